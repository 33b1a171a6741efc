"""Extraction benchmark: the original script's loop vs this extractor vs the forward pass alone.

    python benchmarks/extract_bench.py [--images 300] [--model vit-b32|vit-b16|vit-l14] [--vision-layers N]
                                       [--device auto] [--precision auto] [--batch-size 64] [--workers 2] [--compile]
                                       [--reader processes|threads] [--dask N] [--dask-readers threads|processes]
                                       [--torch-threads N]
                                       [--throughput-only]

On the same JPEGs and the same ViT-shaped CLIP (random weights: speed does not depend on
them), measures images/s of
  (a) the original script's loop: per image PIL open, the HF image processor, forward, .numpy()
  (b) this extractor (`extract.run`: DataLoader workers, batched inference, writer thread; with
      --reader threads, the dask workers' reader instead: threads of this process, no fork)
  (c) the forward pass alone on ready tensors, same batch size and precision as (b), measured
      before and after (b); the faster of the two is the bound (a shared machine's speed drifts
      by 10-20 % within a minute, so one measurement could put (b) above its bound)
  (r) the readers alone (decode, preprocess, pin for a GPU), the bound from the CPU side, and
      their start: the seconds until one image comes back (forking the processes, or not)
  (d) with --dask N, the same run as (b) on a LocalCluster of N workers, whose readers are threads
      (dask's daemonic workers) or, with --dask-readers processes, processes started once per
      worker (workers that are not daemonic: `distributed.worker.daemon: False`); d/b counts its
      cluster's start and its workers' model loads, and a second ratio adds to (b) its own model
      load (handed to it here, loaded by `python -m pipeline extract`)
and prints b/a and b/c, (b) without its start, where (b) waited, the cost of an incremental run
(+1 % new images) and of resuming after a SIGKILL at 50 %, both relative to a full run, peak
RSS, and the cosine between embeddings at the chosen precision and fp32. Every ratio is
measured in the same run; --throughput-only leaves out (a), the incremental and the resume runs.
"""

from __future__ import annotations

import os

# What `python -m pipeline extract` sets before it imports torch (pipeline.cli.idle_openmp_threads_sleep),
# since (b) and (c) run in this process. Before it: `GOMP_SPINCOUNT=300000 python benchmarks/extract_bench.py`
# (GNU OpenMP's spin without a policy; a spin count wins over the policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import atexit
import logging
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dask
import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

from pipeline import backbones, config, distributed, embedder, extract, manifest, manifest_table
from pipeline.outputs import Outputs
from pipeline.store import caches

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "vit-b32": {
        "image_size": 224,
        "patch_size": 32,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "layers": 12,
        "heads": 12,
        "proj": 512,
    },
    "vit-b16": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "layers": 12,
        "heads": 12,
        "proj": 512,
    },
    "vit-l14": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "layers": 24,
        "heads": 16,
        "proj": 768,
    },
}


