"""L2-penalised logistic regression solved by Newton's method with conjugate-gradient steps: the
`logreg` probe's solver where scikit-learn's lbfgs crawls; and scikit-learn's lbfgs itself for
every C of a grid at once, from shared passes over the rows (`lbfgs_grid`), where it does not.

The objective is scikit-learn's `LogisticRegression(C)`, scaled as it scales it:

    F(w, b) = mean_i log(1 + exp(-s_i (z_i . w + b))) + |w|^2 / (2 C n),   s_i = +-1,

with the intercept b unpenalised, and the stopping rule is its too: max |grad F| <= tol. The
optimum is the same; only the path to it differs.

Why: a backbone's embeddings have a spectrum spanning many decades (a random-weight ViT-B/32's
standardised features: eigenvalues from ~170 down to ~2e-5), and first-order methods need
thousands of steps there. Exact Newton converges in ~10 steps, but forming the Hessian
[Z 1]^T D [Z 1] costs n d^2 per step, as much as ~40 lbfgs steps at d = 768. So each Newton
system H s = -g is solved by conjugate gradients (two passes over Z per step), preconditioned by
the Cholesky factor of a Hessian computed earlier; that factor is recomputed only when CG needs
more than `REFRESH` steps. At w = 0 every p(1 - p) is 1/4, so the first preconditioner is the
rows' Gram matrix / 4 (plus the penalty), which a C grid computes once and shares
(`Shared`); it also bounds every later Hessian from above (p(1 - p) <= 1/4).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy.linalg import cho_solve
from scipy.optimize import minimize
from scipy.sparse.linalg import LinearOperator, cg
from scipy.special import expit

REFRESH = 10  # CG steps in one Newton step after which the preconditioner is recomputed
CG_MAX = 50  # CG steps per Newton step at most (an inexact step; the line search copes)
ARMIJO = 1e-4  # sufficient decrease of the line search
HALVINGS = 40  # line-search step halvings before giving up (the objective's rounding floor)
BLOCK = 512  # rows per block of `lbfgs_grid`'s passes: ~3 MB of float64 rows at d = 768, held in cache
FORCING_FLOOR = 1e-5  # CG's relative tolerance at most, where float32 products stop resolving


@dataclass
class Solution:
    coef: np.ndarray
    intercept: float
    n_iter: int  # Newton steps taken
    converged: bool


def augmented_gram(Z: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """[Z 1]^T diag(weights) [Z 1] (weights default 1), on a scaled copy of the rows where there are
    weights. numpy's `A.T @ A` is one BLAS syrk (half a matrix product's work), and numpy lets go of
    the GIL around it, where scipy's BLAS and LAPACK wrappers hold it: a C grid's threads form their
    Hessians side by side."""
    n, d = Z.shape
    if weights is None:
        Z = np.ascontiguousarray(Z)
        G = np.empty((d + 1, d + 1))
        G[:d, :d] = Z.T @ Z
        G[d, :d] = G[:d, d] = Z.sum(axis=0)
        G[d, d] = n
        return G
    root = np.sqrt(weights)
    A = np.empty((n, d + 1))
    np.multiply(Z, root[:, None], out=A[:, :d])
    A[:, d] = root
    return A.T @ A


def gram_in_halves(Z: np.ndarray, parallel_map=map) -> np.ndarray:
    """`augmented_gram(Z)` from the two halves of the rows side by side (a pool's `map`; always
    two halves, so the same sum on any number of cores)."""
    half = len(Z) // 2
    first, second = parallel_map(augmented_gram, (Z[:half], Z[half:]))
    return first + second


@dataclass
class Shared:
    """What every C of a grid shares on the same rows: the data part of the Hessian at w = 0, b = 0
    (every p(1 - p) = 1/4, so it does not depend on C) and the rows in float32 (`hessian_times`)."""

    start_hessian: np.ndarray
    rows32: np.ndarray

    @classmethod
    def of(cls, Z: np.ndarray, parallel_map=map) -> Shared:
        return cls(gram_in_halves(Z, parallel_map) / (4.0 * len(Z)), Z.astype(np.float32))


class Objective:
    """F, its gradient and Hessian on normalised rows Z (n x d) with labels y in {0, 1}."""

    def __init__(self, Z: np.ndarray, y: np.ndarray, C: float, rows32: np.ndarray | None = None):
        self.Z, self.y, self.C = Z, np.asarray(y, dtype=np.float64), float(C)
        self.rows32 = rows32
        self.n, self.d = Z.shape
        self.sign = 2.0 * self.y - 1.0
        self.penalty = 1.0 / (self.C * self.n)

    def at(self, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(F, grad F, p) at theta = (w, b), p = sigmoid(Z w + b)."""
        w, b = theta[:-1], theta[-1]
        z = self.Z @ w + b
        value = float(np.logaddexp(0.0, -self.sign * z).mean() + 0.5 * self.penalty * (w @ w))
        p = expit(z)
        residual = (p - self.y) / self.n
        return value, np.r_[self.Z.T @ residual + self.penalty * w, residual.sum()], p

    def with_penalty(self, data_hessian: np.ndarray) -> np.ndarray:
        H = data_hessian.copy()
        H[np.arange(self.d), np.arange(self.d)] += self.penalty
        return H

    def hessian(self, p: np.ndarray) -> np.ndarray:
        """The exact Hessian at the point with probabilities p."""
        return self.with_penalty(augmented_gram(self.Z, p * (1.0 - p) / self.n))

    def hessian_times(self, p: np.ndarray) -> LinearOperator:
        """H v, with the rows in float32: a Newton direction needs a few digits, and this product
        is most of CG's time (2.5x faster than float64); the gradient stays float64."""
        if self.rows32 is None:
            self.rows32 = self.Z.astype(np.float32)
        rows, curvature = self.rows32, (p * (1.0 - p) / self.n).astype(np.float32)

        def times(v: np.ndarray) -> np.ndarray:
            u = (rows @ v[:-1].astype(np.float32) + np.float32(v[-1])) * curvature
            return np.r_[rows.T @ u + self.penalty * v[:-1], u.sum(dtype=np.float64)]

        return LinearOperator((self.d + 1, self.d + 1), matvec=times, dtype=np.float64)


