"""The protocols a paper reports beyond in-dataset: cross-dataset test sets with their own reals
and an official test list, scored from the cache exactly as scikit-learn would score them."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline import cache_report, evaluate, extract, features, manifest, manifest_table, perturb, probes, train
from pipeline.config import ConfigError, load
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore
from tests.conftest import update_params

CELEB = {"Celeb-real": ("real", 5), "YouTube-real": ("real", 3), "Celeb-synthesis": ("fake", 6)}
LISTED = [
    "1 YouTube-real/00001.mp4",
    "1 Celeb-real/id0_0000.mp4",
    "1 Celeb-real/id1_0003.mp4",
    "0 Celeb-synthesis/id0_id1_0000.mp4",
    "0 Celeb-synthesis/id1_id0_0003.mp4",
    "0 Celeb-synthesis/id0_id1_0004.mp4",
    "0 Celeb-synthesis/id9_id9_0009.mp4",  # not in the dataset: left out with a warning
]


def video_ids(folder: str, n: int) -> list[str]:
    if folder == "YouTube-real":
        return [f"{i:05d}" for i in range(n)]
    if folder == "Celeb-real":
        return [f"id{i % 2}_{i:04d}" for i in range(n)]
    return [f"id{i % 2}_id{1 - i % 2}_{i:04d}" for i in range(n)]


@pytest.fixture
def celeb_project(project):
    """The demo project plus a Celeb-DF-v2-like tree (frame folders, 2 frames a video) and its
    official test list, declared as a cross-dataset test set."""
    root = project / "data" / "Celeb-DF-v2"
    rng = np.random.default_rng(0)
    for folder, (_, n) in CELEB.items():
        for vid in video_ids(folder, n):
            (root / folder / vid).mkdir(parents=True)
            for j in range(2):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / vid / f"{j:04d}.png")
    (root / "List_of_testing_videos.txt").write_text("\n".join(LISTED) + "\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for folder, (label, _) in CELEB.items():
        params["data"]["datasets"][folder.lower()] = {"path": f"Celeb-DF-v2/{folder}", "label": label}
    params["evaluate"]["cross_dataset"] = {
        "celebdf": {"real": ["celeb-real", "youtube-real"], "fake": ["celeb-synthesis"]},
        "celebdf_official": {
            "real": ["celeb-real", "youtube-real"],
            "fake": ["celeb-synthesis"],
            "test_list": "data/Celeb-DF-v2/List_of_testing_videos.txt",
        },
    }
    params["evaluate"]["protocols"] = ["heldout", "cross_dataset"]
    params["evaluate"]["bootstrap"] = 50
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def test_a_cross_dataset_set_is_scored_with_its_own_reals_on_exactly_the_listed_videos(celeb_project, caplog):
    settings, outputs = load(celeb_project / "params.yaml"), Outputs(celeb_project)
    for stage in (manifest, extract, train):
        stage.run(settings, outputs)
    results = evaluate.run(settings, outputs)["cross_dataset"]
    assert "1 of 7 listed test videos are not in the manifest (e.g. celeb-synthesis/id9_id9_0009)" in caplog.text

    # The reference: the saved probe on the cached vectors of the rows picked by hand, every split.
    probe, card = probes.load(outputs.probe)
    table = manifest_table.read(outputs.manifest).to_pandas()
    store = EmbeddingStore.open(outputs.embeddings / json.loads(outputs.extract_summary.read_text())["embeddings"])
    listed = {("celeb-real", "id0_0000"), ("celeb-real", "id1_0003"), ("youtube-real", "00001"),
              ("celeb-synthesis", "id0_id1_0000"), ("celeb-synthesis", "id1_id0_0003"),
              ("celeb-synthesis", "id0_id1_0004")}  # fmt: skip
    for name, rows in (
        ("celebdf", table[table.dataset.isin(["celeb-real", "youtube-real", "celeb-synthesis"])]),
        ("celebdf_official", table[[(d, v) in listed for d, v in zip(table.dataset, table.video, strict=True)]]),
    ):
        vectors, found = store.read(list(rows.digest), card["layer"])
        assert found.all()
        y = rows.label.to_numpy().astype(int)
        expected = roc_auc_score(y, probe.predict_proba(vectors))
        assert results[name]["frame"]["auc"] == pytest.approx(expected, abs=1e-9), name
        assert results[name]["frame"]["n_real"] + results[name]["frame"]["n_fake"] == len(rows)
    assert results["celebdf"]["videos"] == {"real": 8, "fake": 6, "listed": None, "listed_missing": None}
    assert results["celebdf_official"]["videos"] == {"real": 3, "fake": 3, "listed": 7, "listed_missing": 1}
    assert results["celebdf_official"]["frame"]["auc_ci_low"] is not None
    html = (outputs.reports / "index.html").read_text()
    assert "Cross-dataset test sets" in html and "the 7 videos of its official test list" in html
    assert json.loads(outputs.protocol_metrics("cross_dataset").read_text()).keys() == {"celebdf", "celebdf_official"}


def test_cross_dataset_sets_are_checked_before_anything_runs(celeb_project):
    path = celeb_project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for change, message in (
        ({"fake": ["celeb-real"]}, "whose label is real"),
        ({"real": ["real_youtube"]}, "which train.datasets trains on"),
        ({"test_list": "missing.txt"}, "missing.txt does not exist"),
    ):
        broken = json.loads(json.dumps(params))
        broken["evaluate"]["cross_dataset"]["celebdf"].update(change)
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=message):
            load(path)
    bad_list = celeb_project / "data" / "Celeb-DF-v2" / "List_of_testing_videos.txt"
    bad_list.write_text("1 Celeb-synthesis/id0_id1_0000.mp4\n")
    path.write_text(yaml.safe_dump(params))
    settings, outputs = load(path), Outputs(celeb_project)
    for stage in (manifest, extract, train):
        stage.run(settings, outputs)
    with pytest.raises(ConfigError, match="calls celeb-synthesis/id0_id1_0000 real"):
        evaluate.run(settings, outputs)


def test_the_layers_protocol_fits_one_probe_per_cached_layer_and_train_reads_a_concatenation(project):
    layers = ["projection", "pooled", "block_0", "block_1"]  # every block of the tiny CLIP
    update_params(project, "model", layers=layers)
    update_params(project, "evaluate", protocols=["heldout", "layers"], bootstrap=100)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    for stage in (manifest, extract, train):
        stage.run(settings, outputs)
    results = evaluate.run(settings, outputs)
    result = results["layers"]
    assert result["layers"] == layers and result["reference"] == "projection"
    for name, heldout in results["heldout"].items():
        # The projection layer's probe is the train stage's probe: the same AUC, a zero difference.
        assert result["auc"]["projection"][name] == heldout["frame"]["auc"]
        assert result["vs_reference"]["projection"][name]["delta"] == 0.0
        assert not result["vs_reference"]["projection"][name]["significant"]
    trained = [d for d in settings.train.datasets if d in settings.evaluate.datasets]
    others = [d for d in settings.evaluate.datasets if d not in trained]
    for layer in layers:
        assert result["mean_in_domain_auc"][layer] == pytest.approx(np.mean([result["auc"][layer][d] for d in trained]))
        assert result["mean_cross_auc"][layer] == pytest.approx(np.mean([result["auc"][layer][d] for d in others]))
    plot = json.loads(outputs.layers_plot.read_text())
    assert len(plot) == len(layers) * (len(settings.evaluate.datasets) + 2)
    assert "<h2>Layers</h2>" in (outputs.reports / "index.html").read_text()

    # train.layer as a list: the probe reads the layers side by side, each row L2-normalised.
    update_params(project, "train", layer=["pooled", "block_1"])
    settings = load(project / "params.yaml")
    train.run(settings, outputs)
    _, card = probes.load(outputs.probe)
    assert card["layer"] == ["pooled", "block_1"]
    table = manifest_table.read(outputs.manifest)
    store = features.open_cache(outputs)
    digests = table.column("digest").to_pylist()
    X, found = features.read_layers(store, digests, ["pooled", "block_1"])
    parts = [store.read(digests, layer)[0] for layer in ("pooled", "block_1")]
    expected = np.hstack([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts])
    assert found.all() and np.allclose(X, expected, atol=1e-6)
    assert set(evaluate.run(settings, outputs)["heldout"]) == set(settings.evaluate.datasets)


def test_the_report_says_which_model_cache_probe_commit_and_params_made_it(project, capsys):
    import subprocess

    git = lambda *a: subprocess.run(["git", *a], cwd=project, check=True, capture_output=True, text=True)  # noqa: E731
    assert evaluate.git_commit(project) == "not a git repository"
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "params")
    head = git("rev-parse", "HEAD").stdout.strip()
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    for stage in (manifest, extract, train):
        stage.run(settings, outputs)
    capsys.readouterr()
    evaluate.run(settings, outputs)
    assert "cross_manipulation: 100%" in capsys.readouterr().err, "probe fitting shows progress"
    _, card = probes.load(outputs.probe)
    html = (outputs.reports / "index.html").read_text()
    for shown in (card["model"], card["fingerprint"], "projection", "logreg", f"<td>{card['C']}</td>", head):
        assert shown in html, shown
    assert "bootstrap: 1000" in html and "video_pooling: mean" in html, "the run's params"
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n# edited\n")
    assert evaluate.git_commit(project) == f"{head} + uncommitted changes"


def test_blur_and_a_resize_below_the_side_take_out_fine_detail_and_keep_the_size():
    """The two degradations the test below leaves unrun on the demo's 64 px images (it blurs none,
    and resizes to a side above theirs): both take out the finest detail, keep the image's size,
    and pass a smooth image almost as it is."""
    checks = (np.indices((64, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    fine = Image.fromarray(np.stack([checks] * 3, axis=-1))
    ramp = Image.fromarray(np.stack([np.tile(np.linspace(0, 255, 96), (64, 1)).astype(np.uint8)] * 3, axis=-1))
    for spec in ("blur=2", "resize=16"):
        out = perturb.apply(fine, spec, "key")
        assert out.size == fine.size and out.mode == "RGB", spec
        assert np.asarray(out, float).std() < 0.1 * np.asarray(fine, float).std(), f"{spec} kept the detail"
        passed = np.abs(np.asarray(perturb.apply(ramp, spec, "key"), float) - np.asarray(ramp, float))
        assert np.median(passed) < 2, f"{spec} changed a smooth image"


def test_robustness_variants_are_embedded_once_incrementally_deterministically_and_scored(project, caplog):
    from pipeline import backbones

    caplog.set_level(logging.INFO, logger="pipeline.extract")
    update_params(project, "evaluate", protocols=["heldout", "robustness"], robustness={"jpeg": [60], "noise": [10.0]})
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    table = manifest.run(settings, outputs)
    extract.run(settings, outputs)
    n = len(perturb.test_keys(settings, table))
    assert n > 0 and f"robustness: 2 perturbations x {n} test images, 0 cached, {2 * n} to embed" in caplog.text
    caplog.clear()
    extract.run(settings, outputs)
    assert f"{2 * n} cached, 0 to embed" in caplog.text, "a second run embeds nothing"
    caplog.clear()
    update_params(project, "evaluate", robustness={"jpeg": [60, 20], "noise": [10.0], "resize": [4096]})
    settings = load(project / "params.yaml")
    extract.run(settings, outputs)
    assert f"{2 * n} cached, {n} to embed" in caplog.text, "a new level embeds only itself"
    # The demo's images are 64 px on their shorter side: resizing them to 4096 leaves them as they
    # are, so their clean rows serve that level and nothing is embedded for it.
    assert f"resize=4096 leaves all {n} test images as they are: their clean rows serve it" in caplog.text
    cached = features.open_cache(outputs).keys()
    assert not [k for k in cached if k.endswith("~resize=4096")]
    info = cache_report.describe(features.open_cache(outputs), set(table.column("digest").to_pylist()), None)
    assert f"manifest images embedded, 0 failed, and {3 * n} robustness variants of them\n" in info

    # A cached variant is the model's output on the degraded image; noise is seeded by the key.
    store = features.open_cache(outputs)
    key = perturb.test_keys(settings, table)[0]
    path = manifest_table.absolute_path(table.to_pandas().set_index("digest").loc[key, "path"], settings.data_root)
    image = Image.open(path).convert("RGB")
    noisy = perturb.apply(image, "noise=10", perturb.key(key, "noise=10"))
    assert np.array_equal(np.asarray(noisy), np.asarray(perturb.apply(image, "noise=10", perturb.key(key, "noise=10"))))
    assert not np.array_equal(np.asarray(noisy), np.asarray(perturb.apply(image, "noise=10", "another key")))
    backbone = backbones.load(settings.model, "cpu", "fp32")
    expected = backbone.embed(torch.from_numpy(backbone.preprocess(noisy)[None]))["projection"][0]
    cached, found = store.read([perturb.key(key, "noise=10"), key], "projection")
    assert found.all() and not np.allclose(cached[0], cached[1]), "the clean row is untouched and differs"
    np.testing.assert_allclose(cached[0], expected, rtol=1e-4, atol=1e-5)

    # The protocol: the trained probe on exactly the degraded test rows, as scikit-learn scores them.
    train.run(settings, outputs)
    caplog.set_level(logging.INFO, logger="pipeline.evaluate")
    result = evaluate.run(settings, outputs)["robustness"]
    # Images no larger than a resize level are left as they are: said, since that level's AUC is the clean one.
    assert f"resize=4096 leaves all {n} test images unchanged" in caplog.text
    assert result["resize"]["4096"] == result["clean"]
    probe, _ = probes.load(outputs.probe)
    rows = table.to_pandas()
    reals = rows[(rows.dataset == "real_youtube") & (rows.split == "test")]
    for name in settings.evaluate.datasets:
        test = pd.concat([reals, rows[(rows.dataset == name) & (rows.split == "test")]])
        X, found = store.read([perturb.key(d, "jpeg=20") for d in test.digest], "projection")
        assert found.all()
        expected_auc = roc_auc_score(test.label.to_numpy(), probe.predict_proba(X))
        assert result["jpeg"]["20"][name]["auc"] == pytest.approx(expected_auc, abs=1e-9)
    assert set(result) == {"clean", "jpeg", "noise", "resize"} and list(result["jpeg"]) == ["60", "20"]
    assert len(json.loads(outputs.robustness_plot.read_text())) == 4 * len(settings.evaluate.datasets)
    summary = json.loads(outputs.summary.read_text())
    assert set(summary["robustness"]) == {"jpeg=60", "jpeg=20", "noise=10", "resize=4096"}


def test_a_folder_of_reals_and_fakes_with_a_labels_file_is_a_cross_dataset_set(celeb_project):
    """DFDC's layout: one folder, a metadata.json naming each video REAL or FAKE."""
    root = celeb_project / "data" / "dfdc"
    rng = np.random.default_rng(1)
    metadata = {}
    for i in range(10):
        vid = f"clip{i:02d}"
        (root / vid).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / vid / f"{j:04d}.png")
        metadata[f"{vid}.mp4"] = {"label": "FAKE" if i % 3 else "REAL", "split": "train"}
    (root / "metadata.json").write_text(json.dumps(metadata))
    params = yaml.safe_load((celeb_project / "params.yaml").read_text())
    params["data"]["datasets"]["dfdc"] = {"path": "dfdc", "label": "mixed", "labels": "data/dfdc/metadata.json"}
    params["evaluate"]["cross_dataset"] = {"dfdc": {"real": ["dfdc"], "fake": ["dfdc"]}}
    (celeb_project / "params.yaml").write_text(yaml.safe_dump(params))
    settings, outputs = load(celeb_project / "params.yaml"), Outputs(celeb_project)
    table = manifest.run(settings, outputs).to_pandas()
    dfdc = table[table.dataset == "dfdc"]
    assert dict(zip(dfdc.video, dfdc.label, strict=True)) == {f"clip{i:02d}": int(i % 3 != 0) for i in range(10)}
    extract.run(settings, outputs)
    train.run(settings, outputs)
    result = evaluate.run(settings, outputs)["cross_dataset"]["dfdc"]
    probe, card = probes.load(outputs.probe)
    store = features.open_cache(outputs)
    X, _ = store.read(list(dfdc.digest), card["layer"])
    assert result["frame"]["auc"] == pytest.approx(roc_auc_score(dfdc.label, probe.predict_proba(X)), abs=1e-9)
    assert result["videos"]["real"] == 4 and result["videos"]["fake"] == 6

    metadata.pop("clip03.mp4")  # a video the labels file does not list is an error, not a guess
    (root / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ConfigError, match=r"2 files of dataset 'dfdc'.*its labels file does not list"):
        manifest.run(settings, outputs)
    params["train"]["datasets"].append("dfdc")
    (celeb_project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="use it as a cross-dataset test set"):
        load(celeb_project / "params.yaml")


