"""The embedding store: content-addressed shards of embeddings for one model fingerprint.

Layout of one model's cache::

    cache/embeddings/<model-slug>-<fingerprint>/
        card.json                 what produced the numbers (model, preprocessing, layers, ...)
        index.json                the shards this cache holds (written by the extract that holds the lock)
        shards/<time_ns>-<sha256 of the file, 16 hex>.parquet | .h5

A shard is visible only once complete (built in memory, written to a temp file, fsync, rename),
so a crash loses at most the shard being written. Keys are sha256 digests of image bytes; a
digest held by any shard is done. Shard files are read by their suffix, so one cache may hold
shards of several formats.

Integrity on every read: a shard's name ends in the hash of its bytes, and every reader checks
it (once per process and file) before trusting a number; a damaged or truncated shard, or one
that `index.json` lists and the disk lacks, is a `StoreError` naming the file and the fix
(`python -m pipeline cache repair` drops it, so the next extract re-embeds just its rows).
Shards on disk that the index does not list yet (committed by a run killed before it wrote the
index) are read like any other: their checksum vouches for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import atomic
from pipeline.config import ConfigError, flatten
from pipeline.store import hdf5, parquet, text
from pipeline.store.shard import ShardData, ShardHeader

FORMAT_VERSION = 1
FORMATS = {"parquet": parquet, "hdf5": hdf5}
_BY_SUFFIX = {module.SUFFIX: module for module in FORMATS.values()}
INDEX = "index.json"
FOREIGN = "foreign"  # where repair keeps shards of another cache that is not beside this one
REPAIR_HINT = "run `python -m pipeline cache repair` to drop it, then `dvc repro` (extract re-embeds only its rows)"
CUT_KEYS = (
    "an HDF5 shard written before 2026-11-27, whose keys were cut to 64 characters: a video frame's "
    "or a robustness variant's row stands under its video's or its image's digest"
)

# Shard files whose bytes matched their checksum in this process: (path, size, mtime_ns).
_VERIFIED: set[tuple[str, int, int]] = set()


class StoreError(ConfigError):
    """The cache on disk does not match what the caller expects."""


class DamagedShard(StoreError):
    """A shard that cannot be trusted: changed bytes, truncated, unreadable or missing."""

    def __init__(self, shard: Path, why: str):
        self.shard, self.why = shard, why
        super().__init__(f"shard {shard} is damaged ({why}); {REPAIR_HINT}.")


class ForeignShard(StoreError):
    """A sound shard of another cache (another fingerprint) in this cache's folder."""

    def __init__(self, shard: Path, fingerprint: str, layers: list[str], directory: Path):
        self.shard, self.fingerprint = shard, fingerprint
        super().__init__(
            f"shard {shard} was written for fingerprint {fingerprint} (layers {layers}), not this cache's; move it "
            f"out of {directory} (`python -m pipeline cache repair` moves it into its own cache, or aside)."
        )


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


def differences(here: dict, there: dict) -> list[tuple[str, object, object]]:
    """(key, value here, value there) for each key of two fingerprint descriptions, flattened
    (`libraries.transformers`), whose values differ."""
    here, there = flatten(here), flatten(there)  # values as JSON: a tuple here equals a card's list
    return [(k, here.get(k), there.get(k)) for k in sorted(here.keys() | there.keys()) if here.get(k) != there.get(k)]


def differences_shown(here: dict, there: dict, most: int = 3, names: tuple[str, str] = ("here", "there")) -> str:
    """`differences` for people: `libraries.transformers (5.25 here, 5.24 there)`, the first `most`."""
    shown = [
        f"{k} ({_short(mine)} {names[0]}, {_short(theirs)} {names[1]})" for k, mine, theirs in differences(here, there)
    ]
    return ", ".join(shown[:most]) + (f" and {len(shown) - most} more" if len(shown) > most else "")


def _short(value: object, width: int = 40) -> str:
    shown = "absent" if value is None else str(value)
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def directory_name(model_name: str, fp: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name.rstrip("/")).name).strip("-") or "model"
    return f"{slug}-{fp}"


