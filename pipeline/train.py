"""train stage: fit a probe on cached embeddings; C (and a decision threshold) are chosen on
the val split only (`pipeline.probes`)."""

from __future__ import annotations

import logging

from pipeline import features, manifest_table, probes
from pipeline.config import Settings
from pipeline.outputs import Outputs

log = logging.getLogger(__name__)


def run(settings: Settings, outputs: Outputs) -> dict:
    t = settings.train
    table = manifest_table.read(outputs.manifest)
    store = features.open_cache(outputs)
    for layer in t.layers:
        store.dimension(layer)  # a clear error now if a layer is not cached
    frames = features.load(table, store, t.layer, stream=t.stream)
    train, val = frames.train_val(t.datasets)
    fitted = probes.fit_and_select(*frames.training_data(t.datasets), t, what="+".join(t.datasets))
    for C, auc in fitted.val_auc.items():
        log.info("C=%g: val AUC %.4f", C, auc)
    card = {
        "model": store.card["model"],
        "fingerprint": store.header.fingerprint,
        "layer": t.layer,
        "datasets": list(t.datasets),
        "n_train": int(train.sum()),
        "n_val": int(val.sum()),
        "train_val_sha256": frames.train_val_sha256(t.datasets),
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
