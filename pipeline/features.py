"""Cached features for manifest rows: what train and evaluate read (never images, never torch).

`FeatureTable` reads one layer (or several side by side) for every manifest row once; protocols then select rows with
boolean masks, so a cross-manipulation matrix costs one read of the cache. `StreamedFeatures`
is the same view for caches larger than memory: it reads shard by shard on use. Both only
read, mask and score; fitting belongs to `pipeline.probes`, which takes what `training_data` gives.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.outputs import Outputs
from pipeline.probes import Labelled
from pipeline.store import EmbeddingStore, StoreError, reasons_counted
from pipeline.store.summary import ExtractSummary

log = logging.getLogger(__name__)


def open_cache(outputs: Outputs) -> EmbeddingStore:
    """The cache the last extract run filled, as recorded in cache/extract.json."""
    summary = ExtractSummary.read(outputs.extract_summary)
    return EmbeddingStore.open(outputs.embeddings / summary.embeddings, expect_fingerprint=summary.fingerprint)


def read_layers(store: EmbeddingStore, digests: list[str], layer: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of `layer` for `digests` -> (array, found mask); several layers are read side
    by side, each row of each L2-normalised first (so no layer dominates by its scale, RINE-style)."""
    if isinstance(layer, str):
        return store.read(digests, layer)
    blocks, found = [], np.ones(len(digests), dtype=bool)
    for name in layer:
        X, present = store.read(digests, name)
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        blocks.append(X / np.where(norms > 0, norms, 1.0))
        found &= present
    return np.hstack(blocks).astype(np.float32), found


