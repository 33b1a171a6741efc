"""open_clip checkpoints as published on the hub (`open_clip_config.json` +
`open_clip_model.safetensors`): LAION, DataComp, MetaCLIP, EVA-CLIP and SigLIP models trained
or converted with open_clip. Needs the `open_clip` extra (and torchvision).

Model and preprocessing are built by open_clip itself from the checkpoint's config
(`create_model_and_transforms('local-dir:DIR')`). Layers:
  projection   `encode_image`: the image embedding in the joint image-text space
  pooled       the pooled token before the projection (CLS after `ln_post` for open_clip's ViT;
               the trunk's pooled output for towers built on timm, e.g. EVA)
  block_<i>    the CLS token after block i (open_clip's ViT)
  patch_mean   the mean of the patch tokens after `ln_post` (open_clip's ViT)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones.base import Backbone, LibraryTransform, block_index, fields, require
from pipeline.config import ConfigError, ModelSettings

log = logging.getLogger(__name__)


def _import():
    return require("open_clip", "an open_clip", "open_clip")


class OpenClipBackbone(Backbone):
    def __init__(self, net: torch.nn.Module, directory: Path, **kwargs):
        super().__init__(**kwargs)
        self.net, self.directory = net, directory
        self._tokenizer = None

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        visual = self.net.visual
        if not hasattr(visual, "transformer"):  # a tower built on timm (EVA) or a ResNet
            pooled = visual.trunk(pixels) if hasattr(visual, "trunk") else None
            result = {}
            for layer in self.layers:
                if layer == "projection":
                    result[layer] = visual.head(pooled) if pooled is not None else visual(pixels)
                else:
                    result[layer] = pooled
            return result
        blocks = sorted(set(self.blocks.values()))
        x = visual._embeds(pixels)
        x, hidden = (
            visual.transformer.forward_intermediates(x, indices=blocks) if blocks else (visual.transformer(x), [])
        )
        by_block = dict(zip(blocks, hidden, strict=True))
        pooled, tokens = visual._pool(x)
        result = {}
        for layer in self.layers:
            if layer == "projection":
                result[layer] = pooled @ visual.proj if visual.proj is not None else pooled
            elif layer == "pooled":
                result[layer] = pooled
            elif layer == "patch_mean":
                result[layer] = tokens.mean(1)
            else:
                result[layer] = by_block[self.blocks[layer]][:, 0]
        return result

    @torch.inference_mode()
    def embed_text(self, prompts: list[str]) -> tuple[np.ndarray, dict] | None:
        open_clip = _import()
        if self._tokenizer is None:
            try:
                self._tokenizer = open_clip.get_tokenizer(f"local-dir:{self.directory}")
            except Exception as exc:  # e.g. a tokenizer that would have to be downloaded
                log.warning("model '%s': no tokenizer (%s); zero-shot prompts cannot be embedded", self.name, exc)
                self._tokenizer = False
        if self._tokenizer is False:
            return None
        features = self.net.encode_text(self._tokenizer(prompts).to(self.device))
        bias = getattr(self.net, "logit_bias", None)
        scoring = {
            "logit_scale": float(self.net.logit_scale.exp()),
            "logit_bias": float(bias) if bias is not None else 0.0,
            "scoring": "sigmoid" if bias is not None else "softmax",
        }
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy(), scoring


def load(directory: Path, config: dict, model: ModelSettings, device: torch.device, precision: str) -> OpenClipBackbone:
    open_clip = _import()
    if not (directory / "open_clip_model.safetensors").is_file():
        raise ConfigError(
            f"open_clip checkpoint {directory} has no open_clip_model.safetensors (open_clip would pick another "
            "file); name its safetensors weights open_clip_model.safetensors."
        )
    try:
        net, _, transform = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"open_clip could not build '{model.name}' from {directory} ({first}).") from None
    net = net.eval().to(device)
    visual = net.visual
    size = visual.image_size if isinstance(visual.image_size, int) else min(visual.image_size)
    is_vit = hasattr(visual, "transformer")
    n_blocks = len(visual.transformer.resblocks) if is_vit else 0
    pooled = is_vit or hasattr(visual, "trunk")
    with torch.inference_mode():  # the widths, as the model computes them
        hw = (size, size) if isinstance(visual.image_size, int) else tuple(visual.image_size)
        sizing = OpenClipBackbone(
            net, directory, name=model.name, preprocess=None, layers=["projection"] + (["pooled"] if pooled else []),
            dims={}, device=device, precision="fp32", description={},
        )  # fmt: skip
        shapes = {k: v.shape[-1] for k, v in sizing.forward(torch.zeros(1, 3, *hw, device=device)).items()}
    dims: dict[str, int] = {}
    allowed = list(shapes) + (["patch_mean", f"block_0 .. block_{n_blocks - 1}"] if is_vit else [])
    for layer in model.layers:
        block = block_index(layer)
        if layer in shapes:
            dims[layer] = shapes[layer]
        elif is_vit and (layer == "patch_mean" or (block is not None and block < n_blocks)):
            dims[layer] = visual.transformer.width
        else:
            raise ConfigError(
                f"model.layers has '{layer}', which this open_clip model does not have; use {', '.join(allowed)}."
            )
    common = fields(
        directory, config, model, device, precision, LibraryTransform(transform, size), {"transform": str(transform)},
        dims, family="open_clip", libraries=("open_clip_torch", "timm", "torchvision"),
    )  # fmt: skip
    return OpenClipBackbone(net, directory, **common)
