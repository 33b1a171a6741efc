"""Hugging Face transformers families beside CLIP: SigLIP, SigLIP2 (NaFlex), DINOv2 (with and
without registers), DINOv3 ViT and MetaCLIP-2, loaded from safetensors with their own classes.

Preprocessing is the family's own image processor, called on each image (its PIL backend where
transformers has one, so the numbers do not depend on whether torchvision is installed; DINOv3
has only the torchvision backend). Layers, as for every family:
  projection   the image embedding in the joint image-text space: MetaCLIP-2's projected CLS,
               SigLIP's attention-pool head output (its image features); DINO has none
  pooled       CLS after the final norm (MetaCLIP-2, DINO); SigLIP's attention-pool head output
  block_<i>    the CLS token after block i; SigLIP has no CLS token: the mean of the patch tokens
  patch_mean   the mean of the last block's patch tokens after the final norm (registers excluded)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import images
from pipeline.backbones.base import Backbone, block_index, building, fields, install_output_hooks
from pipeline.config import ConfigError, ModelSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    model_class: str  # the transformers class of the published checkpoint
    cls_token: bool  # False: no CLS token, block_<i> is the mean of the patch tokens
    projection: str | None  # "visual_projection" | "pooled" | None (no joint image-text space)
    zero_shot: str | None  # how text prompts score: "softmax" | "sigmoid" | None (vision only)


KINDS = {
    "siglip": Kind("SiglipModel", cls_token=False, projection="pooled", zero_shot="sigmoid"),
    "siglip2": Kind("Siglip2Model", cls_token=False, projection="pooled", zero_shot="sigmoid"),
    "metaclip_2": Kind("MetaClip2Model", cls_token=True, projection="visual_projection", zero_shot="softmax"),
    "dinov2": Kind("Dinov2Model", cls_token=True, projection=None, zero_shot=None),
    "dinov2_with_registers": Kind("Dinov2WithRegistersModel", cls_token=True, projection=None, zero_shot=None),
    "dinov3_vit": Kind("DINOv3ViTModel", cls_token=True, projection=None, zero_shot=None),
}


class Processor:
    """The family's own image processor, one RGB image at a time -> pixel_values (3, h, w), or a
    dict of arrays for processors with several outputs (SigLIP2's patches, mask and shape)."""

    def __init__(self, directory: Path):
        from transformers import AutoImageProcessor

        try:
            self.processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
        except Exception:  # a family with only a torchvision processor (DINOv3)
            self.processor = AutoImageProcessor.from_pretrained(directory)
        self.backend = "pil" if type(self.processor).__name__.endswith("Pil") else "torchvision"
        size = getattr(self.processor, "size", None) or {}
        self.shortest_edge = size.get("shortest_edge") if isinstance(size, dict) else None

    def describe(self) -> dict:
        return {"backend": self.backend, **json.loads(self.processor.to_json_string())}

    def __call__(self, image: Image.Image) -> np.ndarray | dict[str, np.ndarray]:
        if self.shortest_edge:
            images.check_resize(image.size, self.shortest_edge)
        out = self.processor(images=image, return_tensors="np")
        arrays = {k: np.asarray(v[0]) for k, v in out.items()}
        if list(arrays) == ["pixel_values"]:
            return np.ascontiguousarray(arrays["pixel_values"], dtype=np.float32)
        return arrays


class HFBackbone(Backbone):
    def __init__(self, net: torch.nn.Module, kind: Kind, directory: Path, n_prefix: int, **kwargs):
        super().__init__(**kwargs)
        self.net, self.kind, self.directory, self.n_prefix = net, kind, directory, n_prefix
        self.vision = getattr(net, "vision_model", net)
        self._text = None

    def forward(self, pixels) -> dict[str, torch.Tensor]:
        inputs = pixels if isinstance(pixels, dict) else {"pixel_values": pixels}
        out = self.vision(**inputs, output_hidden_states=bool(self.blocks))
        mask = inputs.get("pixel_attention_mask")  # SigLIP2: which patch slots hold the image

        def patches(hidden: torch.Tensor) -> torch.Tensor:
            tokens = hidden[:, self.n_prefix :]
            if mask is None:
                return tokens.mean(1)
            weights = mask.to(tokens.dtype)[..., None]
            return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)

        result: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if layer == "projection":
                pooled = out.pooler_output
                result[layer] = (
                    self.net.visual_projection(pooled) if self.kind.projection == "visual_projection" else pooled
                )
            elif layer == "pooled":
                result[layer] = out.pooler_output
            elif layer == "patch_mean":
                result[layer] = patches(out.last_hidden_state)
            else:
                hidden = out.hidden_states[self.blocks[layer] + 1]
                result[layer] = hidden[:, 0] if self.kind.cls_token else patches(hidden)
        return result

    def compile(self, batch_size: int = 0, **options) -> None:
        install_output_hooks(self.vision)
        super().compile(batch_size, **options)

    @torch.inference_mode()
    def embed_text(self, prompts: list[str]) -> tuple[np.ndarray, dict] | None:
        if self.kind.zero_shot is None:
            return None
        if self._text is None:
            self._text = _tokenizer(self.name, self.directory) or False
        if self._text is False:
            return None
        if self.kind.zero_shot == "sigmoid":
            # SigLIP was trained on prompts padded to 64 tokens, the padding attended (its processor
            # passes no attention mask): embed them the same way.
            tokens = self._text(prompts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
            keep = ("input_ids",)
        else:
            tokens = self._text(prompts, padding=True, truncation=True, return_tensors="pt")
            keep = ("input_ids", "attention_mask")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in keep}
        out = self.net.get_text_features(**tokens)
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        scale = float(self.net.logit_scale.exp())
        bias = float(self.net.logit_bias) if getattr(self.net, "logit_bias", None) is not None else 0.0
        vectors = torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
        return vectors, {"logit_scale": scale, "logit_bias": bias, "scoring": self.kind.zero_shot}


