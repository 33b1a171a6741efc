"""Probes round-trip without pickle; metrics agree with scikit-learn; evaluation uses held-out reals."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from pipeline import config, evaluate, extract, manifest, train
from pipeline.metrics import binary_metrics, roc_points
from pipeline.outputs import Outputs
from pipeline.probes import NORMALIZATIONS, LinearProbe


def blobs(n=200, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    X = rng.normal(size=(n, dim)) + y[:, None] * 0.8
    return X.astype(np.float32), y


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_probe_round_trips_through_safetensors_and_json(tmp_path, normalize):
    X, y = blobs()
    probe = LinearProbe(C=0.5, normalize=normalize).fit(X, y)
    assert probe.fit(X, y) is probe
    probe.save(tmp_path / "probe", {"layer": "projection"})
    loaded, card = LinearProbe.load(tmp_path / "probe")
    np.testing.assert_allclose(loaded.predict_proba(X), probe.predict_proba(X), rtol=1e-12)
    assert card["C"] == 0.5 and card["normalize"] == normalize and card["layer"] == "projection"
    assert set(load_file(str(tmp_path / "probe" / "weights.safetensors"))) == {"coef", "intercept", "mean", "scale"}


def test_standardized_probe_matches_the_original_scripts_sklearn_pipeline():
    X, y = blobs(seed=1)
    probe = LinearProbe(C=1.0, normalize="standardize").fit(X, y)
    scaler = StandardScaler().fit(X)
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X), y)
    np.testing.assert_allclose(probe.predict_proba(X), reference.predict_proba(scaler.transform(X))[:, 1], atol=1e-6)


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=300)
    scores = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    m = binary_metrics(y, scores)
    assert m["auc"] == pytest.approx(roc_auc_score(y, scores))
    assert m["ap"] == pytest.approx(average_precision_score(y, scores))
    assert m["n_real"] == (y == 0).sum() and m["n_fake"] == (y == 1).sum()
    assert m["fake_accuracy"] == pytest.approx((scores[y == 1] >= 0.5).mean())
    assert m["real_accuracy"] == pytest.approx((scores[y == 0] < 0.5).mean())
    points = roc_points(y, scores)
    assert points[0] == {"fpr": 0.0, "tpr": 0.0, "threshold": 1.0}
    assert points[-1]["fpr"] == points[-1]["tpr"] == 1.0


def test_a_one_class_test_set_gives_null_not_nan():
    m = binary_metrics(np.ones(5, int), np.linspace(0, 1, 5))
    assert m["auc"] is None and m["ap"] is None and m["real_accuracy"] is None
    json.dumps(m, allow_nan=False)
    assert roc_points(np.ones(5, int), np.linspace(0, 1, 5)) == []


def test_train_picks_C_on_val_and_evaluate_scores_fakes_with_held_out_reals(project):
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    extract.run(settings, outputs)
    card = train.run(settings, outputs)
    assert set(card["val_auc"]) == {str(c) for c in settings.train.C}
    assert card["C"] == float(max(card["val_auc"], key=lambda c: (card["val_auc"][c], -float(c))))

    results = evaluate.run(settings, outputs)
    table = pq.read_table(outputs.manifest).to_pandas()
    real_test = ((table.dataset == "real_youtube") & (table.split == "test")).sum()
    assert set(results) == set(settings.evaluate.datasets)
    for name, m in results.items():
        assert m["n_real"] == real_test > 0
        assert m["n_fake"] == ((table.dataset == name) & (table.split == "test")).sum() > 0
        assert 0.0 <= m["auc"] <= 1.0
        roc = json.loads((outputs.roc_plots / f"{name}.json").read_text())
        assert roc[0]["fpr"] == 0.0 and roc[-1]["tpr"] == 1.0
    assert json.loads(outputs.metrics.read_text()) == results
    shown = evaluate.table_text(evaluate.read_metrics(outputs)).splitlines()
    assert shown[0].split()[:4] == ["dataset", "n_real", "n_fake", "auc"]
    assert [line.split()[0] for line in shown[1:]] == sorted(settings.evaluate.datasets)