def cholesky(H: np.ndarray) -> tuple[np.ndarray, bool]:
    """`scipy.linalg.cho_factor(H, lower=True)` (for `cho_solve`), by numpy, which lets go of the GIL."""
    return np.linalg.cholesky(H), True


def newton_cg(
    Z: np.ndarray,
    y: np.ndarray,
    C: float,
    tol: float,
    max_iter: int,
    start: tuple[np.ndarray, float] | None = None,
    shared: Shared | None = None,
) -> Solution:
    """Minimise F from `start` (coef, intercept; default zero) by at most `max_iter` Newton steps;
    `shared`: `Shared.of(Z)`, when a C grid has computed it."""
    objective = Objective(Z, y, C, shared.rows32 if shared else None)
    theta = np.zeros(objective.d + 1) if start is None else np.r_[start[0], start[1]].astype(np.float64)
    value, gradient, p = objective.at(theta)
    factor = None
    if shared is not None and start is None:
        factor = cholesky(objective.with_penalty(shared.start_hessian))
    steps = 0
    while np.abs(gradient).max() > tol:
        if steps == max_iter:
            return Solution(theta[:-1], float(theta[-1]), steps, False)
        if factor is None:
            factor = cholesky(objective.hessian(p))
        preconditioner = LinearOperator(theta.shape * 2, matvec=partial(cho_solve, factor), dtype=np.float64)
        cg_steps = []
        # Inexact far from the optimum, converging quadratically near it, down to what float32
        # products resolve.
        forcing = min(0.1, max(float(np.abs(gradient).max()), FORCING_FLOOR))
        step, _ = cg(objective.hessian_times(p), -gradient, rtol=forcing, maxiter=CG_MAX, M=preconditioner,
                     callback=cg_steps.append)  # fmt: skip
        if len(cg_steps) > REFRESH:
            factor = None
        slope = float(gradient @ step)
        for halving in range(HALVINGS):
            t = 0.5**halving
            new_value, new_gradient, new_p = objective.at(theta + t * step)
            decreased = new_value <= value + ARMIJO * t * slope
            # At the optimum F changes by less than its rounding: a smaller gradient decides.
            level = new_value - value <= 16 * np.finfo(float).eps * abs(value)
            if decreased or (level and np.abs(new_gradient).max() < np.abs(gradient).max()):
                break
        else:
            return Solution(theta[:-1], float(theta[-1]), steps, False)
        theta, value, gradient, p = theta + t * step, new_value, new_gradient, new_p
        steps += 1
    return Solution(theta[:-1], float(theta[-1]), steps, True)


