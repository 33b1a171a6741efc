"""Evaluation benchmark on an FF++-sized synthetic cache: 30,000 frames x 768 dims.

    python benchmarks/evaluate_bench.py [--videos 1000] [--frames 6] [--dim 768] [--spectrum flat|backbone]

1,000 real videos and 4 x 1,000 fake videos (FF++'s size), 6 frames each, written as a real
manifest and real Parquet shards, with three cached layers (for the layers protocol), a
Celeb-DF-like cross-dataset set (200 real and 200 fake videos, its own reals, an official test list
of half of them) and two robustness levels of every held-out test frame. Times the train stage
and each evaluate protocol, and prints each against the baseline measured in the same run: one
probe fit on one training set (what the original script did once per experiment, after
re-embedding every image).

`--spectrum backbone` maps every row through a fixed matrix that gives the features a backbone's
spectrum (three dominant directions over a tail spanning three decades, as a ViT's embeddings
have): the probes' solver takes many more steps on such rows than on the isotropic default.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from pipeline import config, evaluate, features, manifest_table, perturb, report, splits, train
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe
from pipeline.store import EmbeddingStore
from pipeline.store.shard import ShardData
from pipeline.store.summary import ExtractSummary

METHODS = ["faceswap", "neuraltextures", "deepfakes", "face2face"]
CELEB = ["celeb_real", "celeb_synthesis"]
LAYERS = ["projection", "block_0", "block_1"]
LEVELS = ["jpeg=60", "jpeg=20"]


def backbone_spectrum(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A dim x dim map: a random rotation with singular values 30, 30, 30 and then 1 down to 1e-3."""
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scales = np.logspace(0, -3, dim)
    scales[:3] = 30.0
    return ((basis * scales) @ basis.T).astype(np.float32)