def test_a_labels_file_may_be_lines_of_label_and_path_in_either_order(tmp_path):
    listing = tmp_path / "labels.txt"
    listing.write_text("real videos/a.mp4\nvideos/b.mp4,FAKE\n\nFake c/d.mp4\n")
    assert manifest.read_labels(listing) == {"a": 0, "b": 1, "d": 1}
    listing.write_text("maybe e.mp4\n")
    with pytest.raises(ConfigError, match="use real or fake"):
        manifest.read_labels(listing)
    metadata = tmp_path / "metadata.json"
    metadata.write_text('{"a.mp4": "FAKE",}')  # a trailing comma: not JSON
    with pytest.raises(ConfigError, match=r"metadata.json is not valid JSON \(.*line 1"):
        manifest.read_labels(metadata)
    (tmp_path / "list.txt").write_bytes(b"1 Celeb-real/id0_0000.mp4\n\xff\xfe")  # a binary file, or UTF-16
    (tmp_path / "list.json").write_text('["Celeb-real/id0_0000.mp4"]')  # JSON, but not an object
    for read, shape in (
        (manifest.read_labels, "must map video file names to labels"),
        (evaluate.read_test_list, "must map video paths to their facts"),
    ):
        with pytest.raises(ConfigError, match="is not UTF-8 text"):
            read(tmp_path / "list.txt")
        with pytest.raises(ConfigError, match=shape):
            read(tmp_path / "list.json")


