"""The embedding store: content-addressed shards of embeddings for one model fingerprint.

Layout of one model's cache::

    cache/embeddings/<model-slug>-<fingerprint>/
        card.json                 what produced the numbers (model, preprocessing, layers, ...)
        shards/<time_ns>-<sha256 of the file, 16 hex>.parquet | .h5

A shard is visible only once complete (temp file, fsync, rename), so a crash loses at most the
shard being written. Keys are sha256 digests of image bytes; a digest held by any shard is
done. Shard files are read by their suffix, so one cache may hold shards of several formats.
A shard's name ends in the hash of its bytes, so `verify` detects any change to a shard.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import ConfigError
from pipeline.store import hdf5, parquet
from pipeline.store.shard import ShardData, ShardHeader

FORMAT_VERSION = 1
FORMATS = {"parquet": parquet, "hdf5": hdf5}
_BY_SUFFIX = {module.SUFFIX: module for module in FORMATS.values()}


class StoreError(ConfigError):
    """The cache on disk does not match what the caller expects."""


# flock locks belong to the open file, which forked children (DataLoader workers) share: a
# child that outlives a killed extractor would keep the cache locked. Children close their
# copy, so the lock lives and dies with the process that took it.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def fingerprint(description: dict) -> str:
    """A short, stable hash of everything that changes the numbers (an explicit, sorted dict)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def directory_name(model_name: str, fp: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name.rstrip("/")).name).strip("-") or "model"
    return f"{slug}-{fp}"


