"""The reader -> model -> writer loop (`pipeline.embedder`) with its parts swapped in, as a
test or a benchmark does: a writer that fails at shard k, a reader that records what it reads."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from pipeline import backbones, embedder, extract, machine, manifest
from pipeline.config import ConfigError, load
from pipeline.outputs import Outputs
from pipeline.store import caches
from tests.conftest import CUDA, REPO, update_params


class FailsAtThirdShard(embedder.ShardWriter):
    flushes = 0

    def _flush(self) -> None:
        if self._buffer:
            self.flushes += 1
            if self.flushes == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        super()._flush()


def blank() -> Image.Image:
    return Image.new("RGB", (48, 40), (120, 90, 60))


def contents(outputs: Outputs) -> tuple[list[str], np.ndarray]:
    (store,) = caches(outputs.embeddings)
    keys = sorted(store.keys())
    return keys, store.read(keys, "projection")[0]


def test_an_injected_failing_writer_keeps_earlier_shards_and_the_resumed_run_is_identical(project, tmp_path):
    update_params(project, "extract", shard_size=8)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    backbone = backbones.load(settings.model, "cpu", "fp32")  # one tiny model for every run below

    with pytest.raises(OSError, match="No space left"):
        extract.run(settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone, writer=FailsAtThirdShard))
    (store,) = caches(outputs.embeddings)
    assert len(store.shard_paths()) == 2 and store.verify() == []
    committed = set(store.keys())

    read: list[str] = []

    def recording_reader(items, *args):
        read.extend(item.digest for item in items)
        return embedder.read_batches(items, *args)

    resumed = extract.run(
        settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone, reader=recording_reader)
    )
    assert resumed.embedded == resumed.images and len(read) == resumed.images - len(committed)
    assert not set(read) & committed, "the resumed run reads only what no committed shard holds"

    other = Outputs(tmp_path / "uninterrupted")
    other.manifest.parent.mkdir(parents=True)
    shutil.copy(outputs.manifest, other.manifest)
    extract.run(settings, other, embedder=embedder.LocalEmbedder(settings, backbone))
    keys, embeddings = contents(outputs)
    ref_keys, ref_embeddings = contents(other)
    assert keys == ref_keys
    np.testing.assert_array_equal(embeddings, ref_embeddings)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_every_reader_gives_the_same_batches_in_order_whole_or_in_parts(project, device):
    """The DataLoader reader, the threaded one (daemonic dask workers cannot fork) and the kept one
    (processes started once for call after call: a dask worker that may have children), each batch read whole
    by one reader or in parts by several and joined (the GPU's way: the first batch is ready
    sooner), give the same batches: items, order, pixels, failures. A call to the kept readers
    made while another is reading (two tasks at once in one worker) reads in threads and leaves
    that one undisturbed; a call stopped midway leaves nothing behind for the next. For a GPU
    every batch comes in page-locked memory."""
    pin = device == "cuda"
    settings = load(project / "params.yaml")
    table = manifest.run(settings, Outputs(project))
    paths = table.column("path").to_pylist()[:21]
    items = [
        embedder.Item(d, p, settings.data_root / p)
        for d, p in zip(table.column("digest").to_pylist()[:21], paths, strict=True)
    ]
    items[9] = dataclasses.replace(items[9], digest="0" * 64)  # changed since the manifest: fails, inside a part
    preprocess = backbones.load(settings.model, "cpu", "fp32").preprocess
    dataset = embedder.ImageDataset(items, preprocess)
    expected = [dataset[list(range(i, i + 7))] for i in range(0, len(items), 7)]
    assert expected[1].errors[2] is not None
    cases = [(embedder.read_batches, n, split) for n in (0, 1, 2) for split in (False, True)]  # 2: parts of 4 + 3
    cases += [(embedder.threaded_batches, n, split) for n in (0, 1, 3) for split in (False, True)]  # 3 + 3 + 1
    kept = embedder.KeptReaders()
    cases += [(kept, 2, True), (kept, 2, True), (kept, 2, False), (kept, 1, True)]  # kept, then made again
    for reader, readers, in_parts in cases:
        case = (getattr(reader, "__name__", "kept"), readers, in_parts)
        runs = []
        if reader is kept:
            stopped = reader(items[::-1], preprocess, 7, readers, pin, in_parts=in_parts)
            assert next(stopped).digests == [item.digest for item in items[::-1][:7]]
            runs.append(list(reader(items, preprocess, 7, readers, pin, in_parts)))  # meanwhile: in threads
            assert next(stopped).digests == [item.digest for item in items[::-1][7:14]], "undisturbed"
            stopped.close()  # its last batch, already being read ahead, is never taken
        runs.append(list(reader(items, preprocess, 7, readers, pin, in_parts=in_parts)))
        for got in runs:
            assert [b.digests for b in got] == [b.digests for b in expected], case
            assert [b.errors for b in got] == [b.errors for b in expected], case
            assert all(np.array_equal(g.pixels, e.pixels) for g, e in zip(got, expected, strict=True)), case
            assert all(b.pixels.is_pinned() == pin for b in got), case


def test_threaded_readers_stopped_early_read_no_batch_they_had_not_started(project):
    """A run stopped early (Ctrl-C; a dask partition whose run has gone) closes its reader: the
    batches queued ahead for its threads are not read any more; only those being read finish (a
    dask worker with batches of 64 and 2 threads read 128 images more, for nothing)."""
    settings = load(project / "params.yaml")
    table = manifest.run(settings, Outputs(project))
    items = [
        embedder.Item(d, p, settings.data_root / p)
        for d, p in zip(table.column("digest").to_pylist(), table.column("path").to_pylist(), strict=True)
    ][:64]
    calls = []

    def slow(image) -> np.ndarray:
        calls.append(1)
        time.sleep(0.1)
        return np.zeros(1, np.float32)

    # Batches of 8 in 2 parts of 4 (a part per thread), 4 batches in flight: when the first comes,
    # the second is being read and two more (16 images) wait for a thread.
    batches = embedder.threaded_batches(items, slow, 8, 2, False, in_parts=True)
    assert len(next(batches).digests) == 8
    batches.close()
    assert len(calls) <= 16, f"{len(calls)} images read: the batches queued were read after the reader closed"


def niceness(image) -> np.ndarray:
    """A preprocess that gives, as its pixels, the CPU priority of the reader that calls it."""
    return np.array([os.getpriority(os.PRIO_PROCESS, threading.get_native_id())], np.float32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_readers_yield_the_cores_to_a_model_on_the_cpu(project, device):
    """For a model on the CPU every reader, process or thread, runs at nice 19 (the model's intra-op
    threads stalled whenever a reader took one's core); for a GPU they keep this process's priority.
    The thread that asked is never reniced, nor is a run read in it (no readers)."""
    pin = device == "cuda"
    settings = load(project / "params.yaml")
    table = manifest.run(settings, Outputs(project))
    items = [
        embedder.Item(d, p, settings.data_root / p)
        for d, p in zip(*table.select(["digest", "path"]).to_pydict().values(), strict=True)
    ][:12]
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = ours if pin else 19
    for reader, readers, want in [
        (embedder.read_batches, 2, expected),
        (embedder.threaded_batches, 2, expected),
        (embedder.KeptReaders(), 2, expected),
        (embedder.threaded_batches, 0, ours),
    ]:
        seen = {float(v) for b in reader(items, niceness, 4, readers, pin) for v in b.pixels.flatten()}
        assert seen == {want}, (reader, readers, seen)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours


def test_only_a_run_of_at_most_one_batch_per_reader_without_face_crops_reads_in_threads():
    """`LocalEmbedder.embed` forks reader processes unless the run is that small (forking from the
    process that holds the model costs more there; tests/test_extract.py counts the forks), and
    never reads face crops in threads (a detector per process)."""
    assert embedder.small_run(8, 4, 2, None) and embedder.small_run(1, 256, 12, None)
    assert not embedder.small_run(9, 4, 2, None), "more than one batch per reader: processes"
    assert not embedder.small_run(3, 4, 0, None), "no readers: read in this thread either way"
    assert not embedder.small_run(3, 4, 2, crops=object()), "face crops: processes"


def test_a_gpu_run_leaves_the_readers_the_cores_and_gives_its_threads_back():
    """On the H100 (16 cores, 12 readers), torch's 16 intra-op threads in the main process, used
    only to join and pin batches, took the readers' cores: ViT-B/16 1902 img/s, 3062 with 4."""
    before = torch.get_num_threads()
    cpus = machine.cores()
    assert embedder.host_threads(cpus - 1) == 1, "the cores the readers leave"
    assert embedder.host_threads(cpus + 8) == 1, "at least one"
    assert embedder.host_threads(0) == min(before, cpus), "never more than torch had"
    with embedder.gpu_host_threads("cuda", readers=cpus - 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with embedder.gpu_host_threads("cpu", readers=cpus - 1):
        assert torch.get_num_threads() == before, "on a CPU the model's forward pass needs them"


def test_batches_are_split_into_near_equal_parts_in_order():
    assert embedder.parts(10, 4, 3) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8], [9]]]
    assert embedder.parts(3, 8, 12) == [[[0], [1], [2]]]
    assert embedder.parts(5, 8, 1) == [[[0, 1, 2, 3, 4]]]
    assert embedder.parts(0, 8, 2) == []
    split = embedder.parts(20008, 256, 12)  # ViT-L/14 on the H100 machine: 12 readers
    assert [i for batch in split for part in batch for i in part] == list(range(20008))
    assert all(len(batch) <= 12 and sum(map(len, batch)) == 256 for batch in split[:-1])
    assert max(map(len, split[0])) == 22