@dataclass
class Rows(Labelled):
    """Selected rows with features (rows without an embedding already dropped)."""

    X: np.ndarray
    y: np.ndarray
    dataset: np.ndarray
    video: np.ndarray  # video key: "<dataset>/<video id>", so the same id in two methods differs
    path: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class _Frames:
    """Manifest metadata of every row, shared by the in-memory and the streamed feature views."""

    dataset: np.ndarray
    split: np.ndarray
    label: np.ndarray
    video: np.ndarray  # "<dataset>/<video id>"
    path: np.ndarray
    digest: np.ndarray
    found: np.ndarray

    def label_of(self, dataset: str) -> int | None:
        """0 (real) or 1 (fake) for a dataset in the manifest, None if it has no rows."""
        labels = self.label[self.dataset == dataset]
        return int(labels[0]) if len(labels) else None

    def mask(self, datasets: list[str], splits: list[str], labels: list[int] | None = None) -> np.ndarray:
        m = np.isin(self.dataset, datasets) & np.isin(self.split, splits) & self.found
        if labels is not None:
            m &= np.isin(self.label, labels)
        return m

    def train_val(self, datasets: list[str], splits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Masks of the train and val rows of `datasets` (with `splits` instead of the manifest's)."""
        split = self.split if splits is None else splits
        base = np.isin(self.dataset, datasets) & self.found
        return base & (split == "train"), base & (split == "val")

    def train_val_sha256(self, datasets: list[str]) -> str:
        """Which rows a probe on `datasets` is fitted (train) and selected (val) on: a sha256 of
        their sorted digests, for the probe's card."""
        h = hashlib.sha256()
        for mask in self.train_val(datasets):
            h.update("\n".join(sorted(self.digest[mask])).encode() + b"\0")
        return h.hexdigest()

    def training_data(self, datasets: list[str], splits: np.ndarray | None = None):
        """(train, val) of `datasets` in the shape `probes.fit_and_select` takes."""
        tr, va = self.train_val(datasets, splits)
        return self.labelled(tr), self.labelled(va)


def check_complete(table: pa.Table, store: EmbeddingStore, found: np.ndarray) -> None:
    """Every manifest image has an embedding or a recorded failure: a cache that lost rows (a
    deleted shard, an interrupted pull) is an error, never a smaller training set. The rows left
    out for their recorded failure are counted by reason."""
    if found.all():
        return
    failed = store.failures()
    digests = table.column("digest").to_pylist()
    absent = [i for i, (d, f) in enumerate(zip(digests, found, strict=True)) if not f and d not in failed]
    if absent:
        raise StoreError(
            f"{len(absent)} of {len(digests)} manifest images (e.g. {table.column('path')[absent[0]]}) are neither "
            f"embedded nor recorded as failed in {store.directory}; the cache is incomplete: run "
            "`python -m pipeline cache verify`, then `dvc repro` (extract embeds what is missing)."
        )
    reasons = reasons_counted(failed[d][1] for d, f in zip(digests, found, strict=True) if not f)
    log.warning("%d of %d manifest rows have no embedding (%s) and are left out", (~found).sum(), len(found), reasons)


def _metadata(table: pa.Table, found: np.ndarray) -> dict:
    cols = {name: np.array(table.column(name).to_pylist()) for name in ("dataset", "split", "label", "path", "digest")}
    video = np.array(table.column("video").to_pylist())
    cols["video"] = np.char.add(np.char.add(cols["dataset"].astype(str), "/"), video.astype(str))
    cols["label"] = cols["label"].astype(int)
    return {**cols, "found": found}


@dataclass
class FeatureTable(_Frames):
    """Every manifest row with its embedding of one layer, in memory."""

    X: np.ndarray

    @classmethod
    def load(cls, table: pa.Table, store: EmbeddingStore, layer: str | list[str]) -> FeatureTable:
        X, found = read_layers(store, table.column("digest").to_pylist(), layer)
        check_complete(table, store, found)
        return cls(**_metadata(table, found), X=X)

    def rows(self, mask: np.ndarray) -> Rows:
        mask = mask & self.found
        return Rows(self.X[mask], self.label[mask], self.dataset[mask], self.video[mask], self.path[mask])

    def select(self, datasets: list[str], splits: list[str], labels: list[int] | None = None) -> Rows:
        return self.rows(self.mask(datasets, splits, labels))

    def labelled(self, mask: np.ndarray) -> Rows:
        """The rows in `mask` for fitting a probe (`probes.fit_and_select`)."""
        return self.rows(mask)

    def score(self, fn: Callable[[np.ndarray], np.ndarray], mask: np.ndarray) -> np.ndarray:
        """fn(features) of the rows in `mask` (which must hold only rows with an embedding)."""
        return fn(self.X[mask])


@dataclass
class StreamedFeatures(_Frames):
    """The same view for caches larger than memory: features are read shard by shard on use."""

    store: EmbeddingStore
    layer: str

    @classmethod
    def load(cls, table: pa.Table, store: EmbeddingStore, layer: str) -> StreamedFeatures:
        keys = store.keys()
        found = np.array([d in keys for d in table.column("digest").to_pylist()], dtype=bool)
        check_complete(table, store, found)
        return cls(**_metadata(table, found), store=store, layer=layer)

    def labelled(self, mask: np.ndarray) -> ShardRows:
        """The rows in `mask` for fitting a probe, read shard by shard (`probes.Chunked`)."""
        mask = mask & self.found
        return ShardRows(self.store, self.layer, dict(zip(self.digest[mask], self.label[mask], strict=True)))

    def score(self, fn: Callable[[np.ndarray], np.ndarray], mask: np.ndarray) -> np.ndarray:
        by_digest: dict[str, float] = {}
        for X, _, digests in ShardRows(self.store, self.layer, dict.fromkeys(self.digest[mask], 0)).chunks():
            by_digest.update(zip(digests, fn(X).tolist(), strict=True))
        return np.array([by_digest[d] for d in self.digest[mask]])


class ShardRows:
    """Rows of a cache (digest -> label), read one shard at a time: a `probes.Chunked` source."""

    def __init__(self, store: EmbeddingStore, layer: str, wanted: dict[str, int]):
        self.store, self.layer, self.wanted = store, layer, wanted
        self.y = np.array(list(wanted.values()), dtype=int)
        self.dim = store.dimension(layer)

    def parts(self) -> int:
        return len(self.store.shard_paths())

    def chunks(self, order=None) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """(X, y, digests) of the wanted rows, one shard at a time (in `order`, or shard order),
        each row once, also where two shards hold it (a dask task rerun before 2026-11-27)."""
        shards = self.store.shard_paths()
        seen: set[str] = set()
        for i in order if order is not None else range(len(shards)):
            digests, X = self.store.read_shard(shards[i], self.layer)
            keep = [j for j, d in enumerate(digests) if d in self.wanted and d not in seen]
            if keep:
                picked = [digests[j] for j in keep]
                seen.update(picked)
                yield X[keep], np.array([self.wanted[d] for d in picked]), picked

    def read(self, order=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for X, y, _ in self.chunks(order):
            yield X, y


def load(
    table: pa.Table, store: EmbeddingStore, layer: str | list[str], stream: bool = False
) -> FeatureTable | StreamedFeatures:
    """The features of every manifest row: in memory, or streamed from the shards."""
    return (StreamedFeatures if stream else FeatureTable).load(table, store, layer)
