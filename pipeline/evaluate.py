"""evaluate stage: protocols computed from the cache, never from images.

Every fake test set is scored together with the held-out real test split (the test-split
frames of the real datasets in `train.datasets`): a fake-only test set has no AUC, which was
the original script's mistake. Protocols (`evaluate.protocols`):

  heldout             the train stage's probe on each evaluate dataset -> metrics/evaluate.json
  cross_manipulation  one probe per fake dataset vs the reals, tested on every fake dataset
                      -> metrics/cross_manipulation.json (an N x N AUC matrix)
  leave_one_out       train on all fake datasets but one, test on the one left out
                      -> metrics/leave_one_out.json
  zero_shot           no training: cosine similarity to text prompts -> metrics/zero_shot.json
  layers              one probe per cached layer, AUC per layer and test set, in-domain and
                      cross-manipulation means, paired bootstrap vs the train stage's probe
                      -> metrics/layers.json, plots/layers.json
  robustness          the train stage's probe on perturbed test images (JPEG, blur, noise,
                      resize; embedded by extract) -> metrics/robustness.json, plots/robustness.json
  cross_dataset       the train stage's probe on other datasets with their own reals
                      (`evaluate.cross_dataset`), optionally only an official list of test videos
                      -> metrics/cross_dataset.json

Frame- and video-level metrics (video score = mean frame score) are both reported; with
`evaluate.bootstrap > 0` the frame AUC gets a 95 % CI from resampling videos; with several
`evaluate.seeds` the held-out AUC is also reported as mean and std over re-drawn train/val
splits. A protocol not listed writes `{}`, so DVC always finds its file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from pipeline import atomic, features, manifest_table, perturb, probes, report, shortcut, splits
from pipeline.config import PROTOCOLS, ConfigError, Settings, TrainSettings
from pipeline.metrics import binary_metrics, bootstrap_auc, paired_bootstrap_auc, roc_points, video_level
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe

Frames = features.FeatureTable | features.StreamedFeatures

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """A test set's labels, scores, video keys and image digests."""

    y: np.ndarray
    scores: np.ndarray
    video: np.ndarray
    digest: np.ndarray


def scored(frames: Frames, reals: list[str], fake: str, fn: Callable[[np.ndarray], np.ndarray]) -> Scored:
    """The test split of `fake` together with the test split of the real datasets, scored by fn."""
    mask = frames.mask(reals, ["test"], labels=[0]) | frames.mask([fake], ["test"], labels=[1])
    return Scored(frames.label[mask], frames.score(fn, mask), frames.video[mask], frames.digest[mask])


def score_set(s: Scored, val_threshold: float | None, bootstrap: int, name: str, pooling: str = "mean") -> dict:
    """Frame- and video-level metrics of one scored test set (real + fake rows); a video's score
    pools its frames' scores (`evaluate.video_pooling`)."""
    frame = binary_metrics(s.y, s.scores, val_threshold=val_threshold, name=name)
    ci = bootstrap_auc(s.y, s.scores, s.video, n=bootstrap)
    frame["auc_ci_low"], frame["auc_ci_high"] = ci if ci else (None, None)
    v_scores, v_labels, _ = video_level(s.scores, s.y, s.video, pooling)
    video = binary_metrics(v_labels, v_scores, val_threshold=val_threshold, name=f"{name} (videos)")
    return {"frame": frame, "video": video}


def redraw_train_val(frames: Frames, datasets: list[str], seed: int) -> np.ndarray:
    """Each row's split with the train/val rows of `datasets` re-drawn by video group for `seed`."""
    video_ids = np.array([str(v).split("/", 1)[1] for v in frames.video])
    return splits.redraw_train_val(frames.split, video_ids, np.isin(frames.dataset, datasets), seed, frames.dataset)


def fit(frames: Frames, datasets: list[str], spec: TrainSettings, split: np.ndarray | None = None) -> probes.Fitted:
    """A probe on the train rows of `datasets`, C and threshold chosen on their val rows."""
    return probes.fit_and_select(*frames.training_data(datasets, split), spec, what="+".join(datasets))


