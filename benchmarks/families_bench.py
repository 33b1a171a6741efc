"""Extraction rate per backbone family, ViT-B/16-shaped, random weights (speed does not depend on
them), in one run on the same JPEGs:

    python -m benchmarks.families_bench [--images 64] [--batch-size 32] [--workers 2]

For each family: a checkpoint saved the way its authors publish it (tests/checkpoints.py, size
"base": 224 px, patch 16, width 768, 12 blocks), then `extract.run` on a fresh cache (layer
`pooled`), and the forward pass alone on ready batches of the same size. Prints img/s of both,
their ratio, and each family's extraction rate relative to CLIP's, measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline import backbones, config, embedder, extract, images, manifest
from pipeline.outputs import Outputs
from tests import checkpoints

FAMILIES = ["clip", "siglip", "siglip2", "metaclip_2", "dinov2", "dinov2_with_registers", "dinov3_vit",
            "open_clip", "timm"]  # fmt: skip


def write_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for folder in ("real", "fake"):
        for i in range(n // 2):
            d = root / folder / f"{i:03d}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(256, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / "0000.jpg", quality=90)


def params(data: Path, model: Path, batch_size: int, workers: int) -> dict:
    return {
        "data": {
            "root": str(data),
            "datasets": {"real": {"path": "real", "label": "real"}, "fake": {"path": "fake", "label": "fake"}},
        },
        "model": {"name": str(model), "layers": ["pooled"]},
        "extract": {"batch_size": batch_size, "num_workers": workers, "precision": "fp32", "device": "cpu"},
        "train": {"datasets": ["real", "fake"], "layer": "pooled"},
        "evaluate": {"datasets": ["fake"], "protocols": ["heldout"]},
    }


def forward_rate(backbone, sample, n: int, batch_size: int) -> float:
    batch = embedder.collate([("d", "p", sample, None, None)] * batch_size).pixels
    backbone.embed(batch)  # warm-up
    start, done = time.perf_counter(), 0
    while done < n:
        backbone.embed(batch)
        done += batch_size
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=FAMILIES)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="families-bench-"))
    try:
        write_images(root / "data", args.images)
        rows = []
        for family in args.families:
            model = getattr(checkpoints, family)(root / "models" / family, size="base")
            project = root / "projects" / family
            project.mkdir(parents=True)
            (project / "params.yaml").write_text(
                yaml.safe_dump(params(root / "data", model, args.batch_size, args.workers))
            )
            settings, outputs = config.load(project / "params.yaml"), Outputs(project)
            manifest.run(settings, outputs)
            backbone = backbones.load(settings.model, "cpu", "fp32")
            start = time.perf_counter()
            summary = extract.run(settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone))
            rate = summary.embedded / (time.perf_counter() - start)
            sample, _ = images.load(next((root / "data" / "real").rglob("*.jpg")), backbone.preprocess)
            forward = forward_rate(backbone, sample, args.images, args.batch_size)
            rows.append((family, rate, forward))
            print(f"{family:<22} extract {rate:6.2f} img/s   forward {forward:6.2f} img/s   ratio {rate / forward:.2f}")
            shutil.rmtree(root / "models" / family)
        clip = dict((f, r) for f, r, _ in rows).get("clip")
        print(
            "\n| family | extract img/s | forward img/s | extract / forward | extract / CLIP |\n|---|---|---|---|---|"
        )
        for family, rate, forward in rows:
            rel = f"{rate / clip:.2f}" if clip else "-"
            print(f"| {family} | {rate:.2f} | {forward:.2f} | {rate / forward:.2f} | {rel} |")
        print(f"\n{args.images} JPEGs 320x256, batch {args.batch_size}, {args.workers} DataLoader workers, fp32, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
