"""extract stage: embed every manifest image that no committed shard holds yet.

reader (DataLoader workers decode + preprocess) -> mapper (the backbone, batched, in
inference mode) -> writer (a background thread that commits shards atomically). The plan is
`planned - done`, a pure function; "done" is whatever committed shards hold, so a crash or
Ctrl-C loses at most the shard in flight and the next run resumes from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import atomic, backbones, images
from pipeline import manifest as manifest_mod
from pipeline.config import ConfigError, Settings
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore, StoreError, cache_dirs, text
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


@dataclass(frozen=True)
class Item:
    digest: str
    path: str  # as in the manifest
    file: Path  # where to read it


class ImageDataset(Dataset):
    """Decodes and preprocesses one image per item; failures come back as values."""

    def __init__(self, items: list[Item], preprocess: images.Preprocess):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        array, error = images.load(item.file, self.preprocess, digest=item.digest)
        return item.digest, item.path, array, error


def collate(batch):
    digests, paths, arrays, errors = zip(*batch, strict=True)
    good = [a for a in arrays if a is not None]
    pixels = torch.from_numpy(np.stack(good)) if good else None
    return list(digests), list(paths), pixels, list(errors)


class ShardWriter:
    """Buffers rows and commits a shard every `shard_size` rows, on a background thread."""

    def __init__(self, store: EmbeddingStore, shard_size: int, fmt: str):
        self.store, self.shard_size, self.fmt = store, shard_size, fmt
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._buffer: list[ShardData] = []
        self._buffered = 0
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

    def _loop(self) -> None:
        while True:
            data = self._queue.get()
            if self._error is not None:
                if data is None:
                    return
                continue  # drain, so the producer never blocks on a dead writer
            try:
                if data is None:
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


def _rows(digests, paths, errors, pixels, backbone: backbones.Backbone) -> ShardData:
    """One batch through the model -> rows (failed images get zero rows and their reason).
    Files that changed since the manifest get no row at all: their digest is not theirs."""
    ok = np.array([e is None for e in errors], dtype=bool)
    embedded = backbone.embed(pixels) if pixels is not None else {}
    keep = np.array([e != images.CHANGED for e in errors], dtype=bool)
    arrays = {}
    for layer in backbone.layers:
        full = np.zeros((len(digests), backbone.dims[layer]), dtype=np.float32)
        if ok.any():
            full[ok] = embedded[layer]
        arrays[layer] = full[keep]
    pick = lambda values: [v for v, k in zip(values, keep, strict=True) if k]  # noqa: E731
    return ShardData(pick(digests), pick(paths), pick(errors), arrays)


def embed_items(
    items: list[Item],
    backbone: backbones.Backbone,
    writer: ShardWriter,
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> list[str]:
    """Run the reader -> model -> writer loop over `items`; returns the paths of files that
    changed since the manifest (embedded under no key)."""
    loader = DataLoader(
        ImageDataset(items, backbone.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=backbone.device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    changed: list[str] = []
    with tqdm(total=len(items), desc="embedding", unit="img", smoothing=0.1, disable=not progress) as bar:
        for digests, paths, pixels, errors in loader:
            writer.put(_rows(digests, paths, errors, pixels, backbone))
            changed += [p for p, e in zip(paths, errors, strict=True) if e == images.CHANGED]
            bar.update(len(digests))
    return changed


class LocalEmbedder:
    """Embeds on this machine: DataLoader workers -> the backbone -> a background shard writer."""

    def __init__(self, settings: Settings, backbone: backbones.Backbone | None = None):
        self.settings = settings
        self.backbone = backbone or backbones.load(settings.model, settings.extract.device, settings.extract.precision)
        self.description, self.dims = self.backbone.description, self.backbone.dims

    def __enter__(self) -> LocalEmbedder:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def embed(self, items: list[Item], store: EmbeddingStore) -> list[str]:
        """Embed `items` into `store`; returns the paths of files that changed since the manifest."""
        ex = self.settings.extract
        writer = ShardWriter(store, ex.shard_size, ex.format)
        try:
            changed = embed_items(items, self.backbone, writer, ex.batch_size, ex.num_workers)
        finally:
            writer.close()  # commits what is buffered, also on Ctrl-C
        return changed

    def embed_text(self, prompts: list[str]) -> tuple[np.ndarray, float] | None:
        tower = backbones.load_text(self.settings.model, self.backbone.device)
        return None if tower is None else (tower.embed(prompts), tower.logit_scale)


def embedder_for(settings: Settings, backbone: backbones.Backbone | None = None):
    """The embedder `extract.scheduler` asks for (a context manager: a cluster is shut down after)."""
    if settings.extract.scheduler == "dask":
        from pipeline import distributed

        return distributed.DaskEmbedder(settings)
    return LocalEmbedder(settings, backbone)


def shared_precision(settings: Settings, outputs: Outputs) -> Settings:
    """`extract.precision: auto` means the precision of the cache this project already has for
    the model (the one `cache/extract.json` names, shared through git and DVC, else any cache of
    the model here), so that teammates on other kinds of machine extend one cache instead of
    starting a second one; without such a cache, the device class decides (backbones)."""
    if settings.extract.precision != "auto":
        return settings
    recorded = []
    if outputs.extract_summary.exists():
        with contextlib.suppress(ValueError, OSError, AttributeError):
            summary = json.loads(outputs.extract_summary.read_text())
            if summary.get("model") == settings.model.name:
                recorded.append(summary.get("precision"))
    for directory in cache_dirs(outputs.embeddings):
        with contextlib.suppress(ValueError, OSError, AttributeError, KeyError, StoreError):
            card = EmbeddingStore.open(directory).card
            same = card["model"] == settings.model.name and card["layers"] == settings.model.layers
            if same and card["dtype"] == settings.model.dtype:
                recorded.append(card["description"]["precision"])
    precision = next((p for p in recorded if p in ("fp32", "bf16", "fp16")), None)
    if precision is None:
        return settings
    log.info("extract.precision auto: %s, the precision of this project's cache of %s", precision, settings.model.name)
    return dataclasses.replace(settings, extract=dataclasses.replace(settings.extract, precision=precision))


def run(settings: Settings, outputs: Outputs, retry_failed: bool = False, backbone=None) -> dict:
    table = manifest_mod.read(outputs.manifest)
    settings = shared_precision(settings, outputs)
    with embedder_for(settings, backbone) as embedder:
        store = EmbeddingStore.create(outputs.embeddings, settings.model.name, embedder.description, embedder.dims)
        with store.writer_lock():
            return _extract(settings, outputs, table, embedder, store, retry_failed)


def _extract(settings, outputs, table, embedder, store: EmbeddingStore, retry_failed: bool) -> dict:
    removed = store.remove_leftovers()
    if removed:
        log.info("removed %d unfinished temp files of an interrupted run", removed)
    digests = table.column("digest").to_pylist()
    paths = table.column("path").to_pylist()
    todo = plan(digests, store.keys(), set(store.failures()), retry_failed)
    first_path = {}
    for d, p in zip(digests, paths, strict=True):
        first_path.setdefault(d, p)
    items = [Item(d, first_path[d], manifest_mod.absolute_path(first_path[d], settings.data_root)) for d in todo]
    unique = len(set(digests))
    log.info(
        "extract: %d unique images in the manifest, %d already cached, %d to embed -> %s",
        unique,
        unique - len(todo),
        len(todo),
        store.directory,
    )

    started = time.perf_counter()
    changed: list[str] = []
    if items:
        try:
            changed = embedder.embed(items, store)
        finally:
            store = EmbeddingStore.open(store.directory)  # re-read: shards may come from other processes
            store.write_index()  # what was committed, also when the run stops early
    seconds = time.perf_counter() - started
    if todo:
        log.info("embedded %d images in %.1f s (%.1f img/s)", len(todo), seconds, len(todo) / max(seconds, 1e-9))
    if changed:
        raise ConfigError(
            f"{len(changed)} image files changed since the manifest was built (e.g. {changed[0]}) and were not "
            "embedded; rerun the manifest stage (`dvc repro -f manifest`, then `dvc repro`): everything else is cached."
        )

    embed_prompts(settings, store, embedder)
    summary = summarize(store, set(digests), settings.model.name, outputs)
    report_failures(store, set(digests))
    atomic.write_json(outputs.extract_summary, summary)
    return summary


def embed_prompts(settings: Settings, store: EmbeddingStore, embedder) -> None:
    """Embed the zero-shot prompts the cache does not hold yet (a handful: instant)."""
    prompts = settings.evaluate.zero_shot.prompts
    wanted = [p for p in prompts["real"] + prompts["fake"] if p not in text.prompts_in(store.directory)]
    if not wanted:
        return
    try:
        embedded = embedder.embed_text(wanted)
    except Exception as exc:  # auxiliary: the images are committed; zero_shot will say what is missing
        log.warning("zero-shot prompts could not be embedded (%s); the zero_shot protocol will be unavailable", exc)
        return
    if embedded is None:
        return
    vectors, scale = embedded
    text.add(store.directory, dict(zip(wanted, vectors, strict=True)), scale)
    log.info("embedded %d zero-shot prompts", len(wanted))


def summarize(store: EmbeddingStore, wanted: set[str], model_name: str, outputs: Outputs) -> dict:
    """What train/evaluate need to find the cache; the same bytes whenever the cache is the same."""
    return {
        "model": model_name,
        "fingerprint": store.header.fingerprint,
        "embeddings": store.directory.relative_to(outputs.embeddings).as_posix(),
        "layers": store.header.dims,
        "precision": store.card["description"]["precision"],
        "images": len(wanted),
        "embedded": len(wanted & store.keys()),
        "failed": len(wanted & set(store.failures())),
    }


def report_failures(store: EmbeddingStore, wanted: set[str]) -> None:
    failed = {d: v for d, v in store.failures().items() if d in wanted}
    if not failed:
        return
    reasons = Counter(reason.split(" (")[0] for _, reason in failed.values())
    log.warning(
        "%d images could not be embedded (%s); they are recorded in the cache and skipped. First few:\n%s",
        len(failed),
        ", ".join(f"{n} {r}" for r, n in reasons.most_common()),
        "\n".join(f"  {p}: {r}" for p, r in list(failed.values())[:5]),
    )