def fit_many(frames: Frames, dataset_lists: list[list[str]], spec: TrainSettings, desc: str) -> list[probes.Fitted]:
    """`fit` for each list of datasets (a protocol's folds, `desc` its name); in memory, the
    folds share their solver's passes over the rows (`probes.fit_and_select_many`)."""
    if not isinstance(frames, features.FeatureTable):
        return [fit(frames, d, spec) for d in tqdm(dataset_lists, desc=f"{desc}: fitting", unit="probe", leave=False)]
    sets = [frames.train_val(datasets) for datasets in dataset_lists]
    whats = ["+".join(d) for d in dataset_lists]
    return probes.fit_and_select_many(frames.X, frames.label, sets, spec, whats, desc)


def train_stage_probe(settings: Settings, trained: tuple | None, datasets: list[str], layer) -> object | None:
    """The train stage's probe (`trained` = (probe, card)) where a protocol would fit the same one
    again: the same datasets, layer and probe settings, as its card records; None otherwise. The
    fit is deterministic, so this saves the fit and changes no number."""
    if trained is None:
        return None
    probe, card = trained
    t = settings.train
    same = (
        sorted(card["datasets"]) == sorted(datasets)
        and card["layer"] == layer == t.layer
        and (card["probe"], card["normalize"], card["streamed"]) == (t.probe, t.normalize, t.stream)
        and sorted(float(c) for c in card["val_auc"]) == sorted(t.C)
        and all(card.get(k) == getattr(t, k) for k in (("hidden", "seed") if t.probe == "mlp" else ("max_iter",)))
    )
    return probe if same else None


# --------------------------------------------------------------------------- protocols


def heldout(settings: Settings, probe: LinearProbe, card: dict, frames: Frames, reals: list[str]):
    """The train stage's probe on each evaluate dataset -> (metrics, ROC curves, scores)."""
    ev = settings.evaluate
    results, curves, by_name = {}, {}, {}
    for name in ev.datasets:
        s = scored(frames, reals, name, probe.predict_proba)
        results[name] = score_set(s, card.get("threshold"), ev.bootstrap, name, ev.video_pooling)
        curves[name] = roc_points(s.y, s.scores)
        by_name[name] = s
    if len(ev.seeds) > 1:
        per_seed = {name: [] for name in ev.datasets}
        for seed in tqdm(ev.seeds, desc="heldout: seeds", unit="probe"):
            fitted = fit(frames, card["datasets"], settings.train, redraw_train_val(frames, card["datasets"], seed))
            for name in ev.datasets:
                s = scored(frames, reals, name, fitted.probe.predict_proba)
                per_seed[name].append(binary_metrics(s.y, s.scores)["auc"])
        for name, aucs in per_seed.items():
            aucs = np.array([a for a in aucs if a is not None])
            results[name]["seeds"] = {
                "seeds": list(ev.seeds),
                "auc": [float(a) for a in aucs],
                "auc_mean": float(aucs.mean()) if len(aucs) else None,
                "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else None,
            }
    return results, curves, by_name


def fake_sets(settings: Settings, frames: Frames) -> list[str]:
    """Fake datasets of the cross-manipulation protocols: train's fakes, then evaluate's."""
    ordered = [d for d in settings.train.datasets if frames.label_of(d) == 1]
    return ordered + [d for d in settings.evaluate.datasets if d not in ordered]


Folds = dict[tuple[str, ...], probes.Fitted]  # fitted probes by their datasets


def left_out_lists(reals: list[str], fakes: list[str]) -> list[list[str]]:
    """The datasets of each leave-one-out probe: the reals and every fake but one."""
    return [[*reals, *(f for f in fakes if f != left_out)] for left_out in fakes]


