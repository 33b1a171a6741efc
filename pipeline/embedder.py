"""The embedding loop: reader -> mapper -> writer, used by the extract stage, the dask workers
and predict alike.

reader   decodes and preprocesses items into batches (by default a DataLoader whose worker
         processes call `images.load` with the backbone's preprocess); failures are values
mapper   the backbone, batched, in inference mode
writer   a background thread that buffers rows and commits a shard every `shard_size` rows
         (atomic, content-named), so the model never waits on the disk

All three are injectable (`LocalEmbedder(settings, backbone=..., reader=..., writer=...)`), so
tests can swap a tiny model or a writer that fails at shard k. "Done" is whatever committed
shards hold; `plan` computes what is left, so a crash loses at most the shard in flight.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import backbones, faces, frames, images, machine, perturb
from pipeline.config import ConfigError, Settings
from pipeline.store import EmbeddingStore, fingerprint
from pipeline.store.shard import ShardData

log = logging.getLogger(__name__)


def plan(wanted: Iterable[str], done: set[str], failed: set[str], retry_failed: bool = False) -> list[str]:
    """Digests to embed, in first-seen order: wanted - done (- failed unless retrying)."""
    skip = done if retry_failed else done | failed
    seen: set[str] = set()
    out = []
    for d in wanted:
        if d not in skip and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def recorded_failures(store) -> set[str]:
    """The keys of `store` (an `EmbeddingStore`) whose failure is a fact about the image, skipped
    unless retrying: not 'file not found', which a cache written before it was refused could hold
    (a machine without the images), and which is tried again."""
    return {k for k, (_, reason) in store.failures().items() if reason != images.MISSING}


def where(key: str, path: str | None) -> str:
    """A cache row for people: its file, and the video frame and perturbation its key names."""
    clean, spec = perturb.split(key)
    frame = frames.frame_index(clean)
    return f"{path}{f' frame {frame}' if frame >= 0 else ''}{f' ({spec})' if spec else ''}"


@dataclass(frozen=True)
class Item:
    digest: str  # the cache key: the file's sha256, or `<sha256>@<frame>` (`#<frame>`) for a video frame
    path: str  # as in the manifest
    file: Path  # where to read it
    frame: int = -1  # the frame's index in a video file; -1 for an image


class Batch(NamedTuple):
    digests: list[str]
    paths: list[str]
    pixels: torch.Tensor | dict[str, torch.Tensor] | None  # the images that decoded, stacked; None if none did
    errors: list[str | None]  # per item: None, or why it failed
    detections: tuple | list = ()  # per item, with data.faces: the face detection used (cached or new)


# --------------------------------------------------------------------------- reader


class ImageDataset(Dataset):
    """Decodes and preprocesses one batch of `items`, given as their indices, per call
    (`read_items`)."""

    def __init__(self, items: list[Item], preprocess: Callable):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, indices: list[int]) -> Batch:
        return read_items([self.items[i] for i in indices], self.preprocess)


class ItemDataset(Dataset):
    """`ImageDataset` for readers that outlive one list of items (`KeptReaders`): an index is the
    items themselves, sent to the reader processes as the sampler yields them."""

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess

    def __getitem__(self, items: list[Item]) -> Batch:
        return read_items(items, self.preprocess)


def _same_turned_file(item: Item, file: Path, turn: int, ranked: bool) -> bool:
    """Whether `item` is a frame of `file` turned by `turn`, counted the same way (decoded in the same pass)."""
    return (
        item.file == file
        and item.frame >= 0
        and frames.orientation(item.digest) == turn
        and frames.is_ranked(item.digest) == ranked
    )


def read_items(items: list[Item], preprocess: Callable) -> Batch:
    """Decodes and preprocesses one batch; failures come back as values. The frames of one video
    within a batch are read, hashed and decoded together (one pass), a robustness variant
    (`<key>~<perturbation>`) is degraded right after decoding, and face detection
    (`preprocess.for_items`, with data.faces) sees the whole batch at once."""
    decoded: list = []
    start = 0
    while start < len(items):  # runs of items from the same file, turned the same way: a video's frames
        end, key = start + 1, items[start].digest
        turn, ranked = frames.orientation(key), frames.is_ranked(key)
        if items[start].frame >= 0:
            while end < len(items) and _same_turned_file(items[end], items[start].file, turn, ranked):
                end += 1
            indices = [i.frame for i in items[start:end]]
            decoded += images.decode_frames(items[start].file, frames.file_digest(key), indices, turn, ranked)
        else:
            decoded.append(images.decode(items[start].file, frames.file_digest(key), turn))
        start = end
    for n, item in enumerate(items):  # robustness variants: degraded before anything else sees them
        spec = perturb.split(item.digest)[1]
        if spec is not None and not isinstance(decoded[n], str):
            try:
                decoded[n] = perturb.apply(decoded[n], spec, item.digest)
            except Exception as exc:
                decoded[n] = images.failure(exc)
    per_item = getattr(preprocess, "for_items", None)  # face crops: one detection per item
    preprocesses = per_item(items, decoded) if per_item else [preprocess] * len(items)
    results = [images.apply(p, rgb) for p, rgb in zip(preprocesses, decoded, strict=True)]
    return collate(
        [
            (item.digest, item.path, array, error, getattr(p, "detection", None))
            for item, p, (array, error) in zip(items, preprocesses, results, strict=True)
        ]
    )


def collate(batch) -> Batch:
    digests, paths, arrays, errors, detections = zip(*batch, strict=True)
    good = [a for a in arrays if a is not None]
    if not good:
        pixels = None
    elif isinstance(good[0], dict):  # a processor with several outputs (SigLIP2: patches, mask, shape)
        pixels = {k: torch.from_numpy(np.stack([a[k] for a in good])) for k in good[0]}
    else:
        pixels = torch.from_numpy(np.stack(good))
    return Batch(list(digests), list(paths), pixels, list(errors), list(detections))


def read_batches(
    items: list[Item],
    preprocess: Callable,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    in_parts: bool | None = None,
) -> Iterable[Batch]:
    """The default reader: a DataLoader with `num_workers` decoding processes (0: in this thread).
    `in_parts` (default: for a GPU, i.e. with `pin_memory`): each batch is read in parts, one per
    process, joined here (into page-locked memory for a GPU: `joined`), so that the first batch is
    ready after 1/num_workers of the time one process takes to decode a batch. On a CPU a process
    decodes a whole batch: there the model is slower than the readers, and joining would cost a
    copy that pinning does not pay for, and the readers yield the cores to the model's threads
    (`yield_cpu`)."""
    split, whole = _batches(len(items), batch_size, num_workers, pin_memory if in_parts is None else in_parts)
    if not split:
        return
    dataset = ImageDataset(items, preprocess)
    loaded = iter(_loader(dataset, [part for batch in split for part in batch], num_workers, pin_memory, whole))
    for batch in split:
        yield joined([next(loaded) for _ in batch], pin_memory)


def _loader(
    dataset, sampler, num_workers: int, pin_memory: bool, whole: bool, keep: bool = False, start: str | None = None
) -> DataLoader:
    """The readers' DataLoader: `num_workers` processes (0: this thread), batches whole (pinned
    here for a GPU) or in parts (pinned by `joined`); `keep`: the processes outlive an epoch;
    `start`: their start method where the preprocess asks for none (default: the process's).
    Without `pin_memory` (the model is not on a CUDA GPU) the processes `yield_cpu`."""
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset makes whole parts
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and whole,  # else `joined` pins
        prefetch_factor=(4 if whole else 8) if num_workers else None,  # whole: 4 x num_workers batches ahead; parts: 8
        persistent_workers=keep,
        multiprocessing_context=(getattr(dataset.preprocess, "multiprocessing_context", None) or start)
        if num_workers
        else None,
        worker_init_fn=_end_with_parent if pin_memory else _end_with_parent_yielding,
    )


def _end_with_parent(worker_id: int) -> None:
    """Each reader ends as soon as the process that started it is gone. DataLoader's own check
    compares the parent's pid with the one the reader saw when it began to read, so a reader
    still starting (spawned and importing: a GPU face detector's readers, or any where the start
    method is spawn) when its parent was killed took init for its parent and waited forever; seen
    after Ctrl-C on a dask run with spawned readers, whose nanny kills a worker that does not
    close within 4 s. A SIGTERM ends it quietly (`_end_quietly`), and so does a batch its parent
    stopped taking (`_quiet_handover`)."""
    signal.signal(signal.SIGTERM, _end_quietly)
    sys.excepthook = _quiet_handover
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns once the parent is gone (the end of a pipe that only it held)
        os._exit(0)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _quiet_handover(kind: type[BaseException], error: BaseException, tb) -> None:
    """A reader's `sys.excepthook`. A reader hands each batch's tensors to its parent through file
    descriptors, served by multiprocessing's resource sharer on a thread of the reader, which
    prints every error it meets: a parent stopped (Ctrl-C, SIGTERM) in the middle of taking a
    batch closed the connection, and a reader printed a BrokenPipeError or ConnectionResetError
    traceback under the run's one sentence (10 Ctrl-Cs in 50 of a fast reader). A connection lost
    there is the parent having stopped, which says so itself; anything else is printed."""
    if (
        isinstance(error, (ConnectionError, EOFError))
        and tb is not None
        and Path(traceback.extract_tb(tb)[0].filename).name == "resource_sharer.py"
    ):
        return
    sys.__excepthook__(kind, error, tb)


def _end_quietly(signum: int, frame) -> None:
    """A reader's SIGTERM (a batch system's, sent to every process of the job; or its parent's, at
    its exit): it ends at once, as a reader that ran out of work does. Killed by the signal (torch
    sets its default for readers), it made the parent fail with "DataLoader worker ... is killed by
    signal" while the parent's own SIGTERM (`cli.stop_on_sigterm`) was committing what it had
    embedded."""
    os._exit(0)


def _end_with_parent_yielding(worker_id: int) -> None:
    """A reader process for a model on the CPU: `yield_cpu`, and `_end_with_parent`."""
    yield_cpu()
    _end_with_parent(worker_id)


def yield_cpu() -> None:
    """The calling reader (a process; on Linux, where a nice value is per thread, also a thread)
    runs at the lowest CPU priority, nice 19, for the rest of its life. It is called where the model
    runs on the CPU, in the intra-op threads of the process that reads: those threads meet at a
    barrier after every operation, so a reader that took one's core for a scheduler slice stalled
    them all, and one core stood idle. At nice 19 a reader decodes when a core is idle and while the
    model waits for a batch, which is all the decoding a CPU-bound model needs. On 2 cores with AMX
    (ViT-B/32 in bf16, 2 readers, `benchmarks/extract_bench.py`) the model's first batch, while the
    readers fill their prefetch queue, took 1.0 s at nice 19 and 2.3 s without, and 1,208 images
    took 18.0 s instead of 19.8 (two runs each, alternating). Where the model runs on a GPU the
    readers keep their priority: there they are what the GPU waits for. A system that refuses is
    left as it is."""
    try:
        if sys.platform.startswith("linux"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        elif threading.current_thread() is threading.main_thread():
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # elsewhere the whole process: never from a reader thread
    except OSError as exc:
        log.debug("readers keep their CPU priority: %s", exc)


def threaded_batches(
    items: list[Item],
    preprocess: Callable,
    batch_size: int,
    num_threads: int,
    pin_memory: bool,
    in_parts: bool | None = None,
) -> Iterable[Batch]:
    """A reader for processes that cannot fork (dask workers are daemonic): `num_threads` threads
    decode and preprocess ahead of the model (PIL and PyAV release the GIL while they decode and
    resize), each batch in parts for a GPU (`in_parts`, as in `read_batches`), up to 2 x
    `num_threads` batches in flight (4 in parts), in order; pinned for a GPU. For a model on the
    CPU the threads `yield_cpu`."""
    dataset = ImageDataset(items, preprocess)
    split, whole = _batches(len(items), batch_size, num_threads, pin_memory if in_parts is None else in_parts)
    load = (lambda part: pinned(dataset[part])) if pin_memory and whole else dataset.__getitem__
    if num_threads <= 0:
        for batch in split:
            yield joined([load(part) for part in batch], pin_memory)
        return
    pool = ThreadPoolExecutor(
        max_workers=num_threads, thread_name_prefix="reader", initializer=None if pin_memory else yield_cpu
    )
    try:
        pending: deque = deque()
        for batch in split:
            pending.append([pool.submit(load, part) for part in batch])
            if len(pending) >= (2 * num_threads if whole else 4):
                yield joined([f.result() for f in pending.popleft()], pin_memory)
        while pending:
            yield joined([f.result() for f in pending.popleft()], pin_memory)
    finally:
        # Stopped early (Ctrl-C, a dask partition whose run has gone): the parts queued ahead are
        # not read; the threads finish only what they are reading.
        pool.shutdown(wait=True, cancel_futures=True)


class KeptReaders:
    """A reader whose decoding processes outlive one call: `read_batches` for a process that
    embeds list after list of items (a dask worker, partition after partition). Its DataLoader
    starts `num_workers` processes on the first call and keeps them (`persistent_workers`); each
    call hands them its items through the sampler; starting them per call would pay their start on
    every partition (a fork copies the page tables of the process that holds the model: 1.3 s for
    12 readers from 5 GB). `start`: their start method (default: the process's; dask's workers
    pass fork, since theirs is spawn, where each reader is a fresh Python importing torch).
    One call reads at a time: a call made while another is reading (a worker running two tasks
    at once) reads in threads (`threaded_batches`)."""

    def __init__(self, start: str | None = None) -> None:
        self.start = start
        self._parts = _Parts()
        self._loader: DataLoader | None = None
        self._made_for: tuple = ()
        self._busy = threading.Lock()

    def __call__(
        self,
        items: list[Item],
        preprocess: Callable,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        in_parts: bool | None = None,
    ) -> Iterable[Batch]:
        if num_workers <= 0 or not self._busy.acquire(blocking=False):
            yield from threaded_batches(items, preprocess, batch_size, num_workers, pin_memory, in_parts)
            return
        try:
            split, whole = _batches(len(items), batch_size, num_workers, pin_memory if in_parts is None else in_parts)
            if not split:
                return
            made_for = (num_workers, pin_memory, whole)
            if self._loader is None or self._loader.dataset.preprocess is not preprocess or self._made_for != made_for:
                self._loader = _loader(
                    ItemDataset(preprocess), self._parts, num_workers, pin_memory, whole, keep=True, start=self.start
                )
                self._made_for = made_for
            self._parts.parts = [[items[i] for i in part] for batch in split for part in batch]
            loaded = iter(self._loader)  # the kept processes, their leftovers of a stopped call drained
            for batch in split:
                yield joined([next(loaded) for _ in batch], pin_memory)
        finally:
            self._busy.release()


class _Parts:
    """The sampler of `KeptReaders`' DataLoader: the current call's parts, each a list of items."""

    def __init__(self) -> None:
        self.parts: list[list[Item]] = []

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def pinned(batch: Batch) -> Batch:
    """The batch with its pixels in page-locked memory (what DataLoader's pin_memory does for its
    workers), so that the copy to the GPU does not block: in the threaded reader's threads, and
    in `joined` for a batch of one part; what is pinned already is kept."""
    if batch.pixels is None:
        return batch
    pin = lambda t: t if t.is_pinned() else t.pin_memory()  # noqa: E731
    if isinstance(batch.pixels, dict):
        return batch._replace(pixels={k: pin(v) for k, v in batch.pixels.items()})
    return batch._replace(pixels=pin(batch.pixels))


def parts(n: int, batch_size: int, readers: int) -> list[list[list[int]]]:
    """The indices of `n` items in batches of `batch_size`, each batch split into up to `readers`
    parts of near-equal size (a reader decodes a part, not a whole batch: with a whole batch per
    reader, the GPU waited for one reader to decode all of the first batch: 1.2 s for ViT-L/14's
    256 images on the H100 machine)."""
    split = []
    for first in range(0, n, batch_size):
        size = min(batch_size, n - first)
        step = -(-size // min(readers, size))
        split.append([list(range(i, min(i + step, first + size))) for i in range(first, first + size, step)])
    return split


def _batches(n: int, batch_size: int, readers: int, in_parts: bool) -> tuple[list[list[list[int]]], bool]:
    """A reader's batches (`parts`: in parts for up to `readers` readers, or whole), and whether
    every batch is a single part."""
    split = parts(n, batch_size, max(1, readers) if in_parts else 1)
    return split, all(len(batch) == 1 for batch in split)


def joined(read: list[Batch], pin_memory: bool) -> Batch:
    """One batch from its parts, in order; its pixels in one tensor, page-locked for a GPU (the
    copy that joins them is the copy that pins them), so that the copy to the GPU does not block."""
    if len(read) == 1:
        return pinned(read[0]) if pin_memory else read[0]  # pinned already, unless a one-part batch among parts
    stacks = [part.pixels for part in read if part.pixels is not None]
    if not stacks:
        pixels = None
    elif isinstance(stacks[0], dict):  # a processor with several outputs (SigLIP2)
        pixels = {k: _concatenated([s[k] for s in stacks], pin_memory) for k in stacks[0]}
    else:
        pixels = _concatenated(stacks, pin_memory)
    return Batch(
        [d for part in read for d in part.digests],
        [p for part in read for p in part.paths],
        pixels,
        [e for part in read for e in part.errors],
        [d for part in read for d in part.detections],
    )


def _concatenated(tensors: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    out = torch.empty(
        (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype, pin_memory=pin_memory
    )
    return torch.cat(tensors, out=out)


Reader = Callable[[list[Item], Callable, int, int, bool], Iterable[Batch]]


def small_run(n: int, batch_size: int, readers: int, crops: faces.FaceStage | None) -> bool:
    """Whether `n` items (an incremental run's new images) are better read by `readers` threads
    of this process than by as many forked processes: no more than one batch per reader, where
    forking costs more than the decoding it spreads (a fork copies the page tables of this
    process, which holds the model: 1.3 s for 12 readers forked from 5 GB, 0.06 s for 2 from
    1 GB, measured). Face crops stay with processes: a process detects one batch at a time."""
    return readers > 0 and crops is None and n <= batch_size * readers


def host_threads(readers: int) -> int:
    """On a GPU, the intra-op threads this process keeps while `readers` decode: the cores they
    leave, at least one, never more than torch has. Here they only join and pin batches (the model
    runs on the GPU), and torch's default of one per core took the readers' cores: on one H100
    with 16 cores and 12 readers, ViT-B/16 1902 img/s with 16 threads, 3062 with 4."""
    return max(1, min(torch.get_num_threads(), machine.cores() - readers))


@contextlib.contextmanager
def gpu_host_threads(device_type: str, readers: int):
    """`host_threads` for the duration of a run on a GPU, torch's count given back after; on a
    CPU nothing changes (there the threads run the model)."""
    before = torch.get_num_threads()
    if device_type == "cuda":
        torch.set_num_threads(host_threads(readers))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Buffers rows and commits a shard every `shard_size` rows, on a background thread."""

    def __init__(self, store: EmbeddingStore, shard_size: int, fmt: str):
        self.store, self.shard_size, self.fmt = store, shard_size, fmt
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._buffer: list[ShardData] = []
        self._buffered = 0
        self._discard = False
        self.committed_rows = 0
        self._thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self._thread.start()

    def put(self, data: ShardData) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self) -> None:
        """Commit what is buffered and stop; re-raises a failure of the writer thread."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop without committing what is buffered, for work that will be redone from its start
        (a dask task that raised is rerun whole: rows committed now would be embedded twice).
        The shards committed already stay; a failure of the writer thread is not raised again."""
        self._discard = True
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            data = self._queue.get()
            if self._error is not None:
                if data is None:
                    return
                continue  # drain, so the producer never blocks on a dead writer
            try:
                if data is None:
                    if not self._discard:
                        self._flush()
                    return
                self._buffer.append(data)
                self._buffered += len(data)
                if self._buffered >= self.shard_size:
                    self._flush()
            except BaseException as exc:
                self._error = exc
                if data is None:
                    return

    def _flush(self) -> None:
        if not self._buffer:
            return
        layers = self.store.layers
        merged = ShardData(
            digests=[d for b in self._buffer for d in b.digests],
            paths=[p for b in self._buffer for p in b.paths],
            errors=[e for b in self._buffer for e in b.errors],
            arrays={k: np.concatenate([b.arrays[k] for b in self._buffer]) for k in layers},
        )
        self.store.commit(merged, self.fmt)
        self.committed_rows += len(merged)
        self._buffer, self._buffered = [], 0


