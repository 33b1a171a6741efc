"""Decoding and preprocessing: bit-exact with the Hugging Face processor; bad files are values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from pipeline import images
from pipeline.backbones.clip import Preprocess


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8))
        return Image.merge("RGBA", (*rgb.split(), alpha))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
@pytest.mark.parametrize("size", [(72, 64), (64, 72), (200, 90), (64, 64), (40, 30)])
def test_preprocessing_is_bit_exact_with_the_hf_processor(tiny_clip, tmp_path, mode, size):
    hf = AutoImageProcessor.from_pretrained(
        tiny_clip, backend="pil"
    )  # the reference: torchvision's is not bit-identical
    ours = Preprocess.from_hf_config(json.loads((tiny_clip / "preprocessor_config.json").read_text()))
    im = random_image(mode, size)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"x{suffix}"
    im.save(path)
    array, error = images.load(path, ours)
    assert error is None
    with Image.open(path) as reloaded:
        expected = hf(images=reloaded, return_tensors="np")["pixel_values"][0]
    assert array.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(array, expected)


def test_every_pixel_value_of_every_channel_is_normalised_as_the_processor_does(tiny_clip, tmp_path):
    """The rescale and normalisation are looked up per uint8 value: all 768 entries, against the
    processor, on an image of the crop's size (nothing resized)."""
    config = json.loads((tiny_clip / "preprocessor_config.json").read_text())
    ours = Preprocess.from_hf_config(config)
    side = ours.crop_height
    values = np.arange(side * side * 3) % 256
    pixels = np.stack([values[: side * side], values[::-1][: side * side], (values[: side * side] * 7) % 256], -1)
    assert all(len(np.unique(pixels[..., c])) == 256 for c in range(3)), "every value in every channel"
    path = tmp_path / "all.png"
    Image.fromarray(pixels.reshape(side, side, 3).astype(np.uint8)).save(path)
    array, error = images.load(path, ours)
    hf = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")
    with Image.open(path) as reloaded:
        expected = hf(images=reloaded, return_tensors="np")["pixel_values"][0]
    assert error is None and ours.crop_width == side and ours.shortest_edge == side
    np.testing.assert_array_equal(array, expected)


def test_a_crop_larger_than_the_resized_image_is_zero_padded_as_the_processor_pads(tiny_clip, tmp_path):
    """A processor whose crop is larger than its shortest edge (or than one side) pads the image
    with zeros around it before normalising: ours pads as it does, odd margins included."""
    config = json.loads((tiny_clip / "preprocessor_config.json").read_text())
    config.update(size={"shortest_edge": 20}, crop_size={"height": 27, "width": 25})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    hf = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    ours = Preprocess.from_hf_config(config)
    for size in [(72, 64), (20, 23), (19, 61), (200, 90)]:
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        random_image("RGB", size).save(path)
        array, error = images.load(path, ours)
        with Image.open(path) as reloaded:
            expected = hf(images=reloaded, return_tensors="np")["pixel_values"][0]
        assert error is None and array.shape == expected.shape == (3, 27, 25)
        np.testing.assert_array_equal(array, expected, err_msg=str(size))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tiny_clip, tmp_path):
    ours = Preprocess.from_hf_config(json.loads((tiny_clip / "preprocessor_config.json").read_text()))
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "16bit.png")
    array, error = images.load(tmp_path / "16bit.png", ours)
    assert error is None
    assert array[0].max() - array[0].min() > 3.0  # a full-range ramp, not a saturated white image


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "unrecognised format"),
        (b"this is a text file pretending to be an image", "unrecognised format"),
        ("truncated", "unreadable image"),
    ],
)
def test_bad_files_come_back_as_reasons(tiny_clip, tmp_path, content, reason):
    ours = Preprocess.from_hf_config(json.loads((tiny_clip / "preprocessor_config.json").read_text()))
    path = tmp_path / "bad.png"
    if content == "truncated":
        random_image("RGB", (64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    array, error = images.load(path, ours)
    assert array is None
    assert reason in error


def test_decompression_bombs_are_refused(tiny_clip, tmp_path, monkeypatch):
    ours = Preprocess.from_hf_config(json.loads((tiny_clip / "preprocessor_config.json").read_text()))
    random_image("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5_000)
    array, error = images.load(tmp_path / "big.png", ours)
    assert array is None and "too large" in error
