"""A backbone family written the way a new one is added: this module plus one line in
`pipeline.backbones.FAMILIES` (tests/test_backbones.py adds the line). It mean-pools an 8 x 8
thumbnail through a fixed random matrix from the checkpoint's safetensors file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file

from pipeline.backbones.base import Backbone, describe
from pipeline.config import ConfigError, ModelSettings

SIDE = 8


def preprocess(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class ToyBackbone(Backbone):
    def __init__(self, weight: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.weight = weight.to(self.device)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": pixels.flatten(1) @ self.weight}


def load(directory: Path, config: dict, model: ModelSettings, device: torch.device, precision: str) -> ToyBackbone:
    if list(model.layers) != ["pooled"]:
        raise ConfigError(f"model.layers has {model.layers}; the toy family has only 'pooled'.")
    weight = torch.from_numpy(load_file(str(directory / "model.safetensors"))["weight"])
    return ToyBackbone(
        weight,
        name=model.name,
        preprocess=preprocess,
        layers=["pooled"],
        dims={"pooled": weight.shape[1]},
        device=device,
        precision=precision,
        description=describe(directory, config, {"side": SIDE}, model, precision, family="toy", libraries={}),
    )
