"""`dvc repro` on a 30,000-image dataset: the first run, a no-op rerun, and +1 % new images.

    python benchmarks/repro_bench.py [--videos 750] [--frames 8] [--model tiny|vit-b32|vit-b16|vit-l14]
                                     [--precision auto] [--keep] [--against REV [--rounds 3]]

A copy of this project in a temporary git + DVC repository, laid out as for your own data: the
demo's generator writes 750 videos x 5 datasets x 8 frames = 30,000 PNG frames under data/demo
and the tiny CLIP under data/tiny-clip (or, with --model, a CLIP of a real backbone's shape with
random weights, as in extract_bench.py: what +1 % costs against a full run depends on how much
of the full run the model takes), and the `demo` stage is deleted from dvc.yaml (as the README
says to do on your data), so the images are no stage's output; the images are kept out of git
(`.gitignore`, as `dvc add` does and as any project keeps 15 GB of frames). Times, in one run:

  (a) the first `dvc repro` (scan, manifest, extract, train, evaluate), split by the moment each
      stage's command starts, and how often each image was opened before extract (DVC + scan +
      manifest; target 1: read once for hashing) and by extract (1: decoded once);
  (b) a no-op `dvc repro` (target <= 3 s);
  (c) `dvc repro` after adding 1 % new images (new videos in every dataset), and its extract
      stage alone against the first run's (target: the increment costs <= 3 % of a full run);
  (d) a no-op `dvc repro` with the images moved outside the repository (an absolute
      `data.root`, as a real dataset usually is): DVC no longer walks them to find its files.
  (e) with --against REV: more +1 % increments on the same project, `pipeline/` taken in turn
      from git revision REV and from this working tree, interleaved (REV first, --rounds times),
      so a change's effect on the increment is measured in the same hour on the same cache. REV
      must compute the same cache as this tree (the same fingerprint), or its first increment
      re-embeds everything.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from pipeline import demo

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "dvc.yaml", "params.yaml", "pyproject.toml"]
# Loaded by every Python process of a `dvc repro` (DVC itself and each stage): logs which
# process opened which image of the dataset (not the reports' plots), to count reads per image.
OPEN_LOG = """
import os, sys
def _log_png_opens(event, args):
    if event == "open" and isinstance(args[0], str) and "/data/demo/" in args[0] and args[0].endswith(".png"):
        with open(os.environ["OPEN_LOG"], "a") as fh:
            fh.write(" ".join(sys.argv[1:2]) if sys.argv[0].endswith("__main__.py") else "dvc")
            fh.write("\\n")
sys.addaudithook(_log_png_opens)
"""


def timed_repro(project: Path, env: dict | None = None) -> tuple[float, dict[str, float]]:
    """Seconds of `dvc repro`, and when (seconds from its start) each stage's command started."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    started: dict[str, float] = {}
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if m := re.match(r"Running stage '([^']+)'", line):
            started[m.group(1)] = time.perf_counter() - start
    if proc.wait() != 0:
        sys.exit("dvc repro failed:\n" + "".join(lines[-40:]))
    return time.perf_counter() - start, started


def phases(total: float, started: dict[str, float]) -> str:
    marks = sorted(started.items(), key=lambda kv: kv[1])
    parts = [f"before {marks[0][0]} {marks[0][1]:.1f} s"] if marks else []
    for (name, t), (_, t_next) in zip(marks, [*marks[1:], ("end", total)], strict=True):
        parts.append(f"{name} {t_next - t:.1f} s")
    return ", ".join(parts)


def add_videos(root: Path, n_videos: int, frames: int, first_id: int = 900, seed: int = 1) -> int:
    """1 % more: new videos (ids `first_id` ...) in every dataset, from the generator with another seed."""
    scratch = root.parent / "new-videos"
    count = demo.make_dataset(scratch, n_videos=n_videos, frames=frames, seed=seed)
    for folder in sorted(p for p in scratch.glob("*/*/*") if p.is_dir()):
        renamed = "_".join(f"{first_id + int(part)}" for part in folder.name.split("_"))
        target = root / folder.relative_to(scratch).parent / renamed
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)
    shutil.rmtree(scratch)
    return count


