"""The scan stage: each new file is read once; its facts serve the manifest, its md5 serves DVC.
(That a whole `dvc repro` then opens each image once is tests/test_dvc.py's audit-hook test.)"""

from __future__ import annotations

import hashlib

import pytest
from dvc.repo import Repo
from PIL import Image

from pipeline import config, file_index, images, manifest, scan
from pipeline.outputs import Outputs
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
def test_one_read_gives_the_manifests_facts_and_dvcs_md5(tmp_path, name, header):
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
    assert md5 == hashlib.md5(data).hexdigest(), "the md5 is DVC's hash of the same bytes"
    assert images.inspect_file_md5(path, md5=False) == (facts, "")


def test_the_manifest_reuses_the_scan_and_reads_nothing(project, monkeypatch):
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    scan.run(settings, outputs)  # not a DVC repo: DVC is left to hash by itself, and the run goes on
    assert outputs.scan_done.read_text() == scan.DONE
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


def test_dvc_gets_the_md5_of_files_unchanged_since_they_were_read(tmp_path):
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    kept, changed = tmp_path / "kept.png", tmp_path / "changed.png"
    for i, path in enumerate((kept, changed)):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
    before = [(str(p), p.stat(), hashlib.md5(p.read_bytes()).hexdigest()) for p in (kept, changed)]
    changed.write_bytes(changed.read_bytes() + b"\0")  # between the scan's read and the hand-over

    with scan.dvc_repo(tmp_path) as repo:
        assert scan.unknown_to_dvc(repo, [str(kept), str(changed)]) == {str(kept), str(changed)}
        scan.give_dvc(repo, before)
        assert scan.unknown_to_dvc(repo, [str(kept), str(changed)]) == {str(changed)}
    with Repo(str(tmp_path)) as repo:  # what DVC itself finds
        _, hash_info = repo.state.get(str(kept), repo.fs)
        assert (hash_info.name, hash_info.value) == ("md5", before[0][2])
        assert repo.state.get(str(changed), repo.fs) == (None, None), "DVC must hash the new bytes itself"


def test_files_dvc_already_knows_are_not_read(project, monkeypatch):
    """A teammate who pulled the images with DVC (or a queued experiment's fresh workspace) has
    files our stamps do not know but DVC does: DVC will not read them, so neither does the scan
    (the manifest reads them once, if it runs at all)."""
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    scan.run(settings, outputs)  # DVC now knows every file's md5
    outputs.scanned.unlink()  # and this machine's own memory of them is gone
    reads = []
    real_inspect = images.inspect_file_md5
    monkeypatch.setattr(images, "inspect_file_md5", lambda path: reads.append(path) or real_inspect(path))
    scan.run(settings, outputs)
    assert reads == [] and not outputs.scanned.exists()
    new = project / "data" / "Train_Real" / "Real_youtube" / "000" / "0099.png"
    Image.new("RGB", (8, 8)).save(new)
    scan.run(settings, outputs)
    assert reads == [str(new)], "a file DVC does not know is read once"
