"""evaluate stage: score each fake test set together with the held-out real test split.

A fake-only test set has no AUC (the original script's mistake); here every fake dataset's
test-split frames are scored with the real test-split frames of the probe's training reals.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from pipeline import atomic, features
from pipeline import manifest as manifest_mod
from pipeline.config import ConfigError, Settings
from pipeline.metrics import binary_metrics, roc_points
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe

log = logging.getLogger(__name__)


def run(settings: Settings, outputs: Outputs) -> dict:
    probe, card = LinearProbe.load(outputs.probe)
    table = manifest_mod.read(outputs.manifest)
    store = features.open_cache(outputs)
    if store.header.fingerprint != card["fingerprint"]:
        log.warning(
            "the probe was trained on cache %s but the current cache is %s",
            card["fingerprint"],
            store.header.fingerprint,
        )
    layer = card["layer"]
    # The held-out reals: test-split real frames of the datasets the probe was trained on.
    real_mask = features.select(table, card["datasets"], ["test"], labels=[0])
    reals = features.load(table, real_mask, store, layer, "real test split")
    real_scores = probe.predict_proba(reals.X)

    results, curves = {}, {}
    for name in settings.evaluate.datasets:
        fakes = features.load(table, features.select(table, [name], ["test"]), store, layer, f"{name} test split")
        y = np.concatenate([np.zeros(len(real_scores), int), np.ones(len(fakes.y), int)])
        scores = np.concatenate([real_scores, probe.predict_proba(fakes.X)])
        results[name] = binary_metrics(y, scores, name=name)
        curves[name] = roc_points(y, scores)

    atomic.write_json(outputs.metrics, results)
    outputs.roc_plots.mkdir(parents=True, exist_ok=True)
    for stale in outputs.roc_plots.glob("*.json"):
        if stale.stem not in curves:
            stale.unlink()
    for name, points in curves.items():
        atomic.write_json(outputs.roc_plots / f"{name}.json", points)
    log.info("metrics -> %s\n%s", outputs.metrics, table_text(results))
    return results


def read_metrics(outputs: Outputs) -> dict:
    if not outputs.metrics.exists():
        raise ConfigError(f"{outputs.metrics} does not exist; run the evaluate stage first (`dvc repro`).")
    return json.loads(outputs.metrics.read_text())


def table_text(results: dict) -> str:
    cols = ["n_real", "n_fake", "auc", "ap", "accuracy", "real_accuracy", "fake_accuracy"]
    lines = [f"{'dataset':<16}" + "".join(f"{c:>14}" for c in cols)]
    for name, m in results.items():
        cells = "".join(
            f"{'-' if m[c] is None else (m[c] if isinstance(m[c], int) else f'{m[c]:.4f}'):>14}" for c in cols
        )
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)
