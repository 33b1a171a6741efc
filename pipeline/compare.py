"""`python -m pipeline compare`: one table of experiments (e.g. a `dvc exp run --queue` sweep over
`model.name`) x held-out test sets: frame AUC with its 95 % interval and video AUC, and which
differences are significant.

Each run is the workspace, the commit checked out (the baseline of `dvc exp run`) or a DVC
experiment (its git ref `refs/exps/.../<name>`), each listed once; from each, params.yaml,
metrics/evaluate.json and metrics/scores.csv are read as that commit holds them.
Significance: for each test set, the best run (frame AUC) against every other, by a paired
bootstrap over videos on the frames both scored (`metrics.paired_bootstrap_auc`): the same
resampled videos for both, so a difference is judged on the same test frames.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline import atomic
from pipeline.config import ConfigError, flatten
from pipeline.metrics import paired_bootstrap_auc
from pipeline.outputs import Outputs

_EXP_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(?P<name>[^/]+)$")
SIGNIFICANT = 0.05


@dataclass
class Run:
    name: str  # "workspace" or the experiment's name
    backbone: str  # model.name, and the layer the probe read
    params: dict[str, str]  # params.yaml flattened: "train.C" -> "[0.5]"
    heldout: dict  # metrics/evaluate.json
    scores: dict[str, dict[str, tuple[str, int, float]]]  # test set -> digest -> (video, label, score)


def _git(root: Path, *args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def _parse_scores(text: str) -> dict[str, dict[str, tuple[str, int, float]]]:
    out: dict[str, dict[str, tuple[str, int, float]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        out.setdefault(row["test_set"], {})[row["digest"]] = (row["video"], int(row["label"]), float(row["score"]))
    return out


def differences(runs: list[Run]) -> dict[str, str]:
    """Per run, the params that set it apart: those whose values differ between the runs (but
    model.name and train.layer, which the backbone column shows), as `key=value, ...`."""
    keys = sorted({k for r in runs for k in r.params} - {"model.name", "train.layer"})
    differing = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
    return {r.name: ", ".join(f"{k}={r.params[k]}" for k in differing if k in r.params) or "-" for r in runs}


RUN_FILES = ("params.yaml", "metrics/evaluate.json", "metrics/scores.csv")


def _run(name: str, texts: tuple[str, ...]) -> Run:
    """A run from the texts of its `RUN_FILES`."""
    params, metrics, scores = texts
    try:
        p = yaml.safe_load(params) or {}
        heldout, by_set = json.loads(metrics), _parse_scores(scores)
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as exc:  # cut short, or edited by hand
        raise ConfigError(
            f"the {name} run's params.yaml or metrics are damaged ({type(exc).__name__}: {exc}); rerun its "
            "evaluate stage (`dvc repro evaluate`), or remove the experiment (`dvc exp remove`)."
        ) from None
    layer = p.get("train", {}).get("layer", "projection")
    backbone = f"{p.get('model', {}).get('name', '?')} [{layer if isinstance(layer, str) else '+'.join(layer)}]"
    return Run(name, backbone, flatten(p), heldout, by_set)


def collect(outputs: Outputs) -> list[Run]:
    """The evaluated runs: the workspace, the commit checked out (named by its branch) and every
    DVC experiment, in ref order. A run is listed once, under its first name: the workspace is
    left out where it holds the results of a commit listed (the baseline it was committed as, or
    the experiment that `dvc exp run` left in it), and an experiment committed as the branch is
    the branch."""
    root = outputs.root
    prefix = (_git(root, "rev-parse", "--show-prefix") or "").strip()  # the project may sit in a sub-folder
    commits = []
    head = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    if head:  # "HEAD" when detached
        commits.append((head, "HEAD"))
    refs = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps") or ""
    for line in refs.splitlines():
        ref, sha = line.split()
        if m := _EXP_REF.match(ref):
            commits.append((m.group("name"), sha))
    found: dict[tuple, str] = {}  # texts -> the first name they were found under
    for name, sha in commits:
        texts = tuple(_git(root, "show", f"{sha}:{prefix}{rel}") for rel in RUN_FILES)
        if None not in texts:
            found.setdefault(texts, name)
    workspace = tuple((root / rel).read_text() if (root / rel).is_file() else None for rel in RUN_FILES)
    if None not in workspace and workspace not in found:
        found = {workspace: "workspace", **found}
    if not found:
        raise ConfigError(
            f"no evaluated runs in {root} (neither the workspace, the commit checked out nor any DVC experiment has "
            "metrics/scores.csv); run `dvc repro` or a sweep (`dvc exp run --queue -S model.name=... && "
            "dvc queue start`) first."
        )
    return [_run(name, texts) for texts, name in found.items()]


def significance(runs: list[Run], test_set: str, n: int = 1000) -> dict[str, dict]:
    """For one test set: the best run by frame AUC against each other run, on shared frames."""
    scored = [r for r in runs if test_set in r.scores and r.heldout.get(test_set, {}).get("frame", {}).get("auc")]
    if len(scored) < 2:
        return {}
    best = max(scored, key=lambda r: r.heldout[test_set]["frame"]["auc"])
    out = {}
    for other in scored:
        if other is best:
            continue
        shared = sorted(set(best.scores[test_set]) & set(other.scores[test_set]))
        if not shared:
            continue
        video = np.array([best.scores[test_set][d][0] for d in shared])
        y = np.array([best.scores[test_set][d][1] for d in shared])
        a = np.array([best.scores[test_set][d][2] for d in shared])
        b = np.array([other.scores[test_set][d][2] for d in shared])
        if len(np.unique(y)) < 2:
            continue
        out[other.name] = {"vs": best.name, "frames": len(shared), **paired_bootstrap_auc(y, a, b, video, n=n)}
    return out


def table(runs: list[Run], n: int = 1000) -> tuple[list[str], dict[str, dict[str, dict]], str]:
    """(test sets, significance per test set, the text table)."""
    test_sets = list(dict.fromkeys(t for r in runs for t in r.heldout))
    tests = {t: significance(runs, t, n) for t in test_sets}
    width = max(20, *(len(r.name) + 2 for r in runs))
    column = max(len("backbone [layer]"), *(len(r.backbone) for r in runs)) + 2
    differs = differences(runs)
    lines = ["run".ljust(width) + "backbone [layer]".ljust(column) + "differs"]
    lines += [f"{r.name.ljust(width)}{r.backbone.ljust(column)}{differs[r.name]}" for r in runs]
    for t in test_sets:
        lines += ["", f"{t}: frame AUC [95% CI], video AUC; * = worse than the best (p < 0.05, paired bootstrap)"]
        for r in runs:
            m = r.heldout.get(t)
            if not m:
                continue
            f, v = m["frame"], m["video"]
            ci = "" if f.get("auc_ci_low") is None else f" [{f['auc_ci_low']:.3f}, {f['auc_ci_high']:.3f}]"
            test = tests[t].get(r.name)
            mark = ""
            if test is not None:
                mark = f"  {'*' if test['p'] < SIGNIFICANT else ' '} d={test['delta']:+.3f} p={test['p']:.3f}"
            elif any(x["vs"] == r.name for x in tests[t].values()):
                mark = "  best"
            auc = "-" if f.get("auc") is None else f"{f['auc']:.3f}"
            vauc = "-" if v.get("auc") is None else f"{v['auc']:.3f}"
            lines.append(f"  {r.name.ljust(width)}{auc}{ci:<17} video {vauc}{mark}")
    return test_sets, tests, "\n".join(lines)


def html_table(runs: list[Run], test_sets: list[str], tests: dict[str, dict[str, dict]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in test_sets)
    differs = differences(runs)
    rows = []
    for r in runs:
        cells = []
        for t in test_sets:
            f = r.heldout.get(t, {}).get("frame", {})
            v = r.heldout.get(t, {}).get("video", {})
            if f.get("auc") is None:
                cells.append("<td>–</td>")
                continue
            ci = "" if f.get("auc_ci_low") is None else f" [{f['auc_ci_low']:.3f}, {f['auc_ci_high']:.3f}]"
            test = tests[t].get(r.name)
            mark = f" {'*' if test['p'] < SIGNIFICANT else ''} (p={test['p']:.3f})" if test else ""
            video = "–" if v.get("auc") is None else f"{v['auc']:.3f}"
            cells.append(f"<td>{f['auc']:.3f}{ci}; video {video}{mark}</td>")
        rows.append(
            f"<tr><th>{html.escape(r.name)}</th><td>{html.escape(r.backbone)}</td>"
            f"<td>{html.escape(differs[r.name])}</td>{''.join(cells)}</tr>"
        )
    return (
        "<table><tr><th>run</th><th>backbone [layer]</th><th>differs</th>" + head + "</tr>" + "".join(rows) + "</table>"
        "<p>Frame AUC [95% CI]; video AUC; * = significantly worse than the best run on that test set "
        "(p &lt; 0.05, paired bootstrap over videos on the same frames).</p>"
    )


def run(outputs: Outputs, n: int = 1000) -> str:
    """The text table (and reports/compare.html, the same table for the report pages)."""
    runs = collect(outputs)
    test_sets, tests, text = table(runs, n)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>compare</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
        "<h1>Backbones compared (held-out test sets)</h1>" + html_table(runs, test_sets, tests) + "</body></html>"
    )
    outputs.reports.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(outputs.reports / "compare.html", page.encode())
    return text