def protocol_folds(settings: Settings, frames: Frames, reals: list[str], trained: tuple | None) -> Folds:
    """The probes that cross_manipulation and leave_one_out fit, fitted together: their folds
    share the solver's passes over the rows (`fit_many`), and a fold both protocols need (two
    fakes: leaving one out is training on the other) is fitted once. By datasets."""
    protocols, fakes = settings.evaluate.protocols, fake_sets(settings, frames)
    lists = []
    if "cross_manipulation" in protocols:
        own = [train_stage_probe(settings, trained, [*reals, fake], settings.train.layer) for fake in fakes]
        lists += [[*reals, fake] for fake, probe in zip(fakes, own, strict=True) if probe is None]
    if "leave_one_out" in protocols and len(fakes) >= 2:
        lists += left_out_lists(reals, fakes)
    unique = [list(datasets) for datasets in dict.fromkeys(map(tuple, lists))]
    fitted = fit_many(
        frames, unique, settings.train, " + ".join(p for p in ("cross_manipulation", "leave_one_out") if p in protocols)
    )
    return dict(zip(map(tuple, unique), fitted, strict=True))


def folds_of(
    frames: Frames, lists: list[list[str]], spec: TrainSettings, desc: str, known: Folds | None
) -> list[probes.Fitted]:
    """The probe of each list of datasets: from `known` (`protocol_folds`), the others fitted now."""
    known = dict(known or {})
    missing = [datasets for datasets in lists if tuple(datasets) not in known]
    known.update(zip(map(tuple, missing), fit_many(frames, missing, spec, desc), strict=True))
    return [known[tuple(datasets)] for datasets in lists]


def cross_manipulation(
    settings: Settings, frames: Frames, reals: list[str], trained: tuple | None = None, folds: Folds | None = None
) -> dict:
    """AUC matrix: rows = the fake dataset a probe was trained on, columns = tested on. The row of
    the train stage's own datasets is its probe (`trained`, when the settings match); the others
    from `folds` (`protocol_folds`) or fitted here."""
    fakes = fake_sets(settings, frames)
    probe_of = {fake: train_stage_probe(settings, trained, [*reals, fake], settings.train.layer) for fake in fakes}
    to_fit = [fake for fake in fakes if probe_of[fake] is None]
    fitted = folds_of(frames, [[*reals, fake] for fake in to_fit], settings.train, "cross_manipulation", folds)
    for fake, fold in zip(to_fit, fitted, strict=True):
        probe_of[fake] = fold.probe
    auc, video_auc = {}, {}
    for trained_on in tqdm(fakes, desc="cross_manipulation", unit="probe"):
        probe = probe_of[trained_on]
        auc[trained_on], video_auc[trained_on] = {}, {}
        for tested_on in fakes:
            s = scored(frames, reals, tested_on, probe.predict_proba)
            auc[trained_on][tested_on] = binary_metrics(s.y, s.scores, name=tested_on)["auc"]
            v_scores, v_labels, _ = video_level(s.scores, s.y, s.video, settings.evaluate.video_pooling)
            video_auc[trained_on][tested_on] = binary_metrics(v_labels, v_scores, name=f"{tested_on} (videos)")["auc"]
    off = [auc[a][b] for a in fakes for b in fakes if a != b and auc[a][b] is not None]
    diag = [auc[a][a] for a in fakes if auc[a][a] is not None]
    return {
        "datasets": fakes,
        "auc": auc,
        "video_auc": video_auc,
        "mean_in_domain_auc": float(np.mean(diag)) if diag else None,
        "mean_cross_auc": float(np.mean(off)) if off else None,
    }


def leave_one_out(settings: Settings, frames: Frames, reals: list[str], folds: Folds | None = None) -> dict:
    """Each fake tested with a probe trained on the reals and the other fakes (from `folds`, or
    fitted here)."""
    fakes = fake_sets(settings, frames)
    if len(fakes) < 2:
        log.warning("leave_one_out needs at least two fake datasets; skipped")
        return {}
    results = {}
    fitted = folds_of(frames, left_out_lists(reals, fakes), settings.train, "leave_one_out", folds)
    for left_out, fold in tqdm(zip(fakes, fitted, strict=True), desc="leave_one_out", unit="probe", total=len(fakes)):
        s = scored(frames, reals, left_out, fold.probe.predict_proba)
        ev = settings.evaluate
        results[left_out] = score_set(s, fold.threshold, ev.bootstrap, left_out, ev.video_pooling)
    return results


