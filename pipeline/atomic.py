"""Commit files atomically: write a temp file beside the target, fsync, rename, fsync the dir.

A reader (or a crash) sees either the old file or the complete new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates 0600 files; committed files get the usual umask-derived mode instead, so a
# teammate on a shared filesystem can read them.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


TEMP_PREFIX = ".tmp-"


def temp_path(directory: Path, name: str) -> Path:
    """A new empty temp file in `directory` (same filesystem as the target, so rename is atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}.", dir=directory)
    os.close(fd)
    return Path(tmp)


def commit_file(tmp: Path, target: Path) -> None:
    """Make the written temp file `target`, durably: fsync, rename, fsync the directory."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `target` durably."""
    target = Path(target)
    tmp = temp_path(target.parent, target.name)
    try:
        yield tmp
        commit_file(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a new temp directory to fill; on success it replaces `target` as a whole (the old
    one is renamed away, then removed), so a reader never sees old and new files mixed and a
    failure leaves the old directory untouched."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if target.exists():
            old = target.parent / f"{TEMP_PREFIX}{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(target: Path, data: bytes) -> None:
    """Commit `data` as `target`; an OSError (a full disk, say) names the target and leaves nothing."""
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        if exc.filename == str(target) or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(target)) from exc


def write_json(target: Path, obj: object, sort_keys: bool = True) -> None:
    """Stable JSON (fixed indent; sorted keys unless the caller's order is itself stable and
    meaningful) so unchanged results give unchanged bytes."""
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n").encode())
