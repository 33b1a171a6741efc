"""The manifest: one row per image, digests with a stat cache, splits by linked video group."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import config, images, manifest, splits
from pipeline.outputs import Outputs
from tests.conftest import FFPP_SPLITS, REPO, run_terminated, terminating_at, update_params


def settings_of(project):
    return config.load(project / "params.yaml")


def build(project):
    settings = settings_of(project)
    manifest.run(settings, Outputs(project))
    return pq.read_table(project / "cache" / "manifest.parquet").to_pandas()


def test_one_row_per_image_with_label_method_video_and_digest(project):
    df = build(project)
    images = [p for p in (project / "data").rglob("*") if p.suffix == ".png"]
    assert len(df) == len(images)
    row = df[df.path == "Train_Fake/FaceSwap/000_001/0000.png"].iloc[0]
    assert (row.dataset, row.label, row.method, row.video) == ("faceswap", 1, "FaceSwap", "000_001")
    assert row.digest == hashlib.sha256((project / "data" / row.path).read_bytes()).hexdigest()
    assert row["size"] == (project / "data" / row.path).stat().st_size
    real = df[df.dataset == "real_youtube"].iloc[0]
    assert (real.label, real.video) == (0, "000")


def test_linked_videos_always_share_a_split(project):
    df = build(project)
    split_of_identity = {}
    for video, split in df.groupby("video").split.first().items():
        assert df[df.video == video].split.nunique() == 1
        for ident in splits.identities(video):
            assert split_of_identity.setdefault(ident, split) == split, f"{video} leaks across splits"
    assert set(df.split) == {"train", "val", "test"}


def test_splits_follow_the_ratios_and_the_seed(project):
    df = build(project)
    share = df.split.value_counts(normalize=True)
    assert 0.08 <= share["test"] <= 0.35 and 0.08 <= share["val"] <= 0.35
    update_params(project, "data", split={"val": 0.14, "test": 0.14, "seed": 1})
    other = build(project)
    assert (other.split != df.split).any(), "a different seed should give a different split"


def test_group_videos_links_chains_and_keeps_strangers_apart():
    groups = splits.group_videos(["000", "003", "000_003", "003_000", "005_007", "007", "010", "clip_a"])
    assert groups["000"] == groups["003"] == groups["000_003"] == groups["003_000"]
    assert groups["005_007"] == groups["007"]
    assert len({groups["000"], groups["007"], groups["010"], groups["clip_a"]}) == 4
    dfd = splits.group_videos(["01_02__meeting__X1Y2", "01__meeting", "02__walk"])
    assert len(set(dfd.values())) == 1
    # Celeb-DF: `id0_id16_0000` is real clip `id0_0000` with id16's face swapped in (the donor is
    # a person, not a clip, so the fake goes with its target clip alone).
    celeb = splits.group_videos(["id0_0000", "id0_0001", "id16_0000", "id0_id16_0000", "id0_id3_0000", "00012"])
    assert celeb["id0_id16_0000"] == celeb["id0_id3_0000"] == celeb["id0_0000"]
    assert len({celeb["id0_0000"], celeb["id0_0001"], celeb["id16_0000"], celeb["00012"]}) == 4


def test_random_fake_pairs_never_split_a_group():
    rng = random.Random(0)
    for trial in range(20):
        reals = [f"{i:03d}" for i in range(rng.randint(5, 60))]
        fakes = [f"{rng.choice(reals)}_{rng.choice(reals)}" for _ in range(rng.randint(0, 80))]
        split = splits.assign_splits(reals + fakes, config.SplitSpec(val=0.2, test=0.2, seed=trial))
        for fake in fakes:
            a, b = fake.split("_")
            assert split[fake] == split[a] == split[b]


def test_adding_videos_keeps_existing_assignments_mostly_stable():
    videos = [f"{i:03d}" for i in range(200)]
    before = splits.assign_splits(videos, config.SplitSpec())
    after = splits.assign_splits(videos + [f"{i:03d}" for i in range(200, 204)], config.SplitSpec())
    moved = sum(before[v] != after[v] for v in videos)
    assert moved <= 4  # only groups at the quota boundaries may move


def test_adding_an_unlinked_dataset_leaves_the_others_splits_as_they_were():
    # A cross-dataset set (Celeb-DF-like ids, linked to no FF++ video) added to FF++: FF++'s
    # splits, and so every in-dataset number, must not move; each family fills its own shares.
    reals = [f"{i:03d}" for i in range(100)]
    ffpp = reals * 4 + [f"{i:03d}_{i ^ 1:03d}" for i in range(100)] * 4
    celeb = [f"id{i}_{j:04d}" for i in range(30) for j in range(5)] * 8
    before = splits.assign_splits(ffpp, config.SplitSpec(), datasets=["ffpp"] * len(ffpp))
    after = splits.assign_splits(
        ffpp + celeb, config.SplitSpec(), datasets=["ffpp"] * len(ffpp) + ["celeb"] * len(celeb)
    )
    assert {v: after[v] for v in before} == before
    celeb_test = sum(after[v] == "test" for v in celeb) / len(celeb)
    assert 0.1 <= celeb_test <= 0.2, "the added set gets its own share of test images"


def test_split_files_warn_only_about_videos_of_the_datasets_they_cover(caplog):
    official = splits.read_split_dir(FFPP_SPLITS)
    ffpp = ["000", "003", "000_003", "003_000"]
    celeb = ["id0_0000", "id1_0000", "id0_id1_0000"]  # a cross-dataset set: the ratios, no warning
    datasets = ["ffpp"] * 4 + ["celeb"] * 3
    splits.assign_splits(ffpp + celeb, config.SplitSpec(), official, datasets)
    assert "not in the official split files" not in caplog.text
    splits.assign_splits([*ffpp, "1000"], config.SplitSpec(), official, ["ffpp"] * 5)  # an FF++ id the files lack
    assert "1 video groups of data the split files cover are not in them (e.g. 1000)" in caplog.text


def ffpp_params(root, model_dir, **split) -> dict:
    return {
        "data": {
            "root": str(root),
            "datasets": {
                "youtube": {"path": "original_sequences/youtube/c23/frames", "label": "real"},
                "faceswap": {"path": "manipulated_sequences/FaceSwap/c23/frames", "label": "fake"},
            },
            "split": split or {"val": 0.14, "test": 0.14, "seed": 0},
        },
        "model": {"name": str(model_dir)},
        "extract": {},
        "train": {"datasets": ["youtube", "faceswap"]},
        "evaluate": {"datasets": ["faceswap"]},
    }


def make_tree(root, relative_paths) -> None:
    from PIL import Image

    for i, rel in enumerate(relative_paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i % 256, 2, 3)).save(root / rel)


def test_a_video_id_in_two_folders_of_a_dataset_is_warned_about(tmp_path, tiny_clip, caplog):
    # DeepfakeBench's layout, the dataset pointed one level too high: its masks beside its frames
    # would be embedded as frames of the same videos.
    make_tree(
        tmp_path / "ffpp",
        [
            "original_sequences/youtube/c23/frames/000/0000.png",
            "original_sequences/youtube/c23/frames/003/0000.png",
            "manipulated_sequences/FaceSwap/c23/frames/000_003/0000.png",
            "manipulated_sequences/FaceSwap/c23/masks/000_003/0000.png",
        ],
    )
    params = ffpp_params(tmp_path / "ffpp", tiny_clip)
    params["data"]["datasets"]["faceswap"]["path"] = "manipulated_sequences/FaceSwap/c23"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    build(tmp_path)
    assert (
        "dataset 'faceswap': 1 video ids name files in more than one folder (e.g. '000_003' in "
        "manipulated_sequences/FaceSwap/c23/frames/000_003, manipulated_sequences/FaceSwap/c23/masks/000_003)"
    ) in caplog.text
    assert "dataset 'youtube'" not in caplog.text


@pytest.mark.skipif(not FFPP_SPLITS.is_dir(), reason="shared/ffpp-splits is not beside the repo")
def test_official_ffpp_split_files_win(tmp_path, tiny_clip):
    official = splits.read_split_dir(FFPP_SPLITS)
    assert len(official) == 1000  # 720 + 140 + 140 videos
    paths = []
    for split in ("train", "val", "test"):
        for a, b in yaml.safe_load((FFPP_SPLITS / f"{split}.json").read_text())[:3]:
            paths += [f"original_sequences/youtube/c23/frames/{v}/0000.png" for v in (a, b)]
            paths += [f"manipulated_sequences/FaceSwap/c23/frames/{v}/0000.png" for v in (f"{a}_{b}", f"{b}_{a}")]
    make_tree(tmp_path / "ffpp", paths)
    params = ffpp_params(tmp_path / "ffpp", tiny_clip, split_dir=str(FFPP_SPLITS))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    df = build(tmp_path)
    assert len(df) == 36
    for video, split in df.groupby("video").split.first().items():
        assert split == official[splits.identities(video)[0]], video
    assert df.split.value_counts().to_dict() == {"train": 12, "val": 12, "test": 12}


def test_split_files_that_split_a_fake_from_its_sources_name_the_video_and_the_fix():
    # The demo's fakes pair 000 with 001; FF++'s official files put 000 in test and 001 in train.
    official = splits.read_split_dir(FFPP_SPLITS)
    assert (official["000"], official["001"]) == ("test", "train")
    with pytest.raises(config.ConfigError) as info:
        splits.assign_splits(["000", "001", "000_001"], config.SplitSpec(), official)
    message = str(info.value)
    assert "000_001" in message and "000 (test.json)" in message and "001 (train.json)" in message
    assert "data.split" in message
    # Linked through a video of neither split: the identities are named instead.
    with pytest.raises(config.ConfigError, match=r"linked videos join 100 \(test.json\) and 200 \(train.json\)"):
        splits.assign_splits(["100_300", "300_200"], config.SplitSpec(), {"100": "test", "200": "train"})


def test_real_ffpp_tree_layout(tmp_path, tiny_clip):
    layout = {
        "original_sequences/youtube/c23/frames/000/0000.png": 0,
        "original_sequences/youtube/c23/frames/003/0000.png": 0,
        "manipulated_sequences/FaceSwap/c23/frames/000_003/0000.png": 1,
        "manipulated_sequences/FaceSwap/c23/frames/003_000/0001.PNG": 1,
    }
    make_tree(tmp_path / "ffpp", layout)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(ffpp_params(tmp_path / "ffpp", tiny_clip)))
    df = build(tmp_path)
    assert sorted(df.video) == ["000", "000_003", "003", "003_000"]  # .PNG counts too
    assert df.split.nunique() == 1  # all four are one linked group
    assert dict(zip(df.path, df.label, strict=True)) == layout


def test_flat_folders_take_the_video_from_the_file_name(tmp_path, tiny_clip):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    (tmp_path / "flat_fake").mkdir()
    for i, name in enumerate(("000_0012.jpg", "000_0013.JPEG", "000_003_0007.webp", "notes.txt")):
        if name.endswith(".txt"):
            (folder / name).write_text("not an image")
        else:
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / name)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "flat_fake" / "001_002_0001.png")
    params = {
        "data": {
            "root": str(tmp_path),
            "datasets": {"r": {"path": "flat", "label": "real"}, "f": {"path": "flat_fake", "label": "fake"}},
        },
        "model": {"name": str(tiny_clip)},
        "extract": {},
        "train": {"datasets": ["r", "f"]},
        "evaluate": {"datasets": ["f"]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    df = build(tmp_path)
    assert sorted(set(df.video)) == ["000", "000_003", "001_002"]
    assert len(df) == 4  # the .txt is ignored


def test_unchanged_files_are_not_read_again_and_output_is_byte_identical(project, monkeypatch):
    build(project)
    out = project / "cache" / "manifest.parquet"
    first = out.read_bytes()
    reads = []
    real_inspect = images.inspect_file
    monkeypatch.setattr(images, "inspect_file", lambda path: reads.append(path) or real_inspect(path))
    build(project)
    assert out.read_bytes() == first, "nothing changed, so the manifest must be byte-identical"
    assert reads == [], "unchanged files are not read again"

    # Change a file's bytes but keep its size and mtime: the ctime still moves, so it is hashed again.
    victim = project / "data" / "Train_Real" / "Real_youtube" / "000" / "0000.png"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    df = build(project)
    assert reads == [victim]
    row = df[df.path == "Train_Real/Real_youtube/000/0000.png"].iloc[0]
    assert row.digest == hashlib.sha256(bytes(data)).hexdigest(), "a stale digest would poison the cache"


def test_broken_links_are_left_out_with_a_warning_not_a_crash(project, caplog):
    folder = project / "data" / "Train_Real" / "Real_youtube" / "000"
    (folder / "9999.png").symlink_to(project / "gone.png")
    df = build(project)
    assert "9999.png" not in " ".join(df.path)
    assert "could not be read and are left out" in caplog.text


# --------------------------------------------------------------------------- honest labels, splits and folders


def test_the_same_bytes_labelled_real_and_fake_is_an_error_naming_both_paths(project):
    real = project / "data" / "Train_Real" / "Real_youtube" / "003" / "0001.png"
    copy = project / "data" / "Test_Fake" / "Deepfakes" / "000_001" / "0099.png"
    copy.write_bytes(real.read_bytes())
    with pytest.raises(config.ConfigError) as exc:
        build(project)
    message = str(exc.value)
    assert "labelled both real and fake" in message
    assert "Train_Real/Real_youtube/003/0001.png (real)" in message and "000_001/0099.png (fake)" in message


def test_the_same_bytes_in_two_splits_are_kept_in_the_held_out_one_only(project, caplog):
    df = build(project)
    train_frame = df[(df.split == "train") & (df.dataset == "real_youtube")].iloc[0]
    test_video = df[(df.split == "test") & (df.dataset == "real_youtube")].video.iloc[0]
    leaked = project / "data" / "Train_Real" / "Real_youtube" / test_video / "0099.png"
    leaked.write_bytes((project / "data" / train_frame.path).read_bytes())

    df = build(project)
    copies = df[df.digest == train_frame.digest]
    assert copies.split.tolist() == ["test"], "one split only: the held-out one"
    assert df.groupby("digest").split.nunique().max() == 1
    assert "repeat the bytes of an image in another split" in caplog.text


@pytest.mark.parametrize("nested", [False, True])
def test_two_datasets_on_the_same_or_nested_folders_are_refused(project, nested):
    path = "Test_Fake/Deepfakes" + ("/000_001" if nested else "")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["datasets"]["face2face"]["path"] = path
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(config.ConfigError, match="give each dataset its own folder"):
        build(project)


def test_links_loops_fifos_undecodable_names_and_unread_formats_are_reported_never_followed_or_waited_on(
    project, caplog
):
    before = len(build(project))
    video = project / "data" / "Train_Real" / "Real_youtube" / "000"
    (video / "loop").symlink_to(".")
    (video / "loop2").symlink_to("..")
    os.mkfifo(video / "9999.png")
    os.close(os.open(os.fsencode(video) + b"/\xff\xfe.png", os.O_CREAT | os.O_WRONLY))
    (video / "IMG_0001.HEIC").write_bytes(b"an iPhone photo")  # a format the pipeline does not read
    (video / "notes.txt").write_text("not media: nothing to say")
    df = build(project)  # would repeat every frame through the loops, block on the FIFO, or crash
    assert len(df) == before and df.path.is_unique
    for reason in ("a link to a folder already scanned", "not a regular file", "not valid UTF-8"):
        assert reason in caplog.text
    assert "IMG_0001.HEIC: .heic files are not read; convert them to .jpg or .png" in caplog.text
    assert "notes.txt" not in caplog.text


def test_an_unreadable_folder_is_reported_not_skipped_silently(project):
    locked = project / "data" / "Train_Real" / "Real_youtube" / "000"
    locked.chmod(0o000)
    # root reads any folder: run the stage without the capabilities that let it
    drop = "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"
    prefix = ["setpriv", *drop] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): no folder is unreadable to root")
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "pipeline", "manifest", "--params", str(project / "params.yaml")],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert f"{locked}: folder not readable (Permission denied)" in done.stderr


def test_a_manifest_stopped_while_hashing_keeps_what_it_read(project, monkeypatch):
    """`python -m pipeline manifest` run by hand, with no scan stage before it, hashes every file
    itself: minutes of reading on a network filesystem. Stopped there (SIGTERM, Ctrl-C), it threw
    all of it away, and the next run read every file again. What it read is now kept in the scan
    stage's table (`cache/scan.parquet`, where the manifest looks first): the next run reads only
    the rest. A real SIGTERM, handled as `python -m pipeline` handles it, arrives at the 20th file."""
    from pipeline import file_index

    settings, outputs = settings_of(project), Outputs(project)
    files = {p.relative_to(project / "data").as_posix() for p in (project / "data").rglob("*.png")}
    reads, real = [], images.inspect_file
    monkeypatch.setattr(images, "inspect_file", terminating_at(20, real, reads))
    run_terminated(manifest.run, settings, outputs)
    assert not outputs.manifest.exists()
    kept = set(file_index.read_known(outputs.scanned))
    assert kept and len(kept) == len(reads) and kept < files, f"{len(kept)} kept of {len(reads)} read"

    reads.clear()
    monkeypatch.setattr(images, "inspect_file", lambda path: reads.append(path) or real(path))
    manifest.run(settings, outputs)
    assert sorted(Path(p).relative_to(project / "data").as_posix() for p in reads) == sorted(files - kept)