def zero_shot(settings: Settings, store, frames: Frames, reals: list[str]) -> dict:
    """Scored by similarity to text prompts (`probes.ZeroShotProbe`). `frames` must hold the
    `projection` layer (the space the text embeddings live in)."""
    from pipeline.store import text

    prompts = settings.evaluate.zero_shot.prompts
    try:
        real_t, fake_t, scoring = text.read(store.directory, prompts["real"], prompts["fake"])
    except KeyError as exc:
        raise ConfigError(f"{exc.args[0]}; re-run extract (`dvc repro extract`) to embed the prompts.") from None

    fn = probes.ZeroShotProbe(real_t, fake_t, **scoring).predict_proba
    return {
        name: score_set(
            scored(frames, reals, name, fn),
            None,
            settings.evaluate.bootstrap,
            f"{name} (zero-shot)",
            settings.evaluate.video_pooling,
        )
        for name in settings.evaluate.datasets
    }


def read_test_list(path: Path) -> dict[tuple[str, str], int | None]:
    """An official list of test videos -> {(folder, video id): 1 real | 0 fake | None (unsaid)}, in
    Celeb-DF's labels (the manifest's are the other way round); folder names compare
    case-insensitively. Two formats:
      text  Celeb-DF's `List_of_testing_videos.txt`: per line `<label> <folder>/<video file>`
            (label 1 = real, 0 = fake), or just the path
      JSON  a split file mapping video paths to their facts, DFDCP's `dataset.json` style:
            {"<folder>/<video file>": {"label": "fake", "set": "test"}, ...}; only entries whose
            `set` (or `split`) is test are listed"""
    listed: dict[tuple[str, str], int | None] = {}
    listing = splits.read_listing(
        path,
        "a test list is Celeb-DF's List_of_testing_videos.txt or a JSON split file",
        "map video paths to their facts, like DFDCP's dataset.json",
    )
    if isinstance(listing, dict):
        for name, facts in listing.items():
            facts = facts if isinstance(facts, dict) else {}
            if str(facts.get("set", facts.get("split", "test"))).lower() != "test":
                continue
            entry = PurePosixPath(name.replace("\\", "/"))
            word = str(facts.get("label", "")).lower()
            listed[(entry.parent.name.lower(), entry.stem)] = {"real": 1, "fake": 0}.get(word)
        return listed
    for number, line in enumerate(listing.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in ("0", "1")):
            raise ConfigError(f"{path}, line {number}: expected '<1 real | 0 fake> <folder>/<video>', got {line!r}.")
        entry = PurePosixPath(parts[-1].replace("\\", "/"))
        listed[(entry.parent.name.lower(), entry.stem)] = int(parts[0]) if len(parts) == 2 else None
    return listed


def listed_rows(frames: Frames, listed: dict[tuple[str, str], int | None]) -> tuple[np.ndarray, set]:
    """Which rows belong to a listed video: the row's video id and one of its path's folders match
    a listed (folder, video). Returns the row mask and the listed entries found."""
    mask = np.zeros(len(frames.path), dtype=bool)
    found: set = set()
    for i, (path, video) in enumerate(zip(frames.path, frames.video, strict=True)):
        vid = str(video).split("/", 1)[1]
        for folder in str(path).lower().split("/")[:-1]:
            if (folder, vid) in listed:
                mask[i] = True
                found.add((folder, vid))
                if listed[(folder, vid)] is not None and listed[(folder, vid)] != 1 - frames.label[i]:
                    kind = "real" if listed[(folder, vid)] == 1 else "fake"
                    raise ConfigError(
                        f"the test list calls {folder}/{vid} {kind}, but its dataset '{frames.dataset[i]}' is labelled "
                        f"{'fake' if frames.label[i] else 'real'}; fix the list or data.datasets."
                    )
                break
    return mask, found