def test_an_official_split_file_in_json_lists_only_its_test_videos(celeb_project):
    split = {
        "Celeb-real/id0_0000.mp4": {"label": "real", "set": "test"},
        "YouTube-real/00002.mp4": {"label": "real", "set": "test"},
        "Celeb-real/id1_0001.mp4": {"label": "real", "set": "train"},  # not a test video
        "Celeb-synthesis/id0_id1_0000.mp4": {"label": "fake", "set": "test"},
        "Celeb-synthesis/id1_id0_0001.mp4": {"label": "fake", "set": "test"},
    }
    (celeb_project / "data" / "Celeb-DF-v2" / "split.json").write_text(json.dumps(split))
    params = yaml.safe_load((celeb_project / "params.yaml").read_text())
    params["evaluate"]["cross_dataset"]["celebdf_official"]["test_list"] = "data/Celeb-DF-v2/split.json"
    (celeb_project / "params.yaml").write_text(yaml.safe_dump(params))
    settings, outputs = load(celeb_project / "params.yaml"), Outputs(celeb_project)
    for stage in (manifest, extract, train):
        stage.run(settings, outputs)
    videos = evaluate.run(settings, outputs)["cross_dataset"]["celebdf_official"]["videos"]
    assert videos == {"real": 2, "fake": 2, "listed": 4, "listed_missing": 0}


def test_the_readme_python_example_reads_the_rows_evaluate_scores(project, monkeypatch, capsys):
    """The README's `load_features` block, run as written on the demo: the train stage's probe on
    the rows it selects gives the AUC evaluate reports."""
    import re

    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split("## The cache from Python", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    update_params(project, "evaluate", protocols=["heldout"], bootstrap=0)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    for stage in (manifest, extract, train, evaluate):
        stage.run(settings, outputs)
    monkeypatch.chdir(project)
    capsys.readouterr()
    exec(compile(block, "README.md", "exec"), {})
    printed = dict(re.findall(r"^(.+?):\s+AUC (\S+)$", capsys.readouterr().out, re.M))
    reported = json.loads(outputs.protocol_metrics("heldout").read_text())["neuraltextures"]["frame"]["auc"]
    assert float(printed["train stage's probe"]) == pytest.approx(reported, abs=5e-5)
    assert 0.0 <= float(printed["own probe"]) <= 1.0
