"""Probes for caches larger than memory (`train.stream: true`): the cache is read one shard at a
time and never held whole.

Fitting uses scikit-learn's SGDClassifier.partial_fit (log loss for `logreg`, hinge for
`linear_svm`; C maps to alpha = 1 / (C * n)). Shards are written in manifest order, so one
shard often holds one dataset; each epoch therefore visits shards in a random order and
shuffles a bounded buffer of rows before the minibatches. Normalisation statistics come from a
first pass. Peak memory is bounded by the buffer and one shard, not by the cache size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import roc_auc_score

from pipeline.config import TrainSettings
from pipeline.probes import LinearProbe
from pipeline.store import EmbeddingStore

log = logging.getLogger(__name__)

BUFFER_ROWS = 32_768  # rows shuffled together before minibatches (bounds memory: rows x dim x 4 B)
MINIBATCH = 1024


def chunks(
    store: EmbeddingStore, layer: str, wanted: dict[str, int], order=None
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(X, y, digests) of the rows in `wanted` (digest -> label), one shard at a time."""
    shards = store.shard_paths()
    for i in order if order is not None else range(len(shards)):
        digests, X = store.read_shard(shards[i], layer)
        keep = [j for j, d in enumerate(digests) if d in wanted]
        if keep:
            picked = [digests[j] for j in keep]
            yield X[keep], np.array([wanted[d] for d in picked]), picked


def _l2(X: np.ndarray, normalize: str) -> np.ndarray:
    X = X.astype(np.float64)
    if "l2" in normalize:
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def normalisation(
    store: EmbeddingStore, layer: str, wanted: dict[str, int], normalize: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Streaming mean and std of the (l2-normalised) training rows -> (mean, scale, n)."""
    n, total, squares = 0, None, None
    for X, _, _ in chunks(store, layer, wanted):
        Z = _l2(X, normalize)
        total = Z.sum(0) if total is None else total + Z.sum(0)
        squares = (Z**2).sum(0) if squares is None else squares + (Z**2).sum(0)
        n += len(Z)
    dim = store.dimension(layer)
    if "standardize" not in normalize or n == 0:
        return np.zeros(dim), np.ones(dim), n
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    return mean, np.where(std > 1e-12, std, 1.0), n


def fit_and_select(
    store: EmbeddingStore, layer: str, train: dict[str, int], val: dict[str, int], spec: TrainSettings, seed: int = 0
):
    """Like train.fit_and_select, streaming: one SGD probe per C, best val AUC wins."""
    from pipeline.train import Fitted, choose_threshold

    mean, scale, n = normalisation(store, layer, train, spec.normalize)
    loss = "log_loss" if spec.probe == "logreg" else "hinge"
    models = {C: SGDClassifier(loss=loss, alpha=1.0 / (C * n), random_state=seed) for C in sorted(spec.C)}
    rng = np.random.default_rng(seed)
    n_shards = len(store.shard_paths())

    def train_on(X: np.ndarray, y: np.ndarray) -> None:
        perm = rng.permutation(len(y))
        Z = (_l2(X[perm], spec.normalize) - mean) / scale
        for start in range(0, len(y), MINIBATCH):
            for model in models.values():
                model.partial_fit(Z[start : start + MINIBATCH], y[perm][start : start + MINIBATCH], classes=[0, 1])

    for _ in range(spec.epochs):
        buffer_X, buffer_y, rows = [], [], 0
        for X, y, _ in chunks(store, layer, train, order=rng.permutation(n_shards)):
            buffer_X.append(X)
            buffer_y.append(y)
            rows += len(y)
            if rows >= BUFFER_ROWS:
                train_on(np.concatenate(buffer_X), np.concatenate(buffer_y))
                buffer_X, buffer_y, rows = [], [], 0
        if rows:
            train_on(np.concatenate(buffer_X), np.concatenate(buffer_y))

    probes = {}
    for C, model in models.items():
        probe = LinearProbe(kind=spec.probe, C=C, normalize=spec.normalize, max_iter=spec.max_iter)
        probe.mean_, probe.scale_ = mean, scale
        probe.coef_, probe.intercept_ = model.coef_.ravel().astype(np.float64), float(model.intercept_[0])
        probes[C] = probe
    val_y, val_scores = [], {C: [] for C in probes}
    for X, y, _ in chunks(store, layer, val):
        val_y.append(y)
        for C, probe in probes.items():
            val_scores[C].append(probe.predict_proba(X))
    y = np.concatenate(val_y)
    aucs = {C: float(roc_auc_score(y, np.concatenate(s))) for C, s in val_scores.items()}
    best = max(aucs, key=lambda C: (aucs[C], -C))  # the smaller C on ties
    return Fitted(probes[best], aucs, choose_threshold(y, np.concatenate(val_scores[best])))


def score(
    store: EmbeddingStore, layer: str, wanted: set[str], fn: Callable[[np.ndarray], np.ndarray]
) -> dict[str, float]:
    """fn(features) for each wanted digest, one shard at a time -> digest -> score."""
    out: dict[str, float] = {}
    for X, _, digests in chunks(store, layer, dict.fromkeys(wanted, 0)):
        out.update(zip(digests, fn(X).tolist(), strict=True))
    return out
