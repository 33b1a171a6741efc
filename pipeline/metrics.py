"""Detection metrics for real (0) vs fake (1) scores, where a higher score means "more fake"."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

log = logging.getLogger(__name__)


def binary_metrics(y: np.ndarray, scores: np.ndarray, threshold: float = 0.5, name: str = "") -> dict:
    """n_real, n_fake, AUC, AP, accuracy at `threshold`, real accuracy, fake accuracy.

    A metric that needs both classes is `None` (JSON null) when one class is absent.
    """
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=float)
    pred = scores >= threshold
    real, fake = y == 0, y == 1
    both = real.any() and fake.any()
    if not both:
        log.warning("test set %s has %d real and %d fake images; AUC and AP need both", name, real.sum(), fake.sum())
    return {
        "n_real": int(real.sum()),
        "n_fake": int(fake.sum()),
        "auc": float(roc_auc_score(y, scores)) if both else None,
        "ap": float(average_precision_score(y, scores)) if both else None,
        "accuracy": float((pred == fake).mean()) if len(y) else None,
        "real_accuracy": float((~pred[real]).mean()) if real.any() else None,
        "fake_accuracy": float(pred[fake].mean()) if fake.any() else None,
    }


def roc_points(y: np.ndarray, scores: np.ndarray) -> list[dict]:
    """ROC curve as records {fpr, tpr, threshold} for `dvc plots` (threshold capped at 1.0)."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return []
    fpr, tpr, thr = roc_curve(y, scores)
    thr = np.minimum(thr, 1.0)  # the first threshold is +inf ("nothing is fake"); JSON has no inf
    return [{"fpr": float(f), "tpr": float(t), "threshold": float(h)} for f, t, h in zip(fpr, tpr, thr, strict=True)]
