"""Shortcut audit: can file metadata alone (format, width, height, bytes, JPEG quality) tell
real from fake? If it can, a detector may be learning the metadata, not the manipulation.

Fits a logistic regression on metadata from the manifest alone (no image, no embedding) on the
train split and reports its AUC on the test split, plus each feature's own AUC, over the datasets
that train and evaluate name: the rows of a cross-dataset test set (another source, which the
probe never learns from) blended in would move the AUC, and could hide a shortcut.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

# Metadata that separates the classes this well means the data has a shortcut.
WARN_AUC = 0.9


def metadata_features(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    fmt = np.array(table.column("format").to_pylist())
    columns, names = [], []
    for value in sorted(set(fmt)):
        columns.append((fmt == value).astype(float))
        names.append(f"format={value}")
    for name in ("width", "height", "jpeg_quality"):
        columns.append(np.array(table.column(name).to_pylist(), dtype=float))
        names.append(name)
    columns.append(np.log1p(np.array(table.column("size").to_pylist(), dtype=float)))
    names.append("log_bytes")
    return np.stack(columns, axis=1), names


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(y)) < 2:
        return None
    auc = float(roc_auc_score(y, score))
    return max(auc, 1.0 - auc)  # a feature separates whichever way round it points


def audit(table: pa.Table, datasets: list[str]) -> dict:
    """The audit of the manifest rows of `datasets` (train.datasets and evaluate.datasets)."""
    wanted = set(datasets)
    table = table.filter(pa.array([d in wanted for d in table.column("dataset").to_pylist()]))
    X, names = metadata_features(table)
    y = np.array(table.column("label").to_pylist(), dtype=int)
    split = np.array(table.column("split").to_pylist())
    train, test = split != "test", split == "test"
    result: dict = {"datasets": list(datasets), "features": names, "warn_above": WARN_AUC}
    if len(np.unique(y[train])) < 2 or len(np.unique(y[test])) < 2:
        result.update(auc=None, feature_auc={}, shortcut=False)
        return result
    scaler = StandardScaler().fit(X[train])
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(X[train]), y[train])
    auc = _auc(y[test], clf.decision_function(scaler.transform(X[test])))
    per_feature = {n: _auc(y[test], X[test, i]) for i, n in enumerate(names)}
    result.update(auc=auc, feature_auc=per_feature, shortcut=bool(auc is not None and auc >= WARN_AUC))
    if result["shortcut"]:
        worst = sorted(((a or 0.0, n) for n, a in per_feature.items()), reverse=True)[:3]
        log.warning(
            "SHORTCUT: file metadata alone separates real from fake (test AUC %.3f; strongest: %s). A detector "
            "may learn this instead of the manipulation; re-encode real and fake frames alike before trusting results.",
            auc,
            ", ".join(f"{n} {a:.2f}" for a, n in worst),
        )
    return result