def use_pipeline(project: Path, revision: str | None) -> None:
    """The project's `pipeline/` from git `revision` of this repository, or from its working tree."""
    shutil.rmtree(project / "pipeline")
    if revision is None:
        shutil.copytree(REPO / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        return
    archive = subprocess.run(["git", "archive", revision, "pipeline"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(project, filter="data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=750, help="real videos (5 datasets of this many)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--model", choices=["tiny", "vit-b32", "vit-b16", "vit-l14"], default="tiny")
    parser.add_argument("--precision", default="auto", help="extract.precision (auto: fp32 on a CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    parser.add_argument("--against", metavar="REV", help="(e): increments with pipeline/ of git REV vs this tree")
    parser.add_argument("--rounds", type=int, default=3, help="(e): increments of each, interleaved")
    args = parser.parse_args()

    project = Path(tempfile.mkdtemp(prefix="repro-bench-"))
    for name in PROJECT_FILES:
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        copy(source, project / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    stages = yaml.safe_load((project / "dvc.yaml").read_text())
    del stages["stages"]["demo"]
    (project / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    start = time.perf_counter()
    n = demo.make_dataset(project / "data" / "demo", n_videos=args.videos, frames=args.frames)
    params = yaml.safe_load((project / "params.yaml").read_text())
    if args.model == "tiny":
        demo.ensure_tiny_clip(project / "data" / "tiny-clip")
    else:
        from extract_bench import make_model  # this script's folder is on sys.path

        make_model(project / "data" / args.model, args.model)
        params["model"]["name"] = f"data/{args.model}"
    params["extract"]["precision"] = args.precision
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    made = time.perf_counter() - start
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots")  # the plot templates dvc.yaml names
    (project / ".gitignore").write_text("/data/demo\n")  # git-ignored: DVC's search for dvc.yaml files skips it
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "benchmark project"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)

    hook = project.parent / f"{project.name}-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_LOG)
    opens = hook / "opens.log"
    env = {**os.environ, "PYTHONPATH": str(hook), "OPEN_LOG": str(opens)}
    first, first_started = timed_repro(project, env)  # the hook costs ~1 s here (a line per open)
    lines = opens.read_text().splitlines()
    extract_opens = lines.count("extract")
    shutil.rmtree(hook)
    noop, _ = timed_repro(project)
    extra = add_videos(project / "data" / "demo", max(2, round(args.videos / 100)), args.frames)
    more, more_started = timed_repro(project)
    outside = project.parent / f"{project.name}-data"
    (project / "data" / "demo").rename(outside)
    params["data"]["root"] = str(outside)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    timed_repro(project)  # the params changed: manifest and extract run (nothing new to embed)
    noop_outside, _ = timed_repro(project)
    compared: dict[str, list[tuple[float, str]]] = {args.against: [], "this tree": []} if args.against else {}
    for round_ in range(args.rounds if args.against else 0):
        for variant, revision in ((args.against, args.against), ("this tree", None)):
            use_pipeline(project, revision)
            first_id = 1000 * (2 + 2 * round_ + (revision is None))
            add_videos(outside, max(2, round(args.videos / 100)), args.frames, first_id, seed=first_id)
            total, started = timed_repro(project)
            compared[variant].append((total, phases(total, started)))

    def extract_time(total, started):
        return started.get("train", total) - started["extract"]

    print(f"\n{n} PNG frames ({args.videos} videos x 5 datasets x {args.frames}; generated in {made:.0f} s)")
    print(f"model: {'tiny CLIP' if args.model == 'tiny' else args.model + '-shaped CLIP'}, precision {args.precision}")
    print(f"(a) first dvc repro      {first:7.1f} s   {phases(first, first_started)}")
    print(
        f"    images opened per image: {(len(lines) - extract_opens) / n:.2f} before extract (DVC, scan, "
        f"manifest; target 1), {extract_opens / n:.2f} by extract"
    )
    print(f"(b) no-op dvc repro      {noop:7.1f} s   target <= 3 s")
    print(f"(c) +{extra} images ({100 * extra / n:.1f} %) {more:7.1f} s   {phases(more, more_started)}")
    print(f"    c / a                {more / first:7.3f}    target <= 0.03")
    ratio = extract_time(more, more_started) / extract_time(first, first_started)
    print(f"    extract stage c / a  {ratio:7.3f}")
    print(f"(d) no-op, data outside  {noop_outside:7.1f} s   target <= 3 s")
    for variant, runs in compared.items():
        print(f"(e) +{extra} images, pipeline/ of {variant}, interleaved:")
        for total, split in runs:
            print(f"    {total:7.1f} s   {split}")
    if args.keep:
        print(f"project kept in {project}, its images in {outside}")
    else:
        shutil.rmtree(project)
        shutil.rmtree(outside)


if __name__ == "__main__":
    main()
