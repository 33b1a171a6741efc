"""Caches larger than memory: train and evaluate stream the shards (train.stream: true) with SGD
probes; results match the in-memory path and peak memory stays flat as the cache grows."""

from __future__ import annotations

import gc
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import config, evaluate, extract, features, manifest, probes, train
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore
from pipeline.store.shard import ShardData
from tests.conftest import update_params
from tests.test_probes_metrics import synthetic_frames, synthetic_settings


def write_cache(tmp_path, frames: features.FeatureTable, shard_rows: int) -> tuple[pa.Table, EmbeddingStore]:
    """A real store + manifest table holding `frames`, shards in manifest order (as extract writes them)."""
    dim = frames.X.shape[1]
    description = {"model": {"synthetic": True}, "layers": ["projection"], "dtype": "float32", "precision": "fp32"}
    store = EmbeddingStore.create(tmp_path / "embeddings", "synthetic", description, {"projection": dim})
    for start in range(0, len(frames.X), shard_rows):
        part = slice(start, start + shard_rows)
        digests = frames.digest[part].tolist()
        store.commit(
            ShardData(digests, frames.path[part].tolist(), [None] * len(digests), {"projection": frames.X[part]})
        )
    table = pa.table(
        {
            "dataset": frames.dataset,
            "split": frames.split,
            "label": frames.label,
            "video": [v.split("/", 1)[1] for v in frames.video],
            "path": frames.path,
            "digest": frames.digest,
        }
    )
    return table, store


def test_a_streamed_probe_matches_the_in_memory_one(tmp_path):
    memory = synthetic_frames(videos=60, dim=16)
    table, store = write_cache(tmp_path, memory, shard_rows=97)
    streamed = features.StreamedFeatures.load(table, store, "projection")
    spec = synthetic_settings().train
    a = evaluate.fit(memory, ["real", "fs"], spec)
    b = evaluate.fit(streamed, ["real", "fs"], spec)
    test = memory.mask(["real"], ["test"], labels=[0]) | memory.mask(["fs"], ["test"], labels=[1])
    y = memory.label[test]
    auc_memory = roc_auc_score(y, memory.score(a.probe.predict_proba, test))
    auc_streamed = roc_auc_score(y, streamed.score(b.probe.predict_proba, test))
    assert auc_memory > 0.95 and abs(auc_memory - auc_streamed) < 0.03
    # Scoring streams the same numbers as scoring in memory.
    np.testing.assert_allclose(streamed.score(a.probe.predict_proba, test), memory.score(a.probe.predict_proba, test))


def test_rows_held_by_two_shards_stream_once(tmp_path):
    """A cache may hold a row twice (a dask task rerun after a failure, before such reruns
    committed nothing of the failed attempt): streamed, each row is fitted and scored once."""
    memory = synthetic_frames(videos=10, dim=4)
    _, store = write_cache(tmp_path, memory, shard_rows=40)
    again = slice(30, 50)
    digests = memory.digest[again].tolist()
    store.commit(
        ShardData(digests, memory.path[again].tolist(), [None] * len(digests), {"projection": memory.X[again]})
    )
    rows = features.ShardRows(store, "projection", dict.fromkeys(memory.digest.tolist(), 0))
    for order in (None, np.arange(rows.parts())[::-1]):
        streamed = [d for _, _, chunk in rows.chunks(order) for d in chunk]
        assert sorted(streamed) == sorted(memory.digest.tolist())


def test_the_cross_manipulation_matrix_streams_too(tmp_path):
    memory = synthetic_frames(videos=40, dim=8)
    table, store = write_cache(tmp_path, memory, shard_rows=64)
    streamed = features.StreamedFeatures.load(table, store, "projection")
    settings = synthetic_settings()
    a = evaluate.cross_manipulation(settings, memory, ["real"])
    b = evaluate.cross_manipulation(settings, streamed, ["real"])
    for x in a["datasets"]:
        for y in a["datasets"]:
            assert abs(a["auc"][x][y] - b["auc"][x][y]) < 0.05, (x, y)


