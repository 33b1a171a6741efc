"""The backbone registry: a family is one module and one registry line, chosen from the
checkpoint's config.json, never from its name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from pipeline import backbones, extract, features, images, manifest, manifest_table, train
from pipeline.config import ConfigError, ModelSettings, load
from pipeline.outputs import Outputs
from tests.conftest import update_params


def toy_checkpoint(directory, dim: int = 5):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "toy"}))
    weight = np.random.default_rng(0).standard_normal((3 * 8 * 8, dim)).astype(np.float32)
    save_file({"weight": weight}, str(directory / "model.safetensors"))
    return directory


def test_a_new_family_is_one_module_and_one_registry_line(project, monkeypatch):
    monkeypatch.setitem(backbones.FAMILIES, "toy", "tests.toy_backbone")
    model = toy_checkpoint(project / "toy-model")
    update_params(project, "model", name=str(model), layers=["pooled"])
    update_params(project, "train", layer="pooled")
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    summary = extract.run(settings, outputs)
    assert summary.layers == {"pooled": 5} and summary.embedded == summary.images
    card = train.run(settings, outputs)
    assert card["layer"] == "pooled"
    # The cache holds what the toy computes for each image, through the extractor's own path.
    table = manifest_table.read(outputs.manifest).slice(0, 3)
    X, found = features.open_cache(outputs).read(table.column("digest").to_pylist(), "pooled")
    backbone = backbones.load(settings.model, "cpu", "fp32")
    files = [manifest_table.absolute_path(p, settings.data_root) for p in table.column("path").to_pylist()]
    pixels = np.stack([images.load(f, backbone.preprocess)[0] for f in files])
    assert found.all()
    np.testing.assert_allclose(X, backbone.embed(torch.from_numpy(pixels))["pooled"], rtol=1e-6)


def test_an_unknown_family_is_named_with_the_supported_ones(tmp_path):
    model = tmp_path / "blip"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        backbones.load(ModelSettings(name=str(model)), "cpu", "fp32")
    message = str(err.value)
    assert "'blip'" in message and "siglip" in message and "open_clip and timm" in message