# --------------------------------------------------------------------------- a C grid's lbfgs


def lbfgs_grid(
    Z: np.ndarray,
    y: np.ndarray,
    Cs: list[float],
    tol: float,
    max_iter: int,
    starts: list[tuple[np.ndarray, float]] | None = None,
    parallel_map=map,
) -> list[Solution]:
    """scikit-learn's lbfgs for `LogisticRegression(C, tol=tol, max_iter=max_iter)` (scipy's
    L-BFGS-B on F, with scikit-learn's options), for every C of a grid at once, from `starts`
    (coef, intercept per C; default zero).

    On well-conditioned rows one lbfgs step costs two matrix-vector products over Z, bound by the
    memory bandwidth of reading Z. Here each C's L-BFGS-B runs in its own thread and asks
    `_Rounds` for F and its gradient, which waits until every unfinished C has asked and then
    answers all of them with two matrix products over Z: one read of the rows serves the grid.
    Each C's steps depend only on its own numbers, so the result does not depend on timing or
    cores; `parallel_map` (a pool's `map`) computes the two halves of the rows side by side."""
    d = Z.shape[1]
    problems = [Problem(None, C, np.zeros(d), np.ones(d)) for C in Cs]
    return _lbfgs(_Rounds(Z, y, problems, parallel_map), tol, max_iter, starts)


@dataclass
class Problem:
    """One probe's objective on some rows of a shared matrix X: F on Z = (X[rows] - mean) / scale
    (rows None: all of them)."""

    rows: np.ndarray | None  # a mask over X's rows
    C: float
    mean: np.ndarray
    scale: np.ndarray


def lbfgs_shared(
    X: np.ndarray, y: np.ndarray, problems: list[Problem], tol: float, max_iter: int, parallel_map=map, done=None
) -> list[Solution]:
    """`lbfgs_grid` for probes on different rows of X, each standardised with its own statistics
    (the folds of a protocol, each with its C grid): every round answers all of them from one pass
    over X (float32 rows are converted a block at a time). With Z = (X - m) / s, Z w = X (w / s) -
    m . (w / s) and Z^T r = (X^T r - m sum(r)) / s: the same objective, summed in another order
    (its optimum within the tolerance, its last bits not those of `lbfgs_grid` on each fold's Z).
    `done()` is called as each problem finishes (a progress bar's `update`)."""
    return _lbfgs(_Rounds(X, y, problems, parallel_map), tol, max_iter, None, done)