def cross_dataset(settings: Settings, probe: LinearProbe, card: dict, frames: Frames) -> dict:
    """The train stage's probe on each cross-dataset test set: its own reals vs its fakes, every
    frame (or the listed videos' frames), no ratio split -> frame and video metrics with CIs."""
    ev = settings.evaluate
    results = {}
    for name, spec in ev.cross_dataset.items():
        mask = frames.mask(spec.real, list(splits.SPLITS), labels=[0]) | frames.mask(
            spec.fake, list(splits.SPLITS), labels=[1]
        )
        listed_count = missing = None
        if spec.test_list is not None:
            listed = read_test_list(settings.resolve(spec.test_list))
            in_list, found = listed_rows(frames, listed)
            mask &= in_list
            listed_count, missing = len(listed), len(listed) - len(found)
            if missing:
                absent = sorted(set(listed) - found)[0]
                log.warning(
                    "%s: %d of %d listed test videos are not in the manifest (e.g. %s/%s); they are left out",
                    name,
                    missing,
                    len(listed),
                    *absent,
                )
        s = Scored(frames.label[mask], frames.score(probe.predict_proba, mask), frames.video[mask], frames.digest[mask])
        results[name] = score_set(s, card.get("threshold"), ev.bootstrap, name, ev.video_pooling)
        results[name]["sets"] = {"real": list(spec.real), "fake": list(spec.fake)}
        results[name]["videos"] = {
            "real": len(np.unique(s.video[s.y == 0])),
            "fake": len(np.unique(s.video[s.y == 1])),
            "listed": listed_count,
            "listed_missing": missing,
        }
    return results


def layers(
    settings: Settings, table, store, trained: tuple, reals: list[str], main: dict[str, Scored], loaded: Frames
) -> dict:
    """One probe per layer of `model.layers` (the train stage's datasets and settings), scored on every
    evaluate dataset: AUC per layer and test set, the mean over the fakes trained on (in-domain)
    and over the others (cross-manipulation), and per layer and test set the paired bootstrap
    difference to the train stage's probe on the same frames (`main`). The train stage's layer is
    its probe on the frames already `loaded` (when the settings match), not a second read and fit."""
    ev = settings.evaluate
    card = trained[1]
    trained_fakes = [d for d in card["datasets"] if d not in reals]
    # In the cache's order; a cache of more layers (a sweep's, `extract.wider_cache`) may hold them.
    chosen = [layer for layer in store.layers if layer in settings.model.layers]
    out: dict = {"layers": chosen, "reference": card["layer"], "auc": {}, "video_auc": {}}
    out.update(mean_in_domain_auc={}, mean_cross_auc={}, vs_reference={})
    for layer in tqdm(chosen, desc="layers protocol", unit="layer"):
        frames = loaded if layer == card["layer"] else features.load(table, store, layer, stream=settings.train.stream)
        probe = train_stage_probe(settings, trained, card["datasets"], layer)
        probe = probe or fit(frames, card["datasets"], settings.train).probe
        out["auc"][layer], out["video_auc"][layer], out["vs_reference"][layer] = {}, {}, {}
        for name in ev.datasets:
            s = scored(frames, reals, name, probe.predict_proba)
            out["auc"][layer][name] = binary_metrics(s.y, s.scores)["auc"]  # small sets: warned by heldout
            v_scores, v_labels, _ = video_level(s.scores, s.y, s.video, ev.video_pooling)
            out["video_auc"][layer][name] = binary_metrics(v_labels, v_scores)["auc"]
            ref = main.get(name)
            if ev.bootstrap and ref is not None and np.array_equal(ref.digest, s.digest) and len(set(s.y)) == 2:
                diff = paired_bootstrap_auc(s.y, s.scores, ref.scores, s.video, n=ev.bootstrap)
                diff["significant"] = bool(diff["ci_low"] > 0 or diff["ci_high"] < 0)
                out["vs_reference"][layer][name] = diff
        inside = [out["auc"][layer][d] for d in ev.datasets if d in trained_fakes and out["auc"][layer][d] is not None]
        cross = [
            out["auc"][layer][d] for d in ev.datasets if d not in trained_fakes and out["auc"][layer][d] is not None
        ]
        out["mean_in_domain_auc"][layer] = float(np.mean(inside)) if inside else None
        out["mean_cross_auc"][layer] = float(np.mean(cross)) if cross else None
    return out