def test_a_batch_the_device_has_no_memory_for_is_one_sentence_and_the_batches_before_stay_cached(project, monkeypatch):
    """`extract.batch_size` too large for the GPU: CUDA's out-of-memory error (raised here at the
    third batch, as no GPU is at hand) ends the run with one sentence that names the fix, and the
    batches embedded before it are committed; the rerun embeds only the rest. A model too large
    for the GPU is one sentence too."""
    update_params(project, "extract", batch_size=8, shard_size=8)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    backbone = backbones.load(settings.model, "cpu", "fp32")
    submit, submitted = backbone.submit, []

    def short_of_memory(pixels):
        submitted.append(len(pixels))
        if len(submitted) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return submit(pixels)

    backbone.submit = short_of_memory
    with pytest.raises(ConfigError) as stopped:
        extract.run(settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone))
    assert str(stopped.value) == (
        f"cpu ran out of memory on a batch of 8 images ({settings.model.name}); set extract.batch_size lower than 8 "
        "(e.g. 4) and rerun: the images embedded before that batch are cached."
    )
    (store,) = caches(outputs.embeddings)
    assert store.count() == 16 and store.verify() == []
    backbone.submit = submit
    summary = extract.run(settings, outputs, embedder=embedder.LocalEmbedder(settings, backbone))
    assert summary.embedded == summary.images

    def too_large(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.20 GiB")

    monkeypatch.setattr(importlib.import_module(backbones.FAMILIES["clip"]), "load", too_large)
    with pytest.raises(ConfigError, match=r"^cpu ran out of memory loading .+ in fp32; free its memory"):
        backbones.load(settings.model, "cpu", "fp32")


def first_items(project, n: int) -> tuple[list[embedder.Item], backbones.Backbone]:
    """The project's first `n` manifest rows as reader items, and its model on the CPU in fp32."""
    settings = load(project / "params.yaml")
    table = manifest.run(settings, Outputs(project))
    digests, paths = table.column("digest").to_pylist()[:n], table.column("path").to_pylist()[:n]
    items = [embedder.Item(d, p, settings.data_root / p) for d, p in zip(digests, paths, strict=True)]
    return items, backbones.load(settings.model, "cpu", "fp32")


def test_batches_in_flight_give_the_rows_of_one_at_a_time_in_order(project):
    """The loop submits up to `in_flight` batches before collecting the oldest (on a GPU: copies
    and forward passes overlap); the rows, their order and the shard contents do not change."""
    items, backbone = first_items(project, 40)
    submit = backbone.submit

    class Recorder:
        def __init__(self):
            self.rows, self.submitted_when_put = [], []

        def put(self, data):
            self.rows.append(data)
            self.submitted_when_put.append(submitted[0])

    runs = {}
    for depth in (0, 3):
        submitted = [0]
        backbone.submit = lambda pixels: submitted.__setitem__(0, submitted[0] + 1) or submit(pixels)  # noqa: B023
        writer = Recorder()
        embedder.embed_items(items, backbone, writer, 8, 0, progress=False, in_flight=depth)
        runs[depth] = writer
    assert runs[0].submitted_when_put == [1, 2, 3, 4, 5]
    assert runs[3].submitted_when_put == [4, 5, 5, 5, 5], "batch k is written after batch k+3 was submitted"
    for a, b in zip(runs[0].rows, runs[3].rows, strict=True):
        assert a.digests == b.digests and a.errors == b.errors
        np.testing.assert_array_equal(a.arrays["projection"], b.arrays["projection"])

    def interrupted(*args):  # Ctrl-C while the fifth batch is being read
        for i, batch in enumerate(embedder.read_batches(*args)):
            if i == 4:
                raise KeyboardInterrupt
            yield batch

    writer = Recorder()
    with pytest.raises(KeyboardInterrupt):
        embedder.embed_items(items, backbone, writer, 8, 0, progress=False, reader=interrupted, in_flight=3)
    assert [r.digests for r in writer.rows] == [r.digests for r in runs[0].rows[:4]], "what was submitted is written"


def test_a_run_whose_model_waits_for_its_readers_says_how_many_cores_could_read(project, monkeypatch, caplog):
    """A run whose model spent most of its time waiting for decoded batches (a reader slowed to
    250 ms a batch here, for a tiny model; on a GPU, the default 2 readers for ViT-B) says so, with
    the cores that could read; a run that kept its model busy, a short one, or one on a machine
    without a core to spare says nothing."""
    items, backbone = first_items(project, 40)  # 10 batches of 4

    def slow_reader(*args):
        for batch in embedder.read_batches(*args):
            time.sleep(0.25)
            yield batch

    class Discard:
        def put(self, rows):
            pass

    monkeypatch.setattr(machine, "cores", lambda: 8)
    caplog.set_level(logging.INFO)
    embedder.embed_items(items, backbone, Discard(), 4, 0, progress=False, reader=slow_reader)
    assert "with extract.num_workers: 0; this machine has 8 cores, so more readers (up to 7) may feed it" in caplog.text
    assert embedder.readers_hint(6.0, 10.0, 12, 2) is not None
    assert embedder.readers_hint(4.0, 10.0, 12, 2) is None, "the model was busy most of the run"
    assert embedder.readers_hint(6.0, 10.0, 9, 2) is None, "too short a run to tell"
    assert embedder.readers_hint(6.0, 10.0, 12, 7) is None, "no core to spare"


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_compiled_forward_pass_is_one_graph_compiled_once_and_gives_the_eager_embeddings(project, device):
    """`extract.compile: true` runs the model through torch.compile (Inductor; on this CPU too),
    traced whole: a graph break (Python that dynamo cannot trace, such as parsing layer names per
    batch, or transformers installing its hidden-state hooks under a lock on the first call)
    returns to Python on every batch, which a GPU feels. Compiled once: a run's last, smaller batch
    and a batch made outside inference mode reuse the first batch's kernels (a recompile costs a
    ViT-L seconds to a minute), nor does a full batch after a smaller first one (a first batch
    with images that failed to decode): every batch is padded to `extract.batch_size`. Block
    layers and the patch mean included."""
    update_params(project, "model", layers=["projection", "block_0", "patch_mean"])
    update_params(project, "extract", compile=True, device=device, precision="fp32", batch_size=4)
    settings = load(project / "params.yaml")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    backbone = embedder.LocalEmbedder(settings).backbone
    assert hasattr(backbone.forward.compiled, "_torchdynamo_orig_callable"), "extract.compile compiles the forward pass"
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.normal(size=(4, 3, *backbone.preprocess(blank()).shape[1:])).astype(np.float32))
    with torch.inference_mode():
        first = backbone.embed(pixels[1:].clone())  # smaller than the batch size, and an inference tensor
    compiled = backbone.embed(pixels)  # on a GPU the copy in makes an inference tensor
    with torch.inference_mode():
        last = backbone.embed(pixels[2:].clone())
    assert not counters["graph_break"], list(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, "compiled once"
    eager = backbones.load(settings.model, "cpu", "fp32").embed(pixels)
    for layer, vectors in eager.items():
        np.testing.assert_allclose(first[layer], compiled[layer][1:], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(last[layer], compiled[layer][2:], rtol=1e-4, atol=1e-5)
        other = compiled[layer]
        cosine = (vectors * other).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(other, axis=1)
        assert cosine.min() > 0.9999, layer


def test_a_forward_pass_torch_compile_cannot_compile_is_one_sentence(project):
    """`extract.compile: true` where Inductor finds no C++ compiler (a bare GPU image without gcc,
    which Triton needs too): one sentence with the cause and the fix, not dynamo's traceback."""
    update_params(project, "extract", compile=True, precision="fp32", batch_size=4)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    torch._dynamo.reset()
    no_compiler = {"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}
    try:
        with torch._inductor.config.patch(no_compiler), pytest.raises(ConfigError) as stopped:
            extract.run(settings, outputs)
    finally:
        torch._dynamo.reset()
    assert str(stopped.value).startswith(
        f"torch.compile could not compile {settings.model.name} for cpu (InvalidCxxCompiler: No working C++ compiler"
    ) and str(stopped.value).endswith("); install what it names, or set extract.compile: false, then rerun.")


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_uint8_batches_normalised_on_the_device_are_the_float_batches_bit_for_bit(project, device):
    """On a GPU the CLIP preprocessing stops at the uint8 crop and the model's device finishes
    it (a quarter of the bytes to move); the numbers must be exactly the processor's, also where
    the device's arithmetic does the normalising."""
    backbone = backbones.load(load(project / "params.yaml").model, device, "fp32")
    float_path = dataclasses.replace(backbone.preprocess, defer_normalize=False)  # on a GPU it comes deferred
    uint8_path = float_path.deferred()
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (37, 91), (12, 10), (200, 64)]  # wider, taller, smaller than the crop (padded), odd
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    floats = torch.from_numpy(np.stack([float_path(p) for p in pictures]))
    raw = torch.from_numpy(np.stack([uint8_path(p) for p in pictures]))
    assert raw.dtype == torch.uint8 and raw.nbytes * 4 == floats.nbytes
    assert torch.equal(uint8_path.normalize(raw.to(backbone.device)).cpu(), floats)
    expected = backbone.embed(floats)
    backbone.preprocess = uint8_path
    for layer, vectors in backbone.embed(raw).items():
        np.testing.assert_array_equal(vectors, expected[layer])
    assert uint8_path.describe() == float_path.describe(), "the same numbers: the same fingerprint"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_submitting_a_batch_on_a_gpu_does_not_wait_for_the_gpu(project):
    """`submit` only queues work: any synchronising call in it (a pageable copy, `.item()`) would
    stall the GPU until the batches before it are done, every batch."""
    backbone = backbones.load(load(project / "params.yaml").model, "cuda", "bf16")
    crop = backbone.preprocess(blank())
    assert crop.dtype == np.uint8, "on a GPU the device normalises"
    batch = torch.from_numpy(np.stack([crop] * 8)).pin_memory()
    backbone.embed(batch)  # first use: cuDNN's benchmark, allocations, the constants on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [backbone.submit(batch) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p in pending:
        assert p.result()["projection"].shape == (8, backbone.dims["projection"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_out_of_memory_is_the_one_sentence(project):
    """The real thing behind the out-of-memory test above: with the GPU's memory all held but
    for a few MiB, a batch cannot be embedded, and the sentence names the GPU."""
    settings = load(project / "params.yaml")
    backbone = backbones.load(settings.model, "cuda", "fp32")
    batch = torch.from_numpy(np.stack([backbone.preprocess(blank())] * 64))
    item = embedder.Item("d" * 64, "a.png", "a.png")
    held = []
    for size in (1 << 30, 1 << 24, 1 << 21):  # fill the GPU, in ever smaller blocks
        with contextlib.suppress(torch.OutOfMemoryError):
            while True:
                held.append(torch.empty(size, dtype=torch.uint8, device="cuda"))

    def reader(*args):
        yield embedder.Batch([item.digest] * 64, [item.path] * 64, batch, [None] * 64)

    try:
        with pytest.raises(ConfigError, match=r"^cuda(:0)? \(.+ GiB\) ran out of memory on a batch of 64 images"):
            embedder.embed_items([item] * 64, backbone, None, 64, 0, progress=False, reader=reader)
    finally:
        del held
        torch.cuda.empty_cache()


ORPHANED = '''
import multiprocessing, os, signal, time

import torch

from pipeline import embedder


def arrive_slowly():
    time.sleep(3)
    return Slow()


class Slow:
    """A preprocess that asks for spawned readers (as a GPU face detector does) and takes 3 s to
    arrive in one: its readers are still starting when this process is killed."""

    multiprocessing_context = "spawn"

    def __reduce__(self):
        return arrive_slowly, ()


class Data(torch.utils.data.Dataset):
    def __init__(self):
        self.preprocess = Slow()

    def __getitem__(self, index):
        return index


if __name__ == "__main__":
    loader = embedder._loader(Data(), [[0], [1]], 2, False, True, keep=True)
    batches = iter(loader)  # kept: a dropped iterator would shut its readers down
    print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # what dask's nanny does to a worker that does not close in 4 s
'''


def test_readers_end_with_the_process_that_started_them_even_while_starting(tmp_path):
    """A reader whose parent is killed while it is still starting (spawned, importing) took init
    for its parent, and DataLoader's own check then never saw the parent die: after Ctrl-C on a
    dask run with spawned reader processes, they were left waiting forever."""
    script = tmp_path / "orphans.py"
    script.write_text(ORPHANED)
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
    readers = [int(pid) for pid in parent.stdout.readline().split()]  # not to EOF: the readers hold the pipe too
    parent.wait(120)
    parent.stdout.close()
    assert len(readers) == 2, errors.read_text()
    try:
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(pid) for pid in readers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(psutil.pid_exists(pid) for pid in readers), "the readers outlived their parent"
    finally:
        for pid in readers:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


READER_HANDING_OVER = """
import multiprocessing, os, socket, sys, time
from multiprocessing import resource_sharer
from pipeline import embedder

def reader(out):
    embedder._end_with_parent(0)  # a reader process's start (DataLoader's worker_init_fn)
    out.send(resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))._id[0])  # a batch's fd, offered
    time.sleep(2)

if __name__ == "__main__":
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(target=reader, args=(theirs,))
    process.start()
    taker = socket.socket(socket.AF_UNIX)
    taker.connect(ours.recv())
    taker.close()  # the embedding process, stopped while it took the batch
    process.join()
    print("reader exit", process.exitcode)
"""


def test_a_reader_whose_batch_was_not_taken_to_the_end_says_nothing(tmp_path):
    """A reader hands each batch's tensors over through file descriptors, served by
    multiprocessing's resource sharer on a thread of the reader, which prints every error: on
    Ctrl-C the embedding process, stopped in the middle of taking a batch, closed the connection,
    and a reader printed a ConnectionResetError (or EOFError) traceback under the run's one
    sentence (10 runs in 50 of a fast reader, Ctrl-C at a random moment). Here the taker connects
    and goes."""
    script = tmp_path / "handing_over.py"
    script.write_text(READER_HANDING_OVER)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert (done.stdout, done.stderr) == ("reader exit 0\n", "")
