"""Cached features for manifest rows: what train and evaluate read (never images, never torch)."""

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
    """Selected manifest rows with their features; rows without an embedding are dropped."""

    X: np.ndarray
    y: np.ndarray
    dataset: np.ndarray
    video: np.ndarray
    path: np.ndarray


def select(table: pa.Table, datasets: list[str], splits: list[str], labels: list[int] | None = None) -> np.ndarray:
    """Boolean mask of manifest rows in `datasets` and `splits` (and `labels`, when given)."""
    ds = np.array(table.column("dataset").to_pylist())
    sp = np.array(table.column("split").to_pylist())
    mask = np.isin(ds, datasets) & np.isin(sp, splits)
    if labels is not None:
        mask &= np.isin(np.array(table.column("label").to_pylist()), labels)
    return mask


def load(table: pa.Table, mask: np.ndarray, store: EmbeddingStore, layer: str, what: str) -> Rows:
    idx = np.flatnonzero(mask)
    digests = table.column("digest").take(pa.array(idx, pa.int64())).to_pylist()
    X, found = store.read(digests, layer)
    if not found.all():
        log.warning(
            "%s: %d of %d images have no embedding (failed to decode) and are skipped", what, (~found).sum(), len(found)
        )
    keep = idx[found]

    def column(name: str) -> np.ndarray:
        return np.array(table.column(name).take(pa.array(keep, pa.int64())).to_pylist())

    return Rows(
        X[found],
        column("label").astype(int) if len(keep) else np.zeros(0, int),
        column("dataset"),
        column("video"),
        column("path"),
    )