def existing_cache(parent: Path, fp: str) -> Path | None:
    """The cache directory under `parent` with fingerprint `fp`, whatever model name it was made
    under; None if there is none."""
    existing = sorted(Path(parent).glob(f"*-{fp}/card.json")) if Path(parent).is_dir() else []
    return existing[0].parent if existing else None


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
        self._keys_of: dict[Path, frozenset[str]] = {}  # the digests of each shard, as `_load_index` read them
        self._cut: list[Path] | None = None  # shards holding a key cut short (`shards_with_cut_keys`)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, parent: Path, model_name: str, description: dict, dims: dict[str, int]) -> EmbeddingStore:
        """Open the cache for this description, creating it on first use."""
        fp = fingerprint(description)
        # The same numbers under another name (a local copy of a hub model) share the cache.
        directory = existing_cache(parent, fp) or Path(parent) / directory_name(model_name, fp)
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
        try:
            card = json.loads(card_path.read_text())
            ShardHeader.from_dict(card)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StoreError(
                f"{card_path} is damaged; restore it (`dvc checkout cache/embeddings`, or `dvc pull`) "
                f"or delete {directory} and re-run extract."
            ) from None
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

    def listed_shards(self) -> set[str]:
        """Names of the shards `index.json` says this cache holds."""
        path = self.directory / INDEX
        if not path.exists():
            return set()
        try:
            return set(json.loads(path.read_text())["shards"])
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{path} is damaged; run `python -m pipeline cache repair` to rebuild it.") from None

    def missing_shards(self) -> list[Path]:
        """Shards the index lists that are not on disk (deleted, or not pulled)."""
        present = {p.name for p in self.shard_paths()}
        return [self.directory / "shards" / name for name in sorted(self.listed_shards() - present)]

    def write_index(self) -> None:
        """List every shard on disk (and keep listing missing ones: only `repair` forgets them).
        Call while holding the writer lock."""
        names = self.listed_shards() | {p.name for p in self.shard_paths()}
        atomic.write_json(self.directory / INDEX, {"shards": sorted(names)})

    def _check_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise DamagedShard(
                missing[0],
                f"listed in {INDEX} but not on disk{f', with {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                "`dvc checkout`/`dvc pull` may restore it",
            )

    def _checked(self, shard: Path, read, *args):
        """read(shard, *args) once the shard's bytes match the checksum in its name (checked once
        per process and file version) and its header matches this cache; any failure to read is a
        DamagedShard naming the file."""
        try:
            st = shard.stat()
        except FileNotFoundError:
            raise DamagedShard(shard, "the file is gone") from None
        key = (str(shard), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            expected = shard.stem.rsplit("-", 1)[-1]
            if len(expected) != 16 or _file_sha256(shard)[:16] != expected:
                raise DamagedShard(shard, "its bytes do not match the checksum in its name")
            _VERIFIED.add(key)
        try:
            self._check_header(shard)
            return read(shard, *args)
        except StoreError:
            raise
        except Exception as exc:  # a format library's error on bad bytes: name the file instead
            raise DamagedShard(shard, f"unreadable: {type(exc).__name__}: {exc}") from None

    def shards_with_cut_keys(self) -> list[Path]:
        """Old HDF5 shards (`hdf5.fixed_width_keys`) that hold a key cut short: one that the shard
        repeats (the frames of one video) or that another shard also holds embedded (a robustness
        variant and its clean image): every old shard of such a pair. Where no HDF5 shard is old,
        this costs one look at each HDF5 shard's key type (none at Parquet shards); shards that
        cannot be read are left to their own checks."""
        if self._cut is None:
            old = set()
            for shard in self.shard_paths():
                with contextlib.suppress(StoreError):
                    if shard.suffix == hdf5.SUFFIX and self._checked(shard, hdf5.fixed_width_keys):
                        old.add(shard)
            cut: set[Path] = set()
            holder: dict[str, Path] = {}  # embedded key -> the first shard holding it
            for shard in self.shard_paths() if old else []:
                try:
                    digests, _, errors = self._checked(shard, _BY_SUFFIX[shard.suffix].read_keys)
                except StoreError:
                    continue
                mine: set[str] = set()
                for d, e in zip(digests, errors, strict=True):
                    if e is None:
                        if d in mine or d in holder:
                            cut |= {shard, holder.get(d, shard)} & old
                        mine.add(d)
                for d in mine:
                    holder.setdefault(d, shard)
            self._cut = sorted(cut)
        return self._cut

    def _check_keys_whole(self) -> None:
        cut = self.shards_with_cut_keys()
        if cut:
            more = f" (and {len(cut) - 1} more shard{'s' * (len(cut) > 2)})" if len(cut) > 1 else ""
            raise DamagedShard(cut[0], f"{CUT_KEYS}{more}")

    def _load_index(self) -> dict[str, tuple[str | None, str | None]]:
        if self._index is None:
            self._check_complete()
            self._check_keys_whole()
            index: dict[str, tuple[str | None, str | None]] = {}
            for shard in self.shard_paths():
                digests, paths, errors = self._checked(shard, _BY_SUFFIX[shard.suffix].read_keys)
                self._keys_of[shard] = frozenset(digests)
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
        """Digests and float32 embeddings of one shard's rows that embedded fine. A shard holding
        NaN or inf is damaged: cached before the extractor refused such vectors (an fp16 overflow)."""
        digests, values = self._checked(shard, _BY_SUFFIX[shard.suffix].read_layer, layer, self.dimension(layer))
        if not np.isfinite(values).all():
            raise DamagedShard(shard, f"its layer '{layer}' holds NaN or inf, embedded before extract checked for them")
        return digests, values

    def read(self, digests: list[str], layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of `layer` for `digests` -> (array (n, dim) float32, found mask (n,))."""
        dim = self.dimension(layer)
        self._check_complete()
        self._check_keys_whole()
        found_digests: list[str] = []
        blocks: list[np.ndarray] = []
        self._load_index()
        wanted = set(digests)  # shards holding none of them are not decoded (robustness variants, other datasets)
        shards = [s for s in self.shard_paths() if s not in self._keys_of or not wanted.isdisjoint(self._keys_of[s])]
        # Shards decode in parallel (Parquet's decoder and the checksum release the GIL), in order.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="shard-reader") as pool:
            for d, a in pool.map(lambda shard: self.read_shard(shard, layer), shards):
                found_digests += d
                blocks.append(a)
        position = {d: i for i, d in enumerate(found_digests)}
        rows = np.array([position.get(d, -1) for d in digests], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((len(digests), dim), dtype=np.float32)
        offset = 0
        for block in blocks:  # block by block: no copy of the whole layer in between
            inside = (rows >= offset) & (rows < offset + len(block))
            out[inside] = block[rows[inside] - offset]
            offset += len(block)
        return out, found

    def _check_layer(self, layer: str) -> None:
        if layer not in self.header.dims:
            raise StoreError(
                f"layer '{layer}' is not in the cache {self.directory.name} (it holds {', '.join(self.layers)}); "
                "add it to model.layers and re-run extract."
            )

    def _check_header(self, shard: Path) -> None:
        try:
            header = _BY_SUFFIX[shard.suffix].read_header(shard)
        except Exception as exc:
            raise DamagedShard(shard, f"unreadable header: {type(exc).__name__}: {exc}") from None
        if header.fingerprint != self.header.fingerprint or header.layers != self.header.layers:
            raise ForeignShard(shard, header.fingerprint, header.layers, self.directory)

    # ------------------------------------------------------------------ writing

    def commit(self, data: ShardData, fmt: str = "parquet") -> Path | None:
        """Write one shard atomically; returns its path (None for no rows)."""
        if not len(data):
            return None
        module = FORMATS[fmt]
        payload = module.to_bytes(self.header, data)
        # Named by its content: unique across concurrent writers, and checked by every reader.
        name = f"{time.time_ns():020d}-{hashlib.sha256(payload).hexdigest()[:16]}{module.SUFFIX}"
        target = self.directory / "shards" / name
        atomic.write_bytes(target, payload)
        if self._index is not None:
            self._keys_of[target] = frozenset(data.digests)
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

    def shard_problem(self, shard: Path) -> str | None:
        """Why this shard cannot be trusted (re-hashed and read in full), or None if it is sound."""
        _VERIFIED.difference_update({k for k in _VERIFIED if k[0] == str(shard)})
        try:
            module = _BY_SUFFIX[shard.suffix]
            digests, _, _ = self._checked(shard, module.read_keys)
            for layer in self.layers:
                self.read_shard(shard, layer)
        except DamagedShard as exc:
            return exc.why
        except StoreError as exc:  # a shard of another cache
            return str(exc)
        if shard in self.shards_with_cut_keys():
            return CUT_KEYS
        if len(set(digests)) != len(digests):
            return "it repeats a digest"
        return None

    def _rechecking(self, what: str) -> Iterator[Path]:
        """The shards, with a progress bar of the bytes read again (rate, ETA): a cache of every
        layer of a large model on tens of thousands of frames holds gigabytes."""
        shards = self.shard_paths()
        sizes = []
        for shard in shards:
            try:
                sizes.append(shard.stat().st_size)
            except OSError:
                sizes.append(0)
        with tqdm(total=sum(sizes), desc=f"{what} {self.directory.name}", unit="B", unit_scale=True) as bar:
            for shard, size in zip(shards, sizes, strict=True):
                yield shard
                bar.update(size)

    def verify(self) -> list[str]:
        """Problems found re-checking every shard, the index and the prompt table (empty when sound)."""
        problems = []
        try:
            problems += [f"{p}: listed in {INDEX} but missing" for p in self.missing_shards()]
        except StoreError as exc:
            problems.append(str(exc))
        for shard in self._rechecking("verifying"):
            problem = self.shard_problem(shard)
            if problem:
                problems.append(f"{shard}: {problem}")
        if (self.directory / text.FILENAME).exists():
            try:
                text.read_all(self.directory)
            except Exception as exc:
                problems.append(f"{self.directory / text.FILENAME}: unreadable ({type(exc).__name__}: {exc})")
        return problems

    def repair(self) -> list[str]:
        """Drop what cannot be trusted, so the next extract re-embeds exactly its rows; returns what
        was done. Call while holding the writer lock."""
        done = []
        try:
            listed = self.listed_shards()
        except StoreError:
            listed = set()
            done.append(f"rebuilt the damaged {INDEX}")
        for name in sorted(listed - {p.name for p in self.shard_paths()}):
            done.append(f"forgot the missing shard {name}")
        for shard in self._rechecking("repairing"):
            problem = self.shard_problem(shard)
            if not problem:
                continue
            try:
                self._checked(shard, lambda _: None)  # its bytes and its header only
            except ForeignShard as exc:
                done.append(self._send_home(shard, exc.fingerprint))
                continue
            except StoreError:
                pass
            shard.unlink()
            done.append(f"removed {shard} ({problem})")
        atomic.write_json(self.directory / INDEX, {"shards": sorted(p.name for p in self.shard_paths())})
        prompts = self.directory / text.FILENAME
        if prompts.exists():
            try:
                text.read_all(self.directory)
            except Exception:
                prompts.unlink()
                done.append(f"removed the damaged {prompts} (extract embeds the prompts again)")
        self._index = self._cut = None
        return done

    def _send_home(self, shard: Path, fp: str) -> str:
        """Move a sound shard of another cache into that cache where it is beside this one (its
        readers take it as one of theirs), else into `foreign/` here; says which."""
        home = existing_cache(self.directory.parent, fp)
        target = home / "shards" if home not in (None, self.directory) else self.directory / FOREIGN
        target.mkdir(parents=True, exist_ok=True)
        os.replace(shard, target / shard.name)  # content-named: the same name there is the same bytes
        return f"moved {shard} (a shard of another cache, fingerprint {fp}) to {target}"

    def remove_leftovers(self) -> int:
        """Delete temp files of interrupted writers (call only while holding the writer lock)."""
        leftovers = list((self.directory / "shards").glob(f"{atomic.TEMP_PREFIX}*"))
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.shard_paths())


def reasons_counted(reasons: Iterable[str]) -> str:
    """Recorded failure reasons counted by kind, most frequent first: `36 no face found, 1
    unreadable image` (a reason's detail in parentheses is left out)."""
    counts = Counter(reason.split(" (")[0] for reason in reasons)
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def cache_dirs(parent: Path) -> list[Path]:
    """Every model cache directory under `parent` (cache/embeddings), readable or not."""
    if not Path(parent).is_dir():
        return []
    return [d for d in sorted(Path(parent).iterdir()) if (d / "card.json").exists()]


def caches(parent: Path) -> list[EmbeddingStore]:
    """Every model cache under `parent` (cache/embeddings)."""
    return [EmbeddingStore.open(d) for d in cache_dirs(parent)]
