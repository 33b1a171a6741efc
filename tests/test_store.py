"""The embedding store: content-addressed, atomic shards that describe themselves."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store import EmbeddingStore, StoreError, directory_name, fingerprint
from pipeline.store.shard import ShardData

DESCRIPTION = {"model": {"weights_sha256": "abc"}, "layers": ["projection", "pooled"], "dtype": "float32"}
DIMS = {"projection": 4, "pooled": 6}


def rows(digests, seed=0, errors=None):
    rng = np.random.default_rng(seed)
    n = len(digests)
    return ShardData(
        digests=list(digests),
        paths=[f"img/{d}.png" for d in digests],
        errors=errors or [None] * n,
        arrays={k: rng.normal(size=(n, d)).astype(np.float32) for k, d in DIMS.items()},
    )


@pytest.fixture
def store(tmp_path):
    return EmbeddingStore.create(tmp_path, "org/model", DESCRIPTION, DIMS)


def test_fingerprint_is_stable_and_order_independent():
    reordered = {"dtype": "float32", "layers": ["projection", "pooled"], "model": {"weights_sha256": "abc"}}
    assert fingerprint(DESCRIPTION) == fingerprint(reordered)
    assert fingerprint(DESCRIPTION) != fingerprint({**DESCRIPTION, "dtype": "float16"})
    assert directory_name("openai/clip-vit-large-patch14", "f00") == "clip-vit-large-patch14-f00"


def test_commit_then_read_round_trips_every_layer(store):
    data = rows(["a", "b", "c"])
    store.commit(data)
    assert store.keys() == {"a", "b", "c"}
    for layer in DIMS:
        got, found = store.read(["c", "zz", "a"], layer)
        assert found.tolist() == [True, False, True]
        np.testing.assert_array_equal(got[0], data.arrays[layer][2])
        np.testing.assert_array_equal(got[2], data.arrays[layer][0])
        assert not got[1].any()


def test_reopening_sees_committed_shards_and_only_them(store, tmp_path):
    store.commit(rows(["a", "b"]))
    store.commit(rows(["c"], seed=1))
    (store.directory / "shards" / ".tmp-half-written.parquet.xyz").write_bytes(b"garbage")
    again = EmbeddingStore.create(tmp_path, "org/model", DESCRIPTION, DIMS)
    assert again.directory == store.directory
    assert again.keys() == {"a", "b", "c"}
    assert len(again.shard_paths()) == 2


def test_failures_are_recorded_and_a_later_success_wins(store):
    store.commit(rows(["a", "bad"], errors=[None, "not an image (unrecognised format)"]))
    assert store.keys() == {"a"}
    assert store.failures() == {"bad": ("img/bad.png", "not an image (unrecognised format)")}
    store.commit(rows(["bad"], seed=3))
    assert store.keys() == {"a", "bad"} and store.failures() == {}
    _, found = store.read(["bad"], "projection")
    assert found.all()


def test_other_settings_get_another_directory(store, tmp_path):
    other = EmbeddingStore.create(tmp_path, "org/model", {**DESCRIPTION, "dtype": "float16"}, DIMS)
    assert other.directory != store.directory


def test_reading_a_layer_that_is_not_cached_says_how_to_fix_it(store):
    with pytest.raises(StoreError, match=r"add it to model\.layers and re-run extract"):
        store.read(["a"], "block_3")


def test_opening_with_the_wrong_fingerprint_is_an_error(store):
    with pytest.raises(StoreError, match="different model"):
        EmbeddingStore.open(store.directory, expect_fingerprint="0000000000000000")


def test_a_foreign_shard_is_refused_not_read(store, tmp_path):
    other = EmbeddingStore.create(tmp_path / "elsewhere", "org/model", {**DESCRIPTION, "dtype": "x"}, DIMS)
    shard = other.commit(rows(["a"]))
    shard.rename(store.directory / "shards" / shard.name)
    with pytest.raises(StoreError, match="was written for fingerprint"):
        store.keys()
