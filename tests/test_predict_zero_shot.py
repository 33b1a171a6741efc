"""predict scores files with a trained probe, reusing the cache; zero-shot scores by prompts."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline import cli, config, evaluate, extract, images, manifest, train
from pipeline.outputs import Outputs
from pipeline.store import caches, text
from pipeline.store.shard import ShardData
from tests.conftest import update_params
from tests.test_probes_metrics import synthetic_frames, synthetic_settings


@pytest.fixture
def trained(project):
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    extract.run(settings, outputs)
    train.run(settings, outputs)
    return project


def test_predict_reuses_the_cache_and_keeps_new_images_out_of_the_tracked_one(trained, tmp_path, caplog, capsys):
    """predict scores files already in the cache without embedding them again, embeds the others
    into an untracked layer, and hashes the files in threads with a progress bar, as the manifest
    does (a folder of 5,000 videos is minutes of reading)."""
    caplog.set_level(logging.INFO)
    folder = tmp_path / "incoming"
    folder.mkdir()
    known = sorted((trained / "data" / "Test_Fake" / "Deepfakes").rglob("*.png"))[:3]
    for i, p in enumerate(known):
        shutil.copy(p, folder / f"renamed_{i}.png")  # same bytes, other names: already embedded
    Image.new("RGB", (80, 70), (200, 10, 10)).save(folder / "new.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "predictions.csv"
    tracked = sorted(p.relative_to(trained) for p in (trained / "cache").rglob("*") if p.is_file())
    tracked_bytes = [(trained / p).read_bytes() for p in tracked]

    capsys.readouterr()
    code = cli.main(["predict", str(folder), "--params", str(trained / "params.yaml"), "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert re.search(r"hashing: +0%\|[^|]*\| 0/5 ", err), "the files are hashed with a progress bar"
    assert "embedding 2 images not in the cache (3 already there)" in caplog.text
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"renamed_0.png", "renamed_1.png", "renamed_2.png", "new.jpg", "broken.png"}
    for name in ("renamed_0.png", "new.jpg"):
        assert 0.0 <= float(rows[name]["score"]) <= 1.0 and rows[name]["label"] in ("real", "fake")
    assert rows["broken.png"]["score"] == "" and "not an image" in rows["broken.png"]["error"]
    now = sorted(p.relative_to(trained) for p in (trained / "cache").rglob("*") if p.is_file())
    assert [p for p in now if p.parts[1] != "predict"] == tracked, "the DVC-tracked cache is untouched"
    assert [(trained / p).read_bytes() for p in tracked] == tracked_bytes, "so `dvc repro` reruns nothing"
    (layer,) = caches(trained / "cache" / "predict")
    assert layer.count() == 1, "the new image went to the untracked predict layer"

    caplog.clear()
    assert cli.main(["predict", str(folder), "--params", str(trained / "params.yaml"), "--out", str(out)]) == 0
    assert "embedding" not in caplog.text, "a second predict embeds nothing"


def test_predict_embeds_an_image_an_older_cache_recorded_as_not_found(trained, tmp_path):
    # 'file not found' says nothing about an image (a machine without it wrote it, before such
    # records were refused): predict embeds the image, as extract retries it.
    image = tmp_path / "new.png"
    Image.new("RGB", (80, 70), (10, 200, 10)).save(image)
    (store,) = caches(trained / "cache" / "embeddings")
    digest = images.inspect_file(image).digest
    dims = store.header.dims
    store.commit(
        ShardData([digest], ["x.png"], ["file not found"], {k: np.zeros((1, d), np.float32) for k, d in dims.items()})
    )
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(image), "--params", str(trained / "params.yaml"), "--out", str(out)]) == 0
    (row,) = csv.DictReader(out.open())
    assert row["error"] == "" and 0.0 <= float(row["score"]) <= 1.0


def test_predict_finds_files_as_the_manifest_does_through_linked_folders(tmp_path):
    from pipeline import predict

    frames = tmp_path / "elsewhere" / "000_003"
    frames.mkdir(parents=True)
    for name in ("0001.png", "0000.PNG", "._0000.png"):  # the last: macOS metadata, not an image
        Image.new("RGB", (8, 8)).save(frames / name, format="PNG")
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "000_003").symlink_to(frames, target_is_directory=True)  # frames linked in, as datasets often are
    Image.new("RGB", (8, 8)).save(folder / "b.jpg")
    found = [p.relative_to(folder).as_posix() for p in predict.collect([folder, folder / "b.jpg"])]
    assert found == ["000_003/0000.PNG", "000_003/0001.png", "b.jpg"]


def test_predict_to_a_folder_says_to_name_a_file_before_any_work(trained, tmp_path, capsys):
    Image.new("RGB", (80, 70), (1, 2, 3)).save(tmp_path / "x.png")
    code = cli.main(
        ["predict", str(tmp_path / "x.png"), "--params", str(trained / "params.yaml"), "--out", str(tmp_path)]
    )
    assert code == 2
    assert (
        f"--out {tmp_path} is a folder; name the CSV file, e.g. {tmp_path / 'predictions.csv'}"
        in capsys.readouterr().err
    )
    assert not (trained / "cache" / "predict").exists(), "nothing embedded"


def test_predict_refuses_a_model_that_does_not_match_the_probes_cache(trained, tmp_path, capsys):
    update_params(trained, "extract", precision="bf16")
    Image.new("RGB", (80, 70), (1, 2, 3)).save(tmp_path / "x.png")
    code = cli.main(
        ["predict", str(tmp_path / "x.png"), "--params", str(trained / "params.yaml"), "--out", str(tmp_path / "p.csv")]
    )
    assert code == 2
    assert "do not reproduce the probe's cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "scoring",
    [
        {"logit_scale": 100.0, "logit_bias": 0.0, "scoring": "softmax"},  # CLIP, MetaCLIP, open_clip
        {"logit_scale": 10.0, "logit_bias": -10.0, "scoring": "sigmoid"},  # SigLIP's initial scale and bias
    ],
)
def test_zero_shot_scores_by_the_nearest_prompt(tmp_path, scoring):
    frames = synthetic_frames(dim=6)
    # Text embeddings: "real" points along feature 5, "fake" along feature 0 (where fs fakes are shifted).
    real_vec, fake_vec = np.eye(6)[5], np.eye(6)[0]
    text.add(tmp_path, {"a real face": real_vec, "a fake face": fake_vec}, scoring)
    settings = synthetic_settings(zero_shot={"prompts": {"real": ["a real face"], "fake": ["a fake face"]}})
    results = evaluate.zero_shot(settings, SimpleNamespace(directory=tmp_path), frames, ["real"])
    assert results["fs"]["frame"]["auc"] > 0.75  # fs fakes lie towards the fake prompt (swapped: ~0.15)
    assert 0.3 < results["nt"]["frame"]["auc"] < 0.7  # nt's shift is orthogonal to both prompts


def test_zero_shot_without_embedded_prompts_says_to_rerun_extract(tmp_path):
    settings = synthetic_settings()
    with pytest.raises(config.ConfigError, match="re-run extract"):
        evaluate.zero_shot(settings, SimpleNamespace(directory=tmp_path), synthetic_frames(), ["real"])


def test_extract_embeds_the_prompts_of_the_demo_model(trained):
    (store,) = caches(trained / "cache" / "embeddings")
    prompts = config.load(trained / "params.yaml").evaluate.zero_shot.prompts
    real, fake, scoring = text.read(store.directory, prompts["real"], prompts["fake"])
    assert real.shape == (1, 32) and fake.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(fake, axis=1), 1.0, rtol=1e-5)
    assert scoring["logit_scale"] == pytest.approx(np.exp(2.6592), rel=1e-3)  # CLIP's initial logit scale
    assert scoring["scoring"] == "softmax" and scoring["logit_bias"] == 0.0


def test_a_model_without_tokenizer_files_still_extracts_and_stores_no_prompts(project, tmp_path, tiny_clip, caplog):
    no_tokenizer = tmp_path / "clip-without-tokenizer"
    shutil.copytree(tiny_clip, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    update_params(project, "model", name=str(no_tokenizer))
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    summary = extract.run(settings, outputs)
    assert summary.embedded == summary.images
    assert "has no tokenizer files" in caplog.text
    (store,) = caches(outputs.embeddings)
    assert text.prompts_in(store.directory) == set()
    train.run(settings, outputs)
    results = evaluate.run(settings, outputs)  # zero_shot is in the default protocols
    assert "zero_shot protocol skipped" in caplog.text and "re-run extract" in caplog.text
    assert results["heldout"] and json.loads(outputs.protocol_metrics("zero_shot").read_text()) == {}
