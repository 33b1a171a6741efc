"""Extraction on a dask.distributed cluster (`extract.scheduler: dask`).

The digests the cache lacks are split into partitions of at most `extract.shard_size`, as many
as a multiple of the workers, so that they all finish together (`partition_size`); each
partition is one task. A worker builds the backbone once (inside its own process: the model is never
pickled) and commits its own shards straight into the shared cache directory (atomic,
content-named, so workers never collide). The client holds the cache's writer lock for the
whole run and shows progress, batch by batch (`PartitionProgress`). A task whose worker dies is
rerun elsewhere by dask, and one that raises is rerun from its start with nothing of the failed
attempt committed, unless its settings stopped it (a batch the GPU has no memory for): that one
would fail again, so it keeps what it embedded and the run stops with its sentence. A run that
is stopped loses only uncommitted partitions, and the next run embeds just what is missing; on a
scheduler that outlives it, its partitions still running stop at their next batch (`_reporter`).
Inside a task, `extract.num_workers` readers decode batches ahead of the model: threads in a
daemonic worker process (dask's default: it cannot have children; `embedder.threaded_batches`),
processes started once and kept for every partition in one that is not
(`distributed.worker.daemon: False`; `embedder.KeptReaders`).

`extract.dask.address` connects to a running scheduler (`tcp://host:8786`; every worker must
see the cache directory and the images at the same paths: a shared filesystem, and must run this
version of the package: `other_code`); left empty, a
`LocalCluster` with `extract.dask.n_workers` processes is started (one per GPU on a multi-GPU
machine: worker i uses GPU i modulo the GPU count), and only when there is something to embed: its
workers run in this environment, so what loading the model gave is remembered in
`cache/backbones.json` as for a local run (`backbones.Known`). A remote scheduler's workers may
differ from this machine: what they said is remembered under the scheduler's address too, so a
run with nothing to embed needs no worker, but they describe the model again before they embed
anything (`DaskEmbedder._confirm`). Every worker describes it at once (loading its model) and the
first answer is taken, so none waits idle for another.

With `data.faces`, each worker detects and crops the faces of its partition (the detector on its
own device), reading and committing the shared detection cache (`cache/faces/`, content-named
parts, like the shards): a rerun, or another scheduler, detects nothing twice.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import hashlib
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ConfigError, ExtractSettings, FacesSettings, ModelSettings, Settings
from pipeline.outputs import Outputs

log = logging.getLogger(__name__)

# dask's nannies start each worker with MALLOC_TRIM_THRESHOLD_=65536, so that it gives freed memory
# back to the system at once. Setting it turns off glibc's adaptive threshold for mmap, so every
# allocation over 128 KiB (a batch of pixels, each activation of the model) is a fresh mmap whose
# pages fault in, zeroed, on first touch: ViT-B/32's forward pass in one thread ran 20 % slower
# (bf16 with AMX: 43 -> 35 img/s), and a 2-worker LocalCluster embedded 2,408 images at 49.7 img/s
# instead of 69.9 (bf16), 1,208 at 24.9 instead of 28.0 (fp32). Our LocalCluster's workers start
# without it; a remote scheduler's workers that have it are named, with how to start them without
# (`allocator_hint`).
TRIM = "MALLOC_TRIM_THRESHOLD_"
# Write errors that a rerun of the task would meet again, after embedding its partition again: a
# full disk, a quota, a read-only or forbidden cache folder.
LASTING_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_BACKBONES: dict = {}  # per worker process: (model, device, precision) -> Backbone
_READERS: list = []  # per worker process: its embedder.KeptReaders, once made


def _source_digests() -> dict[str, str]:
    """This package's source files (`pipeline/...py` -> the first 16 hex digits of their sha256)."""
    root = Path(__file__).resolve().parent
    return {
        f"pipeline/{path.relative_to(root).as_posix()}": hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in sorted(root.rglob("*.py"))
    }