def make_model(directory: Path, shape: str, layers: int = 0) -> None:
    """A random-weight CLIP of `shape`; `layers` (if given) replaces its number of vision blocks."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    s = {**SHAPES[shape], **({"layers": layers} if layers else {})}
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 510,
            "eos_token_id": 511,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": s["image_size"],
            "patch_size": s["patch_size"],
            "hidden_size": s["hidden_size"],
            "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
        },
        projection_dim=s["proj"],
    )
    CLIPModel(cfg).eval().save_pretrained(directory)
    size = s["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory
    )


def make_images(folder: Path, n: int, start: int = 0) -> None:
    """JPEG face-crop-sized frames (320x256), each distinct, in per-video folders; made in
    processes, 1,000 at a time."""
    chunks = [(folder, min(1000, start + n - first), first) for first in range(start, start + n, 1000)]
    if len(chunks) == 1:
        make_chunk(*chunks[0])
        return
    with ProcessPoolExecutor() as pool:
        list(pool.map(make_chunk, *zip(*chunks, strict=True)))


def make_chunk(folder: Path, n: int, start: int) -> None:
    rng = np.random.default_rng(start)
    base = rng.integers(0, 256, size=(40, 32, 3), dtype=np.uint8)
    for i in range(start, start + n):
        small = np.clip(base.astype(int) + rng.integers(-40, 40, size=base.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(small).resize((256, 320), Image.Resampling.BILINEAR)
        path = folder / f"{i // 8:03d}" / f"{i % 8:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)


def original_loop(paths: list[Path], model_dir: Path, limit: int) -> float:
    """The one-off script: one image at a time, fp32 (images/s)."""
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    feats = []
    start = time.perf_counter()
    for p in paths[:limit]:
        image = Image.open(p)
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
            feats.append(model.visual_projection(pooled).numpy())
    return limit / (time.perf_counter() - start)


def cpu_bf16_flags() -> str:
    """Which native bf16 this CPU has, from /proc/cpuinfo: item 2's target names machines with AMX
    (amx_bf16) and with AVX512-BF16 only, whose models run at different rates."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "(cpu flags unknown)"
    return "(" + (", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "no bf16 flags") + ")"


def forward_only(backbone, n: int, batch_size: int) -> float:
    """The model alone: the same batch shapes, already on the device, submitted back to back
    (the upper bound of the extractor: no decoding, no copy in, nothing written)."""
    size = backbone.preprocess.crop_height
    x = torch.randn(batch_size, 3, size, size, device=backbone.device)
    backbone.embed(x)  # warm-up (and, with --compile, compiling: the last, smaller batch is padded to this shape)
    backbone.embed(x[: n % batch_size or batch_size])
    start = time.perf_counter()
    done, last = 0, None
    while done < n:
        last = backbone.submit(x[: min(batch_size, n - done)])
        done += batch_size
    last.result()  # the device finishes in order: the last batch done means all are
    return n / (time.perf_counter() - start)


class TaskCount(logging.Handler):
    """The dask run's partitions, as pipeline.distributed logs them: proof that (d) ran on dask."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.partitions = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("dask: %d partitions"):
            self.partitions = record.args[0]


class EmbeddingPhase(logging.Handler):
    """The seconds extract.run logs for its embedding phase ("embedded N images in S s"): from the
    first image read to the last committed, without what comes before it (a dask cluster's start,
    its workers importing torch and loading the model)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds = None

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("embedded %d images in"):
            self.seconds = record.args[1]


