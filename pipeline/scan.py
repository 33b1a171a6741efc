"""scan stage: read each new image once, before DVC does, so that it is never read twice.

DVC hashes a stage's dependencies (md5) before it runs the stage, and the manifest hashes the
same files again (sha256, the cache key): on 15 GB of frames that is two full passes. This stage
runs first, on every `dvc repro` (`always_changed`, a few tenths of a second when nothing is new):
it reads each file that neither the manifest nor an earlier scan knows, once, computing both
hashes and the header facts. The facts go to `cache/scan.parquet` (machine-local, the manifest's
stat cache for files it has not seen yet); the md5s go into DVC's own hash cache, keyed like DVC
keys it (path, inode, mtime, size), so that DVC finds them instead of reading the files.

Handing DVC the md5s is an optimisation only: outside a DVC repo, or if DVC's cache refuses
them, DVC reads the files itself, as it always has. A file that changes after it was read is
never handed over (its stamp no longer matches), so DVC never records a hash of other bytes.
Its output `cache/scan.done` never changes, so the manifest reruns only when the data does, and
on a machine without the images (a teammate's) the scan finds nothing and the manifest is skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline import file_index, images
from pipeline.config import Settings
from pipeline.outputs import Outputs

log = logging.getLogger(__name__)

DONE = "the scan stage ran (pipeline/scan.py); this file never changes\n"


def run(settings: Settings, outputs: Outputs) -> None:
    known = file_index.read_stamps(outputs.manifest)
    pending = file_index.read_known(outputs.scanned)
    keep: file_index.Known = {}
    todo: list[tuple[str, str, os.stat_result]] = []
    for path, full, st in current_files(settings):
        stamp = file_index.stamp(st)
        if known.get(path) == stamp:
            continue
        if path in pending and pending[path][0] == stamp:
            keep[path] = pending[path]
            continue
        todo.append((path, full, st))
    hashed = []
    if todo:
        log.info("scan: reading %d new or changed files once (sha256 for the cache, md5 for DVC)", len(todo))
        read = file_index.read_all([full for _, full, _ in todo], images.inspect_file_md5, "scanning")
        for (path, full, st), result in zip(todo, read, strict=True):
            if result is not None:  # unreadable: the manifest tries again and reports it
                facts, md5 = result
                keep[path] = (file_index.stamp(st), facts)
                hashed.append((full, st, md5))
    file_index.write_known(keep, outputs.scanned)
    if hashed:
        seed_dvc(settings.base_dir, hashed)
    if not outputs.scan_done.exists() or outputs.scan_done.read_text() != DONE:
        outputs.scan_done.parent.mkdir(parents=True, exist_ok=True)
        outputs.scan_done.write_text(DONE)


def current_files(settings: Settings) -> Iterator[tuple[str, str, os.stat_result]]:
    """(manifest path, full path, stat) of every media file in the dataset folders that exist;
    a missing folder is the manifest's error to report (and normal on a machine without images)."""
    root, problems = settings.data_root, []
    for name in sorted(settings.data.datasets):
        folder = settings.dataset_dir(name)
        if folder.is_dir():
            for full, st in file_index.walk_images(folder, problems):
                yield file_index.display_path(full, root), full, st


def seed_dvc(project: Path, hashed: list[tuple[str, os.stat_result, str]]) -> None:
    """Put each (file, stat before it was read, md5) into the hash cache of the DVC repo holding
    `project`, unless the file has changed since. Any failure leaves DVC to hash the files itself."""
    try:
        from dvc.repo import Repo
        from dvc_data.hashfile.hash_info import HashInfo

        with Repo(str(project)) as repo:
            items = []
            for full, st, md5 in hashed:
                info = repo.fs.info(full)
                if (info["ino"], info["size"], info["mtime"]) == (st.st_ino, st.st_size, st.st_mtime):
                    items.append((full, HashInfo("md5", md5), info))
            repo.state.save_many(items, repo.fs)
        log.info("scan: DVC was given the md5 of %d files, so it does not read them again", len(items))
    except Exception as exc:  # an optimisation: never fail the run over it
        log.info("scan: DVC will hash the new files itself (%s: %s)", type(exc).__name__, exc)
