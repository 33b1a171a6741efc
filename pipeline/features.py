"""Cached features for manifest rows: what train and evaluate read (never images, never torch).

`FeatureTable` reads one layer for every manifest row once; protocols then select rows with
boolean masks, so a cross-manipulation matrix costs one read of the cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore

log = logging.getLogger(__name__)


def open_cache(outputs: Outputs) -> EmbeddingStore:
    """The cache the last extract run filled, as recorded in cache/extract.json."""
    if not outputs.extract_summary.exists():
        raise ConfigError(
            f"{outputs.extract_summary} does not exist; run the extract stage first (`dvc repro extract`)."
        )
    summary = json.loads(outputs.extract_summary.read_text())
    return EmbeddingStore.open(outputs.embeddings / summary["embeddings"], expect_fingerprint=summary["fingerprint"])


@dataclass
class Rows:
    """Selected rows with features (rows without an embedding already dropped)."""

    X: np.ndarray
    y: np.ndarray
    dataset: np.ndarray
    video: np.ndarray  # video key: "<dataset>/<video id>", so the same id in two methods differs
    path: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("X", "y", "dataset", "video", "path")))


@dataclass
class FeatureTable:
    """Every manifest row with its embedding of one layer."""

    dataset: np.ndarray
    split: np.ndarray
    label: np.ndarray
    video: np.ndarray
    path: np.ndarray
    X: np.ndarray
    found: np.ndarray

    @classmethod
    def load(cls, table: pa.Table, store: EmbeddingStore, layer: str) -> FeatureTable:
        cols = {
            name: np.array(table.column(name).to_pylist()) for name in ("dataset", "split", "label", "video", "path")
        }
        X, found = store.read(table.column("digest").to_pylist(), layer)
        if not found.all():
            log.warning(
                "%d of %d manifest images have no embedding (they failed to decode) and are skipped",
                (~found).sum(),
                len(found),
            )
        keys = np.char.add(np.char.add(cols["dataset"].astype(str), "/"), cols["video"].astype(str))
        return cls(cols["dataset"], cols["split"], cols["label"].astype(int), keys, cols["path"], X, found)

    def label_of(self, dataset: str) -> int | None:
        """0 (real) or 1 (fake) for a dataset in the manifest, None if it has no rows."""
        labels = self.label[self.dataset == dataset]
        return int(labels[0]) if len(labels) else None

    def mask(self, datasets: list[str], splits: list[str], labels: list[int] | None = None) -> np.ndarray:
        m = np.isin(self.dataset, datasets) & np.isin(self.split, splits) & self.found
        if labels is not None:
            m &= np.isin(self.label, labels)
        return m

    def rows(self, mask: np.ndarray) -> Rows:
        mask = mask & self.found
        return Rows(self.X[mask], self.label[mask], self.dataset[mask], self.video[mask], self.path[mask])

    def select(self, datasets: list[str], splits: list[str], labels: list[int] | None = None) -> Rows:
        return self.rows(self.mask(datasets, splits, labels))