def robustness(
    settings: Settings, probe: LinearProbe, card: dict, frames: Frames, store, reals: list[str], sides: dict[str, int]
) -> dict:
    """The train stage's probe on every perturbed variant of the held-out test sets (embedded by
    extract under `<key>~<perturbation>`; a variant that leaves its image as it is, the clean row:
    `perturb.variant` with the rows' shorter `sides`): frame and video AUC per perturbation, level
    and test set, beside the clean numbers."""
    ev = settings.evaluate
    specs = perturb.specs(ev.robustness)
    clean = {name: scored(frames, reals, name, probe.predict_proba) for name in ev.datasets}
    out: dict = {"clean": {}, **{kind: {} for kind, _ in map(perturb.parse, specs)}}

    def aucs(s: Scored, scores: np.ndarray) -> dict:  # small test sets were warned about by heldout
        v_scores, v_labels, _ = video_level(scores, s.y, s.video, ev.video_pooling)
        return {"auc": binary_metrics(s.y, scores)["auc"], "video_auc": binary_metrics(v_labels, v_scores)["auc"]}

    out["clean"] = {name: aucs(s, s.scores) for name, s in clean.items()}
    keys = list(
        dict.fromkeys(perturb.variant(d, spec, sides) for spec in specs for s in clean.values() for d in s.digest)
    )
    X, found = features.read_layers(store, keys, card["layer"])  # every level in one read of the cache
    if not found.all():
        spec = perturb.split(keys[int(np.argmin(found))])[1]
        raise ConfigError(
            f"{int((~found).sum())} perturbed test images (e.g. '{spec}' variants) are not in the cache; re-run "
            "extract (`dvc repro extract`) after changing evaluate.robustness."
        )
    score_of = dict(zip(keys, probe.predict_proba(X), strict=True))
    for spec in tqdm(specs, desc="robustness", unit="level"):
        kind, level = perturb.parse(spec)
        out[kind][f"{level:g}"] = {
            name: aucs(s, np.array([score_of[perturb.variant(d, spec, sides)] for d in s.digest]))
            for name, s in clean.items()
        }
    return out


def warn_unchanged_by_resize(settings: Settings, sides: dict[str, int]) -> None:
    """A resize level downscales only the test images whose shorter side is larger: the others
    are scored as they are (their clean rows), and that level's AUC on them is the clean one. Say
    how many. `sides`: the test rows' shorter sides."""
    sides = list(sides.values())
    for level in settings.evaluate.robustness.resize:
        n = sum(side <= level for side in sides)
        if n:
            how_many = f"all {n}" if n == len(sides) else f"{n} of {len(sides)}"
            log.warning(
                "robustness: resize=%g leaves %s test images unchanged (their shorter side is %g px or less "
                "already), so its AUC on them is the clean one; choose sides below the images' own",
                level, how_many, level,
            )  # fmt: skip


# --------------------------------------------------------------------------- stage


SCORE_COLUMNS = ("test_set", "digest", "video", "label", "score")


def write_scores(outputs: Outputs, by_name: dict[str, Scored]) -> None:
    """metrics/scores.csv: every held-out test frame's score (what `compare` pairs across
    experiments: the same digests scored by two backbones). Header only without heldout."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for name, s in by_name.items():
        writer.writerows(
            (name, d, v, int(y), f"{x:.9g}") for d, v, y, x in zip(s.digest, s.video, s.y, s.scores, strict=True)
        )
    atomic.write_bytes(outputs.scores, buffer.getvalue().encode())


def git_commit(directory: Path) -> str:
    """The commit the project is at, `+ uncommitted changes` when its tracked files differ;
    `not a git repository` outside one."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "not a git repository"
    return commit + (" + uncommitted changes" if dirty else "")


