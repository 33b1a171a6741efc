"""Reports for people: ROC curves, score histograms and the cross-manipulation heatmap as PNGs,
and `reports/index.html` showing them with the metric tables."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from pipeline import atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def roc_figure(curves: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, points in curves.items():
        if points:
            ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=name)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes caught)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    plt.close(fig)


def histogram_figure(scores: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    plt = _pyplot()
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, (name, (y, s)) in zip(axes[0], scores.items(), strict=True):
        ax.hist(s[y == 0], bins=bins, alpha=0.6, label="real", color="tab:blue")
        ax.hist(s[y == 1], bins=bins, alpha=0.6, label="fake", color="tab:red")
        ax.set(title=name, xlabel="fake score")
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def heatmap_figure(matrix: dict, path: Path) -> None:
    plt = _pyplot()
    names = matrix["datasets"]
    values = np.array([[np.nan if matrix["auc"][a][b] is None else matrix["auc"][a][b] for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    im = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="tested on", ylabel="trained on", title="cross-manipulation AUC")
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- HTML

_METRICS = [
    ("n_real", "real"),
    ("n_fake", "fake"),
    ("auc", "AUC"),
    ("ap", "AP"),
    ("eer", "EER"),
    ("tpr_at_fpr_1", "TPR@1%FPR"),
    ("tpr_at_fpr_5", "TPR@5%FPR"),
    ("accuracy", "acc@0.5"),
    ("balanced_accuracy", "bal. acc@0.5"),
    ("real_accuracy", "real acc"),
    ("fake_accuracy", "fake acc (detection rate)"),
    ("balanced_accuracy_at_val_threshold", "bal. acc@val thr."),
]


def _fmt(v) -> str:
    if v is None:
        return "–"
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def metrics_table(results: dict) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in _METRICS)
    rows = []
    for name, m in results.items():
        for level in ("frame", "video"):
            vals = m[level]
            cells = "".join(f"<td>{_fmt(vals.get(k))}</td>" for k, _ in _METRICS)
            ci = ""
            if level == "frame" and vals.get("auc_ci_low") is not None:
                ci = f"[{vals['auc_ci_low']:.3f}, {vals['auc_ci_high']:.3f}]"
            seeds = m.get("seeds", {})
            spread = (
                f"{seeds['auc_mean']:.3f} ± {seeds['auc_std']:.3f}"
                if level == "frame" and seeds.get("auc_std") is not None
                else ""
            )
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{level}</td>{cells}<td>{ci}</td><td>{spread}</td></tr>")
    return (
        f"<table><tr><th>test set</th><th>level</th>{head}<th>AUC 95% CI (videos resampled)</th>"
        f"<th>AUC over seeds</th></tr>{''.join(rows)}</table>"
    )


def matrix_table(matrix: dict) -> str:
    names = matrix["datasets"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{html.escape(a)}</th>" + "".join(f"<td>{_fmt(matrix['auc'][a][b])}</td>" for b in names) + "</tr>"
        for a in names
    )
    return f"<table><tr><th>trained on \\ tested on</th>{head}</tr>{rows}</table>"


def write(directory: Path, results: dict, curves: dict, scores: dict, audit: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.png"):
        stale.unlink()
    parts = [
        "<h1>Deepfake detection report</h1>",
        "<p>Every fake test set is scored together with the held-out real test split. Frame level scores each "
        "image; video level scores each video by the mean of its frames. The fake accuracy at 0.5 is the "
        "original script's number (its 'accuracy' on a fake-only test set).</p>",
    ]
    if results.get("heldout"):
        roc_figure(curves, directory / "roc.png", "held-out test sets (frame level)")
        histogram_figure(scores, directory / "scores.png")
        parts += [
            "<h2>Held-out test sets</h2>",
            metrics_table(results["heldout"]),
            '<img src="roc.png" alt="ROC curves"> <img src="scores.png" alt="score histograms">',
        ]
    if results.get("cross_manipulation"):
        matrix = results["cross_manipulation"]
        heatmap_figure(matrix, directory / "cross_manipulation.png")
        parts += [
            "<h2>Cross-manipulation</h2>",
            f"<p>Mean AUC on the training manipulation: {_fmt(matrix['mean_in_domain_auc'])}; "
            f"on the others: {_fmt(matrix['mean_cross_auc'])}.</p>",
            matrix_table(matrix),
            '<img src="cross_manipulation.png" alt="cross-manipulation heatmap">',
        ]
    if results.get("leave_one_out"):
        parts += ["<h2>Leave one manipulation out</h2>", metrics_table(results["leave_one_out"])]
    if results.get("zero_shot"):
        parts += ["<h2>Zero-shot baseline (no training)</h2>", metrics_table(results["zero_shot"])]
    verdict = "a SHORTCUT: metadata alone separates the classes" if audit.get("shortcut") else "no shortcut found"
    parts += [
        "<h2>Shortcut audit (file metadata only)</h2>",
        f"<p>Metadata probe test AUC: {_fmt(audit.get('auc'))} — {verdict}.</p>",
        "<table><tr><th>feature</th><th>AUC alone</th></tr>"
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in audit.get("feature_auc", {}).items()
        )
        + "</table>",
    ]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:48%;vertical-align:top}"
    )
    head = f"<meta charset='utf-8'><title>report</title><style>{style}</style>"
    page = f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"
    atomic.write_bytes(directory / "index.html", page.encode())
    return directory / "index.html"