Writer = Callable[[EmbeddingStore, int, str], ShardWriter]


# --------------------------------------------------------------------------- the loop


IN_FLIGHT = 2  # on a GPU: batches submitted to the model ahead of the one whose rows are being written


class Redescribed(ConfigError):
    """An embedder whose fingerprint description, taken from memory, proved out of date when it was
    about to embed (a remote dask cluster's workers now load the model otherwise: another library
    version); it now holds what they say, and the extract starts again with it. The sentence says
    what changed."""


class NonFiniteEmbeddings(ConfigError):
    """The model gave NaN or inf: its precision, kernels or weights are at fault, not the images."""


def finish_rows(batch: Batch, backbone: backbones.Backbone, embedded: dict[str, np.ndarray]) -> ShardData:
    """A batch and its embeddings -> rows (failed images get zero rows and their reason). Files
    that changed since the manifest, or are not on this machine, get no row at all
    (`images.STALE`): their digest is not theirs, or their absence is not a fact about the image,
    and a recorded failure would be shared with every teammate, who would skip it. NaN or inf in
    an embedding (or in what the storage dtype would make of it) raises `NonFiniteEmbeddings`: no
    such vector is ever cached."""
    ok = np.array([e is None for e in batch.errors], dtype=bool)
    keep = np.array([e not in images.STALE for e in batch.errors], dtype=bool)
    arrays = {}
    for layer in backbone.layers:
        full = np.zeros((len(batch.digests), backbone.dims[layer]), dtype=np.float32)
        if ok.any():
            _check_finite(backbone, layer, embedded[layer], [p for p, k in zip(batch.paths, ok, strict=True) if k])
            full[ok] = embedded[layer]
        arrays[layer] = full[keep]
    pick = lambda values: [v for v, k in zip(values, keep, strict=True) if k]  # noqa: E731
    return ShardData(pick(batch.digests), pick(batch.paths), pick(batch.errors), arrays)


