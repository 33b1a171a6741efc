"""timm checkpoints (`config.json` with `architecture` + `model.safetensors`, as timm publishes
them on the hub), e.g. Perception Encoder, EVA-02 and DINOv2 ViTs. Needs the `timm` extra (and
torchvision).

Model and transform are built by timm itself from the checkpoint's config
(`create_model('local-dir:DIR', pretrained=True)`, `resolve_model_data_config`,
`create_transform`). Layers:
  pooled       the model's pooled pre-logits features (CLS after the final norm, or the
               attention-pool output, as the architecture defines it)
  block_<i>    the CLS token after block i; for models without one, the mean of the patch tokens
  patch_mean   the mean of the patch tokens after the final norm
timm checkpoints carry no text tower: there is no `projection` and no zero-shot.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backbones.base import Backbone, LibraryTransform, block_index, fields, require
from pipeline.config import ConfigError, ModelSettings


def _import():
    timm = require("timm", "a timm", "timm")
    require("timm.data", "a timm", "timm")
    return timm


class TimmBackbone(Backbone):
    def __init__(self, net: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.n_prefix = getattr(net, "num_prefix_tokens", 0)
        self.has_cls = getattr(net, "cls_token", None) is not None

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = sorted(set(self.blocks.values()))
        by_block = {}
        if blocks:
            hidden = self.net.forward_intermediates(
                pixels, indices=blocks, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
            )
            for i, (spatial, prefix) in zip(blocks, hidden, strict=True):
                by_block[i] = prefix[:, 0] if self.has_cls else spatial.mean(1)
        features = self.net.forward_features(pixels)
        result = {}
        for layer in self.layers:
            if layer == "pooled":
                result[layer] = self.net.forward_head(features, pre_logits=True)
            elif layer == "patch_mean":
                result[layer] = features[:, self.n_prefix :].mean(1)
            else:
                result[layer] = by_block[self.blocks[layer]]
        return result


def load(directory: Path, config: dict, model: ModelSettings, device: torch.device, precision: str) -> TimmBackbone:
    timm = _import()
    if not (directory / "model.safetensors").is_file():
        raise ConfigError(
            f"timm checkpoint {directory} has no model.safetensors; timm loads its weights from that file."
        )
    try:
        net = timm.create_model(f"local-dir:{directory}", pretrained=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"timm could not build '{model.name}' from {directory} ({first}).") from None
    net = net.eval().to(device)
    data_config = timm.data.resolve_model_data_config(net)
    transform = timm.data.create_transform(**data_config, is_training=False)
    n_blocks = len(getattr(net, "blocks", []))
    for layer in model.layers:
        block = block_index(layer)
        if not (layer in ("pooled", "patch_mean") or (block is not None and block < n_blocks)):
            allowed = "pooled, patch_mean" + (f", block_0 .. block_{n_blocks - 1}" if n_blocks else "")
            raise ConfigError(f"model.layers has '{layer}', which this timm model does not have; use {allowed}.")
    with torch.inference_mode():  # the widths, as the model computes them
        sizing = TimmBackbone(net, name=model.name, preprocess=None, layers=list(model.layers), dims={},
                              device=device, precision="fp32", description={})  # fmt: skip
        dims = {
            k: v.shape[-1] for k, v in sizing.forward(torch.zeros(1, *data_config["input_size"], device=device)).items()
        }
    described = {
        "transform": str(transform),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }
    preprocess = LibraryTransform(transform, min(data_config["input_size"][1:]))
    common = fields(
        directory, config, model, device, precision, preprocess, described, dims,
        family="timm", libraries=("timm", "torchvision"),
    )  # fmt: skip
    return TimmBackbone(net, **common)
