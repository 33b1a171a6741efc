"""Every probe on cached embeddings: normalisation, fitting (in memory or streamed), the choice
of C and of a decision threshold on the val split, and saving without pickle.

Kinds: `logreg` (scikit-learn's LogisticRegression, the original script's probe, solved to its
optimum: scikit-learn's lbfgs on well-conditioned rows, a C grid's from shared passes over the
rows (`logistic.lbfgs_grid`), Newton steps (`logistic.newton_cg`) where lbfgs would crawl),
`linear_svm` (LinearSVC) and `mlp` (scikit-learn's MLPClassifier with one hidden layer, early
stopping on the val split; `MLPProbe`). Both end as a weight vector and a bias on normalised features, so
one class scores them: score = sigmoid(w . normalise(x) + b), which is P(fake) for logreg and
a monotone squashing of the margin for the SVM (0.5 <=> margin 0 either way). The zero-shot
baseline (`ZeroShotProbe`) scores by cosine similarity to text prompts instead.

Training data comes in two shapes: `Labelled` rows in memory, or a `Chunked` source that is
read one part (shard) at a time for caches larger than memory (`train.stream: true`), fitted
with SGDClassifier.partial_fit (log loss for `logreg`, hinge for `linear_svm`; C maps to
alpha = 1 / (C * n)). `fit_and_select` takes either; the data views in `features` only read.

`LinearProbe` follows scikit-learn's contract: `__init__` stores settings, `fit` returns self,
learned attributes end in `_`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline import atomic, logistic, machine
from pipeline.config import ConfigError, TrainSettings

log = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "l2", "standardize", "l2+standardize")
KINDS = ("logreg", "linear_svm")  # the linear ones; `mlp` is MLPProbe
MLP_PATIENCE = 10  # epochs without a better val AUC before an MLP stops
MLP_MAX_EPOCHS = 200
MLP_BATCH = 32  # adam minibatch (rows)
MLP_LEARNING_RATE = 0.01  # adam; early stopping on val keeps the best epoch
BUFFER_ROWS = 32_768  # streamed fitting: rows shuffled together before minibatches (bounds memory)
MINIBATCH = 1024
# logreg: on rows whose Gram matrix has a condition number above KAPPA_NEWTON (a backbone's
# embeddings: ~1e7 for a random-weight ViT-B/32, against ~1e2 for isotropic rows and ~1e4 for the
# demo's tiny CLIP), Newton steps from the start (`logistic.newton_cg`); lbfgs's steps grow with
# that number (on a ViT-B/32's 17,344 x 512 training rows it stopped at 2,000, 11 s per C, short of
# the optimum). Other rows get LBFGS_STEPS of lbfgs (most converge in 13-47), then, if it has not
# converged, Newton steps from there. Beyond NEWTON_MAX_DIM features a Hessian costs more than
# lbfgs's crawl: lbfgs throughout.
KAPPA_NEWTON = 1e6
LBFGS_STEPS = 100
NEWTON_MAX_DIM = 2048
TOL = 1e-8  # max |gradient| of scikit-learn's scaled objective: results do not depend on the CPU's last bits


# --------------------------------------------------------------------------- normalisation


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (rows of zeros stay zero), in X's own dtype."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class Normalizer:
    """`normalize` as the probes apply it: optional L2 per row, then optional standardisation per
    feature with statistics of the training rows (exact, or accumulated part by part)."""

    def __init__(self, normalize: str):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}")
        self.normalize = normalize
        self._n, self._total, self._squares = 0, None, None

    def rows(self, X: np.ndarray) -> np.ndarray:
        """The per-row step (L2 if asked), in float64."""
        X = np.asarray(X, dtype=np.float64)
        return l2_normalize(X) if "l2" in self.normalize else X

    def fit_transform(self, X: np.ndarray, parallel_map=map) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normalised rows, mean, scale) with one float64 copy of X: centred in place, and the
        scale (numpy's `std`, the same arithmetic) from the centred rows a block of columns at a
        time, instead of `std`'s own centred copy of all the rows (9 passes over the rows -> 6).
        Each column's statistics depend on that column alone: the two halves of the columns are
        done side by side (`parallel_map`, a pool's `map`), bit for bit what one thread computes."""
        if "l2" in self.normalize:  # a row's norm needs all its columns: converted whole first
            Z = self.rows(X)
            Z = Z.copy() if np.shares_memory(Z, X) else Z
        else:
            Z = np.empty(X.shape, dtype=np.float64)
        if "standardize" not in self.normalize:
            if "l2" not in self.normalize:
                Z[...] = X
            return Z, np.zeros(Z.shape[1]), np.ones(Z.shape[1])
        d = Z.shape[1]
        mean, scale = np.empty(d), np.empty(d)

        def columns(part: slice) -> None:
            block = Z[:, part]
            if "l2" not in self.normalize:
                block[...] = X[:, part]
            mean[part] = block.mean(axis=0)
            block -= mean[part]
            var = np.empty(block.shape[1])
            for j in range(0, block.shape[1], 64):  # each column summed over the rows in order, as `std` does
                np.divide(np.square(block[:, j : j + 64]).sum(axis=0), len(block), out=var[j : j + 64])
            std = np.sqrt(var)
            scale[part] = np.where(std > 1e-12, std, 1.0)
            block /= scale[part]

        half = d // 2
        list(parallel_map(columns, (slice(0, half), slice(half, d))))
        return Z, mean, scale

    def add(self, X: np.ndarray) -> None:
        """Accumulate the moments of one part of the training rows (see `fitted`)."""
        Z = self.rows(X)
        self._total = Z.sum(0) if self._total is None else self._total + Z.sum(0)
        self._squares = (Z**2).sum(0) if self._squares is None else self._squares + (Z**2).sum(0)
        self._n += len(Z)

    def fitted(self, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(mean, scale, n) from the parts added so far."""
        n = self._n
        if "standardize" not in self.normalize or n == 0:
            return np.zeros(dim), np.ones(dim), n
        mean = self._total / n
        std = np.sqrt(np.maximum(self._squares / n - mean**2, 0.0))
        return mean, np.where(std > 1e-12, std, 1.0), n


# --------------------------------------------------------------------------- linear probes


@dataclass
class Plan:
    """How `logreg` is solved on one set of normalised rows, shared by a C grid: Newton steps from
    the start on ill-conditioned rows (with what every C's solver shares), else lbfgs first (see
    KAPPA_NEWTON)."""

    newton_first: bool
    shared: logistic.Shared | None = None
    lbfgs: dict[float, logistic.Solution] | None = None  # a grid's first LBFGS_STEPS, every C at once, by C

    @classmethod
    def of(cls, Z: np.ndarray, parallel_map=map) -> Plan:
        """The route for rows Z, from the spectrum of 4 d of them; `parallel_map`: a pool's `map`."""
        n, d = Z.shape
        if d > NEWTON_MAX_DIM:
            return cls(False)
        sample = Z[np.linspace(0, n - 1, min(n, 4 * d)).astype(int)]  # 4 d rows tell 1e2 from 1e7 (overstate < 10x)
        spectrum = np.linalg.eigvalsh(logistic.gram_in_halves(sample, parallel_map), UPLO="L")
        if spectrum[-1] <= KAPPA_NEWTON * max(spectrum[0], 0.0):
            return cls(False)
        return cls(True, logistic.Shared.of(Z, parallel_map))


class LinearProbe:
    def __init__(self, kind: str = "logreg", C: float = 1.0, normalize: str = "standardize", max_iter: int = 2000):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}")
        self.kind = kind
        self.C = C
        self.normalize = normalize
        self.max_iter = max_iter

    @classmethod
    def from_weights(
        cls, settings: dict, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float
    ) -> LinearProbe:
        """A fitted probe from its settings (kind, C, normalize, max_iter) and learned weights."""
        probe = cls(**settings)
        probe.mean_, probe.scale_ = mean, scale
        probe.coef_, probe.intercept_ = np.asarray(coef, dtype=np.float64), float(intercept)
        return probe

    def settings(self) -> dict:
        return {"kind": self.kind, "C": self.C, "normalize": self.normalize, "max_iter": self.max_iter}

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (Normalizer(self.normalize).rows(X) - self.mean_) / self.scale_

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        Z, mean, scale = Normalizer(self.normalize).fit_transform(X)
        return self.fit_normalized(Z, y, mean, scale)

    def fit_normalized(
        self, Z: np.ndarray, y: np.ndarray, mean: np.ndarray, scale: np.ndarray, plan: Plan | None = None
    ) -> LinearProbe:
        """`fit` on rows already normalised with (mean, scale), and the logreg solver's `plan` for
        them: what a C grid shares."""
        self.mean_, self.scale_ = mean, scale
        y = np.asarray(y)
        if self.kind == "logreg":
            coef, intercept, converged = self._logreg(Z, y, plan or Plan.of(Z))
        else:
            clf = LinearSVC(C=self.C, max_iter=self.max_iter).fit(Z, y)
            coef, intercept, converged = clf.coef_, clf.intercept_[0], int(np.max(clf.n_iter_)) < self.max_iter
        if not converged:
            log.warning(
                "the %s probe with C=%g stopped after train.max_iter = %d iterations before converging; "
                "its numbers are not the probe's optimum: raise train.max_iter.",
                self.kind, self.C, self.max_iter,
            )  # fmt: skip
        self.coef_ = np.asarray(coef, dtype=np.float64).ravel()
        self.intercept_ = float(intercept)
        return self

    def _logreg(self, Z: np.ndarray, y: np.ndarray, plan: Plan) -> tuple[np.ndarray, float, bool]:
        """(coef, intercept, converged) by the route `plan` chose (see KAPPA_NEWTON)."""
        if plan.newton_first:
            s = logistic.newton_cg(Z, y, self.C, TOL, self.max_iter, shared=plan.shared)
            return s.coef, s.intercept, s.converged
        budget = min(LBFGS_STEPS, self.max_iter)
        first = plan.lbfgs.get(self.C) if plan.lbfgs else None
        first = first or logistic.lbfgs_grid(Z, y, [self.C], TOL, budget)[0]
        if first.converged or self.max_iter == budget:
            return first.coef, first.intercept, first.converged
        start, rest = (first.coef, first.intercept), self.max_iter - budget
        if Z.shape[1] > NEWTON_MAX_DIM:
            s = logistic.lbfgs_grid(Z, y, [self.C], TOL, rest, starts=[start])[0]
        else:
            s = logistic.newton_cg(Z, y, self.C, TOL, rest, start=start)
        return s.coef, s.intercept, s.converged

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
        with _reading(directory) as (card, t):
            return cls._saved(card, t), card

    @classmethod
    def _saved(cls, card: dict, t: dict[str, np.ndarray]) -> LinearProbe:
        settings = {"kind": card["probe"], "C": card["C"], "normalize": card["normalize"], "max_iter": card["max_iter"]}
        return cls.from_weights(settings, t["mean"], t["scale"], t["coef"], float(t["intercept"][0]))