def _check_finite(backbone: backbones.Backbone, layer: str, values: np.ndarray, paths: list[str]) -> None:
    """Raise `NonFiniteEmbeddings` if a vector holds NaN or inf, or values that the cache's
    storage dtype (`model.dtype: float16`) would turn into inf."""

    def batch_facts(good: np.ndarray) -> str:
        return f"for {int((~good).sum())} of {len(paths)} images of a batch (e.g. {paths[int(np.argmin(good))]})"

    cached = "that batch was not cached (the ones before it were)"
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        compiled = hasattr(backbone.forward, "compiled")
        fixes = {
            "fp16": "use extract.precision bf16 or fp32 (fp16 overflows in some models)",
            "bf16": "use extract.precision fp32",
        }.get(backbone.precision, "check the model's weights (an fp32 forward pass should never give them)")
        if compiled:
            fixes = f"set extract.compile: false (a miscompiled kernel), or {fixes}"
        raise NonFiniteEmbeddings(
            f"{backbone.name} gave NaN or inf in layer '{layer}' {batch_facts(finite)} at extract.precision "
            f"{backbone.precision}{' with extract.compile: true' if compiled else ''}; {cached}: {fixes}, then rerun."
        )
    stored = backbone.description.get("dtype", "float32")
    if stored != "float32":
        with np.errstate(over="ignore"):
            fits = np.isfinite(values.astype(stored)).all(axis=1)
        if not fits.all():
            raise NonFiniteEmbeddings(
                f"{backbone.name} gave values beyond {stored}'s range (±{np.finfo(stored).max:.0f}) in layer '{layer}' "
                f"{batch_facts(fits)}, which model.dtype {stored} would store as inf; {cached}: set model.dtype: "
                "float32, then rerun."
            )


