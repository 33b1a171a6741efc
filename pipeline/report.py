"""Reports for people: the metric tables as text (the evaluate log, `python -m pipeline show`),
ROC curves, score histograms and the cross-manipulation heatmap as PNGs, and
`reports/index.html` showing them with the same tables. Column names come from
`pipeline.metrics` (NAMES), so the text, the HTML and the metrics files agree."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import PROTOCOLS, ConfigError
from pipeline.metrics import HTML_COLUMNS, NAMES, TEXT_COLUMNS
from pipeline.outputs import Outputs


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
        # Counted by numpy, drawn as one filled outline each (`hist` draws a patch per bin: 4x slower)
        ax.stairs(np.histogram(s[y == 0], bins)[0], bins, fill=True, alpha=0.6, label="real", color="tab:blue")
        ax.stairs(np.histogram(s[y == 1], bins)[0], bins, fill=True, alpha=0.6, label="fake", color="tab:red")
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


def layers_figure(result: dict, path: Path) -> None:
    """AUC per layer: one line per test set, and the in-domain and cross-manipulation means."""
    plt = _pyplot()
    names = result["layers"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 3), 4))
    test_sets = list(next(iter(result["auc"].values()), {}))
    for name in test_sets:
        ax.plot(
            x,
            [np.nan if result["auc"][n][name] is None else result["auc"][n][name] for n in names],
            alpha=0.5,
            label=name,
        )
    for key, label in (("mean_in_domain_auc", "mean in-domain"), ("mean_cross_auc", "mean cross-manipulation")):
        ax.plot(x, [np.nan if result[key][n] is None else result[key][n] for n in names], lw=2.5, label=label)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(ylim=(0, 1), ylabel="AUC (frame level)", title="AUC per layer")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def _robustness_rows(result: dict) -> list[tuple[str, dict]]:
    """("clean", per test set), then ("<kind>=<level>", per test set) in the params' order."""
    rows = [("clean", result["clean"])]
    for kind, levels in result.items():
        if kind != "clean":
            rows += [(f"{kind}={level}", per_set) for level, per_set in levels.items()]
    return rows