class EmbeddingStore:
    """One model's embeddings, keyed by image digest."""

    def __init__(self, directory: Path, card: dict):
        self.directory = Path(directory)
        self.card = card
        self.header = ShardHeader(
            fingerprint=card["fingerprint"],
            layers=list(card["layers"]),
            dims={k: int(v) for k, v in card["dims"].items()},
            dtype=card["dtype"],
            format_version=int(card["format_version"]),
        )
        self._index: dict[str, tuple[str | None, str | None]] | None = None  # digest -> (path, error)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, parent: Path, model_name: str, description: dict, dims: dict[str, int]) -> EmbeddingStore:
        """Open the cache for this description, creating it on first use."""
        fp = fingerprint(description)
        # The same numbers under another name (a local copy of a hub model) share the cache.
        existing = sorted(Path(parent).glob(f"*-{fp}/card.json")) if Path(parent).is_dir() else []
        directory = existing[0].parent if existing else Path(parent) / directory_name(model_name, fp)
        card = {
            "fingerprint": fp,
            "format_version": FORMAT_VERSION,
            "model": model_name,
            "description": description,
            "layers": list(description["layers"]),
            "dims": dims,
            "dtype": description["dtype"],
        }
        card_path = directory / "card.json"
        if card_path.exists():
            return cls.open(directory, expect_fingerprint=fp)
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        atomic.write_json(card_path, card)
        return cls(directory, card)

    @classmethod
    def open(cls, directory: Path, expect_fingerprint: str | None = None) -> EmbeddingStore:
        directory = Path(directory)
        card_path = directory / "card.json"
        if not card_path.exists():
            raise StoreError(f"{directory} is not an embedding cache (no card.json); run the extract stage first.")
        card = json.loads(card_path.read_text())
        if expect_fingerprint is not None and card.get("fingerprint") != expect_fingerprint:
            raise StoreError(
                f"{directory} holds embeddings with fingerprint {card.get('fingerprint')}, not {expect_fingerprint}; "
                "it was made by a different model or settings."
            )
        return cls(directory, card)

    # ------------------------------------------------------------------ reading

    @property
    def layers(self) -> list[str]:
        return self.header.layers

    def dimension(self, layer: str) -> int:
        self._check_layer(layer)
        return self.header.dims[layer]

    def shard_paths(self) -> list[Path]:
        shards = self.directory / "shards"
        if not shards.is_dir():
            return []
        return sorted(
            p for p in shards.iterdir() if p.suffix in _BY_SUFFIX and not p.name.startswith(atomic.TEMP_PREFIX)
        )

    def _load_index(self) -> dict[str, tuple[str | None, str | None]]:
        if self._index is None:
            index: dict[str, tuple[str | None, str | None]] = {}
            for shard in self.shard_paths():
                self._check_header(shard)
                digests, paths, errors = _BY_SUFFIX[shard.suffix].read_keys(shard)
                for d, p, e in zip(digests, paths, errors, strict=True):
                    if e is None or d not in index:  # a success anywhere wins over a failure
                        index[d] = (p, e)
            self._index = index
        return self._index

    def keys(self) -> set[str]:
        """Digests with an embedding."""
        return {d for d, (_, e) in self._load_index().items() if e is None}

    def failures(self) -> dict[str, tuple[str | None, str]]:
        """Digests recorded as failed (and never embedded since): digest -> (path, reason)."""
        return {d: (p, e) for d, (p, e) in self._load_index().items() if e is not None}

    def count(self) -> int:
        return len(self.keys())

    def read_shard(self, shard: Path, layer: str) -> tuple[list[str], np.ndarray]:
        """Digests and float32 embeddings of one shard's rows that embedded fine."""
        self._check_header(shard)
        return _BY_SUFFIX[shard.suffix].read_layer(shard, layer, self.dimension(layer))

    def read(self, digests: list[str], layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of `layer` for `digests` -> (array (n, dim) float32, found mask (n,))."""
        dim = self.dimension(layer)
        found_digests: list[str] = []
        blocks: list[np.ndarray] = []
        for shard in self.shard_paths():
            d, a = self.read_shard(shard, layer)
            found_digests += d
            blocks.append(a)
        position = {d: i for i, d in enumerate(found_digests)}
        rows = np.array([position.get(d, -1) for d in digests], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((len(digests), dim), dtype=np.float32)
        if blocks and found.any():
            out[found] = np.concatenate(blocks)[rows[found]]
        return out, found

    def _check_layer(self, layer: str) -> None:
        if layer not in self.header.dims:
            raise StoreError(
                f"layer '{layer}' is not in the cache {self.directory.name} (it holds {', '.join(self.layers)}); "
                "add it to model.layers and re-run extract."
            )

    def _check_header(self, shard: Path) -> None:
        header = _BY_SUFFIX[shard.suffix].read_header(shard)
        if header.fingerprint != self.header.fingerprint or header.layers != self.header.layers:
            raise StoreError(
                f"shard {shard} was written for fingerprint {header.fingerprint} (layers {header.layers}), "
                f"not this cache's {self.header.fingerprint}; move it out of {self.directory}."
            )

    # ------------------------------------------------------------------ writing

    def commit(self, data: ShardData, fmt: str = "parquet") -> Path | None:
        """Write one shard atomically; returns its path (None for no rows)."""
        if not len(data):
            return None
        module = FORMATS[fmt]
        shards = self.directory / "shards"
        tmp = atomic.temp_path(shards, f"shard{module.SUFFIX}")
        try:
            module.write(tmp, self.header, data)
            # Named by its content: unique across concurrent writers, and checkable by verify.
            target = shards / f"{time.time_ns():020d}-{_file_sha256(tmp)[:16]}{module.SUFFIX}"
            atomic.commit_file(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if self._index is not None:
            for d, p, e in zip(data.digests, data.paths, data.errors, strict=True):
                if e is None or d not in self._index:
                    self._index[d] = (p, e)
        return target

    # ------------------------------------------------------------------ maintenance

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the cache's writer lock; a second writer gets a clear error, never interleaved writes."""
        path = self.directory / ".lock"
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise StoreError(
                    f"another extract ({holder}) is writing to {self.directory}; wait for it to finish or stop it."
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
            fh.flush()
            _HELD_LOCKS.add(fh.fileno())
            try:
                yield
            finally:
                _HELD_LOCKS.discard(fh.fileno())
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)

    def verify(self) -> list[str]:
        """Problems found re-checking every shard (empty when the cache is sound)."""
        problems = []
        for shard in self.shard_paths():
            expected = shard.stem.rsplit("-", 1)[-1]
            if _file_sha256(shard)[: len(expected)] != expected:
                problems.append(f"{shard}: contents changed since it was written (hash mismatch)")
                continue
            try:
                self._check_header(shard)
                module = _BY_SUFFIX[shard.suffix]
                digests, _, _ = module.read_keys(shard)
                for layer in self.layers:
                    module.read_layer(shard, layer, self.header.dims[layer])
            except Exception as exc:  # any failure to read is a finding, not a crash
                problems.append(f"{shard}: unreadable ({exc})")
                continue
            if len(set(digests)) != len(digests):
                problems.append(f"{shard}: repeats a digest")
        return problems

    def remove_leftovers(self) -> int:
        """Delete temp files of interrupted writers (call only while holding the writer lock)."""
        leftovers = list((self.directory / "shards").glob(f"{atomic.TEMP_PREFIX}*"))
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.shard_paths())


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def caches(parent: Path) -> list[EmbeddingStore]:
    """Every model cache under `parent` (cache/embeddings)."""
    if not Path(parent).is_dir():
        return []
    return [EmbeddingStore.open(d) for d in sorted(Path(parent).iterdir()) if (d / "card.json").exists()]