def peak_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_stays_flat_as_the_cache_grows(tmp_path, monkeypatch):
    # Memory is bounded by the shuffle buffer once the cache is larger than it: make it small,
    # so that both caches here are (the default is 32k rows).
    monkeypatch.setattr(probes, "BUFFER_ROWS", 256)
    spec = synthetic_settings().train
    peaks_stream, peaks_memory = [], []
    for videos in (100, 400):  # 4x more frames, same shard size
        frames = synthetic_frames(videos=videos, frames=4, dim=128)
        table, store = write_cache(tmp_path / str(videos), frames, shard_rows=400)
        del frames
        streamed = features.StreamedFeatures.load(table, store, "projection")
        test = streamed.mask(["real", "fs"], ["test"])

        def stream_train_and_score(streamed=streamed, test=test):
            fitted = evaluate.fit(streamed, ["real", "fs"], spec)
            streamed.score(fitted.probe.predict_proba, test)

        peaks_stream.append(peak_bytes(stream_train_and_score))
        peaks_memory.append(
            peak_bytes(lambda table=table, store=store: features.FeatureTable.load(table, store, "projection"))
        )
    assert peaks_memory[1] > 3 * peaks_memory[0], "sanity: loading the whole cache grows with it"
    assert peaks_stream[1] < 1.5 * peaks_stream[0], f"streaming peak grew: {peaks_stream}"


@pytest.mark.parametrize("probe", ["logreg", "linear_svm"])
def test_the_demo_runs_end_to_end_streaming(project, probe):
    update_params(project, "train", stream=True, probe=probe, epochs=3)
    update_params(project, "model", layers=["projection", "block_1"])
    update_params(project, "evaluate", bootstrap=50, protocols=[*config.PROTOCOLS])
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    extract.run(settings, outputs)
    card = train.run(settings, outputs)
    assert card["streamed"] is True and card["probe"] == probe
    results = evaluate.run(settings, outputs)
    assert set(results["heldout"]) == set(settings.evaluate.datasets)
    assert (
        json.loads(outputs.protocol_metrics("cross_manipulation").read_text())["auc"]["faceswap"]["faceswap"]
        is not None
    )
    # The layers protocol streams too: one probe per cached layer, the train stage's for its own.
    layers = results["layers"]
    for name, heldout in results["heldout"].items():
        assert layers["auc"]["projection"][name] == heldout["frame"]["auc"]
        assert layers["vs_reference"]["projection"][name]["delta"] == 0.0
        assert 0.0 <= layers["auc"]["block_1"][name] <= 1.0


@pytest.mark.parametrize("stream", [False, True])
def test_rows_without_an_embedding_are_counted_by_their_recorded_reason(tmp_path, caplog, stream):
    frames = synthetic_frames(videos=8, dim=4)
    table, complete = write_cache(tmp_path / "complete", frames, shard_rows=64)
    # The first three rows failed, and extract recorded why.
    failed, keep = frames.digest[:3].tolist(), np.arange(len(frames.X)) >= 3
    reasons = ["no face found", "no face found", "unreadable image (image file is truncated)"]
    store = EmbeddingStore.create(tmp_path / "e", "synthetic", complete.card["description"], {"projection": 4})
    store.commit(ShardData(failed, frames.path[:3].tolist(), reasons, {"projection": np.zeros((3, 4), np.float32)}))
    rest = frames.digest[keep].tolist()
    store.commit(ShardData(rest, frames.path[keep].tolist(), [None] * len(rest), {"projection": frames.X[keep]}))
    caplog.set_level("WARNING", logger="pipeline.features")
    loaded = features.load(table, store, "projection", stream=stream)
    assert loaded.found.tolist() == keep.tolist()
    assert f"3 of {len(keep)} manifest rows have no embedding (2 no face found, 1 unreadable image)" in caplog.text