class BatchTimes(logging.Handler):
    """Sums the extractor's per-batch debug timings: waiting for the readers (decode), submitting
    (the copy in; on a CPU the whole forward pass), waiting for the device, writing."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.sums, self.batches = np.zeros(4), 0
        self.first = self.last = 0.0  # when the first and the last batch were written
        self.after_first = 0  # images written after the first batch

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("batch of "):
            self.sums += record.args[1:]
            self.batches += 1
            self.last = time.perf_counter()
            if self.batches == 1:
                self.first = self.last
            else:
                self.after_first += record.args[0]

    def steady_rate(self) -> float:
        """Images/s from the first batch written to the last: the run without its start (the
        readers' first batches, the model's first batch)."""
        return self.after_first / (self.last - self.first) if self.last > self.first else float("nan")


def readers_alone(
    reader: embedder.Reader, items: list[embedder.Item], preprocess, batch_size: int, workers: int, pin: bool
) -> tuple[float, float, float]:
    """(r) The readers without the model (decode, preprocess, pin), start included as in (b):
    images/s, the seconds until the first batch was ready (what the model waits at the start),
    and the readers' start alone: the seconds until a one-image run returns (`workers` processes
    forked from this process, whose memory the fork copies the page tables of, or threads)."""
    start = time.perf_counter()
    for _ in reader(items[:1], preprocess, batch_size, workers, pin):
        pass
    started = time.perf_counter() - start
    start, done, first = time.perf_counter(), 0, None
    for batch in reader(items, preprocess, batch_size, workers, pin):
        first = first or time.perf_counter() - start
        done += len(batch.digests)
    return done / (time.perf_counter() - start), first or 0.0, started


def timed_extract(
    settings, outputs, backbone, times: BatchTimes | None = None, reader: embedder.Reader = embedder.read_batches
) -> tuple[float, int, float]:
    """(seconds, images embedded, seconds of the embedding phase: `EmbeddingPhase`)"""
    before = sum(s.count() for s in caches(outputs.embeddings))
    log = logging.getLogger(embedder.__name__)
    if times:
        log.addHandler(times)
        log.setLevel(logging.DEBUG)
    # With extract.scheduler dask, the embedder that scheduler names (a DaskEmbedder): handing a
    # LocalEmbedder over here made (d) time the local extractor again, from ebf4185 to d29c443.
    local = None if settings.extract.scheduler == "dask" else embedder.LocalEmbedder(settings, backbone, reader=reader)
    phase, extract_log = EmbeddingPhase(), logging.getLogger(extract.__name__)
    extract_log.addHandler(phase)
    extract_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        extract.run(settings, outputs, embedder=local)
    finally:
        log.removeHandler(times)
        log.setLevel(logging.NOTSET)
        extract_log.removeHandler(phase)
        extract_log.setLevel(logging.NOTSET)
    seconds = time.perf_counter() - start
    after = sum(s.count() for s in caches(outputs.embeddings))
    return seconds, after - before, phase.seconds


def model_load_seconds(params: Path) -> float:
    """What `python -m pipeline extract` spends loading the model that (b) is handed: `backbones.load`
    in a fresh process that has imported what the command imports before it (torch, the pipeline),
    so that it imports the model's own code (transformers' CLIP) as the command does, and this
    process, which made the model, has it imported already."""
    code = (
        "import sys, time\n"
        "from pipeline import backbones, config, extract\n"
        "settings = config.load(sys.argv[1])\n"
        "start = time.perf_counter()\n"
        "backbones.load(settings.model, settings.extract.device, settings.extract.precision, "
        "settings.extract.compile, settings.extract.batch_size)\n"
        "print(time.perf_counter() - start)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def kill_at_half(project: Path, total: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", "--params", str(project / "params.yaml")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while True:
        stores = caches(project / "cache" / "embeddings")
        if stores and stores[0].count() >= total // 2:
            break
        if proc.poll() is not None:
            raise RuntimeError("extract finished before the kill")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--original", type=int, default=100, help="images for the (slow) original loop")
    parser.add_argument("--model", choices=sorted(SHAPES), default="vit-b32")
    parser.add_argument(
        "--vision-layers",
        type=int,
        default=0,
        help="vision blocks instead of the shape's (vit-b32 with 4 runs ~3x faster: on a CPU without AMX, a "
        "stand-in for one whose model is that much faster, where the readers weigh more)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="extract.compile: torch.compile the forward pass")
    parser.add_argument(
        "--reader",
        choices=["processes", "threads"],
        default="processes",
        help="(b) and (r) with the local reader (DataLoader processes) or the dask workers' (threads of this process)",
    )
    parser.add_argument("--dask", type=int, default=0, help="also time a dask LocalCluster of this many workers")
    parser.add_argument(
        "--dask-readers",
        choices=["threads", "processes"],
        default="threads",
        help="(d)'s workers decode in threads (daemonic workers, dask's default) or in processes (not daemonic)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads in this process (0: torch's default; on a GPU the extractor keeps no more than the "
        "cores the readers leave)",
    )
    parser.add_argument(
        "--throughput-only", action="store_true", help="(b), (c), (d) and the cosine only: no (a), +1 %% or resume runs"
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # a model and images: hundreds of MB per run
    model_dir = work / "model"
    make_model(model_dir, args.model, args.vision_layers)
    make_images(work / "data" / "real", args.images)
    make_images(work / "data" / "fake", 8, start=10**6)  # a dataset of its own, for the params (8 images)
    params = {
        "data": {
            "root": str(work / "data"),
            "datasets": {"real": {"path": "real", "label": "real"}, "fake": {"path": "fake", "label": "fake"}},
        },
        "model": {"name": str(model_dir)},
        "extract": {
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "device": args.device,
            "precision": args.precision,
            "compile": args.compile,
            "shard_size": max(32, args.images // 10),
        },
        "train": {"datasets": ["real", "fake"]},
        "evaluate": {"datasets": ["fake"]},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    settings = config.load(work / "params.yaml")
    outputs = Outputs(work)
    n = manifest.run(settings, outputs).num_rows  # every image of both datasets
    paths = sorted((work / "data" / "real").rglob("*.jpg"))

    rate_a = None if args.throughput_only else original_loop(paths, model_dir, min(args.original, n))
    backbone = backbones.load(settings.model, args.device, args.precision, args.compile, args.batch_size)
    rate_c = forward_only(backbone, n, args.batch_size)
    table = pq.read_table(outputs.manifest, columns=["digest", "path"])
    items = [
        embedder.Item(d, p, manifest_table.absolute_path(p, settings.data_root))
        for d, p in zip(table["digest"].to_pylist(), table["path"].to_pylist(), strict=True)
    ]
    reader = embedder.threaded_batches if args.reader == "threads" else embedder.read_batches
    gpu = backbone.device.type == "cuda"
    with embedder.gpu_host_threads(backbone.device.type, args.workers):  # as in (b)
        host_threads = torch.get_num_threads()
        rate_r, first_r, start_r = readers_alone(reader, items, backbone.preprocess, args.batch_size, args.workers, gpu)
    times = BatchTimes()
    full_s, embedded, phase_b = timed_extract(settings, outputs, backbone, times, reader)
    assert embedded == n, (embedded, n)
    rate_b = n / full_s
    rates_c = (rate_c, forward_only(backbone, n, args.batch_size))
    rate_c = max(rates_c)

    if not args.throughput_only:
        # Incremental: +1 % new images.
        extra = max(1, n // 100)
        make_images(work / "data" / "real", extra, start=len(paths))
        manifest.run(settings, outputs)
        inc_s, inc_n, _ = timed_extract(settings, outputs, backbone, reader=reader)
        assert inc_n == extra

        # Resume: a fresh cache, SIGKILL at 50 %, then the resumed run.
        for store in caches(outputs.embeddings):
            shutil.rmtree(store.directory)
        kill_at_half(work, n + extra)
        resume_s, resume_n, _ = timed_extract(settings, outputs, backbone, reader=reader)

    # Optionally: the same full run on a dask LocalCluster (each worker builds its own model).
    rate_dask = None
    if args.dask:
        load_s = model_load_seconds(work / "params.yaml")
        for store in caches(outputs.embeddings):
            shutil.rmtree(store.directory)
        # Without what the resume run's command remembered of the model, every run's workers load it
        # (describing it) before the first partition, outside the embedding phase timed below.
        (work / "cache" / "backbones.json").unlink(missing_ok=True)
        raw = yaml.safe_load((work / "params.yaml").read_text())
        raw["extract"].update(scheduler="dask", dask={"address": "", "n_workers": args.dask})
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        tasks = TaskCount()
        logging.getLogger(distributed.__name__).addHandler(tasks)
        logging.getLogger(distributed.__name__).setLevel(logging.INFO)
        with dask.config.set({"distributed.worker.daemon": args.dask_readers == "threads"}):
            dask_s, dask_n, phase_d = timed_extract(config.load(work / "params.yaml"), outputs, None)
        assert tasks.partitions, "the dask run did not go through the DaskEmbedder"
        rate_dask = dask_n / dask_s

    # Cosine of the chosen precision against fp32.
    fp32 = backbones.load(settings.model, args.device, "fp32")
    x = torch.stack([torch.from_numpy(backbone.preprocess(Image.open(p).convert("RGB"))) for p in paths[:64]])
    a = backbone.embed(x)["projection"]
    b = fp32.embed(x)["projection"]
    cosine = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

    rss_mb = (
        max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        / 1024
    )
    print()
    print(
        f"model {args.model}{f' with {args.vision_layers} blocks' if args.vision_layers else ''} (random weights), "
        f"{n} JPEGs 320x256, device {backbone.device}, "
        f"precision {backbone.precision}{', compiled' if args.compile else ''}, batch {args.batch_size}, "
        f"workers {args.workers} ({args.reader}), "
        f"torch threads {torch.get_num_threads()}{f' ({host_threads} while embedding)' if gpu else ''}, "
        f"cpu bf16 {backbones.cpu_supports_bf16()} {cpu_bf16_flags()}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}"
        + (f" (GOMP_SPINCOUNT {os.environ['GOMP_SPINCOUNT']})" if "GOMP_SPINCOUNT" in os.environ else "")
    )
    rows = [
        ("(b) this extractor", f"{rate_b:8.1f} img/s", ""),
        (
            "(c) forward only, same precision",
            f"{rate_c:8.1f} img/s",
            f"the faster of {rates_c[0]:.1f} before (b) and {rates_c[1]:.1f} after",
        ),
        (
            "(r) readers alone: decode, preprocess, pin",
            f"{rate_r:8.1f} img/s",
            f"start included, as in (b); first batch after {first_r:.2f} s; their start (1 image) {start_r:.2f} s",
        ),
        ("b / c", f"{rate_b / rate_c:8.2f}", "target >= 0.85 (CPU), >= 0.90 (GPU)"),
        (
            "(b) after its first batch / c",
            f"{times.steady_rate() / rate_c:8.2f}",
            f"{times.steady_rate():.1f} img/s: the run without its start",
        ),
        (
            "(b) seconds waiting: readers / submit / device / writer",
            " / ".join(f"{t:.2f}" for t in times.sums),
            f"of {full_s:.2f} s, {times.batches} batches",
        ),
        ("min cosine to fp32", f"{cosine:8.5f}", "target >= 0.9999 (GPU), >= 0.999 (CPU bf16)"),
        ("peak RSS", f"{rss_mb:8.0f} MB", "max of this process and its children"),
    ]
    if rate_a is not None:
        rows[:0] = [("(a) original loop, per image fp32 on the CPU", f"{rate_a:8.1f} img/s", "")]
        rows[3:3] = [("b / a", f"{rate_b / rate_a:8.2f}x", "target >= 4")]
    if not args.throughput_only:
        rows[-2:-2] = [
            ("incremental +1 % / full run", f"{inc_s / full_s:8.3f}", f"{inc_n} new of {n}"),
            ("resume after kill at 50 % / full run", f"{resume_s / full_s:8.3f}", f"{resume_n} left to embed"),
        ]
    if rate_dask is not None:
        rows.append(
            (
                f"(d) dask LocalCluster, {args.dask} workers, readers: {args.dask_readers}",
                f"{rate_dask:8.1f} img/s",
                f"d/b {rate_dask / rate_b:.2f}; includes starting the cluster and loading the model in every worker",
            )
        )
        rows.append(
            (
                "(d) / (b) with its model's load",
                f"{rate_dask / (n / (full_s + load_s)):8.2f}",
                f"(b) as `python -m pipeline extract` runs it: {full_s:.1f} s plus {load_s:.1f} s to load the model "
                "(in a fresh process), which (d) includes in every worker",
            )
        )
        rows.append(
            (
                "(d) embedding phase / (b) embedding phase",
                f"{phase_b / phase_d:8.2f}",
                f"{dask_n / phase_d:.1f} and {n / phase_b:.1f} img/s: from the first image read to the last committed "
                f"(extract's log); the dask run's {dask_s - phase_d:.1f} s before and after it are its fixed cost",
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value}  {note}")


if __name__ == "__main__":
    main()