def embed_items(
    items: list[Item],
    backbone: backbones.Backbone,
    writer: ShardWriter,
    batch_size: int,
    num_workers: int,
    progress: bool = True,
    reader: Reader = read_batches,
    crops: faces.FaceStage | None = None,
    in_flight: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Run the reader -> model -> writer loop over `items` (face crops first, with `crops`);
    returns the files that changed since the manifest or are not on this machine, path -> reason
    (`images.STALE`: embedded and recorded under no key). `on_batch` is told the number of
    images in each batch handed to the writer (a dask task's progress, for the client's bar).

    Up to `in_flight` batches (default: IN_FLIGHT on a GPU, none on a CPU, where submitting does
    the work and holding it back would only delay writing it) are submitted to the model
    (`Backbone.submit`) before the oldest one's embeddings are collected, so on a GPU the copies
    in and out and the forward pass of one batch overlap with reading the next and writing the
    last. A run stopped early (Ctrl-C) still writes the batches it submitted; a killed one loses
    them and what the writer buffered (embedded next time), never a committed shard. On a GPU this
    process keeps only the intra-op threads the readers leave (`gpu_host_threads`). Per-batch
    read/submit/wait/write times are logged at debug level, so a slow run says where its time goes,
    and a run whose model mostly waited for its readers says so at its end (`readers_hint`)."""
    if in_flight is None:
        in_flight = IN_FLIGHT if backbone.device.type == "cuda" else 0
    preprocess = crops.preprocess if crops else backbone.preprocess
    batches = reader(items, preprocess, batch_size, num_workers, backbone.device.type == "cuda")
    changed: dict[str, str] = {}
    undetected = crops.undetected(items) if crops else 0
    pending: deque = deque()
    with (
        gpu_host_threads(backbone.device.type, num_workers),
        tqdm(total=len(items), desc="embedding", unit="img", smoothing=0.1, disable=not progress) as bar,
        tqdm(
            total=undetected, desc="face detection", unit="frame", smoothing=0.1, disable=not (progress and undetected)
        ) as detecting,
    ):

        def collect() -> None:
            batch, submitted, timings = pending.popleft()
            waited = time.perf_counter()
            rows = finish_rows(batch, backbone, submitted.result() if submitted else {})
            written = time.perf_counter()
            writer.put(rows)
            if crops:
                detecting.update(crops.found(batch.digests, batch.detections))
            timings += (written - waited, time.perf_counter() - written)
            log.debug("batch of %d: read %.3f s, submit %.3f s, wait %.3f s, write %.3f s", len(rows), *timings)
            changed.update((p, e) for p, e in zip(batch.paths, batch.errors, strict=True) if e in images.STALE)
            bar.update(len(batch.digests))
            if on_batch is not None:
                on_batch(len(batch.digests))

        started = time.perf_counter()
        first, starved, count = None, 0.0, 0  # after the first batch: the time spent waiting for the readers
        try:
            for batch in batches:
                read = time.perf_counter()
                if first is None:
                    first = read
                else:
                    starved += read - started
                count += 1
                submitted = backbone.submit(batch.pixels) if batch.pixels is not None else None
                pending.append((batch, submitted, (read - started, time.perf_counter() - read)))
                if len(pending) > in_flight:
                    collect()
                started = time.perf_counter()
            while pending:
                collect()
            if first is not None:
                hint = readers_hint(starved, time.perf_counter() - first, count, num_workers)
                if hint:
                    log.info(hint)
        except BaseException as exc:
            # Stopped early (Ctrl-C while reading, a bad batch): the batches already submitted are
            # still written, unless the writer itself is what failed.
            with contextlib.suppress(Exception):
                while pending:
                    collect()
            sentence = settings_at_fault(exc, backbone, batch_size, crops is not None)
            if sentence is not None:
                raise sentence from None
            raise
        finally:
            if crops:
                crops.commit()  # detections made so far are kept, also when the run stops early
    return changed


READERS_HINT_BATCHES = 10  # batches a run needs before it says that its readers were the limit


def readers_hint(starved: float, seconds: float, batches: int, readers: int) -> str | None:
    """A line for a run whose model waited for its `readers` (`extract.num_workers`) more than
    half of the `seconds` after its first batch (`starved`), over at least READERS_HINT_BATCHES
    batches, on a machine with cores to spare for more readers (one stays with the model's
    process); None otherwise."""
    cores = machine.cores()
    if batches < READERS_HINT_BATCHES or starved <= 0.5 * seconds or readers + 1 >= cores:
        return None
    return (
        f"the model waited for decoded images {starved / seconds:.0%} of the run with extract.num_workers: "
        f"{readers}; this machine has {cores} cores, so more readers (up to {cores - 1}) may feed it faster"
    )


def settings_at_fault(
    exc: BaseException, backbone: backbones.Backbone, batch_size: int, crops: bool
) -> ConfigError | None:
    """The sentence for a run stopped by its settings, not its images: `extract.batch_size` too
    large for the GPU's memory, or `extract.compile` on a machine where torch.compile cannot
    compile (Inductor finds no C++ compiler, Triton no C compiler); None for anything else."""
    if isinstance(exc, torch.OutOfMemoryError):
        return backbones.out_of_memory(
            backbone.device,
            f"on a batch of {batch_size} images ({backbone.name}{', with face detection' if crops else ''})",
            f"set extract.batch_size lower than {batch_size} (e.g. {max(1, batch_size // 2)}) and rerun: "
            "the images embedded before that batch are cached",
        )
    if hasattr(backbone.forward, "compiled"):
        from torch._dynamo.exc import BackendCompilerFailed

        if isinstance(exc, BackendCompilerFailed):
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return ConfigError(
                f"torch.compile could not compile {backbone.name} for {backbone.device} ({cause}); install what it "
                "names, or set extract.compile: false, then rerun."
            )
    return None


class LocalEmbedder:
    """Embeds on this machine: the reader -> the backbone -> a background shard writer. The
    extract stage's local scheduler; `distributed.DaskEmbedder` has the same interface.

    The backbone is loaded when something is embedded, not before: the fingerprint description
    comes from `backbones.Known` when this project has loaded the same model files before, so a
    run with nothing to embed never loads (or hashes) the model."""

    def __init__(
        self,
        settings: Settings,
        backbone: backbones.Backbone | None = None,
        reader: Reader = read_batches,
        writer: Writer = ShardWriter,
        faces_dir: Path | None = None,
    ):
        """`faces_dir`: where face detections are cached (default: the project's, `Outputs.faces`)."""
        self.settings = settings
        self.reader, self.writer = reader, writer
        self._backbone = backbone
        ex = settings.extract
        self.known = self._stamp = None
        described = None
        if backbone is None:
            self.known = backbones.Known(settings.base_dir / "cache" / "backbones.json")
            self._stamp, described = self.known.find(settings.model, ex.device, ex.precision)
        base_description, self.dims = described or (self.backbone.description, self.backbone.dims)
        device = str(self._backbone.device) if self._backbone else str(backbones.resolve_device(ex.device))
        preprocess = self._backbone.preprocess if self._backbone else None
        self.crops = faces.FaceStage.create(settings, preprocess, device, faces_dir) if settings.data.faces else None
        self.description = {**base_description, **({"faces": self.crops.spec} if self.crops else {})}

    @property
    def backbone(self) -> backbones.Backbone:
        """The model, loaded on first use (and remembered in `backbones.Known`)."""
        if self._backbone is None:
            ex = self.settings.extract
            self._backbone = backbones.load(self.settings.model, ex.device, ex.precision, ex.compile, ex.batch_size)
            if self.known is not None:
                remembered = self.known.lookup(self._stamp)
                self.known.remember(self._stamp, self._backbone.description, self._backbone.dims)
                # Compared as fingerprints: the remembered description went through JSON.
                if remembered is not None and fingerprint(remembered[0]) != fingerprint(self._backbone.description):
                    raise ConfigError(
                        f"model '{self.settings.model.name}' computes another fingerprint than this project "
                        "remembered for the same files; rerun extract (nothing was embedded under the old one)."
                    )
            if getattr(self, "crops", None) is not None:
                self.crops.preprocess.preprocess = self._backbone.preprocess
        return self._backbone

    def __enter__(self) -> LocalEmbedder:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def embed(self, items: list[Item], store: EmbeddingStore) -> list[str]:
        """Embed `items` into `store`; returns the paths of files that changed since the manifest or
        are not on this machine."""
        ex = self.settings.extract
        reader = self.reader
        if reader is read_batches and small_run(len(items), ex.batch_size, ex.num_workers, self.crops):
            reader = threaded_batches
        writer = self.writer(store, ex.shard_size, ex.format)
        try:
            return list(
                embed_items(
                    items, self.backbone, writer, ex.batch_size, ex.num_workers, reader=reader, crops=self.crops
                )
            )
        finally:
            writer.close()  # commits what is buffered, also on Ctrl-C

    def embed_text(self, prompts: list[str]) -> tuple[np.ndarray, dict] | None:
        """The prompts' embeddings and scoring, or None for a model without a text tower or
        tokenizer (remembered in `backbones.Known`: such a model is not loaded again to find out)."""

        def embed():
            return self.backbone.embed_text(prompts)

        return self.known.embed_text(self._stamp, embed) if self.known is not None else embed()
