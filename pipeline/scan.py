"""scan stage: read each new image once, before DVC does, so that it is never read twice.

DVC hashes a stage's dependencies (md5) before it runs the stage, and the manifest hashes the
same files again (sha256, the cache key): on 15 GB of frames that is two full passes. This stage
runs first, on every `dvc repro` (`always_changed`, a few tenths of a second when nothing is new):
it reads each file that neither the manifest, nor an earlier scan, nor DVC knows, once, computing
both hashes and the header facts. The facts go to `cache/scan.parquet` (machine-local, the
manifest's stat cache for files it has not seen yet); the md5s go into DVC's own hash cache,
keyed like DVC keys it (path, inode, mtime, size), so that DVC finds them instead of reading the
files. A file whose md5 DVC already holds (pulled or checked out by DVC, as on a teammate's
machine or in a queued experiment's workspace) is left alone: DVC will not read it, and the
manifest reads it once if it runs at all.

Talking to DVC is an optimisation only: outside a DVC repo, or if DVC's cache refuses, DVC reads
the files itself, as it always has. A file that changes after it was read is never handed over
(its stamp no longer matches), so DVC never records a hash of other bytes. Its output
`cache/scan.done` never changes, so the manifest reruns only when the data does, and on a
machine without the images (a teammate's) the scan finds nothing and the manifest is skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import file_index, images
from pipeline.config import Settings
from pipeline.outputs import Outputs

if TYPE_CHECKING:
    from dvc.repo import Repo

log = logging.getLogger(__name__)

DONE = "the scan stage ran (pipeline/scan.py); this file never changes\n"
Found = tuple[str, str, os.stat_result]  # a file: its path in the manifest, its full path, its stat


def run(settings: Settings, outputs: Outputs) -> None:
    pending, todo = new_files(settings, outputs)
    if todo:
        with dvc_repo(settings.base_dir) as repo:
            unknown = unknown_to_dvc(repo, [full for _, full, _ in todo])
            if len(unknown) < len(todo):
                log.info(
                    "scan: DVC holds the md5 of %d new files already; it will not read them", len(todo) - len(unknown)
                )
            hashed = read_once([t for t in todo if t[1] in unknown], pending)
            give_dvc(repo, hashed)
    file_index.write_known(pending, outputs.scanned)
    if not outputs.scan_done.exists() or outputs.scan_done.read_text() != DONE:
        outputs.scan_done.parent.mkdir(parents=True, exist_ok=True)
        outputs.scan_done.write_text(DONE)


def new_files(settings: Settings, outputs: Outputs) -> tuple[file_index.Known, list[Found]]:
    """What earlier scans read that no manifest holds yet (for files still unchanged), and the
    files that neither the manifest nor a scan knows."""
    known = file_index.read_stamps(outputs.manifest)
    earlier = file_index.read_known(outputs.scanned)
    pending: file_index.Known = {}
    todo = []
    for path, full, st in current_files(settings):
        stamp = file_index.stamp(st)
        if known.get(path) == stamp:
            continue
        if path in earlier and earlier[path][0] == stamp:
            pending[path] = earlier[path]
        else:
            todo.append((path, full, st))
    return pending, todo


def read_once(todo: list[Found], pending: file_index.Known) -> list[tuple[str, os.stat_result, str]]:
    """Read each file once: its facts go into `pending` (for the manifest), its md5 comes back
    as (full path, stat before the read, md5) for DVC. Unreadable files are left to the manifest,
    which tries again and reports them."""
    if not todo:
        return []
    log.info("scan: reading %d new or changed files once (sha256 for the cache, md5 for DVC)", len(todo))
    hashed = []
    read = file_index.read_all([full for _, full, _ in todo], images.inspect_file_md5, "scanning")
    for (path, full, st), result in zip(todo, read, strict=True):
        if result is not None:
            facts, md5 = result
            pending[path] = (file_index.stamp(st), facts)
            hashed.append((full, st, md5))
    return hashed


def current_files(settings: Settings) -> Iterator[Found]:
    """Every media file in the dataset folders that exist;
    a missing folder is the manifest's error to report (and normal on a machine without images)."""
    root, problems = settings.data_root, []
    for name in sorted(settings.data.datasets):
        folder = settings.dataset_dir(name)
        if folder.is_dir():
            for full, st in file_index.walk_images(folder, problems):
                yield file_index.display_path(full, root), full, st


@contextmanager
def dvc_repo(project: Path) -> Iterator[Repo | None]:
    """The DVC repository holding `project`, or None (not a DVC repo, DVC unusable)."""
    try:
        from dvc.repo import Repo

        repo = Repo(str(project))
    except Exception as exc:  # an optimisation: never fail the run over it
        log.info("scan: no DVC repository to share hashes with (%s: %s)", type(exc).__name__, exc)
        repo = None
    try:
        yield repo
    finally:
        if repo is not None:
            repo.close()


def unknown_to_dvc(repo: Repo | None, paths: list[str]) -> set[str]:
    """The paths whose md5 DVC's hash cache lacks (for these stamps): the ones DVC would read."""
    if repo is None:
        return set(paths)
    try:
        return {path for path, _, hash_info in repo.state.get_many(paths, repo.fs, {}) if hash_info is None}
    except Exception as exc:  # an optimisation: never fail the run over it
        log.info("scan: DVC's hash cache could not be read (%s: %s)", type(exc).__name__, exc)
        return set(paths)


def give_dvc(repo: Repo | None, hashed: list[tuple[str, os.stat_result, str]]) -> None:
    """Put each (file, stat before it was read, md5) into DVC's hash cache, unless the file has
    changed since. Any failure leaves DVC to hash the files itself."""
    if repo is None or not hashed:
        return
    try:
        from dvc_data.hashfile.hash_info import HashInfo

        items = []
        for full, st, md5 in hashed:
            info = repo.fs.info(full)
            if (info["ino"], info["size"], info["mtime"]) == (st.st_ino, st.st_size, st.st_mtime):
                items.append((full, HashInfo("md5", md5), info))
        repo.state.save_many(items, repo.fs)
        log.info("scan: DVC was given the md5 of %d files, so it does not read them again", len(items))
    except Exception as exc:  # an optimisation: never fail the run over it
        log.info("scan: DVC will hash the new files itself (%s: %s)", type(exc).__name__, exc)
