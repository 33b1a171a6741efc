"""train stage: fit a linear probe on cached embeddings; choose C (and a decision threshold)
on the val split only."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline import features
from pipeline import manifest as manifest_mod
from pipeline.config import ConfigError, Settings, TrainSettings
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    probe: LinearProbe
    val_auc: dict[float, float]  # C -> val AUC
    threshold: float  # the val threshold with the best balanced accuracy


def choose_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises balanced accuracy (Youden's J) on these samples."""
    fpr, tpr, thr = roc_curve(y, scores)
    return float(min(thr[int(np.argmax(tpr - fpr))], 1.0))


def check_both_classes(train_y: np.ndarray, val_y: np.ndarray, what: str) -> None:
    for y, split in ((train_y, "train"), (val_y, "val")):
        if set(np.unique(y)) != {0, 1}:
            raise ConfigError(
                f"the {split} split of {what} needs both real and fake images (it has {len(y)} images); "
                "add data or change data.split."
            )


def fit_and_select(
    train: features.Rows, val: features.Rows, spec: TrainSettings, what: str = "train.datasets"
) -> Fitted:
    """Fit one probe per C on train; keep the best val AUC (the smaller C on ties)."""
    check_both_classes(train.y, val.y, what)
    scores: dict[float, float] = {}
    best: tuple[float, LinearProbe] | None = None
    for C in sorted(spec.C):
        probe = LinearProbe(kind=spec.probe, C=C, normalize=spec.normalize, max_iter=spec.max_iter)
        probe.fit(train.X, train.y)
        auc = float(roc_auc_score(val.y, probe.decision_function(val.X)))
        scores[C] = auc
        log.debug("%s C=%g: val AUC %.4f", what, C, auc)
        if best is None or auc > best[0]:
            best = (auc, probe)
    probe = best[1]
    return Fitted(probe, scores, choose_threshold(val.y, probe.predict_proba(val.X)))


def run(settings: Settings, outputs: Outputs) -> dict:
    t = settings.train
    table = manifest_mod.read(outputs.manifest)
    store = features.open_cache(outputs)
    store.dimension(t.layer)  # a clear error now if the layer is not cached
    frames = features.load(table, store, t.layer, stream=t.stream)
    train, val = frames.train_val(t.datasets)
    fitted = frames.fit(t.datasets, t)
    for C, auc in fitted.val_auc.items():
        log.info("C=%g: val AUC %.4f", C, auc)
    card = {
        "model": store.card["model"],
        "fingerprint": store.header.fingerprint,
        "layer": t.layer,
        "datasets": list(t.datasets),
        "n_train": int(train.sum()),
        "n_val": int(val.sum()),
        "streamed": t.stream,
        "val_auc": {str(c): a for c, a in fitted.val_auc.items()},
        "threshold": fitted.threshold,
        "selected_by": "val AUC (C), val balanced accuracy (threshold)",
    }
    card = fitted.probe.save(outputs.probe, card)
    log.info(
        "probe: %s C=%g (val AUC %.4f), threshold %.3f, on %d train images -> %s",
        t.probe,
        fitted.probe.C,
        fitted.val_auc[fitted.probe.C],
        fitted.threshold,
        int(train.sum()),
        outputs.probe,
    )
    return card