# The package's source as this process found it when it imported this module: on a worker, with its
# first task (the modules that task needs are imported with it). The client sends its own with every
# task (`other_code`): a long-lived worker that imported another version (a cluster started before a
# `git pull`, a worker of another checkout) would put what that version computes into the cache
# this version names, or fail with a traceback where a function's arguments changed.
SOURCE = _source_digests()


def other_code(source: dict[str, str]) -> str | None:
    """Runs on a worker: None where it imported the source the client has (`SOURCE`), else the
    sentence naming the files that differ."""
    if source == SOURCE:
        return None
    differ = sorted(name for name in source.keys() | SOURCE.keys() if source.get(name) != SOURCE.get(name))
    named = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    return (
        f"dask worker {_this_worker()} runs another version of this package than this machine ({named} "
        f"differ{'s' if len(differ) == 1 else ''}): it was started before the code changed, or from another "
        "checkout; start the workers again from this checkout (`dask worker <scheduler>`), so that they embed "
        "what this version computes (it embedded nothing)."
    )


def dask_setup(worker) -> None:
    """dask's hook for a worker preload (`LocalCluster(preload=[__name__])`), run in each of our
    LocalCluster's workers as it starts: Ctrl-C, which a terminal sends to every process of the
    job, is left to the run, which closes the cluster. A worker that took it cancelled its own
    event loop and printed its KeyboardInterrupt traceback above the run's one sentence; closed
    with a partition running (which stops at its next batch: `_reporter`), it warns that the
    task was cancelled, which is what closing the run's own cluster means."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker.state_machine").addFilter(_not_a_cancelled_task)
    logging.getLogger("distributed.worker").addFilter(_not_a_closed_scheduler)
    # tqdm's first bar in a process (transformers' "Loading weights") makes a multiprocessing lock,
    # a named semaphore that multiprocessing's resource tracker (the run's) tracks; a worker killed
    # by its nanny on the way out (busy loading its model) never released it, and the tracker
    # warned "There appear to be 1 leaked semaphore objects to clean up at shutdown" after the
    # run's one sentence. Bars in one worker process need only a thread lock.
    tqdm.set_lock(threading.RLock())


def quiet_interrupted_calls() -> None:
    """Ctrl-C during a blocking client call leaves no traceback (`_not_an_interrupted_call`)."""
    logging.getLogger("tornado.application").addFilter(_not_an_interrupted_call)  # once: filters are a set


def _not_an_interrupted_call(record: logging.LogRecord) -> bool:
    """distributed's `sync` (behind every blocking client call) hands Ctrl-C to its event loop as a
    callback that cancels the call; where Ctrl-C came before the loop had started the call, that
    callback fails (NameError: `future` not yet assigned; distributed 2026.8) and tornado logged its
    traceback above the run's one sentence (CI, 1 run of many). Nothing was left running: dropped."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, NameError) and "sync.<locals>.cancel" in record.getMessage())


def _not_a_closed_scheduler(record: logging.LogRecord) -> bool:
    """Our LocalCluster's scheduler lives in the run's process and goes away only with the run. A
    worker whose event loop was busy when the run closed the cluster (unpickling its first task
    imports torch there, 2-3 s) missed the scheduler's goodbye, and its next heartbeat logged
    "Failed to communicate with scheduler during heartbeat" with two tracebacks per worker above
    the run's one sentence (Ctrl-C in the run's first seconds): the run's own doing, no news."""
    return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