def params_text(settings: Settings) -> str:
    """The run's settings as YAML (what the params file said, defaults filled in)."""
    import dataclasses

    import yaml

    raw = dataclasses.asdict(settings)
    raw.pop("base_dir", None)
    return yaml.safe_dump(json.loads(json.dumps(raw, default=str)), sort_keys=False)


def summary(results: dict, audit: dict) -> dict:
    """metrics/summary.json, the compact numbers DVC lists (`dvc exp show`, `dvc metrics diff`):
    per test set the frame and video AUC, the cross-manipulation means, and the audit's AUC. The
    full detail stays in the protocol files beside it."""
    out: dict = {}
    for protocol in ("heldout", "leave_one_out", "zero_shot", "cross_dataset"):
        if results.get(protocol):
            out[protocol] = {
                name: {"auc": m["frame"]["auc"], "video_auc": m["video"]["auc"]}
                for name, m in results[protocol].items()
            }
    if results.get("cross_manipulation"):
        m = results["cross_manipulation"]
        out["cross_manipulation"] = {"in_domain_auc": m["mean_in_domain_auc"], "cross_auc": m["mean_cross_auc"]}
    if results.get("robustness"):
        m = results["robustness"]
        out["robustness"] = {
            f"{kind}={level}": _mean([v["auc"] for v in per_set.values()])
            for kind in perturb.KINDS
            for level, per_set in m.get(kind, {}).items()
        }
    if results.get("layers"):
        m = results["layers"]
        scored = {k: v for k, v in m["mean_cross_auc"].items() if v is not None}
        best = max(scored, key=scored.get) if scored else None
        out["layers"] = {"best_cross_layer": best, "best_cross_auc": scored.get(best) if best else None}
    out["shortcut_auc"] = audit.get("auc")
    return out


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def write_robustness_plot(outputs: Outputs, result: dict) -> None:
    """plots/robustness.json: AUC per perturbation level and test set (the AUC-vs-level curves)."""
    rows = [
        {"perturbation": kind, "level": float(level), "test_set": name, "auc": m["auc"]}
        for kind in perturb.KINDS
        for level, per_set in result.get(kind, {}).items()
        for name, m in per_set.items()
    ]
    atomic.write_json(outputs.robustness_plot, rows, sort_keys=False)


def write_layer_plot(outputs: Outputs, result: dict) -> None:
    """plots/layers.json: AUC per layer (x: the layer's position) per test set, and the in-domain
    and cross-manipulation means, for `dvc plots show` (an empty list without the protocol; the
    top-level plot in dvc.yaml draws one line per test set)."""
    rows = []
    for i, layer in enumerate(result.get("layers", [])):
        for name, auc in result["auc"][layer].items():
            rows.append({"layer": layer, "position": i, "test_set": name, "auc": auc})
        for key, label in (("mean_in_domain_auc", "mean in-domain"), ("mean_cross_auc", "mean cross-manipulation")):
            rows.append({"layer": layer, "position": i, "test_set": label, "auc": result[key][layer]})
    atomic.write_json(outputs.layers_plot, rows, sort_keys=False)


def check_rows(outputs: Outputs, card: dict, frames: Frames) -> None:
    """The probe's train and val rows are still those of its datasets (cards before the check
    have no record of them): after a new split or new training images, a stage run by hand would
    score the probe on frames it was trained on, or report a probe the data no longer gives."""
    trained_on = card.get("train_val_sha256")
    if trained_on is None or trained_on == frames.train_val_sha256(card["datasets"]):
        return
    train, val = frames.train_val(card["datasets"])
    raise ConfigError(
        f"the probe in {outputs.probe} was trained on other train/val rows of {'+'.join(card['datasets'])} than "
        f"the manifest now gives ({card['n_train']} train and {card['n_val']} val then, {int(train.sum())} and "
        f"{int(val.sum())} now: the splits or the data changed since train); retrain it (`python -m pipeline "
        "train`, or `dvc repro`), then evaluate."
    )


