"""Stale caches impossible: the embedding code is versioned, and this golden test fails whenever a
change alters the numbers without bumping `backbones.EMBEDDING_VERSION` (which is part of every
cache fingerprint, so a bump sends old caches out of the way instead of mixing them in).

The model is a tiny CLIP whose weights come from numpy's generator (not torch's, which may
change between releases), the images are PNGs drawn from a fixed seed, and the numbers are
computed through the extractor's own path: decode, preprocess, backbone, every kind of layer.

After an intended change of the numbers: bump EMBEDDING_VERSION, then regenerate with
`python -m tests.test_golden`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import backbones, demo, images
from pipeline.config import ModelSettings

GOLDEN = Path(__file__).parent / "golden" / "embeddings.json"
LAYERS = ["projection", "pooled", "block_0"]


def golden_model(directory: Path) -> Path:
    """The demo's tiny CLIP, its weights replaced by numpy draws from a fixed seed."""
    from safetensors.numpy import load_file, save_file

    demo.make_tiny_clip(directory)
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    rng = np.random.default_rng(2024)
    for name in sorted(tensors):
        shape = tensors[name].shape
        is_norm_scale = "norm" in name and name.endswith("weight")
        values = (1.0 if is_norm_scale else 0.0) + rng.normal(0.0, 0.05, size=shape)
        tensors[name] = np.asarray(values, dtype=tensors[name].dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return directory


def golden_images() -> list[bytes]:
    """Three PNGs: non-square RGB, grayscale smaller than the crop, RGBA (composited on white)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for shape, mode in (((72, 64, 3), "RGB"), ((40, 50), "L"), ((90, 120, 4), "RGBA")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def compute(tmp: Path) -> dict[str, list]:
    backbone = backbones.load(ModelSettings(name=str(golden_model(tmp / "model")), layers=LAYERS), "cpu", "fp32")
    arrays = []
    for i, data in enumerate(golden_images()):
        path = tmp / f"{i}.png"
        path.write_bytes(data)
        array, error = images.load(path, backbone.preprocess)
        assert error is None, error
        arrays.append(array)
    import torch

    embedded = backbone.embed(torch.from_numpy(np.stack(arrays)))
    return {layer: embedded[layer].tolist() for layer in LAYERS}


def test_the_numbers_only_change_with_the_embedding_version(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["embedding_version"] == backbones.EMBEDDING_VERSION, (
        f"EMBEDDING_VERSION is {backbones.EMBEDDING_VERSION} but the golden file was made with "
        f"{golden['embedding_version']}: regenerate it with `python -m tests.test_golden`."
    )
    got = compute(tmp_path)
    for layer in LAYERS:
        expected = np.array(golden["layers"][layer])
        if not np.allclose(got[layer], expected, rtol=1e-4, atol=1e-5):
            pytest.fail(
                f"the '{layer}' embeddings of the golden images changed (max difference "
                f"{np.abs(np.array(got[layer]) - expected).max():.3g}) while EMBEDDING_VERSION stayed "
                f"{backbones.EMBEDDING_VERSION}: caches made before this change would be read as if made by it. "
                "Bump EMBEDDING_VERSION in pipeline/backbones/base.py, then `python -m tests.test_golden`."
            )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        layers = compute(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"embedding_version": backbones.EMBEDDING_VERSION, "layers": layers}) + "\n")
    print(f"wrote {GOLDEN}")