def build(work: Path, videos: int, frames: int, dim: int, spectrum: str = "flat", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directions = {m: rng.normal(size=dim) / np.sqrt(dim) for m in METHODS}
    rows = {k: [] for k in manifest_table.SCHEMA.names}
    arrays = []
    for dataset in ["real_youtube", *METHODS, *CELEB]:
        ids = [f"{v:03d}" for v in range(videos if dataset not in CELEB else videos // 5)]
        # FF++ pairs videos mutually: fakes A_B and B_A (pairs must not chain into one group).
        names = ids if dataset in ("real_youtube", "celeb_real") else [f"{a}_{int(a) ^ 1:03d}" for a in ids]
        names = [f"c{n}" for n in names] if dataset in CELEB else names
        for video in names:
            identity = rng.normal(size=dim)
            for f in range(frames):
                x = identity + 0.5 * rng.normal(size=dim)
                if dataset not in ("real_youtube", "celeb_real"):
                    x += 4.0 * directions.get(dataset, directions["faceswap"]) * np.sqrt(dim) / 10
                arrays.append(x.astype(np.float32))
                path = f"{dataset}/{video}/{f:04d}.png"
                rows["path"].append(path)
                rows["dataset"].append(dataset)
                rows["label"].append(0 if dataset in ("real_youtube", "celeb_real") else 1)
                rows["method"].append(dataset)
                rows["video"].append(video)
                rows["size"].append(100_000)
                rows["mtime_ns"].append(0)
                rows["ctime_ns"].append(0)
                rows["digest"].append(f"{len(arrays):064x}")
                rows["format"].append("png")
                rows["width"].append(256)
                rows["height"].append(256)
                rows["jpeg_quality"].append(-1)
                rows["frame"].append(-1)
                rows["frame_count"].append(-1)
                rows["orientation"].append(1)
    split_of = splits.assign_splits(rows["video"], config.SplitSpec(), datasets=rows["dataset"])
    rows["split"] = [split_of[v] for v in rows["video"]]
    outputs = Outputs(work)
    manifest_table.write(pa.table(rows, schema=manifest_table.SCHEMA), outputs.manifest)

    description = {"model": {"synthetic": True}, "layers": LAYERS, "dtype": "float16", "precision": "fp32"}
    store = EmbeddingStore.create(outputs.embeddings, "synthetic", description, dict.fromkeys(LAYERS, dim))
    X = np.stack(arrays)
    keys, paths = list(rows["digest"]), list(rows["path"])
    heldout_sets = {"real_youtube", *METHODS}
    test = [
        i
        for i, (d, sp) in enumerate(zip(rows["dataset"], rows["split"], strict=True))
        if sp == "test" and d in heldout_sets
    ]
    for level, spec in enumerate(LEVELS, 1):  # robustness variants: the test frames, degraded
        keys += [perturb.key(rows["digest"][i], spec) for i in test]
        paths += [rows["path"][i] for i in test]
        X = np.vstack([X, X[test] + level * rng.normal(size=(len(test), dim)).astype(np.float32)])
    by_layer = {layer: X + 0.3 * i * rng.normal(size=X.shape).astype(np.float32) for i, layer in enumerate(LAYERS)}
    if spectrum == "backbone":
        mapping = backbone_spectrum(dim, rng)
        by_layer = {layer: values @ mapping for layer, values in by_layer.items()}
    for start in range(0, len(X), 4096):
        chunk = slice(start, start + 4096)
        store.commit(
            ShardData(keys[chunk], paths[chunk], [None] * len(X[chunk]), {k: v[chunk] for k, v in by_layer.items()})
        )
    listed = sorted({(d, v) for d, v in zip(rows["dataset"], rows["video"], strict=True) if d in CELEB})[::2]
    (work / "List_of_testing_videos.txt").write_text(
        "".join(f"{1 if d == 'celeb_real' else 0} {d}/{v}.mp4\n" for d, v in listed)
    )
    n = len(rows["digest"])
    ExtractSummary(
        model="synthetic",
        fingerprint=store.header.fingerprint,
        embeddings=store.directory.name,
        layers=store.header.dims,
        precision="fp32",
        images=n,
        embedded=n,
        failed=0,
    ).write(outputs.extract_summary)
    params = {
        "data": {
            "root": str(work),
            "datasets": {
                d: {"path": d, "label": "real" if d in ("real_youtube", "celeb_real") else "fake"}
                for d in ["real_youtube", *METHODS, *CELEB]
            },
        },
        "model": {"name": "synthetic", "layers": LAYERS},
        "extract": {},
        "train": {"datasets": ["real_youtube", "faceswap"]},
        "evaluate": {
            "datasets": METHODS,
            "protocols": ["heldout", "cross_manipulation", "leave_one_out", "cross_dataset", "layers", "robustness"],
            "cross_dataset": {
                "celebdf": {"real": ["celeb_real"], "fake": ["celeb_synthesis"]},
                "celebdf_official": {
                    "real": ["celeb_real"],
                    "fake": ["celeb_synthesis"],
                    "test_list": "List_of_testing_videos.txt",
                },
            },
            "robustness": {"jpeg": [60, 20]},
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--spectrum", choices=["flat", "backbone"], default="flat")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evaluate-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # a model and images: hundreds of MB per run
    build(work, args.videos, args.frames, args.dim, args.spectrum)
    settings = config.load(work / "params.yaml")
    outputs = Outputs(work)
    table = manifest_table.read(outputs.manifest)
    store = features.open_cache(outputs)

    t_read, frames = timed(features.FeatureTable.load, table, store, "projection")
    reals = ["real_youtube"]
    t_fit, _ = timed(baseline_fit, frames)
    t_train, _ = timed(train.run, settings, outputs)
    probe, card = LinearProbe.load(outputs.probe)
    t_heldout, _ = timed(evaluate.heldout, settings, probe, card, frames, reals)
    t_matrix, matrix = timed(evaluate.cross_manipulation, settings, frames, reals, (probe, card))
    t_loo, _ = timed(evaluate.leave_one_out, settings, frames, reals)
    t_cross_dataset, _ = timed(evaluate.cross_dataset, settings, probe, card, frames)
    sides = perturb.shorter_sides(table, perturb.test_keys(settings, table))
    t_robust, _ = timed(evaluate.robustness, settings, probe, card, frames, store, reals, sides)
    main_sets = {n: evaluate.scored(frames, reals, n, probe.predict_proba) for n in settings.evaluate.datasets}
    t_layers, _ = timed(evaluate.layers, settings, table, store, (probe, card), reals, main_sets, frames)
    t_stage, _ = timed(evaluate.run, settings, outputs)

    n, dim = frames.X.shape
    print(f"\n{n} frames x {dim} dims ({args.videos} videos per FF++ dataset + 2 x {args.videos // 5} Celeb-DF-like), "
          f"{args.spectrum} spectrum, C grid {settings.train.C}")  # fmt: skip
    rows = [
        ("baseline: one probe fit at C=1 (real vs faceswap)", t_fit),
        ("read the cache (all frames, one layer)", t_read),
        ("train stage (C grid on val)", t_train),
        ("heldout protocol (4 test sets, 1000 bootstrap resamples each)", t_heldout),
        ("cross-manipulation matrix (4 probes x 4 test sets)", t_matrix),
        ("leave-one-out (4 probes)", t_loo),
        ("cross-dataset (2 sets: all frames, and an official list)", t_cross_dataset),
        (f"robustness ({len(LEVELS)} levels x 4 test sets)", t_robust),
        (f"layers ({len(LAYERS)} probes x 4 test sets, paired bootstrap each)", t_layers),
        ("whole evaluate stage (all of the above + reports)", t_stage),
    ]
    width = max(len(r[0]) for r in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.2f} s  {seconds / t_fit:6.1f}x baseline")
    print()
    print(report.matrix_text(matrix))


def baseline_fit(frames: features.FeatureTable) -> LinearProbe:
    rows = frames.select(["real_youtube", "faceswap"], ["train"])
    return LinearProbe(C=1.0).fit(rows.X, rows.y)


if __name__ == "__main__":
    main()