class MLPProbe:
    """One hidden layer (ReLU) on normalised features, fitted by scikit-learn's MLPClassifier
    (adam, minibatches of MLP_BATCH, L2 penalty alpha = 1 / (C * n)) one epoch at a time; the
    epoch with the best val AUC is kept (early stopping on the val split, after MLP_PATIENCE
    epochs without improvement).
    Deterministic for a seed. Saved as safetensors + JSON like the linear probes."""

    kind = "mlp"

    def __init__(self, C: float = 1.0, normalize: str = "standardize", hidden: int = 256, seed: int = 0,
                 max_iter: int = MLP_MAX_EPOCHS):  # fmt: skip
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}")
        self.C, self.normalize, self.hidden, self.seed, self.max_iter = C, normalize, hidden, seed, max_iter

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (Normalizer(self.normalize).rows(X) - self.mean_) / self.scale_

    def fit(self, X: np.ndarray, y: np.ndarray, val_X: np.ndarray, val_y: np.ndarray) -> MLPProbe:
        from sklearn.neural_network import MLPClassifier

        Z, self.mean_, self.scale_ = Normalizer(self.normalize).fit_transform(X)  # = self.transform(X)
        val_Z, y = self.transform(val_X), np.asarray(y)
        net = MLPClassifier(
            hidden_layer_sizes=(self.hidden,),
            alpha=1.0 / (self.C * len(y)),
            batch_size=min(MLP_BATCH, len(y)),
            learning_rate_init=MLP_LEARNING_RATE,
            random_state=self.seed,
        )
        best, waited = (-1.0, None), 0
        for epoch in range(min(self.max_iter, MLP_MAX_EPOCHS)):
            net.partial_fit(Z, y, classes=[0, 1])
            auc = float(roc_auc_score(val_y, net.predict_proba(val_Z)[:, 1]))
            if auc > best[0]:
                best, waited = (auc, ([w.copy() for w in net.coefs_], [b.copy() for b in net.intercepts_], epoch)), 0
            else:
                waited += 1
                if waited >= MLP_PATIENCE:
                    break
        (self.w1_, self.w2_), (self.b1_, self.b2_), self.epochs_ = best[1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        hidden = np.maximum(self.transform(X) @ self.w1_ + self.b1_, 0.0)
        return (hidden @ self.w2_ + self.b2_).ravel()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = np.clip(self.decision_function(X), -500, 500)
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, directory: Path, card: dict) -> dict:
        tensors = {
            "w1": self.w1_,
            "b1": self.b1_,
            "w2": self.w2_,
            "b2": self.b2_,
            "mean": self.mean_,
            "scale": self.scale_,
        }
        card = {**card, "probe": "mlp", "C": self.C, "normalize": self.normalize, "hidden": self.hidden,
                "seed": self.seed, "max_iter": self.max_iter, "epochs": int(self.epochs_) + 1}  # fmt: skip
        with atomic.atomic_dir(Path(directory)) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
            (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")
        return card


def load(directory: Path) -> tuple[LinearProbe | MLPProbe, dict]:
    """The probe saved in `directory` (whichever kind), and its card."""
    with _reading(directory) as (card, t):
        if card.get("probe") != "mlp":
            return LinearProbe._saved(card, t), card
        probe = MLPProbe(C=card["C"], normalize=card["normalize"], hidden=card["hidden"], seed=card["seed"],
                         max_iter=card["max_iter"])  # fmt: skip
        probe.w1_, probe.b1_, probe.w2_, probe.b2_ = t["w1"], t["b1"], t["w2"], t["b2"]
        probe.mean_, probe.scale_, probe.epochs_ = t["mean"], t["scale"], card["epochs"] - 1
        return probe, card


@contextlib.contextmanager
def _reading(directory: Path) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """A saved probe's card and tensors, for building the probe inside the block; a missing probe,
    or a damaged one (cut short, or not what train writes), is one sentence."""
    directory = Path(directory)
    if not (directory / "card.json").exists() or not (directory / "weights.safetensors").exists():
        raise ConfigError(f"no probe in {directory}; run the train stage first (`dvc repro train`).")
    try:
        yield json.loads((directory / "card.json").read_text()), load_file(str(directory / "weights.safetensors"))
    except (ValueError, KeyError, IndexError, TypeError, SafetensorError) as exc:
        raise ConfigError(
            f"the probe in {directory} is damaged ({type(exc).__name__}: {exc}); run the train stage again "
            "(`dvc repro train`), or `dvc pull` it."
        ) from None


class ZeroShotProbe:
    """No training: the model's own image-text scoring of the best real and the best fake prompt.
    `softmax` (CLIP, MetaCLIP, open_clip): softmax over scale x cosine similarity; `sigmoid`
    (SigLIP): each prompt's own probability sigmoid(scale x cosine + bias), and the fake score is
    p_fake / (p_fake + p_real)."""

    def __init__(self, real: np.ndarray, fake: np.ndarray, logit_scale: float, logit_bias: float = 0.0,
                 scoring: str = "softmax"):  # fmt: skip
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError("scoring must be softmax or sigmoid")
        self.real, self.fake = real, fake
        self.scale, self.bias, self.scoring = logit_scale, logit_bias, scoring

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        img = l2_normalize(X)
        logits = self.scale * np.stack([(img @ self.real.T).max(1), (img @ self.fake.T).max(1)], axis=1)
        if self.scoring == "sigmoid":
            log_p = -np.logaddexp(0.0, -(logits + self.bias))  # log sigmoid, per prompt
            return 1.0 / (1.0 + np.exp(np.clip(log_p[:, 0] - log_p[:, 1], -500, 500)))
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p[:, 1] / p.sum(1)


# --------------------------------------------------------------------------- training data


@dataclass
class Labelled:
    """Rows in memory: features X (n, dim) and labels y (n,)."""

    X: np.ndarray
    y: np.ndarray


@runtime_checkable
class Chunked(Protocol):
    """Rows read one part at a time (a cache larger than memory): labels are known up front."""

    y: np.ndarray  # every row's label (the order of `read` may differ)
    dim: int

    def parts(self) -> int: ...

    def read(self, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(X, y) of each part, in `order` (part indices) or part order."""
        ...


# --------------------------------------------------------------------------- fitting and selection


@dataclass
class Fitted:
    probe: LinearProbe | MLPProbe
    val_auc: dict[float, float]  # C -> val AUC
    threshold: float  # the val threshold with the best balanced accuracy


def choose_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises balanced accuracy (Youden's J) on these samples."""
    fpr, tpr, thr = roc_curve(y, scores)
    return float(min(thr[int(np.argmax(tpr - fpr))], 1.0))


def best_C(val_auc: dict[float, float]) -> float:
    """The C with the best val AUC; the smaller C on ties (the simpler probe)."""
    return max(val_auc, key=lambda C: (val_auc[C], -C))


def check_both_classes(train_y: np.ndarray, val_y: np.ndarray, what: str) -> None:
    for y, split in ((train_y, "train"), (val_y, "val")):
        if set(np.unique(y)) != {0, 1}:
            raise ConfigError(
                f"the {split} split of {what} needs both real and fake images (it has {len(y)} images); "
                "add data or change data.split."
            )


def fit_and_select(
    train: Labelled | Chunked, val: Labelled | Chunked, spec: TrainSettings, what: str = "train.datasets"
) -> Fitted:
    """One probe per C in `spec.C` fitted on train; the best val AUC wins (the smaller C on
    ties) and the decision threshold is chosen on val. Streamed when the data is `Chunked`."""
    check_both_classes(train.y, val.y, what)
    if spec.probe == "mlp":
        if isinstance(train, Chunked):
            raise ConfigError("train.probe mlp reads the cache in memory; set train.stream: false.")
        fitted = _fit_mlp(train, val, spec)
    elif isinstance(train, Chunked):
        fitted = _fit_streamed(train, val, spec)
    else:
        fitted = _fit_in_memory(train, val, spec)
    for C, auc in fitted.val_auc.items():
        log.debug("%s C=%g: val AUC %.4f", what, C, auc)
    return fitted


def _fit_in_memory(train: Labelled, val: Labelled, spec: TrainSettings) -> Fitted:
    """The C grid normalises the rows once and fits its probes side by side, one thread per core,
    each with a single-threaded BLAS: a probe's solver is bound by memory bandwidth on these
    matrix-vector products, so this is faster than one probe at a time on all cores (3.5x on 2
    cores) and gives the same probes on any number of cores. On the lbfgs route the grid's first
    LBFGS_STEPS are taken together (`logistic.lbfgs_grid`: one read of the rows per step for every
    C, 1.7x faster than a read per C on 17,280 x 768 rows)."""
    grid = sorted(spec.C, reverse=True)  # the largest C converges slowest: started first, the threads finish together
    with threadpool_limits(1), ThreadPoolExecutor(min(len(grid), machine.cores())) as pool:
        normalizer = Normalizer(spec.normalize)
        Z, mean, scale = normalizer.fit_transform(train.X, pool.map)
        plan = Plan.of(Z, pool.map) if spec.probe == "logreg" else None
        if plan is not None and not plan.newton_first:
            steps = min(LBFGS_STEPS, spec.max_iter)
            first = logistic.lbfgs_grid(Z, train.y, grid, TOL, steps, parallel_map=pool.map)
            plan.lbfgs = dict(zip(grid, first, strict=True))
        return _select(Z, mean, scale, plan, train.y, val, spec, pool)


def _select(
    Z: np.ndarray | None, mean: np.ndarray, scale: np.ndarray, plan: Plan | None, y: np.ndarray, val: Labelled,
    spec: TrainSettings, pool: ThreadPoolExecutor,
) -> Fitted:  # fmt: skip
    """Each C's probe on the normalised rows Z (None where nothing is left to fit: `plan.lbfgs`
    holds every C's final solution, converged or at `train.max_iter`), the best on val, and its
    threshold."""
    grid = sorted(spec.C, reverse=True)
    val_Z = (Normalizer(spec.normalize).rows(val.X) - mean) / scale

    def one(C: float) -> tuple[LinearProbe, float]:
        probe = LinearProbe(kind=spec.probe, C=C, normalize=spec.normalize, max_iter=spec.max_iter)
        probe.fit_normalized(Z, y, mean, scale, plan)
        return probe, float(roc_auc_score(val.y, val_Z @ probe.coef_ + probe.intercept_))

    fitted = dict(zip(grid, pool.map(one, grid), strict=True))
    aucs = {C: auc for C, (_, auc) in fitted.items()}
    best = fitted[best_C(aucs)][0]
    return Fitted(best, aucs, choose_threshold(val.y, best.predict_proba(val.X)))


def fit_and_select_many(
    X: np.ndarray, y: np.ndarray, sets: list[tuple[np.ndarray, np.ndarray]], spec: TrainSettings, whats: list[str],
    desc: str = "probes",
) -> list[Fitted]:  # fmt: skip
    """`fit_and_select` for several (train, val) row masks over the rows X (labels y), in memory:
    a protocol's folds. On the lbfgs route the first LBFGS_STEPS of every fold and C are taken
    together (`logistic.lbfgs_shared`: one pass over the union of the folds' rows answers them
    all, ~1.8x less work per probe than a pass per fold); each fold's rows are still normalised
    with their own statistics, and every probe is its own problem's optimum. A fold's rows are
    copied out of X only while it is worked on."""

    def labelled(mask: np.ndarray) -> Labelled:
        return Labelled(X[mask], y[mask])

    if spec.probe != "logreg" or len(sets) < 2:
        return [fit_and_select(labelled(t), labelled(v), spec, w) for (t, v), w in zip(sets, whats, strict=True)]
    for (train, val), what in zip(sets, whats, strict=True):
        check_both_classes(y[train], y[val], what)
    grid, steps = sorted(spec.C, reverse=True), min(LBFGS_STEPS, spec.max_iter)
    out: list[Fitted | None] = [None] * len(sets)
    with threadpool_limits(1), ThreadPoolExecutor(min(len(grid), machine.cores())) as pool:
        normalizer, shared = Normalizer(spec.normalize), []
        for i, (train, val) in enumerate(sets):
            Z, mean, scale = normalizer.fit_transform(X[train], pool.map)
            plan = Plan.of(Z, pool.map)
            if plan.newton_first:  # fitted now, from the rows at hand
                out[i] = _select(Z, mean, scale, plan, y[train], labelled(val), spec, pool)
            else:
                shared.append((i, mean, scale, plan))
            del Z  # one fold's normalised rows at a time
        if shared:
            union = np.logical_or.reduce([sets[i][0] for i, *_ in shared])
            rows = X[union] if "l2" not in spec.normalize else normalizer.rows(X[union])
            problems = [
                logistic.Problem(sets[i][0][union], C, mean, scale) for i, mean, scale, _ in shared for C in grid
            ]
            with tqdm(total=len(problems), desc=f"{desc}: fitting", unit="fit", leave=False) as bar:
                first = logistic.lbfgs_shared(rows, y[union], problems, TOL, steps, pool.map, done=bar.update)
            first = iter(first)
            del rows
        for i, mean, scale, plan in shared:
            plan.lbfgs = {C: next(first) for C in grid}
            train, val = sets[i]
            unfinished = spec.max_iter > steps and not all(s.converged for s in plan.lbfgs.values())
            Z = normalizer.fit_transform(X[train], pool.map)[0] if unfinished else None  # the same bits again
            out[i] = _select(Z, mean, scale, plan, y[train], labelled(val), spec, pool)
    return out


def _fit_mlp(train: Labelled, val: Labelled, spec: TrainSettings) -> Fitted:
    probes, aucs = {}, {}
    for C in sorted(spec.C):
        probe = MLPProbe(C=C, normalize=spec.normalize, hidden=spec.hidden, seed=spec.seed, max_iter=spec.max_iter)
        probe.fit(train.X, train.y, val.X, val.y)
        probes[C], aucs[C] = probe, float(roc_auc_score(val.y, probe.decision_function(val.X)))
    best = probes[best_C(aucs)]
    return Fitted(best, aucs, choose_threshold(val.y, best.predict_proba(val.X)))


def _fit_streamed(train: Chunked, val: Chunked, spec: TrainSettings, seed: int = 0) -> Fitted:
    """SGD probes, one per C, trained in the same passes. Parts (shards) are often one dataset
    each, so every epoch visits them in a random order and shuffles a bounded buffer of rows
    before the minibatches; normalisation statistics come from a first pass. Peak memory is
    bounded by the buffer and one part, not by the size of the data."""
    normalizer = Normalizer(spec.normalize)
    for X, _ in train.read():
        normalizer.add(X)
    mean, scale, n = normalizer.fitted(train.dim)
    loss = "log_loss" if spec.probe == "logreg" else "hinge"
    models = {C: SGDClassifier(loss=loss, alpha=1.0 / (C * n), random_state=seed) for C in sorted(spec.C)}
    rng = np.random.default_rng(seed)

    def train_on(X: np.ndarray, y: np.ndarray) -> None:
        perm = rng.permutation(len(y))
        Z = (normalizer.rows(X[perm]) - mean) / scale
        for start in range(0, len(y), MINIBATCH):
            for model in models.values():
                model.partial_fit(Z[start : start + MINIBATCH], y[perm][start : start + MINIBATCH], classes=[0, 1])

    for _ in range(spec.epochs):
        buffer_X, buffer_y, rows = [], [], 0
        for X, y in train.read(order=rng.permutation(train.parts())):
            buffer_X.append(X)
            buffer_y.append(y)
            rows += len(y)
            if rows >= BUFFER_ROWS:
                train_on(np.concatenate(buffer_X), np.concatenate(buffer_y))
                buffer_X, buffer_y, rows = [], [], 0
        if rows:
            train_on(np.concatenate(buffer_X), np.concatenate(buffer_y))

    settings = {"kind": spec.probe, "normalize": spec.normalize, "max_iter": spec.max_iter}
    probes = {
        C: LinearProbe.from_weights({**settings, "C": C}, mean, scale, m.coef_.ravel(), m.intercept_[0])
        for C, m in models.items()
    }
    val_y, val_scores = [], {C: [] for C in probes}
    for X, y in val.read():
        val_y.append(y)
        for C, probe in probes.items():
            val_scores[C].append(probe.predict_proba(X))
    y = np.concatenate(val_y)
    aucs = {C: float(roc_auc_score(y, np.concatenate(s))) for C, s in val_scores.items()}
    best = best_C(aucs)
    return Fitted(probes[best], aucs, choose_threshold(y, np.concatenate(val_scores[best])))
