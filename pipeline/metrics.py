"""Detection metrics for real (0) vs fake (1) scores, where a higher score means "more fake".

Frame level scores each image; video level scores each video by the mean (or median, or max:
`evaluate.video_pooling`) of its frames (`video_level`). A metric that needs both classes is
None (JSON null) when one is missing, so outputs never hold NaN.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import auc, average_precision_score, roc_curve

log = logging.getLogger(__name__)

# The name of every number a test set gets: key in metrics/*.json -> (column of the text tables,
# column of the HTML report). `binary_metrics` writes the first group; the evaluate stage adds
# the rest (`auc_ci` stands for the pair auc_ci_low/auc_ci_high, `video_auc` for the video
# level's auc, `seeds` for the AUC over re-drawn splits).
NAMES: dict[str, tuple[str, str]] = {
    "n_real": ("real", "real"),
    "n_fake": ("fake", "fake"),
    "auc": ("auc", "AUC"),
    "ap": ("ap", "AP"),
    "eer": ("eer", "EER"),
    "tpr_at_fpr_1": ("tpr@1%fpr", "TPR@1%FPR"),
    "tpr_at_fpr_5": ("tpr@5%fpr", "TPR@5%FPR"),
    "accuracy": ("acc", "acc@0.5"),
    "real_accuracy": ("real_acc", "real acc"),
    "fake_accuracy": ("fake_acc", "fake acc (detection rate)"),
    "balanced_accuracy": ("bal_acc", "bal. acc@0.5"),
    "accuracy_at_val_threshold": ("acc@val", "acc@val thr."),
    "real_accuracy_at_val_threshold": ("real_acc@val", "real acc@val thr."),
    "fake_accuracy_at_val_threshold": ("fake_acc@val", "fake acc@val thr."),
    "balanced_accuracy_at_val_threshold": ("bal_acc@val", "bal. acc@val thr."),
    "auc_ci": ("auc 95% ci", "AUC 95% CI (videos resampled)"),
    "video_auc": ("video_auc", "video AUC"),
    "seeds": ("auc over seeds", "AUC over seeds"),
}
# Which of them each table shows, in order.
TEXT_COLUMNS = (
    "n_real", "n_fake", "auc", "auc_ci", "ap", "eer", "tpr_at_fpr_5", "balanced_accuracy", "fake_accuracy", "video_auc",
)  # fmt: skip
HTML_COLUMNS = (
    "n_real", "n_fake", "auc", "ap", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5", "accuracy", "balanced_accuracy",
    "real_accuracy", "fake_accuracy", "balanced_accuracy_at_val_threshold",
)  # fmt: skip

# Fewer samples of a class than this and the metrics of a test set get a warning (once).
MIN_PER_CLASS = 10
_warned: set[str] = set()

DRAWS_AT_ONCE = 2**20  # video draws per call of the generator in `video_draws` (8 MB of indices)


def binary_metrics(
    y: np.ndarray, scores: np.ndarray, threshold: float = 0.5, val_threshold: float | None = None, name: str = ""
) -> dict:
    """n_real, n_fake, AUC, AP, EER, TPR at 1 % and 5 % FPR, and accuracies at `threshold`
    (and at `val_threshold`, the threshold chosen on the val split, when given)."""
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=float)
    real, fake = y == 0, y == 1
    n_real, n_fake = int(real.sum()), int(fake.sum())
    both = n_real > 0 and n_fake > 0
    if min(n_real, n_fake) < MIN_PER_CLASS and name and name not in _warned:
        _warned.add(name)
        log.warning(
            "test set %s has %d real and %d fake samples; its metrics are unreliable%s",
            name,
            n_real,
            n_fake,
            "" if both else " (AUC, AP, EER need both classes and are null)",
        )
    out = {"n_real": n_real, "n_fake": n_fake}
    if both:
        fpr, tpr, _ = roc_curve(y, scores)
        out["auc"] = float(auc(fpr, tpr))  # what roc_auc_score computes, from the same curve
        out["ap"] = float(average_precision_score(y, scores))
        out["eer"] = equal_error_rate(fpr, tpr)
        out["tpr_at_fpr_1"] = tpr_at_fpr(fpr, tpr, 0.01)
        out["tpr_at_fpr_5"] = tpr_at_fpr(fpr, tpr, 0.05)
    else:
        out.update(auc=None, ap=None, eer=None, tpr_at_fpr_1=None, tpr_at_fpr_5=None)
    out.update(_accuracies(y, scores, threshold, ""))
    if val_threshold is not None:
        out.update(_accuracies(y, scores, val_threshold, "_at_val_threshold"))
    return out


def _accuracies(y: np.ndarray, scores: np.ndarray, threshold: float, suffix: str) -> dict:
    pred = scores >= threshold
    real, fake = y == 0, y == 1
    real_acc = float((~pred[real]).mean()) if real.any() else None
    fake_acc = float(pred[fake].mean()) if fake.any() else None
    balanced = (real_acc + fake_acc) / 2 if real_acc is not None and fake_acc is not None else None
    return {
        f"accuracy{suffix}": float((pred == fake).mean()) if len(y) else None,
        f"real_accuracy{suffix}": real_acc,
        f"fake_accuracy{suffix}": fake_acc,
        f"balanced_accuracy{suffix}": balanced,
    }


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The error rate where false positives and false negatives are equally frequent.

    Along the ROC curve (from (0, 0) to (1, 1)) fnr - fpr falls from 1 to -1; the EER is where it
    crosses zero, interpolated linearly between the two ROC points around the crossing.
    """
    diff = (1.0 - tpr) - fpr
    i = int(np.argmax(diff <= 0))
    if i == 0:
        return float(fpr[0])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest true positive rate reachable with a false positive rate of at most `target`."""
    return float(tpr[fpr <= target].max()) if (fpr <= target).any() else 0.0


POOLINGS = ("mean", "median", "max")


def video_level(
    scores: np.ndarray, y: np.ndarray, videos: np.ndarray, pooling: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One score per video from its frames' scores (mean, median or max) -> (video scores,
    video labels, video keys)."""
    keys, inverse = np.unique(np.asarray(videos), return_inverse=True)
    labels = np.zeros(len(keys), dtype=int)
    labels[inverse] = y
    if pooling == "mean":
        sums = np.bincount(inverse, weights=scores, minlength=len(keys))
        return sums / np.bincount(inverse, minlength=len(keys)), labels, keys
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}")
    pool = np.median if pooling == "median" else np.max
    order = np.argsort(inverse, kind="stable")
    groups = np.split(np.asarray(scores, dtype=float)[order], np.cumsum(np.bincount(inverse))[:-1])
    return np.array([pool(g) for g in groups]), labels, keys


