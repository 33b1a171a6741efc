"""Media files under the dataset folders, and what is known about each without reading it again.

Shared by the `scan` and `manifest` stages. A file's facts (`images.FileFacts`: sha256 and
header) are remembered with its stamp (size, mtime, ctime): while the stamp is unchanged the
file is not read again. The memory is a Parquet table with the manifest's own columns, so the
manifest is one such table and the scan stage's `cache/scan.parquet` (files not yet in a
manifest) another.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import atomic, frames
from pipeline.images import IMAGE_SUFFIXES, FileFacts
from pipeline.manifest_table import CONTENT_COLUMNS

MEDIA_SUFFIXES = IMAGE_SUFFIXES | frames.VIDEO_SUFFIXES
# Picture and video formats that phones and cameras write but the pipeline does not read: each
# such file is named among the problems, never left out without a word (other files are not media).
UNREAD_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".tif", ".tiff", ".gif"})
UNREAD_VIDEO_SUFFIXES = frozenset({".m4v", ".3gp", ".mpg", ".mpeg", ".wmv", ".flv", ".mts", ".m2ts"})

Stamp = tuple[int, int, int]  # size, mtime_ns, ctime_ns (ctime changes on every write, even one restoring the mtime)
Known = dict[str, tuple[Stamp, FileFacts]]  # path as the manifest writes it -> (stamp, facts)
Md5s = dict[str, tuple[Stamp, str]]  # path as the manifest writes it -> (stamp, md5 of the bytes)
T = TypeVar("T")


def stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def walk_images(folder: Path, problems: list[str]) -> Iterable[tuple[str, os.stat_result]]:
    """(path, stat) of every regular media file under `folder`, folders and files in sorted order,
    following links but never a loop or a folder twice. What is skipped goes into `problems`
    (unreadable folders, FIFOs and devices named like images, names that are not valid UTF-8), so
    nothing is left out silently. Plain strings and `os.scandir`: the scan stage walks every file
    on every `dvc repro`, and pathlib would triple its cost."""
    seen: set[tuple[int, int]] = set()
    todo = [str(folder)]
    while todo:
        dirpath = todo.pop()
        try:
            st = os.stat(dirpath)
            with os.scandir(dirpath) as it:
                entries = list(it)
        except OSError as exc:
            problems.append(f"{dirpath}: folder not readable ({exc.strerror})")
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked: a loop
            problems.append(f"{dirpath}: a link to a folder already scanned (a loop?), skipped")
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs, files = [], []
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if _is_dir(entry):
                if _utf8(entry.name):
                    dirs.append(entry.name)
                else:
                    problems.append(f"{entry.path!r}: folder name is not valid UTF-8; rename it")
            elif entry.name.startswith("."):
                continue
            elif suffix in MEDIA_SUFFIXES:
                files.append(entry.name)
            elif suffix in UNREAD_IMAGE_SUFFIXES or suffix in UNREAD_VIDEO_SUFFIXES:
                to = ".jpg or .png" if suffix in UNREAD_IMAGE_SUFFIXES else ".mp4"
                where = entry.path if _utf8(entry.name) else repr(entry.path)
                problems.append(f"{where}: {suffix} files are not read; convert them to {to}")
        for fname in sorted(files):
            full = os.path.join(dirpath, fname)
            if not _utf8(fname):
                problems.append(f"{full!r}: file name is not valid UTF-8; rename it")
                continue
            try:
                st = os.stat(full)
            except OSError as exc:  # a broken link, a permission problem: skip, never stop
                problems.append(f"{full}: {exc.strerror}")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{full}: not a regular file (a FIFO, socket or device)")
                continue
            yield full, st
        todo += [os.path.join(dirpath, d) for d in sorted(dirs, reverse=True)]  # popped in sorted order


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk hands undecodable bytes over as surrogates
        return False
    return True


def display_path(full: str, root: Path) -> str:
    """The path the manifest records: relative to the data root, else absolute."""
    prefix = os.path.join(str(root), "")
    if full.startswith(prefix):
        return full[len(prefix) :].replace(os.sep, "/")
    return Path(full).resolve().as_posix()


def read_all(paths: list[Path], inspect: Callable[[Path], T], desc: str) -> list[T]:
    """`inspect` of every path, in threads (hashing releases the GIL), in order, with progress."""
    results: list = [None] * len(paths)
    read_into(paths, inspect, desc, results.__setitem__)
    return results


def read_into(paths: list[Path], inspect: Callable[[Path], T], desc: str, take: Callable[[int, T], None]) -> None:
    """`inspect` of every path, in threads, with progress; `take(i, result)` as soon as path i is
    read (in the reading thread, in any order). Stopped (SIGTERM, Ctrl-C), the reads not yet started
    are cancelled, and those in flight finish and are taken: whatever was read, the caller has."""

    def read(numbered: tuple[int, Path]) -> None:
        take(numbered[0], inspect(numbered[1]))

    pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2))
    try:
        for _ in tqdm(pool.map(read, enumerate(paths)), total=len(paths), desc=desc, unit="file", leave=False):
            pass  # an error of `inspect` itself (bad files are results) stops the reading
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_stamps(path: Path) -> dict[str, Stamp]:
    """Only the stamps of a manifest (or the scan stage's table): what the scan needs to tell
    known files from new ones, read fast (it runs on every `dvc repro`); empty if unreadable."""
    table = _read(path, ["path", "size", "mtime_ns", "ctime_ns"])
    if table is None:
        return {}
    cols = [table.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "ctime_ns")]
    return {p: (size, mtime, ctime) for p, size, mtime, ctime in zip(*cols, strict=True)}


def read_known(path: Path) -> Known:
    """What a manifest (or the scan stage's table) says about each file; empty if unreadable."""
    t = _read(path, ["path", "size", "mtime_ns", "ctime_ns", *CONTENT_COLUMNS])
    if t is None:
        return {}
    cols = t.to_pydict()
    ranked = [frames.is_ranked(d) for d in cols["digest"]]
    cols["digest"] = [frames.file_digest(d) for d in cols["digest"]]  # a video frame's key -> the file's
    facts = [
        FileFacts(**dict(zip(CONTENT_COLUMNS, values, strict=True)), ranked=r)
        for *values, r in zip(*(cols[c] for c in CONTENT_COLUMNS), ranked, strict=True)
    ]
    stamps = zip(cols["size"], cols["mtime_ns"], cols["ctime_ns"], strict=True)
    return {p: (s, f) for p, s, f in zip(cols["path"], stamps, facts, strict=True)}


def _read(path: Path, columns: list[str]) -> pa.Table | None:
    if not path.exists():
        return None
    try:
        table = pq.ParquetFile(path).read(columns=columns)  # not pq.read_table: no pyarrow.dataset import
    except (pa.ArrowInvalid, OSError, KeyError):
        return None
    return table if table.num_columns == len(columns) else None  # a column missing: an older version's table


def write_known(known: Known, path: Path) -> None:
    """`known` as a table `read_known` reads back (atomically); no file when there is nothing."""
    if not known:
        path.unlink(missing_ok=True)
        return
    paths = sorted(known)
    columns = {"path": paths, "size": [], "mtime_ns": [], "ctime_ns": [], **{c: [] for c in CONTENT_COLUMNS}}
    for p in paths:
        (size, mtime_ns, ctime_ns), facts = known[p]
        columns["size"].append(size)
        columns["mtime_ns"].append(mtime_ns)
        columns["ctime_ns"].append(ctime_ns)
        for c in CONTENT_COLUMNS:
            columns[c].append(getattr(facts, c))
        columns["digest"][-1] = frames.key(facts.digest, ranked=facts.ranked)  # a ranked video: `<sha256>#`
    with atomic.atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp, compression="zstd")


def read_md5s(path: Path) -> Md5s:
    """What `write_md5s` wrote; empty if unreadable."""
    table = _read(path, ["path", "size", "mtime_ns", "ctime_ns", "md5"])
    if table is None:
        return {}
    cols = [table.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "ctime_ns", "md5")]
    return {p: ((size, mtime, ctime), md5) for p, size, mtime, ctime, md5 in zip(*cols, strict=True)}


def machine_md5s(data_root: Path) -> Path | None:
    """Where this machine remembers the md5s of the files under `data_root` for every workspace
    that scans them (a queued or `--temp` experiment's copy of the repo, a second clone), beside
    the workspace's own `cache/md5.parquet`: `$XDG_CACHE_HOME` (default `~/.cache`)
    `/ffpp-cache/md5/<sha256 of the data root>.parquet`. None without a home folder."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home folder to resolve
        return None
    name = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:16]
    return base / "ffpp-cache" / "md5" / f"{name}.parquet"


def write_md5s(md5s: Md5s, path: Path) -> None:
    """`md5s` as a table `read_md5s` reads back (atomically)."""
    paths = sorted(md5s)
    stamps = [md5s[p][0] for p in paths]
    columns = {
        "path": paths,
        "size": [s[0] for s in stamps],
        "mtime_ns": [s[1] for s in stamps],
        "ctime_ns": [s[2] for s in stamps],
        "md5": [md5s[p][1] for p in paths],
    }
    with atomic.atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp, compression="zstd")