def robustness_figure(result: dict, path: Path) -> None:
    """AUC against the perturbation level, one panel per kind, one line per test set (the clean
    AUC dashed)."""
    plt = _pyplot()
    kinds = [k for k in result if k != "clean"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        levels = list(result[kind])
        x = [float(v) for v in levels]
        for i, name in enumerate(result["clean"]):
            color = f"C{i}"
            y = [result[kind][v][name]["auc"] for v in levels]
            ax.plot(x, [np.nan if a is None else a for a in y], marker="o", color=color, label=name)
            if result["clean"][name]["auc"] is not None:
                ax.axhline(result["clean"][name]["auc"], color=color, ls="--", lw=0.8)
        ax.set(title=kind, xlabel="level", ylabel="AUC (frame level)", ylim=(0, 1))
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- text tables


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def table_text(results: dict) -> str:
    """Per test set: frame-level metrics (AUC with its 95 % CI) and the video-level AUC; with
    several `evaluate.seeds`, the frame AUC's mean ± std over them."""
    header = "".join(f"{NAMES[key][0]:>17}" if key == "auc_ci" else f"{NAMES[key][0]:>10}" for key in TEXT_COLUMNS)
    seeded = any(m.get("seeds", {}).get("auc_std") is not None for m in results.values())
    lines = [f"{'dataset':<16}{header}" + (f"{NAMES['seeds'][0]:>17}" if seeded else "")]
    for name, m in results.items():
        f, v = m["frame"], m["video"]
        cells = []
        for key in TEXT_COLUMNS:
            if key == "auc_ci":
                ci = "-" if f.get("auc_ci_low") is None else f"[{f['auc_ci_low']:.3f}, {f['auc_ci_high']:.3f}]"
                cells.append(f"{ci:>17}")
            else:
                cells.append(f"{_cell(v['auc'] if key == 'video_auc' else f.get(key)):>10}")
        if seeded:
            seeds = m.get("seeds", {})
            spread = "-" if seeds.get("auc_std") is None else f"{seeds['auc_mean']:.3f} ± {seeds['auc_std']:.3f}"
            cells.append(f"{spread:>17}")
        lines.append(f"{name:<16}" + "".join(cells))
    return "\n".join(lines)


def matrix_text(matrix: dict) -> str:
    names = matrix["datasets"]
    width = max(14, *(len(n) + 2 for n in names))
    lines = ["train \\ test".ljust(width) + "".join(n.rjust(width) for n in names)]
    for a in names:
        lines.append(a.ljust(width) + "".join(_cell(matrix["auc"][a][b]).rjust(width) for b in names))
    return "\n".join(lines)


def _mark(result: dict, layer: str, name: str) -> str:
    """`+`/`-`: this layer's AUC is significantly above/below the train stage's probe's (the
    paired bootstrap's 95 % interval excludes 0); blank otherwise."""
    diff = result.get("vs_reference", {}).get(layer, {}).get(name)
    if not diff or not diff["significant"]:
        return " "
    return "+" if diff["delta"] > 0 else "-"


def layers_text(result: dict) -> str:
    names = list(next(iter(result["auc"].values()), {}))
    width = max(12, *(len(n) + 3 for n in names))
    columns = [*names, "in-domain", "cross"]
    lines = ["layer".ljust(16) + "".join(c.rjust(width) for c in columns)]
    for layer in result["layers"]:
        cells = [_cell(result["auc"][layer][n]) + _mark(result, layer, n) for n in names]
        cells += [_cell(result["mean_in_domain_auc"][layer]) + " ", _cell(result["mean_cross_auc"][layer]) + " "]
        lines.append(layer.ljust(16) + "".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def robustness_text(result: dict) -> str:
    names = list(result["clean"])
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["perturbation".ljust(16) + "".join(n.rjust(width) for n in names)]
    for label, per_set in _robustness_rows(result):
        lines.append(label.ljust(16) + "".join(_cell(per_set[n]["auc"]).rjust(width) for n in names))
    return "\n".join(lines)


def summaries(results: dict) -> dict[str, str]:
    out = {}
    if results.get("heldout"):
        out["held-out test sets (frame level; video_auc = video level)"] = table_text(results["heldout"])
    if results.get("cross_manipulation"):
        out["cross-manipulation AUC (frame level)"] = matrix_text(results["cross_manipulation"])
    if results.get("leave_one_out"):
        out["leave one out (tested on the dataset left out)"] = table_text(results["leave_one_out"])
    if results.get("zero_shot"):
        out["zero-shot baseline (no training)"] = table_text(results["zero_shot"])
    if results.get("cross_dataset"):
        out["cross-dataset test sets (their own reals; frame level, video_auc = video level)"] = table_text(
            results["cross_dataset"]
        )
    if results.get("robustness"):
        out["robustness: AUC on perturbed test images (frame level)"] = robustness_text(results["robustness"])
    if results.get("layers"):
        reference = results["layers"]["reference"]
        reference = reference if isinstance(reference, str) else "+".join(reference)
        title = f"AUC per layer (frame level; +/-: significantly above/below the {reference} probe, paired bootstrap)"
        out[title] = layers_text(results["layers"])
    return out


def read_metrics(outputs: Outputs) -> dict:
    if not outputs.metrics.exists():
        raise ConfigError(f"{outputs.metrics} does not exist; run the evaluate stage first (`dvc repro`).")
    out = {}
    for p in PROTOCOLS:
        path = outputs.protocol_metrics(p)
        if path.exists():
            try:
                out[p] = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(
                    f"{path} is damaged ({exc}); rerun the evaluate stage (`dvc repro evaluate`)."
                ) from None
    return out


# --------------------------------------------------------------------------- HTML


def _fmt(v) -> str:
    if v is None:
        return "–"
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def metrics_table(results: dict) -> str:
    head = "".join(f"<th>{html.escape(NAMES[key][1])}</th>" for key in HTML_COLUMNS)
    rows = []
    for name, m in results.items():
        for level in ("frame", "video"):
            vals = m[level]
            cells = "".join(f"<td>{_fmt(vals.get(k))}</td>" for k in HTML_COLUMNS)
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
        f"<table><tr><th>test set</th><th>level</th>{head}<th>{html.escape(NAMES['auc_ci'][1])}</th>"
        f"<th>{html.escape(NAMES['seeds'][1])}</th></tr>{''.join(rows)}</table>"
    )


def matrix_table(matrix: dict) -> str:
    names = matrix["datasets"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{html.escape(a)}</th>" + "".join(f"<td>{_fmt(matrix['auc'][a][b])}</td>" for b in names) + "</tr>"
        for a in names
    )
    return f"<table><tr><th>trained on \\ tested on</th>{head}</tr>{rows}</table>"


def header(card: dict, commit: str, params: str) -> str:
    """What this report is: the model, the cache, the probe and the code and params that made it."""
    layer = card.get("layer", "?")
    rows = [
        ("model", card.get("model")),
        ("cache fingerprint", card.get("fingerprint")),
        ("layer(s)", layer if isinstance(layer, str) else " + ".join(layer)),
        (
            "probe",
            f"{card.get('probe')} (normalize {card.get('normalize')}), "
            f"trained on {' + '.join(card.get('datasets', []))}",
        ),
        ("C (chosen on val)", card.get("C")),
        ("decision threshold (chosen on val)", None if card.get("threshold") is None else f"{card['threshold']:.4f}"),
        ("git commit", commit),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return (
        f"<table class='run'>{table}</table>"
        f"<details><summary>params of this run</summary><pre>{html.escape(params)}</pre></details>"
    )


def write(directory: Path, results: dict, curves: dict, scores: dict, audit: dict, about: str = "") -> Path:
    """reports/index.html (and its PNGs); `about` is the `header` of the run."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.png"):
        stale.unlink()
    parts = [
        "<h1>Deepfake detection report</h1>",
        about,
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
    if results.get("cross_dataset"):
        sets = results["cross_dataset"]
        described = "; ".join(
            f"{html.escape(n)}: {', '.join(m['sets']['real'])} ({m['videos']['real']} videos) vs "
            f"{', '.join(m['sets']['fake'])} ({m['videos']['fake']} videos)"
            + (f", the {m['videos']['listed']} videos of its official test list" if m["videos"]["listed"] else "")
            for n, m in sets.items()
        )
        parts += [
            "<h2>Cross-dataset test sets</h2>",
            f"<p>Each set scored with its own reals, every frame a test frame: {described}.</p>",
            metrics_table(sets),
        ]
    if results.get("robustness"):
        result = results["robustness"]
        robustness_figure(result, directory / "robustness.png")
        names = list(result["clean"])
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        rows = "".join(
            f"<tr><th>{html.escape(label)}</th>"
            + "".join(f"<td>{_fmt(per_set[n]['auc'])}</td>" for n in names)
            + "</tr>"
            for label, per_set in _robustness_rows(result)
        )
        parts += [
            "<h2>Robustness</h2>",
            "<p>The train stage's probe on the held-out test images degraded before preprocessing (each "
            "variant embedded once and cached), frame-level AUC; dashed lines in the plot: the clean AUC.</p>",
            f"<table><tr><th>perturbation</th>{head}</tr>{rows}</table>",
            '<img src="robustness.png" alt="AUC against perturbation level">',
        ]
    if results.get("layers"):
        result = results["layers"]
        layers_figure(result, directory / "layers.png")
        names = list(next(iter(result["auc"].values()), {}))
        head = "".join(f"<th>{html.escape(n)}</th>" for n in [*names, "mean in-domain", "mean cross"])
        rows = "".join(
            f"<tr><th>{html.escape(layer)}</th>"
            + "".join(f"<td>{_fmt(result['auc'][layer][n])}{_mark(result, layer, n).strip()}</td>" for n in names)
            + "".join(f"<td>{_fmt(result[key][layer])}</td>" for key in ("mean_in_domain_auc", "mean_cross_auc"))
            + "</tr>"
            for layer in result["layers"]
        )
        parts += [
            "<h2>Layers</h2>",
            "<p>One probe per cached layer (the train stage's datasets and settings), frame-level AUC. "
            "+ / −: significantly above / below the train stage's probe on the same frames (paired bootstrap "
            "over videos, 95 % interval excluding 0).</p>",
            f"<table><tr><th>layer</th>{head}</tr>{rows}</table>",
            '<img src="layers.png" alt="AUC per layer">',
        ]
    verdict = "a SHORTCUT: metadata alone separates the classes" if audit.get("shortcut") else "no shortcut found"
    parts += [
        "<h2>Shortcut audit (file metadata only)</h2>",
        f"<p>Metadata probe test AUC: {_fmt(audit.get('auc'))} — {verdict} "
        f"(on {html.escape(', '.join(audit.get('datasets', [])))}).</p>",
        "<table><tr><th>feature</th><th>AUC alone</th></tr>"
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in audit.get("feature_auc", {}).items()
        )
        + "</table>",
    ]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:48%;vertical-align:top}"
        "table.run td,table.run th{text-align:left}"
    )
    head = f"<meta charset='utf-8'><title>report</title><style>{style}</style>"
    page = f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"
    atomic.write_bytes(directory / "index.html", page.encode())
    return directory / "index.html"
