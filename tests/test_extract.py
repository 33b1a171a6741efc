"""The extractor: embeds what the cache lacks, matches the model, survives bad images."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel

from pipeline import config, extract, manifest
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore
from tests.conftest import update_params


def run_stages(project, **kwargs):
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    return extract.run(settings, outputs, **kwargs), outputs


def test_plan_is_wanted_minus_done_minus_failed():
    wanted = ["a", "b", "a", "c", "d"]
    assert extract.plan(wanted, done={"b"}, failed={"d"}) == ["a", "c"]
    assert extract.plan(wanted, done={"b"}, failed={"d"}, retry_failed=True) == ["a", "c", "d"]


def test_every_image_is_embedded_once_and_matches_clip(project, tiny_clip):
    summary, outputs = run_stages(project)
    table = pq.read_table(outputs.manifest).to_pandas()
    assert summary["images"] == summary["embedded"] == table.digest.nunique()
    assert summary["failed"] == 0

    store = EmbeddingStore.open(outputs.embeddings / summary["embeddings"])
    sample = table.iloc[[0, 7, len(table) - 1]]
    got, found = store.read(sample.digest.tolist(), "projection")
    assert found.all()

    # Reference: the plain Hugging Face way, one image at a time.
    model = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_clip)
    for row, embedding in zip(sample.itertuples(), got, strict=True):
        with Image.open(project / "data" / row.path) as im:
            pixels = processor(images=im, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pooled = model.vision_model(pixel_values=pixels).pooler_output
            expected = model.visual_projection(pooled)[0].numpy()
        np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-5)


def test_a_rerun_embeds_nothing_and_new_images_only_themselves(project, caplog):
    run_stages(project)
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_stages(project)
    assert "0 to embed" in caplog.text

    src = project / "data" / "Train_Real" / "Real_youtube" / "000"
    shutil.copytree(src, project / "data" / "Train_Real" / "Real_youtube" / "900")  # same bytes: no work
    new = project / "data" / "Train_Real" / "Real_youtube" / "901"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (i * 40, 10, 200)).save(new / f"{i:04d}.png")
    caplog.clear()
    summary, _ = run_stages(project)
    assert "3 to embed" in caplog.text
    assert summary["embedded"] == summary["images"]


def test_bad_images_are_recorded_and_the_run_finishes(project, caplog):
    folder = project / "data" / "Train_Real" / "Real_youtube" / "000"
    (folder / "9000.png").write_bytes(b"")
    (folder / "9001.png").write_text("not an image at all")
    good = (folder / "0000.png").read_bytes()
    (folder / "9002.png").write_bytes(good[: len(good) // 3])
    Image.new("RGBA", (72, 64), (10, 20, 30, 128)).save(folder / "9003.png")
    Image.new("L", (72, 64), 77).save(folder / "9004.jpg")

    caplog.set_level(logging.INFO)
    summary, outputs = run_stages(project)
    assert summary["failed"] == 3
    assert summary["embedded"] == summary["images"] - 3
    assert "3 images could not be embedded" in caplog.text
    store = EmbeddingStore.open(outputs.embeddings / summary["embeddings"])
    reasons = sorted(reason for _, reason in store.failures().values())
    assert any("unrecognised format" in r for r in reasons)
    assert any("unreadable image" in r for r in reasons)

    caplog.clear()
    run_stages(project)
    assert "0 to embed" in caplog.text, "failed images are not retried by default"
    caplog.clear()
    run_stages(project, retry_failed=True)
    assert "3 to embed" in caplog.text


def test_batches_larger_than_a_shard_make_several_atomic_shards(project):
    update_params(project, "extract", shard_size=40)
    summary, outputs = run_stages(project)
    store = EmbeddingStore.open(outputs.embeddings / summary["embeddings"])
    shards = store.shard_paths()
    assert len(shards) >= summary["images"] // 48
    assert not [p for p in (store.directory / "shards").iterdir() if p.name.startswith(".tmp")]
    card = json.loads((store.directory / "card.json").read_text())
    assert card["layers"] == ["projection"] and card["dims"] == {"projection": 32}


def test_several_layers_in_one_pass(project):
    update_params(project, "model", layers=["projection", "pooled", "block_1"])
    assert config.load(project / "params.yaml").model.layers == ["projection", "pooled", "block_1"]
    summary, outputs = run_stages(project)
    store = EmbeddingStore.open(outputs.embeddings / summary["embeddings"])
    assert store.header.dims == {"projection": 32, "pooled": 128, "block_1": 128}
    digest = pq.read_table(outputs.manifest).column("digest")[0].as_py()
    pooled, _ = store.read([digest], "pooled")
    block, _ = store.read([digest], "block_1")
    assert not np.allclose(pooled, block)  # pooled = post-layernorm CLS, block_1 = raw CLS


@pytest.mark.parametrize("workers", [2])
def test_worker_processes_give_the_same_embeddings(project, workers):
    summary, outputs = run_stages(project)
    store = EmbeddingStore.open(outputs.embeddings / summary["embeddings"])
    digests = sorted(store.keys())
    single, _ = store.read(digests, "projection")
    shutil.rmtree(outputs.embeddings)
    update_params(project, "extract", num_workers=workers)
    summary, outputs = run_stages(project)
    multi, _ = EmbeddingStore.open(outputs.embeddings / summary["embeddings"]).read(digests, "projection")
    np.testing.assert_array_equal(single, multi)
