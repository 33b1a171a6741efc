"""Robustness perturbations (`evaluate.robustness`): test images degraded before preprocessing,
each variant embedded once and cached like any other row under its own key.

A perturbed row's key is the clean key with the perturbation appended, `<key>~<kind>=<level>`
(`abc…~jpeg=60`, `abc…@12~blur=1.5`), so variants are content-addressed beside the clean rows,
which they never change. The degradations follow the robustness studies of the field
(DeeperForensics-1.0, DeepfakeBench):

  jpeg    re-encoded as JPEG at this quality (PIL, 4:2:0)
  blur    Gaussian blur with this standard deviation in pixels
  noise   additive Gaussian noise with this standard deviation in 8-bit levels, seeded by the
          row's key: the same image always gets the same noise
  resize  downscaled (bicubic) until its shorter side has this many pixels, then upscaled back
          to its own size: the detail of a low-resolution copy
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageFilter

SEPARATOR = "~"
KINDS = ("jpeg", "blur", "noise", "resize")


def test_datasets(settings) -> set[str]:
    """The datasets whose test rows the robustness protocol perturbs: the evaluate datasets and
    the real datasets in train.datasets (the rows `heldout` scores)."""
    reals = [d for d in settings.train.datasets if settings.data.datasets[d].label == "real"]
    return set(settings.evaluate.datasets) | set(reals)


def test_keys(settings, table) -> list[str]:
    """The clean keys the robustness protocol perturbs (`test_datasets`' test rows), in manifest order."""
    wanted = test_datasets(settings)
    columns = (table.column(c).to_pylist() for c in ("digest", "dataset", "split"))
    return list(dict.fromkeys(d for d, ds, sp in zip(*columns, strict=True) if sp == "test" and ds in wanted))


def shorter_sides(table, keys: list[str]) -> dict[str, int]:
    """{key: shorter side in pixels} of these manifest rows (a video frame: its video's), as the
    manifest recorded it; rows without a size are left out."""
    wanted = set(keys)
    columns = (table.column(c).to_pylist() for c in ("digest", "width", "height"))
    return {d: min(w, h) for d, w, h in zip(*columns, strict=True) if w and h and d in wanted}


def unchanged(spec: str, side: int | None) -> bool:
    """True where `spec` leaves an image whose shorter side is `side` pixels as it is: a resize to
    a side it has already or exceeds (`apply` then returns the same pixels). Unknown sides: False."""
    kind, level = parse(spec)
    return kind == "resize" and side is not None and side <= level


def variant(row_key: str, spec: str, sides: dict[str, int]) -> str:
    """The cache row that holds `row_key`'s `spec` variant: the clean row itself where `spec`
    leaves the image as it is (`unchanged`; nothing to embed), else `key(row_key, spec)`. `sides`:
    `shorter_sides` of the rows."""
    return row_key if unchanged(spec, sides.get(row_key)) else key(row_key, spec)


def specs(robustness) -> list[str]:
    """Every perturbation `evaluate.robustness` lists, as `<kind>=<level>` strings, in order."""
    return [f"{kind}={level:g}" for kind in KINDS for level in getattr(robustness, kind)]


def embedded_for_evaluate(settings) -> dict:
    """What of `evaluate` and `train` decides what the extract stage embeds: the robustness
    levels and the datasets whose test rows get them, and the zero-shot prompts. Nothing else of
    those sections changes a row of the cache (`scan.write_extract_settings`)."""
    levels = specs(settings.evaluate.robustness)
    return {
        "robustness": levels,
        "robustness_datasets": sorted(test_datasets(settings)) if levels else [],
        "zero_shot_prompts": settings.evaluate.zero_shot.prompts,
    }


def key(row_key: str, spec: str) -> str:
    return f"{row_key}{SEPARATOR}{spec}"


def split(key_: str) -> tuple[str, str | None]:
    """(clean key, perturbation spec or None)."""
    clean, _, spec = key_.partition(SEPARATOR)
    return clean, spec or None


def parse(spec: str) -> tuple[str, float]:
    kind, _, level = spec.partition("=")
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {spec!r}")
    return kind, float(level)


def apply(rgb: Image.Image, spec: str, seed_key: str) -> Image.Image:
    """`rgb` degraded by `spec`; deterministic (noise is seeded by `seed_key`)."""
    kind, level = parse(spec)
    if kind == "jpeg":
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=int(level))
        buffer.seek(0)
        with Image.open(buffer) as im:
            return im.convert("RGB")
    if kind == "blur":
        return rgb.filter(ImageFilter.GaussianBlur(radius=level))
    if kind == "noise":
        seed = int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:8], "little")
        noise = np.random.default_rng(seed).normal(0.0, level, (rgb.height, rgb.width, 3))
        return Image.fromarray((np.asarray(rgb, dtype=np.float64) + noise).round().clip(0, 255).astype(np.uint8))
    w, h = rgb.size  # resize
    factor = min(1.0, level / min(w, h))
    small = rgb.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)
