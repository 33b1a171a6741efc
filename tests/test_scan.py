"""The scan stage: each new file is read once (its facts serve the manifest), and `cache/data.json`,
what the manifest depends on instead of the data folder, changes exactly when the data does.
(That a whole `dvc repro` then opens each image once is tests/test_dvc.py's audit-hook test.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config, file_index, images, manifest, scan
from pipeline.outputs import Outputs
from tests.conftest import run_terminated, terminating_at
from tests.test_dvc import sh
from tests.test_videos import write_video


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("frame.png", ("png", 40, 30, -1, -1)),
        ("frame.jpg", ("jpeg", 40, 30, 80, -1)),
        ("clip.mp4", ("mov", 64, 48, -1, 5)),
        ("broken.png", ("unknown", -1, -1, -1, -1)),
    ],
)
def test_one_read_gives_the_manifests_facts_and_the_md5(tmp_path, name, header):
    path = tmp_path / name
    if name.endswith(".mp4"):
        write_video(path, n=5)  # 64 x 48
    elif name == "broken.png":
        path.write_bytes(b"\x89PNG not really")
    else:
        Image.effect_noise((40, 30), 50).convert("RGB").save(path, quality=80)
    facts, md5 = images.inspect_file_md5(path)
    data = path.read_bytes()
    assert facts == images.FileFacts(hashlib.sha256(data).hexdigest(), *header), "sha256 (the key) and header"
    assert md5 == hashlib.md5(data).hexdigest(), "the md5 (DVC's hash) of the same bytes"
    assert images.inspect_file_md5(path, md5=False) == (facts, "")


def data_digest(data: Path) -> dict:
    """What cache/data.json must say about the images under `data`, computed here from the bytes."""
    files = sorted((p.relative_to(data).as_posix(), p) for p in data.rglob("*.png"))
    lines = "".join(f"{rel}\t{hashlib.md5(p.read_bytes()).hexdigest()}\n" for rel, p in files)
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for _, p in files),
        "digest": hashlib.sha256(lines.encode()).hexdigest(),
    }


def recorded(outputs: Outputs) -> dict:
    return {k: v for k, v in json.loads(outputs.data.read_text()).items() if k in ("files", "bytes", "digest")}


def counting_reads(monkeypatch) -> list:
    reads = []
    real = images.inspect_file_md5
    monkeypatch.setattr(images, "inspect_file_md5", lambda path: reads.append(path) or real(path))
    return reads


def test_the_manifest_reuses_the_scan_and_reads_nothing(project, monkeypatch):
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    scan.run(settings, outputs)  # not a DVC repo: every file is read, once
    assert recorded(outputs) == data_digest(project / "data")
    scanned = file_index.read_known(outputs.scanned)
    files = {p.relative_to(project / "data").as_posix(): p for p in (project / "data").rglob("*.png")}
    assert scanned.keys() == files.keys()
    assert all(scanned[k][1] == images.inspect_file(p) for k, p in files.items())

    reads = []
    real_inspect = images.inspect_file
    monkeypatch.setattr(images, "inspect_file", lambda path: reads.append(path) or real_inspect(path))
    manifest.run(settings, outputs)
    assert reads == [], "the manifest takes what the scan read"
    scan.run(settings, outputs)
    assert not outputs.scanned.exists(), "what the manifest holds is not kept twice"

    victim = next(iter(files.values()))
    victim.write_bytes(victim.read_bytes() + b"\0")  # changed after the manifest: read again, once
    scan.run(settings, outputs)
    assert list(file_index.read_known(outputs.scanned)) == [victim.relative_to(project / "data").as_posix()]
    manifest.run(settings, outputs)
    assert reads == []


def test_a_file_the_manifest_leaves_out_as_a_duplicate_is_not_read_again(project, monkeypatch):
    """A frame whose bytes repeat one in a held-out split has no row of its own (the held-out
    copy is kept); its facts are remembered all the same, so no later manifest reads it again."""
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    scan.run(settings, outputs)
    rows = manifest.run(settings, outputs).to_pandas()
    kept = rows[(rows.dataset == "faceswap") & (rows.split == "train")].path.iloc[0]
    test_video = Path(rows[(rows.dataset == "faceswap") & (rows.split == "test")].path.iloc[0]).parent
    data = project / "data"
    shutil.copy(data / kept, data / test_video / "9999.png")  # the same bytes, in the test split
    scan.run(settings, outputs)
    rows = manifest.run(settings, outputs).to_pandas()
    assert kept not in set(rows.path) and f"{test_video.as_posix()}/9999.png" in set(rows.path), "test wins"

    scan.run(settings, outputs)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data / test_video / "9998.png")  # the data changes: a new manifest
    scan.run(settings, outputs)
    reads = []
    real_inspect = images.inspect_file
    monkeypatch.setattr(images, "inspect_file", lambda path: reads.append(path) or real_inspect(path))
    manifest.run(settings, outputs)
    assert reads == [], "the left-out original is known, and the new image was read by the scan"


def test_the_data_json_changes_exactly_when_the_data_does(project, tmp_path, monkeypatch):
    """The manifest reruns when data.json changes: on new, changed, renamed or deleted files,
    never on a no-op or a touched file, and a copy of the data elsewhere gives the same json."""
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    data = project / "data"
    scan.run(settings, outputs)
    first, before = outputs.data.read_bytes(), recorded(outputs)
    reads = counting_reads(monkeypatch)

    scan.run(settings, outputs)
    assert reads == [] and outputs.data.read_bytes() == first, "nothing new: nothing read, nothing changed"
    files = sorted(data.rglob("*.png"))
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    scan.run(settings, outputs)
    assert reads == [str(files[0])], "a touched file is read again, once"
    assert outputs.data.read_bytes() == first, "but the same bytes are the same data"

    files[1].write_bytes(files[1].read_bytes() + b"\0")
    files[2].rename(files[2].with_name("renamed.png"))
    files[3].unlink()
    Image.new("RGB", (8, 8)).save(files[4].with_name("new.png"))
    scan.run(settings, outputs)
    assert recorded(outputs) == data_digest(data)
    assert recorded(outputs)["digest"] != before["digest"]
    changed = [files[1], files[2].with_name("renamed.png"), files[4].with_name("new.png")]
    assert sorted(reads[1:]) == sorted(map(str, changed)), "each changed or new file is read once"

    elsewhere = tmp_path / "elsewhere"  # the same files on another machine (new inodes and times)
    shutil.copytree(project, elsewhere, ignore=shutil.ignore_patterns("cache"))
    params = (elsewhere / "params.yaml").read_text().replace(str(data), str(elsewhere / "data"))
    (elsewhere / "params.yaml").write_text(params)
    scan.run(config.load(elsewhere / "params.yaml"), Outputs(elsewhere))
    assert Outputs(elsewhere).data.read_bytes() == outputs.data.read_bytes()


def test_a_machine_without_the_images_keeps_the_recorded_data_json(project):
    """A teammate who pulls only the embeddings has data.json from git and no dataset folder:
    the json stays as recorded, so DVC does not rerun the manifest there."""
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    scan.run(settings, outputs)
    recorded_bytes = outputs.data.read_bytes()
    shutil.rmtree(project / "data")
    scan.run(settings, outputs)
    assert outputs.data.read_bytes() == recorded_bytes
    outputs.data.unlink()  # nothing recorded (a new project whose data is not there yet): an empty dataset
    scan.run(settings, outputs)
    assert json.loads(outputs.data.read_text())["files"] == 0


def test_files_dvc_already_knows_are_not_read(project, monkeypatch):
    """A teammate who pulled the images with DVC (or a queued experiment's fresh workspace) has
    files our stamps do not know but DVC does: the scan takes their md5 from DVC and reads none
    (the manifest reads them once, if it runs at all)."""
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    sh(project, "dvc", "add", "-q", "data")  # DVC hashes the files and checks them out again
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    reads = counting_reads(monkeypatch)
    scan.run(settings, outputs)
    assert reads == [] and not outputs.scanned.exists()
    assert recorded(outputs) == data_digest(project / "data")
    new = project / "data" / "Train_Real" / "Real_youtube" / "000" / "0099.png"
    Image.new("RGB", (8, 8)).save(new)
    scan.run(settings, outputs)
    assert reads == [str(new)], "a file DVC does not know is read once"
    assert recorded(outputs) == data_digest(project / "data")


def test_another_workspace_on_the_same_data_reads_nothing(project, tmp_path, monkeypatch):
    """A queued or `--temp` experiment runs in a fresh copy of the repo, and a second clone is
    another folder: with the data outside the repo (an absolute data.root, as queued experiments
    need) DVC knows none of its files there, and the workspace's own memory is not copied. The
    md5s are also remembered per machine, by data root, so that workspace reads none of them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine"))
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    assert settings.data_root.is_absolute()
    scan.run(settings, outputs)
    other = tmp_path / "workspace"
    other.mkdir()
    shutil.copy(project / "params.yaml", other / "params.yaml")
    reads = counting_reads(monkeypatch)
    scan.run(config.load(other / "params.yaml"), Outputs(other))
    assert reads == [], "the other workspace read the data again"
    assert recorded(Outputs(other)) == recorded(outputs) == data_digest(project / "data")


def test_a_scan_stopped_midway_stops_at_once_and_keeps_what_it_read(project, monkeypatch):
    """SIGTERM (a batch system's time limit) or Ctrl-C during the first scan of a large dataset,
    minutes of reading on a network filesystem: the scan stops with the files its threads are
    reading, not after every file queued for them, and what it read is kept (`cache/md5.parquet`,
    `cache/scan.parquet`): the next scan reads only the rest. Here a real SIGTERM, handled as
    `python -m pipeline` handles it, arrives while the 20th file is read."""
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    files = {p.relative_to(project / "data").as_posix() for p in (project / "data").rglob("*.png")}
    reads, real = [], images.inspect_file_md5
    monkeypatch.setattr(images, "inspect_file_md5", terminating_at(20, real, reads))
    run_terminated(scan.run, settings, outputs)
    assert len(reads) < 40 < len(files), f"{len(reads)} of {len(files)} files read after the stop"
    assert not outputs.data.exists(), "data.json is written only by a scan that read everything"
    kept = set(file_index.read_md5s(outputs.md5s))
    assert kept and kept == set(file_index.read_known(outputs.scanned)) and kept < files

    reads.clear()
    monkeypatch.setattr(images, "inspect_file_md5", lambda path: reads.append(path) or real(path))
    scan.run(settings, outputs)
    assert sorted(Path(p).relative_to(project / "data").as_posix() for p in reads) == sorted(files - kept)
    assert recorded(outputs) == data_digest(project / "data")


PEAK_GROWTH = """
import re, sys
from pathlib import Path
from pipeline import file_index, images
def peak():  # VmHWM: this process's own peak (ru_maxrss starts at the parent's, across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
import av  # imported by the first video read: not counted
images.VIDEO_BYTES.limit = int(sys.argv[1])
paths = sorted(Path(sys.argv[2]).glob("*.mp4"))
before = peak()
file_index.read_all(paths, images.inspect_file, "hashing")
print(peak() - before)
"""


def test_the_hashing_threads_hold_whole_videos_within_a_byte_budget(tmp_path):
    # A video is read whole (its hash and its facts come from the same bytes), and the hashing
    # threads read several files at once: long videos (2 GB each) could fill a laptop's memory.
    # Measured as the growth of the peak memory of a process that hashes six 40 MB "videos".
    import subprocess
    import sys

    size = 40_000_000
    # The same bytes every run, which FFmpeg rejects as no format: with fresh random bytes the peak
    # under the cap varied from run to run (1.1 files here, 1.7 in one CI run).
    for i in range(6):
        (tmp_path / f"{i}.mp4").write_bytes(np.random.default_rng(i).bytes(size))

    # glibc returns every block of 128 KiB or more to the system when freed (no per-thread arenas
    # keeping FFmpeg's probe buffers): the peak is what was held, not what the allocator kept.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}

    def peak_growth(limit: int) -> float:
        out = subprocess.run([sys.executable, "-c", PEAK_GROWTH, str(limit), str(tmp_path)], capture_output=True,
                             text=True, check=True, env=env).stdout  # fmt: skip
        return int(out.split()[-1]) * 1024 / size  # in files

    alone, together = peak_growth(size), peak_growth(100 * size)  # here: 1.11 and 4.1 (4 threads, 2 cores)
    assert alone < 1.5, f"a budget of one file held {alone:.2f} files' worth at once"
    assert together > alone + 1.5, f"without a budget the threads held {together:.2f} files at once, not more"


def test_a_process_forked_while_threads_hold_videos_does_not_wait_for_them():
    # A reader process forked while a thread of its parent holds 900 MB of whole videos: the copy
    # of that holding belongs to a thread the child does not have, and would block it for good.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with images.VIDEO_BYTES.holding(900 << 20):
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:  # the child: take 500 MB within 5 s, or exit 1
            taker = threading.Thread(target=lambda: images.VIDEO_BYTES.holding(500 << 20).__enter__(), daemon=True)
            taker.start()
            taker.join(5)
            os._exit(1 if taker.is_alive() else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child waited for its parent's threads"
    finally:
        release.set()
        holder.join()
