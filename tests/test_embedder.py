"""The reader -> model -> writer loop (`pipeline.embedder`) with its parts swapped in, as a
test or a benchmark does: a writer that fails at shard k, a reader that records what it reads."""

from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest

from pipeline import backbones, embedder, extract, manifest
from pipeline.config import load
from pipeline.outputs import Outputs
from pipeline.store import caches
from tests.conftest import update_params


class FailsAtThirdShard(embedder.ShardWriter):
    flushes = 0

    def _flush(self) -> None:
        if self._buffer:
            self.flushes += 1
            if self.flushes == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        super()._flush()


def contents(outputs: Outputs) -> tuple[list[str], np.ndarray]:
    (store,) = caches(outputs.embeddings)
    keys = sorted(store.keys())
    return keys, store.read(keys, "projection")[0]


def test_an_injected_failing_writer_keeps_earlier_shards_and_the_resumed_run_is_identical(project, tmp_path):
    update_params(project, "extract", shard_size=8)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    backbone = backbones.load(settings.model, "cpu", "fp32")  # one tiny model for every run below

    with pytest.raises(OSError, match="No space left"):
        extract.run(settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone, writer=FailsAtThirdShard))
    (store,) = caches(outputs.embeddings)
    assert len(store.shard_paths()) == 2 and store.verify() == []
    committed = set(store.keys())

    read: list[str] = []

    def recording_reader(items, *args):
        read.extend(item.digest for item in items)
        return embedder.read_batches(items, *args)

    resumed = extract.run(
        settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone, reader=recording_reader)
    )
    assert resumed.embedded == resumed.images and len(read) == resumed.images - len(committed)
    assert not set(read) & committed, "the resumed run reads only what no committed shard holds"

    other = Outputs(tmp_path / "uninterrupted")
    other.manifest.parent.mkdir(parents=True)
    shutil.copy(outputs.manifest, other.manifest)
    extract.run(settings, other, embedder=embedder.LocalEmbedder(settings, backbone))
    keys, embeddings = contents(outputs)
    ref_keys, ref_embeddings = contents(other)
    assert keys == ref_keys
    np.testing.assert_array_equal(embeddings, ref_embeddings)


def test_the_threaded_reader_gives_the_batches_of_the_default_reader_in_order(project):
    """What dask workers use (they cannot fork DataLoader processes): threads decoding ahead."""
    settings = load(project / "params.yaml")
    table = manifest.run(settings, Outputs(project))
    paths = table.column("path").to_pylist()[:50]
    items = [
        embedder.Item(d, p, settings.data_root / p)
        for d, p in zip(table.column("digest").to_pylist()[:50], paths, strict=True)
    ]
    preprocess = backbones.load(settings.model, "cpu", "fp32").preprocess
    expected = list(embedder.read_batches(items, preprocess, 8, 0, False))
    for threads in (0, 1, 3):
        got = list(embedder.threaded_batches(items, preprocess, 8, threads, False))
        assert [b.digests for b in got] == [b.digests for b in expected]
        assert all(np.array_equal(g.pixels, e.pixels) for g, e in zip(got, expected, strict=True))