def _lbfgs(
    rounds: _Rounds, tol: float, max_iter: int, starts: list[tuple[np.ndarray, float]] | None, done=None
) -> list[Solution]:
    count, d = len(rounds.problems), rounds.d
    starts = starts or [(np.zeros(d), 0.0)] * count
    options = {"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps}  # scikit-learn's

    def one(k: int) -> Solution:
        try:
            start = np.r_[starts[k][0], starts[k][1]].astype(np.float64)
            result = minimize(partial(rounds.evaluate, k), start, method="L-BFGS-B", jac=True, options=options)
        finally:
            rounds.leave(k)
        if done is not None:
            done()
        steps = min(int(result.nit), max_iter)
        return Solution(result.x[:-1], float(result.x[-1]), steps, steps < max_iter)

    if count == 1:
        return [one(0)]
    with ThreadPoolExecutor(count) as threads:  # they wait on each other: one thread per problem, whatever the cores
        return list(threads.map(one, range(count)))


class _Rounds:
    """F and grad F for several problems at once: `evaluate` waits until every problem still
    running has asked, then the last to ask computes them all (`_compute`) and wakes the others."""

    def __init__(self, X: np.ndarray, y: np.ndarray, problems: list[Problem], parallel_map):
        self.parallel_map, self.problems, self.d = parallel_map, problems, X.shape[1]
        masks = [p.rows for p in problems]
        self.masks = None if all(m is None for m in masks) else np.stack(
            [np.ones(len(X), bool) if m is None else m for m in masks], axis=1
        ).astype(np.float64)  # fmt: skip
        self.n = np.array([len(X) if m is None else int(m.sum()) for m in masks], dtype=np.float64)
        self.penalty = np.array([1.0 / (p.C * n) for p, n in zip(problems, self.n, strict=True)])
        self.mean = np.stack([p.mean for p in problems], axis=1)  # d x problems
        self.scale = np.stack([p.scale for p in problems], axis=1)
        y, half = np.asarray(y, dtype=np.float64), len(X) // 2  # always two halves: the same sums on any cores
        self.halves = [(0, X[:half], y[:half]), (half, X[half:], y[half:])]
        self.running = set(range(len(problems)))
        self.asked: dict[int, np.ndarray] = {}
        self.answers: dict[int, tuple[float, np.ndarray]] = {}
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def evaluate(self, k: int, theta: np.ndarray) -> tuple[float, np.ndarray]:
        with self.condition:
            self.asked[k] = theta.copy()
            self._answer_if_all_asked()
            while k not in self.answers and self.error is None:
                self.condition.wait()
            if self.error is not None:
                raise RuntimeError("another problem's objective failed") from self.error
            return self.answers.pop(k)

    def leave(self, k: int) -> None:
        with self.condition:
            self.running.discard(k)
            self._answer_if_all_asked()

    def _answer_if_all_asked(self) -> None:
        if not self.asked or set(self.asked) != self.running:
            return
        asked, self.asked = self.asked, {}
        try:
            ks = sorted(asked)
            thetas = np.stack([asked[k] for k in ks], axis=1)  # (d + 1) x len(ks)
            self.answers.update(zip(ks, self._compute(ks, thetas), strict=True))
        except BaseException as error:  # every waiting problem raises it, none waits for good
            self.error = error
        self.condition.notify_all()

    def _compute(self, ks: list[int], thetas: np.ndarray) -> list[tuple[float, np.ndarray]]:
        W, b = thetas[:-1], thetas[-1]
        mean, scale, n, penalty = self.mean[:, ks], self.scale[:, ks], self.n[ks], self.penalty[ks]
        V = W / scale  # Z w = X (w / s) - m . (w / s): W itself where m = 0, s = 1 (`lbfgs_grid`)
        offset = b - np.einsum("ij,ij->j", mean, V)
        masks = None if self.masks is None else self.masks[:, ks]

        def half(part: tuple[int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            first, Xh, yh = part
            loss, gradient, total = np.zeros(len(ks)), np.zeros(W.shape), np.zeros(len(ks))
            for start in range(0, len(Xh), BLOCK):  # both products on a block while it is in cache
                block = Xh[start : start + BLOCK].astype(np.float64, copy=False)
                labels = yh[start : start + BLOCK, None]
                z = block @ V + offset
                losses = np.logaddexp(0.0, z) - labels * z  # log(1 + e^z) - y z: label y's log loss
                residual = expit(z) - labels
                if masks is not None:  # rows outside a problem weigh 0
                    weights = masks[first + start : first + start + len(block)]
                    losses *= weights
                    residual *= weights
                loss += losses.sum(axis=0)
                gradient += block.T @ residual
                total += residual.sum(axis=0)
            return loss, gradient, total

        (loss0, grad0, sum0), (loss1, grad1, sum1) = self.parallel_map(half, self.halves)
        total = sum0 + sum1
        values = (loss0 + loss1) / n + 0.5 * penalty * np.einsum("ij,ij->j", W, W)
        gradients = np.vstack([((grad0 + grad1) - mean * total) / scale / n + penalty * W, total / n])
        return [(float(values[j]), gradients[:, j].copy()) for j in range(len(values))]
