"""Item 3 of issue #13 as a user meets it: `python -m pipeline extract` on a 2-worker dask
LocalCluster against the same command run locally, each end to end in its own process (imports,
the model's load in this process or in each worker, the cluster's start and close), alternating.

    python benchmarks/cli_dask_bench.py [--images 2400] [--rounds 3] [--precision bf16] [--workers 2]

The same ViT-B/32-shaped CLIP (random weights) and JPEGs as extract_bench.py; every round embeds
the whole set again into an empty cache, first locally, then on dask. Prints each round's seconds
and d/b (the dask run's images/s over the local run's), then the mean. Where extract_bench.py's
(d) compares with a local run that is handed its model, this is the comparison a user makes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import extract_bench  # this folder's: the model and the images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--workers", type=int, default=2, help="dask workers, and reader threads or processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cli-dask-bench-"))
    try:
        extract_bench.make_model(work / "model", "vit-b32")
        extract_bench.make_images(work / "data" / "real", args.images)
        extract_bench.make_images(work / "data" / "fake", 8, start=10**6)
        params = {
            "data": {
                "root": str(work / "data"),
                "datasets": {"real": {"path": "real", "label": "real"}, "fake": {"path": "fake", "label": "fake"}},
            },
            "model": {"name": str(work / "model")},
            "extract": {
                "batch_size": 64,
                "num_workers": args.workers,
                "device": "cpu",
                "precision": args.precision,
                "shard_size": max(32, args.images // 10),
            },
            "train": {"datasets": ["real", "fake"]},
            "evaluate": {"datasets": ["fake"]},
        }
        (work / "local.yaml").write_text(yaml.safe_dump(params))
        params["extract"].update(scheduler="dask", dask={"address": "", "n_workers": args.workers})
        (work / "dask.yaml").write_text(yaml.safe_dump(params))

        def run(stage: str, which: str) -> float:
            start = time.perf_counter()
            command = [sys.executable, "-m", "pipeline", stage, "--params", str(work / f"{which}.yaml")]
            subprocess.run(command, check=True, capture_output=True)
            return time.perf_counter() - start

        run("manifest", "local")
        ratios = []
        print(f"{args.images + 8} JPEGs, ViT-B/32 shape, {args.precision}, {args.workers} workers")
        for round_ in range(1, args.rounds + 1):
            seconds = {}
            for which in ("local", "dask"):
                shutil.rmtree(work / "cache" / "embeddings", ignore_errors=True)
                seconds[which] = run("extract", which)
            ratios.append(seconds["local"] / seconds["dask"])
            local, dask = seconds["local"], seconds["dask"]
            print(f"round {round_}: (b) local {local:.1f} s, (d) dask {dask:.1f} s, d/b {ratios[-1]:.2f}")
        print(f"d/b mean {sum(ratios) / len(ratios):.2f}  target >= 0.85")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