def run(settings: Settings, outputs: Outputs) -> dict:
    probe, card = probes.load(outputs.probe)
    table = manifest_table.read(outputs.manifest)
    store = features.open_cache(outputs)
    if store.header.fingerprint != card["fingerprint"]:  # a stage run by hand: its vectors are not the probe's
        raise ConfigError(
            f"the probe in {outputs.probe} was trained on cache {card['fingerprint']} ({card['model']}), but the "
            f"last extract filled cache {store.header.fingerprint} ({store.directory.name}); retrain it on this "
            "cache (`python -m pipeline train`, or `dvc repro`), then evaluate."
        )
    frames = features.load(table, store, card["layer"], stream=settings.train.stream)
    check_rows(outputs, card, frames)
    reals = [d for d in card["datasets"] if frames.label_of(d) == 0]
    protocols = settings.evaluate.protocols

    results: dict[str, dict] = {}
    curves: dict = {}
    by_name: dict[str, Scored] = {}
    if "heldout" in protocols:
        results["heldout"], curves, by_name = heldout(settings, probe, card, frames, reals)
    folds = protocol_folds(settings, frames, reals, (probe, card))
    if "cross_manipulation" in protocols:
        results["cross_manipulation"] = cross_manipulation(settings, frames, reals, (probe, card), folds)
    if "leave_one_out" in protocols:
        results["leave_one_out"] = leave_one_out(settings, frames, reals, folds)
    if "cross_dataset" in protocols and settings.evaluate.cross_dataset:
        results["cross_dataset"] = cross_dataset(settings, probe, card, frames)
    if "robustness" in protocols and perturb.specs(settings.evaluate.robustness):
        sides = perturb.shorter_sides(table, perturb.test_keys(settings, table))
        warn_unchanged_by_resize(settings, sides)
        results["robustness"] = robustness(settings, probe, card, frames, store, reals, sides)
    if "layers" in protocols:
        main = by_name or {n: scored(frames, reals, n, probe.predict_proba) for n in settings.evaluate.datasets}
        results["layers"] = layers(settings, table, store, (probe, card), reals, main, frames)
    if "zero_shot" in protocols:
        try:
            if "projection" not in store.layers:
                raise ConfigError("it needs the 'projection' layer; add it to model.layers and re-run extract.")
            projected = frames
            if card["layer"] != "projection":
                projected = features.load(table, store, "projection", stream=settings.train.stream)
            results["zero_shot"] = zero_shot(settings, store, projected, reals)
        except ConfigError as exc:  # the other protocols' results are still written
            log.warning("zero_shot protocol skipped: %s", exc)
    audit = shortcut.audit(table, list(dict.fromkeys([*settings.train.datasets, *settings.evaluate.datasets])))

    for protocol in PROTOCOLS:
        # In the order of evaluate.datasets, as the user listed them.
        atomic.write_json(outputs.protocol_metrics(protocol), results.get(protocol, {}), sort_keys=False)
    atomic.write_json(outputs.shortcut, audit)
    atomic.write_json(outputs.summary, summary(results, audit), sort_keys=False)
    outputs.roc_plot.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"test_set": name, **point} for name, points in curves.items() for point in points]
    atomic.write_json(outputs.roc_plot, rows, sort_keys=False)

    write_layer_plot(outputs, results.get("layers", {}))
    write_robustness_plot(outputs, results.get("robustness", {}))
    write_scores(outputs, by_name)
    about = report.header(card, git_commit(settings.base_dir), params_text(settings))
    report.write(outputs.reports, results, curves, {n: (s.y, s.scores) for n, s in by_name.items()}, audit, about)
    for protocol, text_ in report.summaries(results).items():
        log.info("%s:\n%s", protocol, text_)
    return results
