"""CLIP (Hugging Face transformers `clip` and `clip_vision_model` checkpoints).

Layers: `projection` (the image embedding in the joint image-text space, CLIP's
`image_embeds`), `pooled` (the CLS token after the final layer norm, before the projection),
`block_<i>` (the CLS token after transformer block i, before the final layer norm),
`patch_mean` (the mean of the last block's patch tokens, as CLIP's last hidden state gives them).

`Preprocess` reproduces the Hugging Face CLIP image processor (PIL backend) bit for bit: RGB
conversion (done by `images.load`: transparency composited onto white), bicubic resize of the
shortest edge, centre crop, rescale by 1/255 in float64 then cast to float32, (x - mean) / std.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import images
from pipeline.backbones.base import Backbone, block_index, building, fields, install_output_hooks, read_json
from pipeline.config import ConfigError, ModelSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    # On a GPU: return the crop as uint8 and let `normalize` finish on the device (a quarter of the
    # bytes through the readers' shared memory, pinning and PCIe). The same numbers: not described.
    defer_normalize: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Preprocess:
        """From a `preprocessor_config.json` dict (CLIP-style processors)."""
        size = cfg.get("size", {})
        shortest = size.get("shortest_edge") if isinstance(size, dict) else size
        crop = cfg.get("crop_size", {})
        if not isinstance(crop, dict):
            crop = {"height": crop, "width": crop}
        unsupported = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if cfg.get(k) is False]
        if shortest is None or "height" not in crop or unsupported:
            raise ValueError(
                "only CLIP-style preprocessing (resize shortest edge, centre crop, rescale, normalise) is supported"
            )
        return cls(
            shortest_edge=int(shortest),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            mean=tuple(float(x) for x in cfg["image_mean"]),
            std=tuple(float(x) for x in cfg["image_std"]),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        )

    def describe(self) -> dict:
        """The part of the cache fingerprint that preprocessing contributes."""
        return {
            "shortest_edge": self.shortest_edge,
            "crop": [self.crop_height, self.crop_width],
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
        }

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> float32 array (3, crop_h, crop_w)."""
        w, h = image.size
        new_w, new_h = self.resized_size(w, h)
        if new_w * new_h > images.MAX_PIXELS:
            raise images.Rejected(f"extreme aspect ratio ({w}x{h} pixels would resize to {new_w}x{new_h})")
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        arr = np.asarray(image)
        arr = _center_crop(arr, self.crop_height, self.crop_width)
        if self.defer_normalize:
            return np.ascontiguousarray(arr.transpose(2, 0, 1))  # uint8: `normalize` finishes it
        # A channel of an RGB image (uint8) has 256 values, each put through the processor's
        # arithmetic once (`_table`): looking them up gives its numbers to the bit, faster than
        # computing them per pixel (a reader's time per image 1.85 -> 1.65 ms, taken from the
        # model on a CPU).
        out = np.empty((3, *arr.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self._table[c], arr[..., c], out=out[c])
        return out

    def _normalized(self, values: np.ndarray) -> np.ndarray:
        """The processor's arithmetic: rescale in float64, cast to float32, subtract the mean and
        divide by the std in float32 (values: float64, channels last)."""
        rescaled = (values * self.rescale_factor).astype(np.float32)
        return (rescaled - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)

    @functools.cached_property
    def _table(self) -> np.ndarray:
        """(3, 256) float32: what `_normalized` makes of each uint8 value in each channel."""
        values = np.repeat(np.arange(256, dtype=np.float64)[:, None], 3, axis=1)
        return np.ascontiguousarray(self._normalized(values).T)

    def deferred(self) -> Preprocess:
        """This preprocessing with the rescale and normalisation left to `normalize`."""
        return replace(self, defer_normalize=True)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (n, 3, h, w) from the deferred preprocessing, on any device -> the float32
        batch `__call__` gives, bit for bit: the same operations in the same order and precision
        (rescale in float64, cast to float32, subtract the mean, divide by the std, in float32)."""
        x = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        mean, std = _on_device(self.mean, self.std, pixels.device)
        return (x - mean) / std


@functools.cache
def _on_device(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants as (1, 3, 1, 1) float32 tensors on `device`, made once: making
    them per batch copies from pageable memory, which waits for every batch the GPU has queued."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (mean, std))


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + ch, left : left + cw]
    # Smaller than the crop: zero-pad around it, as the HF processor does.
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, *arr.shape[2:]), dtype=arr.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[tp : tp + h, lp : lp + w] = arr
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


class ClipBackbone(Backbone):
    def __init__(self, net: torch.nn.Module, directory: Path, **kwargs):
        super().__init__(**kwargs)
        self.model = net
        self.directory = directory
        self._text: tuple | None = None

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.vision_model(pixel_values=pixels, output_hidden_states=bool(self.blocks))
        pooled = out.pooler_output
        result: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if layer == "projection":
                result[layer] = self.model.visual_projection(pooled)
            elif layer == "pooled":
                result[layer] = pooled
            elif layer == "patch_mean":
                result[layer] = out.last_hidden_state[:, 1:].mean(1)
            else:
                result[layer] = out.hidden_states[self.blocks[layer] + 1][:, 0]
        return result

    def compile(self, batch_size: int = 0, **options) -> None:
        install_output_hooks(self.model.vision_model)
        super().compile(batch_size, **options)

    @torch.inference_mode()
    def embed_text(self, prompts: list[str]) -> tuple[np.ndarray, dict] | None:
        if self._text is None:
            self._text = _load_text(self.name, self.directory, self.device) or (None,)
        if self._text[0] is None:
            return None
        net, tokenizer, scale = self._text
        limit = net.config.max_position_embeddings  # the tower's limit, whatever the tokenizer says
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = tokens.to(self.device)
        out = net(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        vectors = torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()
        return vectors, {"logit_scale": scale, "logit_bias": 0.0, "scoring": "softmax"}


def load(directory: Path, config: dict, model: ModelSettings, device: torch.device, precision: str) -> ClipBackbone:
    """The vision tower with its projection, from safetensors."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    try:
        preprocess = Preprocess.from_hf_config(read_json(directory / "preprocessor_config.json"))
    except ValueError as exc:
        raise ConfigError(f"model '{model.name}': {exc}.") from None
    with building(model.name, directory):
        if config["model_type"] == "clip":
            # The projection width lives on the full config; the vision sub-config may not carry it.
            full = CLIPConfig.from_pretrained(directory)
            vision_config = full.vision_config
            vision_config.projection_dim = full.projection_dim
        else:
            vision_config = CLIPVisionConfig.from_pretrained(directory)
        net = CLIPVisionModelWithProjection.from_pretrained(directory, config=vision_config, use_safetensors=True)
    net = net.eval().to(device)

    vision = net.config
    n_blocks = vision.num_hidden_layers
    dims: dict[str, int] = {}
    for layer in model.layers:
        block = block_index(layer)
        if layer == "projection":
            dims[layer] = net.config.projection_dim
        elif layer in ("pooled", "patch_mean") or (block is not None and block < n_blocks):
            dims[layer] = vision.hidden_size
        else:
            raise ConfigError(
                f"model.layers has '{layer}'; use projection, pooled, patch_mean or block_0 .. block_{n_blocks - 1}."
            )
    common = fields(
        directory, config, model, device, precision, preprocess.deferred() if device.type == "cuda" else preprocess,
        preprocess.describe(), dims, family="clip", libraries=("transformers",),
    )  # fmt: skip
    return ClipBackbone(net, directory, **common)


def _load_text(name: str, directory: Path, device: torch.device) -> tuple | None:
    """(text tower with projection, tokenizer, logit scale), or None when the checkpoint has no
    text tower or no tokenizer."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

    if read_json(directory / "config.json").get("model_type") != "clip":
        return None
    if not any((directory / n).exists() for n in ("tokenizer.json", "vocab.json")):
        # Without its files AutoTokenizer would build an empty-vocabulary tokenizer: garbage prompts.
        log.warning("model '%s' has no tokenizer files; zero-shot prompts cannot be embedded", name)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        log.warning("model '%s' has no tokenizer; zero-shot prompts cannot be embedded", name)
        return None
    full = CLIPConfig.from_pretrained(directory)
    text_config = full.text_config
    text_config.projection_dim = full.projection_dim
    with building(name, directory):
        net = CLIPTextModelWithProjection.from_pretrained(directory, config=text_config, use_safetensors=True)
    scale = 100.0
    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), framework="np") as f:
            if "logit_scale" in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                scale = float(np.exp(f.get_tensor("logit_scale")))
    return net.eval().to(device), tokenizer, scale