def rank_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUC by the rank-sum (Mann-Whitney) formula, ties averaged: equal to roc_auc_score, without
    its input checks (which dominate the cost of a thousand bootstrap resamples)."""
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def video_draws(y: np.ndarray, videos: np.ndarray, n: int, seed: int = 0):
    """`n` bootstrap resamples as counts per video -> (counts (n, videos), each frame's video):
    whole videos drawn with replacement within each class (so every resample has both), never
    single frames."""
    keys, inverse = np.unique(np.asarray(videos), return_inverse=True)
    video_label = np.zeros(len(keys), dtype=int)
    video_label[inverse] = y
    by_class = [members for c in (0, 1) if len(members := np.flatnonzero(video_label == c))]
    # Resample r is what `rng.choice(members, len(members))` draws for class 0, then for class 1
    # (choice draws its indices with `integers`), for r = 0, 1, ...: drawn here many resamples per
    # call, with an array of bounds. Both take each index from the generator's next 32 bits in turn
    # (a bound below 2^32), so the stream is the same; the per-resample calls and their checks
    # took most of a bootstrap's time.
    members, sizes = np.concatenate(by_class), [len(m) for m in by_class]
    bounds = np.repeat(sizes, sizes)  # each draw's class size, and where its class starts in `members`
    offsets = np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n, len(keys)))
    per_call = max(1, DRAWS_AT_ONCE // len(members))  # bounded memory
    for lo in range(0, n, per_call):
        rows = min(per_call, n - lo)
        drawn = members[rng.integers(0, np.tile(bounds, rows)).reshape(rows, -1) + offsets]
        flat = (drawn + len(keys) * np.arange(rows)[:, None]).ravel()
        counts[lo : lo + rows] = np.bincount(flat, minlength=rows * len(keys)).reshape(rows, len(keys))
    return counts, inverse


def resampled_aucs(y: np.ndarray, scores: np.ndarray, counts: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """The frame AUC of every resample (`video_draws`): a resample weighs each frame by its
    video's count, so its AUC is the Mann-Whitney statistic with weights (ties count half).
    Counts, pair counts and halves are integers and halves, which float64 adds and multiplies
    exactly in any order, so each value equals `rank_auc` of the resample's frame list bit for
    bit, by either route: from a matrix of video pairs where there are few videos per frame
    (`_by_video_pairs`; every FF++ test set), else from one sort (`_by_one_sort`; loose frames,
    each its own video). The estimated costs choose (measured here: ~2.5 ns per frame pair and
    ~0.05 ns per resample and video pair, against ~20-45 ns per resample and frame)."""
    positive = np.asarray(y) == 1
    inverse = np.asarray(inverse)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return np.full(len(counts), np.nan)  # no AUC without both classes (as 0 / 0 gives)
    v_pos, v_neg = len(np.unique(inverse[positive])), len(np.unique(inverse[~positive]))
    pairs = n_pos * n_neg + len(counts) * v_pos * v_neg / 50
    if pairs <= 8 * len(counts) * len(positive) and v_pos * v_neg <= 2**23:
        return _by_video_pairs(positive, np.asarray(scores, dtype=float), counts, inverse)
    return _by_one_sort(positive, np.asarray(scores, dtype=float), counts, inverse)


def _by_video_pairs(positive: np.ndarray, s: np.ndarray, counts: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """U = c_pos^T M c_neg for every resample's counts c, where M[v, w] sums, over the positive
    frames of video v and the negative frames of video w, 1 for each pair ranked right and 1/2
    for each tie: the frame pairs are compared once for all resamples (a BLAS product after)."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    pos, neg = pos[np.argsort(inverse[pos], kind="stable")], neg[np.argsort(inverse[neg], kind="stable")]
    pos_videos, pos_starts = np.unique(inverse[pos], return_index=True)
    neg_videos, neg_starts = np.unique(inverse[neg], return_index=True)
    M = np.zeros((len(pos_videos), len(neg_videos)))
    row_video = np.searchsorted(pos_videos, inverse[pos])  # each positive frame's row of M
    negative_scores = s[neg]
    step = max(1, 2**22 // len(neg))  # bounded memory: ~4M frame pairs (32 MB) at a time
    for lo in range(0, len(pos), step):
        here = s[pos[lo : lo + step], None]
        pairs = (negative_scores < here) + 0.5 * (negative_scores == here)
        by_video = np.add.reduceat(pairs, neg_starts, axis=1)  # (frames of this block, negative videos)
        rows, first = np.unique(row_video[lo : lo + step], return_index=True)
        M[rows] += np.add.reduceat(by_video, first, axis=0)
    pos_counts, neg_counts = counts[:, pos_videos], counts[:, neg_videos]
    u = ((pos_counts @ M) * neg_counts).sum(axis=1)
    n_pos = pos_counts @ np.diff(np.r_[pos_starts, len(pos)]).astype(float)  # frames per video, weighed
    n_neg = neg_counts @ np.diff(np.r_[neg_starts, len(neg)]).astype(float)
    return u / (n_pos * n_neg)


def _by_one_sort(positive: np.ndarray, scores: np.ndarray, counts: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Each resample's weighted Mann-Whitney statistic from one sort of the scores: the weighted
    negatives below each group of tied scores, by a cumulative sum per resample."""
    order = np.argsort(scores, kind="stable")
    s, positive = scores[order], positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
    out = np.empty(len(counts))
    step = max(1, min(256, 2**22 // len(s)))  # bounded memory: ~4M weights (32 MB) per array at a time
    for lo in range(0, len(counts), step):
        w = counts[lo : lo + step][:, inverse[order]]
        negatives = np.where(positive, 0.0, w)
        below = np.cumsum(negatives, axis=1)[:, np.r_[starts[1:] - 1, len(s) - 1]]  # up to each group's end
        at = np.diff(np.c_[np.zeros(len(w)), below], axis=1)  # negatives tied with each group
        below -= at
        u = (np.where(positive, w, 0.0) * (below + 0.5 * at)[:, group]).sum(axis=1)
        n_pos, n_neg = w[:, positive].sum(axis=1), negatives.sum(axis=1)
        out[lo : lo + step] = u / (n_pos * n_neg)
    return out


def bootstrap_auc(
    y: np.ndarray, scores: np.ndarray, videos: np.ndarray, n: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % percentile interval of the frame-level AUC over video resamples (`video_draws`)."""
    y = np.asarray(y).astype(int)
    if n <= 0 or len(np.unique(y)) < 2:
        return None
    aucs = resampled_aucs(y, np.asarray(scores, dtype=float), *video_draws(y, videos, n, seed))
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def roc_points(y: np.ndarray, scores: np.ndarray) -> list[dict]:
    """ROC curve as records {fpr, tpr, threshold} for `dvc plots` (threshold capped at 1.0)."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return []
    fpr, tpr, thr = roc_curve(y, scores)
    thr = np.minimum(thr, 1.0)  # the first threshold is +inf ("nothing is fake"); JSON has no inf
    return [{"fpr": float(f), "tpr": float(t), "threshold": float(h)} for f, t, h in zip(fpr, tpr, thr, strict=True)]


def paired_bootstrap_auc(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, videos: np.ndarray, n: int = 1000, seed: int = 0
) -> dict:
    """AUC(a) - AUC(b) on the same frames, with a 95 % interval and a two-sided p-value from video
    resamples (`video_draws`), the same resample for both scorers."""
    y = np.asarray(y).astype(int)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    draws = video_draws(y, videos, n, seed)
    deltas = resampled_aucs(y, a, *draws) - resampled_aucs(y, b, *draws)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    p = min(1.0, 2 * min((deltas <= 0).mean(), (deltas >= 0).mean()))
    return {"delta": rank_auc(y, a) - rank_auc(y, b), "ci_low": float(lo), "ci_high": float(hi), "p": float(p)}
