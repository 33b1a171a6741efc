"""Linear probes on cached embeddings, saved without pickle (safetensors weights + JSON card).

Kinds: `logreg` (scikit-learn's LogisticRegression, the original script's probe) and
`linear_svm` (LinearSVC). Both end as a weight vector and a bias on normalised features, so
one class scores them: score = sigmoid(w . normalise(x) + b), which is P(fake) for logreg and
a monotone squashing of the margin for the SVM (0.5 <=> margin 0 either way).

The estimator follows scikit-learn's contract: `__init__` stores settings, `fit` returns self,
learned attributes end in `_`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from pipeline import atomic
from pipeline.config import ConfigError

NORMALIZATIONS = ("none", "l2", "standardize", "l2+standardize")
KINDS = ("logreg", "linear_svm")


class LinearProbe:
    def __init__(self, kind: str = "logreg", C: float = 1.0, normalize: str = "standardize", max_iter: int = 2000):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        self.C = C
        self.normalize = normalize
        self.max_iter = max_iter

    # ------------------------------------------------------------------ features

    def _l2(self, X: np.ndarray) -> np.ndarray:
        if "l2" not in self.normalize:
            return X
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = self._l2(np.asarray(X, dtype=np.float64))
        return (X - self.mean_) / self.scale_

    # ------------------------------------------------------------------ estimator

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        X = self._l2(np.asarray(X, dtype=np.float64))
        if "standardize" in self.normalize:
            self.mean_ = X.mean(axis=0)
            std = X.std(axis=0)
            self.scale_ = np.where(std > 1e-12, std, 1.0)
        else:
            self.mean_ = np.zeros(X.shape[1])
            self.scale_ = np.ones(X.shape[1])
        if self.kind == "logreg":
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=1e-8)
        else:
            clf = LinearSVC(C=self.C, max_iter=self.max_iter)
        clf.fit((X - self.mean_) / self.scale_, np.asarray(y))
        self.coef_ = clf.coef_.ravel().astype(np.float64)
        self.intercept_ = float(clf.intercept_[0])
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.transform(X) @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """The fake score per row, in (0, 1)."""
        z = np.clip(self.decision_function(X), -500, 500)
        return 1.0 / (1.0 + np.exp(-z))

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path, card: dict) -> dict:
        """Write weights.safetensors + card.json, replacing the directory as a whole (never new
        weights beside an old card); returns the card as written."""
        tensors = {
            "coef": self.coef_,
            "intercept": np.array([self.intercept_]),
            "mean": self.mean_,
            "scale": self.scale_,
        }
        card = {**card, "probe": self.kind, "C": self.C, "normalize": self.normalize, "max_iter": self.max_iter}
        with atomic.atomic_dir(Path(directory)) as tmp:
            save_file(tensors, str(tmp / "weights.safetensors"))
            (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")
        return card

    @classmethod
    def load(cls, directory: Path) -> tuple[LinearProbe, dict]:
        directory = Path(directory)
        if not (directory / "card.json").exists() or not (directory / "weights.safetensors").exists():
            raise ConfigError(f"no probe in {directory}; run the train stage first (`dvc repro train`).")
        card = json.loads((directory / "card.json").read_text())
        tensors = load_file(str(directory / "weights.safetensors"))
        probe = cls(kind=card["probe"], C=card["C"], normalize=card["normalize"], max_iter=card["max_iter"])
        probe.coef_ = tensors["coef"]
        probe.intercept_ = float(tensors["intercept"][0])
        probe.mean_ = tensors["mean"]
        probe.scale_ = tensors["scale"]
        return probe, card