def _tokenizer(name: str, directory: Path):
    from transformers import AutoTokenizer

    if not any((directory / n).exists() for n in ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")):
        log.warning("model '%s' has no tokenizer files; zero-shot prompts cannot be embedded", name)
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        log.warning("model '%s' has no usable tokenizer (%s); zero-shot prompts cannot be embedded", name, exc)
        return None


def load(directory: Path, config: dict, model: ModelSettings, device: torch.device, precision: str) -> HFBackbone:
    import transformers

    kind = KINDS[config["model_type"]]
    try:
        preprocess = Processor(directory)
    except Exception as exc:
        raise ConfigError(
            f"model '{model.name}': its image processor could not be built from {directory} ({exc}); "
            "check preprocessor_config.json against the original checkpoint."
        ) from None
    with building(model.name, directory):
        net = getattr(transformers, kind.model_class).from_pretrained(directory, use_safetensors=True)
    net = net.eval().to(device)
    vision_config = getattr(net.config, "vision_config", net.config)
    n_blocks, width = vision_config.num_hidden_layers, vision_config.hidden_size
    n_prefix = (1 + getattr(vision_config, "num_register_tokens", 0)) if kind.cls_token else 0
    projection_dim = getattr(net.config, "projection_dim", width) if kind.projection == "visual_projection" else width
    dims: dict[str, int] = {}
    allowed = (["projection"] if kind.projection else []) + ["pooled", "patch_mean", f"block_0 .. block_{n_blocks - 1}"]
    for layer in model.layers:
        block = block_index(layer)
        if layer == "projection" and kind.projection:
            dims[layer] = projection_dim
        elif layer in ("pooled", "patch_mean") or (block is not None and block < n_blocks):
            dims[layer] = width
        else:
            raise ConfigError(
                f"model.layers has '{layer}', which a {config['model_type']} model does not have; "
                f"use {', '.join(allowed)}."
            )
    common = fields(
        directory, config, model, device, precision, preprocess, preprocess.describe(), dims,
        family=config["model_type"], libraries=("transformers",),
    )  # fmt: skip
    return HFBackbone(net, kind, directory, n_prefix, **common)