def _not_a_cancelled_task(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Async instruction for") and message.endswith("ended with CancelledError"))


def _worker_device(device: str) -> str:
    import torch
    from distributed import get_worker

    return gpu_for(get_worker().name, device, torch.cuda.device_count())


def gpu_for(worker: int | str, device: str, gpus: int) -> str:
    """Spread workers over GPUs: worker i of a cluster (LocalCluster names them 0 .. n-1; a worker
    started by hand may be named `<anything>-i`) takes cuda:(i mod GPU count). An explicit device
    (`cpu`, `cuda:N`), one GPU visible (e.g. CUDA_VISIBLE_DEVICES per worker) or none: unchanged."""
    if device not in ("auto", "cuda") or gpus < 2:
        return device
    index = worker if isinstance(worker, int) else str(worker).rsplit("-", 1)[-1]
    return f"cuda:{int(index) % gpus}" if str(index).isdigit() else device


def _backbone(model: ModelSettings, extract: ExtractSettings):
    from pipeline import backbones

    if Path(model.name).is_absolute() and not Path(model.name).is_dir():  # a folder the client has (DaskEmbedder)
        raise ConfigError(not_found_on(_this_worker(), f"the model directory {model.name}"))
    device = _worker_device(extract.device)
    key = (repr(model), device, extract.precision, extract.compile, extract.batch_size)
    if key not in _BACKBONES:
        if not _BACKBONES:
            # At the worker's exit, Python's last garbage collections walk every object that torch and
            # transformers made, to find cycles to free in a process about to end: 1 s of a LocalCluster's
            # close (1.24 -> 0.24 s, 2 workers), which the run waits for. Frozen objects are not walked;
            # the exit is otherwise the normal one (atexit handlers, logging's flush, module teardown).
            atexit.register(gc.freeze)
        _BACKBONES[key] = backbones.load(model, device, extract.precision, extract.compile, extract.batch_size)
    return _BACKBONES[key]


def _describe(model: ModelSettings, extract: ExtractSettings, source: dict[str, str]) -> tuple[dict, dict[str, int]]:
    """Runs on a worker: the fingerprint description and dims, as the workers will compute them."""
    if why := other_code(source):
        raise ConfigError(why)
    try:
        backbone = _backbone(model, extract)
    except ConfigError as exc:
        raise ConfigError(on_worker(str(exc))) from None
    return backbone.description, backbone.dims


@contextlib.contextmanager
def _nanny_quiet():
    """Closing the run's own LocalCluster, its nannies kill a worker still busy after 4 s (one in a
    partition or loading the model when Ctrl-C or an error stopped the run) and warned "Worker
    process still alive after 4.0 seconds, killing" above the run's one sentence: the run's own
    doing, no news. Errors still show."""
    nanny = logging.getLogger("distributed.nanny")
    level = nanny.level
    nanny.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nanny.setLevel(level)


@contextlib.contextmanager
def _ctrl_c_held():
    """Ctrl-C held back from the cluster's processes as it starts. A terminal sends Ctrl-C to every
    process of the job, and a worker still importing (the first ~3 s, before `dask_setup` ignores
    it) died printing its KeyboardInterrupt traceback, and the cluster, half started, printed
    "Exception ignored in atexit callback: close_clusters" at exit: ~100 lines above the run's one
    sentence. A blocked signal stays blocked across fork and exec, and a thread starts with its
    creator's mask: blocked in this thread while the cluster starts its event loop's thread, it is
    blocked in that thread, in the threads that spawn the workers and in the workers (which then
    ignore it). Here it is unblocked as soon as the cluster is up: a Ctrl-C pressed meanwhile stops
    the run then, with the cluster assigned, so that the run closes it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes Ctrl-C
        yield
        return
    from multiprocessing import resource_tracker

    # multiprocessing starts its resource tracker on the first spawn, and unblocks SIGINT in the
    # thread that starts it (bpo-33613): started here first, it leaves the cluster's threads alone.
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def _environ_kept():
    """os.environ as it was before: a nanny exports its worker's settings (OMP_NUM_THREADS=1, ...)
    into the process that starts it, before spawning the worker, so anything this process started
    after the cluster (a notebook's next subprocess) ran single-threaded. The workers have started
    by the time LocalCluster returns."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _trim_setting() -> str | None:
    """Runs on a worker: its MALLOC_TRIM_THRESHOLD_, if set (see TRIM)."""
    return os.environ.get(TRIM)


def allocator_hint(settings: dict[str, str | None]) -> str | None:
    """{worker: its MALLOC_TRIM_THRESHOLD_ or None} -> the sentence for a cluster whose workers run
    with it set (see TRIM), or None."""
    slowed = sum(value is not None for value in settings.values())
    if not slowed:
        return None
    return (
        f"{slowed} of {len(settings)} dask workers run with {TRIM} set (what a dask nanny gives its worker by "
        "default), under which every large allocation of the model page-faults anew (a forward pass on a CPU "
        "20 % slower); start the workers with `distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null` "
        "in their dask config (README, Extraction on a cluster)"
    )


def _embed_text(model: ModelSettings, extract: ExtractSettings, prompts: list[str], source: dict[str, str]):
    if why := other_code(source):
        raise ConfigError(why)
    return _backbone(model, extract).embed_text(prompts)


@dataclass(frozen=True)
class FaceJob:
    """What a worker needs for face crops: the settings, the project folder (the detection cache
    and crops live under its cache/, an onnx path is relative to it) and the boxes `nearest` lends."""

    settings: FacesSettings
    base_dir: str
    borrowed: dict = field(default_factory=dict)


def embed_partition(
    items: list,
    store_dir: str,
    model: ModelSettings,
    extract: ExtractSettings,
    source: dict[str, str],
    faces_job: FaceJob | None = None,
    progress: tuple[str, int] | None = None,
) -> PartitionResult:
    """Runs on a worker: embed `items` (their face crops, with `faces_job`) and commit them as
    shard(s) of the cache at `store_dir`. Face detections are read from and committed to the
    shared detection cache. `source`: the client's `SOURCE` (see `other_code`).
    `progress`: (topic, partition number): after each batch, how many of its images this attempt
    has embedded is logged as an event on the topic (`PartitionProgress`, the client's bar).

    A task stopped by its settings (a `ConfigError`: a batch the GPU has no memory for, NaN at
    fp16, a model that does not fit) would fail the same way again if dask retried it, so it
    commits the batches embedded before, as a local run does, and returns the sentence instead of
    raising: dask retries a task that raises. So does one stopped by a write error that lasts
    (`LASTING_ERRORS`: a full disk), returning the OSError."""
    from pipeline import embedder, faces
    from pipeline.store import EmbeddingStore

    if why := other_code(source):
        return PartitionResult.stop(why)
    try:
        backbone = _backbone(model, extract)
    except ConfigError as exc:
        return PartitionResult.stop(on_worker(str(exc)))
    if not Path(store_dir).is_dir():  # made by the client
        return PartitionResult.stop(not_found_on(_this_worker(), f"the cache directory {store_dir}"))
    description = backbone.description
    crops = None
    if faces_job is not None:
        base = Path(faces_job.base_dir)
        crops = faces.FaceStage(
            faces_job.settings, backbone.preprocess, Outputs(base).faces, str(backbone.device), base
        )
        crops.preprocess.borrowed = faces_job.borrowed
        description = {**description, "faces": crops.spec}
    store = EmbeddingStore.open(Path(store_dir))
    if description != store.card["description"]:
        return PartitionResult.stop(other_description(store_dir, store.card["description"], description))
    writer = embedder.ShardWriter(store, extract.shard_size, extract.format)
    try:
        try:
            changed = embedder.embed_items(
                items,
                backbone,
                writer,
                extract.batch_size,
                num_workers=max(1, extract.num_workers),
                progress=False,
                reader=_reader(crops),
                crops=crops,
                on_batch=_reporter(*progress) if progress else None,
            )
        except ConfigError as exc:
            writer.close()
            return PartitionResult.stop(on_worker(str(exc)))
        except BaseException:
            # dask reruns the task from its first item (`retries`), and a partition is one shard:
            # what this attempt embedded is dropped, not committed beside the rerun's rows.
            writer.abandon()
            raise
        writer.close()
    except OSError as exc:
        if exc.errno not in LASTING_ERRORS:
            raise
        return PartitionResult.stop(exc)
    return PartitionResult(len(items), changed, None, _this_worker())


@dataclass(frozen=True)
class PartitionResult:
    """What a task returns: the images done; the files it did not embed as the manifest lists them,
    path -> `images.CHANGED` or `images.MISSING` (not found on the worker); the reason the run
    stops (a sentence, or an OSError that lasts), or None; the worker's address."""

    done: int
    stale: dict[str, str]
    stopped: str | OSError | None
    worker: str

    @classmethod
    def stop(cls, why: str | OSError) -> PartitionResult:
        return cls(0, {}, why, _this_worker())


def other_description(store_dir: str, cache: dict, worker: dict) -> str:
    """The sentence for a worker that describes the model otherwise than the cache it was handed
    (a remote worker with other library versions or model files): its vectors would not be the
    cache's, so it embeds nothing, and a rerun elsewhere would meet the same worker again."""
    from pipeline.store import differences_shown

    differ = differences_shown(cache, worker, names=("in the cache", "on the worker"))
    return (
        f"dask worker {_this_worker()} loads the model otherwise than the cache {store_dir} was made: "
        f"{differ}; give every worker the same model files and library versions, or leave that worker out "
        "(it embedded nothing)."
    )


def not_found_on(worker: str, what: str) -> str:
    """The sentence for a worker that does not find `what` ("the cache directory <path>"), which
    this machine has: a remote worker without the shared folders, or with them mounted elsewhere."""
    return (
        f"dask worker {worker} cannot find {what} that this machine has; every worker needs the model files, the "
        "images and the cache at the same paths as this machine (a shared filesystem, mounted at the same place): "
        "mount them there, or leave that worker out."
    )


def on_worker(sentence: str) -> str:
    """A sentence from this worker (its device ran out of memory, its model does not load), named
    by the worker's address, as the sentences that are about the worker already are: on a cluster
    of unlike machines, the one to fix."""
    prefix = f"dask worker {_this_worker()}"
    return sentence if sentence.startswith(f"{prefix} ") else f"{prefix}: {sentence}"


def _this_worker() -> str:
    from distributed import get_worker

    return get_worker().address


class RunGone(Exception):
    """Raised in a task whose run has gone (see `_reporter`): it embeds nothing more and commits nothing."""


def _reporter(topic: str, partition: int) -> Callable[[int], None]:
    """Runs on a worker: a callback that logs, per batch, [partition, attempt, images embedded by
    this attempt] on `topic` (an attempt is one run of the task: dask reruns a task whose worker
    died, from its first image), after checking that the task's run still wants it.

    A run that stops (one partition out of memory, Ctrl-C, a killed client) releases its tasks,
    but dask cannot interrupt the thread of a task already running: on a scheduler that outlives
    the run (a cluster's), each of its other partitions ran to its end, holding its worker from
    the next run, and committed its shard after the run had let the cache's writer lock go. The
    worker marks such a task cancelled: at its next batch it raises `RunGone`, and
    `embed_partition` drops what it embedded, as for any failed attempt (the next run embeds it)."""
    from distributed import get_worker

    worker, attempt, done = get_worker(), uuid.uuid4().hex, 0
    key = worker.get_current_task()

    def report(images: int) -> None:
        nonlocal done
        task = worker.state.tasks.get(key)
        if task is None or task.state == "cancelled":
            raise RunGone(f"partition {partition}: the run that submitted it has stopped; nothing of it was committed")
        done += images
        worker.log_event(topic, [partition, attempt, done])

    return report


class PartitionProgress:
    """A progress bar over the partitions of a dask run, moved by the workers' per-batch reports
    (`_reporter`), so that a partition of thousands of images on a CPU worker does not hold the
    bar still for minutes. A partition counts the images of its latest attempt: one that dask
    reruns starts again from zero, and a report of an attempt it replaced, or of a partition whose
    result has come, changes nothing. Reports arrive on the client's event loop, results on the
    caller's thread: both go through one lock."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self._lock = threading.Lock()
        self._done: dict[int, int] = {}
        self._attempt: dict[int, str] = {}
        self._replaced: set[str] = set()
        self._finished: set[int] = set()

    def report(self, partition: int, attempt: str, done: int) -> None:
        with self._lock:
            if partition in self._finished or attempt in self._replaced:
                return
            if self._attempt.setdefault(partition, attempt) != attempt:
                self._replaced.add(self._attempt[partition])
                self._attempt[partition] = attempt
            self._move(partition, done)

    def finish(self, partition: int, done: int) -> None:
        with self._lock:
            self._finished.add(partition)
            self._move(partition, done)

    def _move(self, partition: int, done: int) -> None:
        self.bar.update(done - self._done.get(partition, 0))
        self._done[partition] = done


def _reader(crops) -> Callable:
    """How this worker decodes ahead of its model: in threads where its process is daemonic (dask's
    default: it cannot have children) or for face crops (each partition lends its own boxes);
    else in processes started once and kept for every partition (`embedder.KeptReaders`)."""
    import multiprocessing

    from pipeline import embedder

    if crops is not None or multiprocessing.current_process().daemon:
        return embedder.threaded_batches
    if not _READERS:
        # Forked, as a local run's readers are, not spawned as dask starts processes: a spawned
        # reader imports torch afresh (on the demo: 307 MB of its own, the run 8.1 s) where a
        # forked one shares this process's pages (18 MB of its own, the run 4.9 s).
        _READERS.append(embedder.KeptReaders("fork" if "fork" in multiprocessing.get_all_start_methods() else None))
    return _READERS[0]


def partition_size(n: int, shard_size: int, batch_size: int, workers: int) -> int:
    """Images per task (the last takes the rest): as many tasks as shards of `shard_size` would
    hold the `n` images, rounded up to a multiple of the `workers`, in whole batches and at most a
    shard, or one batch where a shard is smaller (the writer commits whole batches). Partitions of
    a whole shard each left one worker alone on the last of them (20,000 images on 4 workers: the
    last 3,616 on one worker after the others had finished); these end together. Whole batches:
    every task starts where a batch of the local run would, so a worker's batches hold the images
    a local run's would. On a CPU whose fp32 kernels depend on the batch (AVX2's GEMM: another
    batch size gave vectors that differ by up to 7e-7), a shard of 24 with batches of 16 made a
    dask run's vectors differ from a local run's."""
    most = max(1, shard_size // batch_size) * batch_size  # the whole batches a shard holds
    tasks = -(-max(1, -(-n // most)) // workers) * workers
    per_task = -(-n // tasks)
    return min(most, max(1, -(-per_task // batch_size)) * batch_size)


class DaskEmbedder:
    """Embeds on a dask.distributed cluster; the same interface as embedder.LocalEmbedder."""

    def __init__(self, settings: Settings):
        from pipeline import embedder, faces

        self.extract = settings.extract
        # Face crops: the workers detect and crop; this side knows the crop spec, the detection
        # cache (for `nearest`) and writes the crops of frames embedded earlier (save_crops).
        self.crops = faces.FaceStage.create(settings, None) if settings.data.faces else None
        self.base_dir = str(settings.base_dir.resolve())
        self.reader = embedder.read_batches
        # Workers resolve the model themselves: a relative model path must mean the same to them. An
        # absolute path is never a Hugging Face id: one that is no folder here is refused here, so
        # that a worker that lacks an absolute model folder knows this machine has it (`_backbone`).
        local = Path(settings.model.name).expanduser()
        if local.is_absolute() and not local.is_dir():
            from pipeline.backbones.base import resolve_directory

            resolve_directory(settings.model)  # the sentence a local run gives
        self.model = replace(settings.model, name=str(local.resolve())) if local.is_dir() else settings.model
        self.asked = settings.model  # as params name it: what a local run remembers the model under (Known)
        self._client = self.cluster = None
        self._warming: list = []  # the workers' describe tasks, kept until the run ends (a released one is cancelled)
        self.known = self._stamp = None  # backbones.Known, and the model's stamp there (None: not remembered)
        self._unconfirmed = False  # a remote scheduler's description taken from memory, its workers not yet asked

    def __enter__(self) -> DaskEmbedder:
        try:
            return self._enter()
        except BaseException:
            # `with` calls __exit__ only after __enter__ returned: a model the workers cannot load
            # (or a Ctrl-C while they load it) left the cluster it started running, the model in
            # its workers' memory, a GPU's too, in a notebook until the kernel ended.
            self.__exit__(None, None, None)
            raise

    def _enter(self) -> DaskEmbedder:
        from pipeline import backbones

        self.known = backbones.Known(Path(self.base_dir) / "cache" / "backbones.json")
        if not self.extract.dask.address:  # a LocalCluster: workers on this machine, in this environment
            self._stamp, described = self.known.find(self.asked, self.extract.device, self.extract.precision)
        else:
            self._stamp, described = self._remembered()
            self._unconfirmed = described is not None
        if described is None:
            described = self._ask_workers()
            if self._stamp is not None:
                self.known.remember(self._stamp, *described)
        self._use(described)
        return self

    def _remembered(self) -> tuple[str | None, tuple[dict, dict] | None]:
        """A remote scheduler's: the stamp of the model files as this machine sees them (the shared
        filesystem), the settings and the scheduler's address, and what its workers said under it
        last time; (None, None) where this machine cannot see the model files (a Hugging Face id
        only the workers' caches hold). With it, a run with nothing to embed (after an `evaluate`
        param changed) neither connects nor loads the model on every worker, and needs no worker
        at all: the cluster's job may have ended. Its workers' libraries may have changed since,
        which this machine cannot see: the workers confirm before anything is embedded (`_confirm`)."""
        try:
            return self.known.find(self.asked, self.extract.device, self.extract.precision, self.extract.dask.address)
        except ConfigError:
            return None, None

    def _ask_workers(self) -> tuple[dict, dict[str, int]]:
        """The fingerprint description and dims as the workers compute them. Every worker describes
        (loading its model), not one while the others wait: the first answer is taken, and the
        others' models are ready by the time their partitions come."""
        from distributed import as_completed

        workers = [[worker] for worker in self.client.nthreads()] or [None]  # none yet: the first to come
        if workers == [None] and self.extract.dask.address:  # workers still queued: say why nothing moves
            log.warning(
                "dask: the scheduler at %s has no workers yet; waiting for the first to join (`dask worker %s`)",
                self.extract.dask.address,
                self.extract.dask.address,
            )
        self._warming = [
            self.client.submit(_describe, self.model, self.extract, SOURCE, pure=False, workers=where)
            for where in workers
        ]
        return next(iter(as_completed(self._warming))).result()

    def _use(self, described: tuple[dict, dict[str, int]]) -> None:
        self.described = described
        self.description, self.dims = described
        if self.crops is not None:
            self.description = {**self.description, "faces": self.crops.spec}

    def _confirm(self) -> None:
        """Before the first thing a remote scheduler's workers embed, where the description came from
        memory (`_remembered`): they describe the model; if they now load it otherwise, that is
        remembered and used, and `Redescribed` starts the extract again with it (a new cache)."""
        if not self._unconfirmed:
            return
        self._unconfirmed = False
        from pipeline.embedder import Redescribed
        from pipeline.store import differences_shown, fingerprint

        now = self._ask_workers()
        before = self.described
        if fingerprint(now[0]) == fingerprint(before[0]) and now[1] == before[1]:
            return
        self.known.remember(self._stamp, *now)
        self._use(now)
        raise Redescribed(
            f"the dask workers of {self.extract.dask.address} load {self.asked.name} otherwise than when they last "
            f"described it: {differences_shown(before[0], now[0], names=('then', 'now'))}"
        )

    @property
    def client(self):
        """The cluster's client, started on first use: a run with nothing to embed starts none."""
        if self._client is None:
            import dask
            from distributed import Client, LocalCluster

            quiet_interrupted_calls()
            if self.extract.dask.address:
                try:
                    self._client = Client(self.extract.dask.address)
                except OSError as exc:  # refused, or no answer within distributed.comm.timeouts.connect
                    raise ConfigError(
                        f"extract.dask.address is {self.extract.dask.address}, where no dask scheduler answered "
                        f'({exc}); start one there (`dask scheduler`), or set the address to "" for a '
                        "LocalCluster on this machine."
                    ) from None
            else:
                # Our own cluster's start and stop (nannies, comms, workers added and removed) is
                # not the user's business: dask's warnings and errors still show. See TRIM for its
                # workers' environment, and `_environ_kept` for this process's.
                logging.getLogger("distributed").setLevel(logging.WARNING)
                no_trim = {f"distributed.nanny.pre-spawn-environ.{TRIM}": None}
                with _ctrl_c_held(), _environ_kept(), dask.config.set(no_trim):
                    self.cluster = LocalCluster(
                        n_workers=self.extract.dask.n_workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        # The scheduler's HTTP routes (health, metrics) on a free port, not dask's usual
                        # 8787, which a notebook's cluster may hold ("Port 8787 is already in use").
                        scheduler_kwargs={"dashboard_address": ":0"},
                        preload=[__name__],  # dask_setup
                    )
                self._client = Client(self.cluster)
            log.info("dask: %s", self._client)
        return self._client

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()
        if self.cluster is not None:
            with _nanny_quiet():
                self.cluster.close()

    def embed(self, items: list, store) -> list[str]:
        from distributed import as_completed

        from pipeline import images

        self._confirm()
        workers = max(1, len(self.client.nthreads()))
        if self.extract.dask.address and (hint := allocator_hint(self.client.run(_trim_setting))):
            log.warning(hint)
        size = partition_size(len(items), self.extract.shard_size, self.extract.batch_size, workers)
        partitions = [items[i : i + size] for i in range(0, len(items), size)]
        log.info("dask: %d partitions of up to %d images for %d workers", len(partitions), size, workers)
        topic = f"pipeline-extract-progress-{uuid.uuid4().hex}"  # this run's, on a scheduler others may share
        changed: list[str] = []
        files = {item.path: item.file for item in items}
        with tqdm(total=len(items), desc="embedding (dask)", unit="img", smoothing=0.1) as bar:
            progress = PartitionProgress(bar)
            self.client.subscribe_topic(topic, lambda event: progress.report(*event[1]))
            try:
                futures = {
                    self.client.submit(
                        embed_partition,
                        part,
                        str(store.directory),
                        self.model,
                        self.extract,
                        SOURCE,
                        self._face_job(part),
                        (topic, number),
                        pure=False,
                        retries=2,
                    ): number
                    for number, part in enumerate(partitions)
                }
                for future in as_completed(futures):
                    result = future.result()
                    if isinstance(result.stopped, OSError):
                        raise result.stopped  # the local run's error (cli.os_error_sentence)
                    if result.stopped is not None:
                        raise ConfigError(result.stopped)
                    unseen = [
                        files[p] for p, why in result.stale.items() if why == images.MISSING and files[p].exists()
                    ]
                    if unseen:
                        what = f"{len(unseen)} image file{'s' if len(unseen) > 1 else ''} (e.g. {unseen[0]})"
                        raise ConfigError(not_found_on(result.worker, what))
                    changed += result.stale
                    progress.finish(futures[future], result.done)
            finally:
                self.client.unsubscribe_topic(topic)
        return changed

    def _face_job(self, items: list) -> FaceJob | None:
        if self.crops is None:
            return None
        lent = self.crops.preprocess.borrowed
        return FaceJob(
            self.crops.preprocess.settings, self.base_dir, {i.digest: lent[i.digest] for i in items if i.digest in lent}
        )

    def embed_text(self, prompts: list[str]):
        def embed():
            self._confirm()
            return self.client.submit(_embed_text, self.model, self.extract, prompts, SOURCE, pure=False).result()

        return self.known.embed_text(self._stamp, embed) if self._stamp is not None else embed()
