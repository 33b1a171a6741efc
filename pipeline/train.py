"""train stage: fit a linear probe on cached embeddings; choose C by AUC on the val split."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline import features
from pipeline import manifest as manifest_mod
from pipeline.config import ConfigError, Settings
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe

log = logging.getLogger(__name__)


def fit_and_select(train: features.Rows, val: features.Rows, Cs: list[float], normalize: str, max_iter: int):
    """Fit one probe per C on train; keep the best val AUC (the smaller C on ties)."""
    for rows, split in ((train, "train"), (val, "val")):
        if set(np.unique(rows.y)) != {0, 1}:
            raise ConfigError(
                f"the {split} split of train.datasets needs both real and fake images (it has {len(rows.y)} images); "
                "add data or change data.split."
            )
    scores = {}
    best: tuple[float, LinearProbe] | None = None
    for C in sorted(Cs):
        probe = LinearProbe(C=C, normalize=normalize, max_iter=max_iter).fit(train.X, train.y)
        auc = float(roc_auc_score(val.y, probe.decision_function(val.X)))
        scores[C] = auc
        log.info("C=%g: val AUC %.4f", C, auc)
        if best is None or auc > best[0]:
            best = (auc, probe)
    return best[1], scores


def run(settings: Settings, outputs: Outputs) -> dict:
    t = settings.train
    table = manifest_mod.read(outputs.manifest)
    store = features.open_cache(outputs)
    store.dimension(t.layer)  # a clear error now if the layer is not cached
    train = features.load(table, features.select(table, t.datasets, ["train"]), store, t.layer, "train split")
    val = features.load(table, features.select(table, t.datasets, ["val"]), store, t.layer, "val split")
    probe, val_auc = fit_and_select(train, val, t.C, t.normalize, t.max_iter)
    card = {
        "model": store.card["model"],
        "fingerprint": store.header.fingerprint,
        "layer": t.layer,
        "datasets": list(t.datasets),
        "n_train": len(train.y),
        "n_val": len(val.y),
        "val_auc": {str(c): a for c, a in val_auc.items()},
        "selected_by": "val AUC",
    }
    card = probe.save(outputs.probe, card)
    log.info(
        "probe: C=%g (val AUC %.4f) on %d train images -> %s", probe.C, val_auc[probe.C], len(train.y), outputs.probe
    )
    return card
