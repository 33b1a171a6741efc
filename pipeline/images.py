"""Safe image decoding and the backbone's preprocessing; failures are values, not exceptions.

`Preprocess` reproduces the Hugging Face CLIP image processor (PIL backend) bit for bit:
RGB conversion (transparency composited onto white), bicubic resize of the shortest edge,
centre crop, rescale by 1/255 in float64 then cast to float32, and (x - mean) / std.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Refuse decompression bombs: at most this many pixels (a 16k x 8k frame is already absurd),
# decoded or after the resize (a 1 x 2,000,000 strip would become 224 x 448,000,000).
MAX_PIXELS = 128_000_000
# The reason recorded for a file whose bytes are not the ones the manifest hashed.
CHANGED = "changed since the manifest was built"


@dataclass(frozen=True)
class Preprocess:
    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

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
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        arr = np.asarray(image)
        arr = _center_crop(arr, self.crop_height, self.crop_width)
        arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        arr = (arr - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (the HF processor's convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255; scale to 8 bits instead.
        arr = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((arr >> 8).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file; a FIFO or device named like an image is refused, never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def load(path: Path, preprocess: Preprocess, digest: str | None = None) -> tuple[np.ndarray | None, str | None]:
    """Decode and preprocess one file -> (array, None) or (None, reason it failed).

    With `digest`, the bytes decoded are the bytes hashed: a file whose sha256 is not `digest`
    (it changed after the manifest hashed it) comes back as the reason CHANGED, not decoded."""
    try:
        data = read_regular_file(path)
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            return None, CHANGED
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    return None, f"image too large ({im.width}x{im.height} pixels)"
                new_w, new_h = preprocess.resized_size(im.width, im.height)
                if new_w * new_h > MAX_PIXELS:
                    return None, f"extreme aspect ratio ({im.width}x{im.height} pixels would resize to {new_w}x{new_h})"
                im.load()
                rgb = to_rgb(im)
        return preprocess(rgb), None
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "not a regular file"
    except MemoryError:
        return None, "image too large to decode in memory"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large (decompression bomb)"
    except Image.UnidentifiedImageError:
        return None, "not an image (unrecognised format)"
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        return None, f"unreadable image ({exc})"
