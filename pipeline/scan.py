"""scan stage: read each new image once, and tell DVC whether the data changed without DVC
walking it.

Two costs it removes. The manifest hashes every file (sha256, the cache key); had DVC hashed the
data folder too (md5), 15 GB would be read twice. And had the manifest depended on the data
folder, DVC would walk that folder six times whenever it changed (to check it, twice for its run
cache, and before and after the manifest runs: one `stat` and one hash-cache lookup per file
each time), and once on every no-op; on 30,000 files 6.5 s of each new batch of images, and
ten times that on an FF++-sized dataset.

So this stage runs first, on every `dvc repro` (`always_changed`; a few tenths of a second when
nothing is new), and the manifest depends on its output, `cache/data.json`, instead of the data:
the number of files, their bytes, and one digest of every file's path and md5. The json changes
exactly when a file is added, removed, renamed or changed, so DVC reruns the manifest exactly
then, and it is the same on every machine holding the same files (paths relative to
`data.root`). It is small and lives in git (`cache: false`), like `dvc.lock`.

Each file's md5 comes, in this order, from this machine's memory of it (`cache/md5.parquet`,
keyed by path, size, mtime and ctime, and the same per data root for every workspace on the
machine, `file_index.machine_md5s`: a queued experiment's copy of the repo, a second clone),
from DVC's own hash cache (a file DVC pulled or checked
out: a teammate's copy, a queued experiment's workspace; DVC keys it by inode, mtime and size),
or from reading the file once, which also gives the sha256 and header facts the manifest needs
(`cache/scan.parquet`, until a manifest holds them). A file DVC knows is not read here; the
manifest reads it if it runs at all. A scan stopped midway (Ctrl-C, SIGTERM) writes what it
read before it stops (`keep`): minutes of reading on a large dataset are not read again.

On a machine without the images (none of the dataset folders exists: a teammate who pulls the
embeddings only) the recorded `cache/data.json` is kept, so the manifest and extract are not
rerun there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import atomic, file_index, images, perturb
from pipeline.config import Settings
from pipeline.outputs import Outputs

if TYPE_CHECKING:
    from dvc.repo import Repo

log = logging.getLogger(__name__)

Found = tuple[str, str, os.stat_result]  # a file: its path in the manifest, its full path, its stat


def run(settings: Settings, outputs: Outputs) -> None:
    write_extract_settings(settings, outputs.extract_settings)
    if not any(settings.dataset_dir(name).is_dir() for name in settings.data.datasets) and outputs.data.exists():
        log.info(
            "scan: none of the dataset folders exists here (a machine without the images): %s is kept as recorded, "
            "so the manifest is not rerun",
            outputs.data,
        )
        return
    files = list(current_files(settings))
    pending, todo = new_files(outputs, files)
    remembered = file_index.read_md5s(outputs.md5s)
    machine = file_index.machine_md5s(settings.data_root)
    shared = file_index.read_md5s(machine) if machine else {}
    known = {**shared, **remembered}
    md5s = {p: known[p] for p, _, st in files if known.get(p, (None,))[0] == file_index.stamp(st)}
    unknown = [f for f in files if f[0] not in md5s]
    try:
        if unknown:
            with dvc_repo(settings.base_dir) as repo:
                known_to_dvc = md5s_from_dvc(repo, [full for _, full, _ in unknown])
            if known_to_dvc:
                log.info("scan: DVC holds the md5 of %d files already; they are not read", len(known_to_dvc))
            for path, full, st in unknown:
                if full in known_to_dvc:
                    md5s[path] = (file_index.stamp(st), known_to_dvc[full])
            new = {path for path, _, _ in todo}
            read_once([f for f in unknown if f[1] not in known_to_dvc], new, pending, md5s)
    finally:  # also when stopped (SIGTERM, Ctrl-C): what was read is kept, the next scan reads the rest
        keep(outputs, pending, md5s, remembered, machine, shared)
    write_data(outputs.data, files, md5s)


def write_extract_settings(settings: Settings, path: Path) -> None:
    """`cache/extract-settings.json`, what the extract stage depends on instead of the whole
    `evaluate` section and `train.datasets` (`perturb.embedded_for_evaluate`): a change there that
    embeds nothing (evaluate's seeds, bootstrap or protocols; the fakes a probe trains on) reran
    extract, which on a teammate's machine without the images and the model stopped the whole
    `dvc repro --pull --allow-missing`. Written on every machine, images or not (the scan runs on
    every repro), and only when it changed."""
    text = json.dumps(perturb.embedded_for_evaluate(settings), indent=1, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic.write_bytes(path, text.encode())


def keep(
    outputs: Outputs,
    pending: file_index.Known,
    md5s: file_index.Md5s,
    remembered: file_index.Md5s,
    machine: Path | None,
    shared: file_index.Md5s,
) -> None:
    """Write what the files read gave: their facts for the manifest, and their md5s, in this
    project's memory and (where it gained any) this machine's."""
    file_index.write_known(pending, outputs.scanned)
    if md5s != remembered:
        file_index.write_md5s(md5s, outputs.md5s)
    if machine is not None and {**shared, **md5s} != shared:
        try:
            machine.parent.mkdir(parents=True, exist_ok=True)
            file_index.write_md5s({**shared, **md5s}, machine)
        except OSError as exc:  # an optimisation: never fail the run over it
            log.info("scan: this machine's md5 memory %s could not be written (%s)", machine, exc)


def new_files(outputs: Outputs, files: list[Found]) -> tuple[file_index.Known, list[Found]]:
    """What earlier scans read that no manifest holds yet (for files still unchanged), and the
    files whose facts neither the manifest nor a scan knows."""
    known = file_index.read_stamps(outputs.manifest)
    earlier = file_index.read_known(outputs.scanned)
    pending: file_index.Known = {}
    todo = []
    for path, full, st in files:
        stamp = file_index.stamp(st)
        if known.get(path) == stamp:
            continue
        if path in earlier and earlier[path][0] == stamp:
            pending[path] = earlier[path]
        else:
            todo.append((path, full, st))
    return pending, todo


def read_once(todo: list[Found], new: set[str], pending: file_index.Known, md5s: file_index.Md5s) -> None:
    """Read each file once: its md5 goes into `md5s`, and the facts of those in `new` (unknown
    to the manifest) into `pending`. Unreadable files get no md5: `write_data` counts them
    apart, and the manifest tries again and reports them."""
    if not todo:
        return
    log.info("scan: reading %d new or changed files once (sha256 and header for the manifest, md5)", len(todo))
    read: dict = {}
    try:
        file_index.read_into([full for _, full, _ in todo], images.inspect_file_md5, "scanning", read.__setitem__)
    finally:  # a scan stopped midway keeps every file it read
        for i in sorted(read):
            if read[i] is not None:
                (path, _, st), (facts, md5) = todo[i], read[i]
                md5s[path] = (file_index.stamp(st), md5)
                if path in new:
                    pending[path] = (file_index.stamp(st), facts)


def write_data(target: Path, files: list[Found], md5s: file_index.Md5s) -> None:
    """`cache/data.json`: what the manifest depends on, rewritten only when it changes. An
    unreadable file enters the digest by its size and mtime, so that it counts as changed once
    it is replaced."""
    digest = hashlib.sha256()
    unreadable = 0
    for path, _, st in sorted(files):
        if path in md5s:
            digest.update(f"{path}\t{md5s[path][1]}\n".encode())
        else:
            unreadable += 1
            digest.update(f"{path}\tunreadable {st.st_size} {st.st_mtime_ns}\n".encode())
    data = {
        "files": len(files),
        "bytes": sum(st.st_size for _, _, st in files),
        "unreadable": unreadable,
        "digest": digest.hexdigest(),
        "what": "sha256 of the sorted lines '<path relative to data.root>\\t<md5 of its bytes>' (pipeline/scan.py)",
    }
    text = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    if not target.exists() or target.read_bytes() != text:
        atomic.write_bytes(target, text)


def current_files(settings: Settings) -> Iterator[Found]:
    """Every media file in the dataset folders that exist;
    a missing folder is the manifest's error to report."""
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
        log.info("scan: no DVC repository to ask for md5s (%s: %s)", type(exc).__name__, exc)
        repo = None
    try:
        yield repo
    finally:
        if repo is not None:
            repo.close()


def md5s_from_dvc(repo: Repo | None, paths: list[str]) -> dict[str, str]:
    """{path: md5} of the paths DVC's hash cache holds (for their current inode, mtime and size)."""
    if repo is None:
        return {}
    try:
        return {
            path: hash_info.value
            for path, _, hash_info in repo.state.get_many(paths, repo.fs, {})
            if hash_info is not None and hash_info.name == "md5"
        }
    except Exception as exc:  # an optimisation: never fail the run over it
        log.info("scan: DVC's hash cache could not be read (%s: %s)", type(exc).__name__, exc)
        return {}
