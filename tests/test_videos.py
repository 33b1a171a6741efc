"""Video datasets: N evenly spaced frames per video, exact seeks, one manifest row per sampled
frame keyed by the video's digest and the frame index, and the pipeline end to end on real .mp4
files written with PyAV."""

from __future__ import annotations

import csv
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import ExifTags, Image

from pipeline import backbones, cli, evaluate, extract, frames, images, manifest, manifest_table, probes, train
from pipeline.config import ConfigError, load
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore
from tests.conftest import demo_params, update_params

av = pytest.importorskip("av")

FRAMES = 30


def level(i: int) -> int:
    """The grey level painted into frame i (steps of 6 survive lossy compression)."""
    return 20 + 6 * i


def write_video(path, n: int = FRAMES, size=(64, 48), gop: int = 10, seed: int = 0, options=None) -> None:
    """An H.264 .mp4 whose frame i is flat grey at level(i) with a little noise, keyframe every `gop`
    (`options`: the muxer's, e.g. {"movflags": "faststart"}: the index before the frames)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "18", "bf": "2"}
        for i in range(n):
            pixels = np.full((size[1], size[0], 3), level(i), np.int16) + rng.integers(-2, 3, (size[1], size[0], 3))
            frame = av.VideoFrame.from_ndarray(pixels.clip(0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frame_sampling_is_evenly_spaced_with_both_ends():
    rng = np.random.default_rng(0)
    for _ in range(200):
        count, n = int(rng.integers(1, 500)), int(rng.integers(1, 64))
        picked = frames.sample(count, n)
        assert picked == sorted(set(picked)) and all(0 <= i < count for i in picked)
        if count <= n:
            assert picked == list(range(count))
        else:
            assert picked[0] == 0 and len(picked) <= n and (n == 1 or picked[-1] == count - 1)
            assert picked == sorted({int(i) for i in np.linspace(0, count - 1, n, dtype=int)})  # DeepfakeBench's
    assert frames.sample(10, None) == list(range(10))


def test_seeks_return_exactly_the_frame_asked_for(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path)
    data = path.read_bytes()
    facts = frames.inspect(data)
    assert (facts.frame_count, facts.width, facts.height, facts.format) == (FRAMES, 64, 48, "mov")
    for i in [FRAMES - 1, 0, 17, 9, 10, 11, 3, 29, 22]:  # across keyframes, backwards and forwards
        image = frames.decode(data, i)
        assert image.mode == "RGB" and image.size == (64, 48)
        assert abs(np.asarray(image, dtype=float).mean() - level(i)) < 2.5, i
    with pytest.raises(ValueError, match="no frame 30"):
        frames.decode(data, FRAMES)
    # Many frames in one pass (decoding through gaps, seeking past unreached keyframes) are the
    # frames single seeks give, bit for bit; a frame the video lacks comes back as the reason.
    for wanted in ([0, 9, 19, 29], [3, 4, 5, 27], list(range(FRAMES)), [29, 1, 12, 31, 40]):
        many = frames.decode_many(data, wanted)
        assert sorted(many) == sorted(set(wanted))
        for i, image in many.items():
            if i >= FRAMES:
                assert image == f"the video has no frame {i}"
            else:
                assert np.array_equal(np.asarray(image), np.asarray(frames.decode(data, i))), (wanted, i)


def test_a_truncated_video_keeps_the_frames_before_the_damage(tmp_path):
    # A download cut short, its index in front (faststart): the header still counts 30 frames,
    # the file holds the first ~22. Those are the intact file's frames, bit for bit; the others
    # fail with the decoder's reason, frame by frame (one pass used to fail all of them).
    path = tmp_path / "v.mp4"
    write_video(path, options={"movflags": "faststart"})
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * 0.9)])
    assert frames.inspect(path.read_bytes()).frame_count == FRAMES
    wanted = [0, 9, 19, 29]
    decoded = images.decode_frames(path, None, wanted)
    for i, rgb in zip(wanted[:3], decoded[:3], strict=True):
        assert np.array_equal(np.asarray(rgb), np.asarray(frames.decode(whole, i))), i
    assert decoded[3].startswith("unreadable image (unreadable video (")


def test_a_batch_reads_and_hashes_each_video_once(tmp_path, monkeypatch):
    from pipeline import embedder

    paths = [tmp_path / f"{i}.mp4" for i in range(2)]
    for i, path in enumerate(paths):
        write_video(path, seed=i)
    items = []
    for path in paths:
        digest = images.inspect_file(path).digest
        items += [embedder.Item(frames.key(digest, i), str(path), path, i) for i in (0, 9, 19, 29)]
    reads = []
    original = images.read_regular_file
    monkeypatch.setattr(images, "read_regular_file", lambda path: reads.append(path) or original(path))
    (batch,) = embedder.read_batches(items, np.asarray, 8, 0, False)
    assert batch.errors == [None] * 8 and sorted(reads) == paths
    for k, i in enumerate((0, 9, 19, 29)):
        assert abs(batch.pixels[k].float().mean().item() - level(i)) < 2.5


@pytest.fixture
def video_project(tmp_path, tiny_clip):
    """10 real videos and 10 fakes (000_001 and 001_000 from 000 and 001, ...), 30 frames each."""
    data = tmp_path / "data"
    for i in range(10):
        write_video(data / "original" / "videos" / f"{i:03d}.mp4", seed=i)
        partner = i + 1 if i % 2 == 0 else i - 1
        write_video(data / "fake" / "videos" / f"{i:03d}_{partner:03d}.mp4", seed=100 + i)
    write_params(tmp_path, data, tiny_clip, ("real", "original/videos"), ("fake", "fake/videos"), per_video=4)
    return tmp_path


def write_params(project, data, model, real: tuple[str, str], fake: tuple[str, str], per_video: int) -> None:
    """`project/params.yaml` for two datasets under `data`, each (name, folder): one real, one fake
    (trained on both, the fake one evaluated held out), `per_video` frames sampled per video."""
    (real_name, real_folder), (fake_name, fake_folder) = real, fake
    params = demo_params(data, model)
    params["data"]["datasets"] = {
        real_name: {"path": real_folder, "label": "real"},
        fake_name: {"path": fake_folder, "label": "fake"},
    }
    params["data"]["frames"] = {"per_video": per_video}
    params["train"]["datasets"] = [real_name, fake_name]
    params["evaluate"].update(datasets=[fake_name], protocols=["heldout"], bootstrap=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_a_video_dataset_runs_end_to_end_one_row_per_sampled_frame(video_project):
    settings, outputs = load(video_project / "params.yaml"), Outputs(video_project)
    table = manifest.run(settings, outputs).to_pandas()
    assert len(table) == 20 * 4 and set(table.frame_count) == {FRAMES}
    for _, rows in table.groupby("path"):
        assert list(rows.frame) == frames.sample(FRAMES, 4) == [0, 9, 19, 29]
        file_digest = images.inspect_file(manifest_table.absolute_path(rows.path.iloc[0], settings.data_root)).digest
        assert list(rows.digest) == [f"{file_digest}@{i}" for i in rows.frame]
    assert set(table.video) == {f"{i:03d}" for i in range(10)} | {
        f"{i:03d}_{i + 1 - 2 * (i % 2):03d}" for i in range(10)
    }
    for i in range(0, 10, 2):  # a fake and the reals it was made from share a split
        group = table[table.video.isin([f"{i:03d}", f"{i + 1:03d}", f"{i:03d}_{i + 1:03d}", f"{i + 1:03d}_{i:03d}"])]
        assert group.split.nunique() == 1

    summary = extract.run(settings, outputs)
    assert summary.embedded == summary.images == 80 and summary.failed == 0
    train.run(settings, outputs)
    assert set(evaluate.run(settings, outputs)["heldout"]) == {"fake"}

    # The cached vector of frame 19 is the model's output on exactly that decoded frame.
    row = table[table.frame == 19].iloc[0]
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    cached, found = store.read([row.digest], "projection")
    assert found.all()
    backbone = backbones.load(settings.model, "cpu", "fp32")
    file = manifest_table.absolute_path(row.path, settings.data_root)
    pixels = backbone.preprocess(frames.decode(file.read_bytes(), 19))
    expected = backbone.embed(torch.from_numpy(pixels[None]))["projection"][0]
    np.testing.assert_allclose(cached[0], expected, rtol=1e-4, atol=1e-5)  # batched vs alone: last bits

    # predict scores a video by its sampled frames, as the manifest samples them (cached ones are
    # read, a new video's are embedded), pooled as evaluate pools a video (evaluate.video_pooling).
    new = video_project / "incoming" / "new.mp4"
    write_video(new, seed=77)  # seeds 0-9 and 100-109 are the dataset's
    out = video_project / "predictions.csv"
    assert cli.main(["predict", str(file), str(new.parent), "--params", str(video_project / "params.yaml"),
                     "--out", str(out)]) == 0  # fmt: skip
    got = {r["path"]: r for r in csv.DictReader(out.open())}
    assert set(got) == {str(file), str(new)} and all(r["frames"] == "4/4" and not r["error"] for r in got.values())
    probe, _ = probes.load(outputs.probe)
    known = table[table.path == row.path].digest.tolist()
    vectors, _ = store.read(known, "projection")
    assert float(got[str(file)]["score"]) == pytest.approx(probe.predict_proba(vectors).mean(), abs=1e-6)
    new_keys = [frames.key(images.inspect_file(new).digest, i) for i in (0, 9, 19, 29)]
    assert EmbeddingStore.open(outputs.predict_embeddings / summary.embeddings).keys() == set(new_keys)

    # A video rewritten after the manifest is never embedded under its old key.
    update_params(video_project, "data", frames={"per_video": 5})
    settings = load(video_project / "params.yaml")
    manifest.run(settings, outputs)
    write_video(file, seed=999)
    with pytest.raises(ConfigError, match="changed since the manifest"):
        extract.run(settings, outputs)


def test_per_video_caps_the_frames_of_frame_folders_evenly(project):
    update_params(project, "data", frames={"per_video": 1})
    table = manifest.run(load(project / "params.yaml"), Outputs(project)).to_pandas()
    assert (table.groupby(["dataset", "video"]).size() == 1).all()
    assert set(table.frame) == {-1}
    assert table.path.str.endswith("/0000.png").all(), "one frame per video: the first, as linspace picks"


def test_per_video_picks_frames_in_numeric_order_when_names_are_not_zero_padded():
    # `ffmpeg -i v.mp4 %d.png` names frames 1.png ... 100.png; sorted as text, 10.png and 100.png
    # come before 2.png, and "evenly spaced" frames were not (DeepfakeBench sorts them by number).
    files = sorted(
        (manifest.ImageFile(f"fs/000_003/{i}.png", "fs", "000_003", 1, 0) for i in range(1, 101)),
        key=lambda f: f.path,
    )
    kept = [f.path.rsplit("/", 1)[1] for f in manifest.cap_frames(files, 5)]
    assert sorted(kept, key=lambda name: int(name.split(".")[0])) == ["1.png", "25.png", "50.png", "75.png", "100.png"]


# EXIF orientation -> how a camera stores an upright picture so that the tag shows it upright
# again (the inverse of what viewers and cv2.imread do to show it: 6 and 8 turn the other way).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}  # fmt: skip


def write_lossless_video(path, pixels: np.ndarray, rotation: int = 0) -> None:
    """Three frames of `pixels`, lossless (x264 at qp 0, 4:4:4), shown turned `rotation` degrees
    counter-clockwise (the display matrix phones write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = pixels.shape[1], pixels.shape[0], "yuv444p"
        stream.options = {"qp": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_files_stored_turned_are_embedded_the_way_they_are_shown(tmp_path, tiny_clip, caplog):
    # A phone stores a portrait photo or video sideways and says how to show it: an EXIF
    # orientation, a video's display matrix. cv2 (DeepfakeBench's reader), ffmpeg and every viewer
    # turn it upright; embedding it sideways gives a vector the model never sees on upright faces.
    from pipeline import embedder

    shown = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    Image.fromarray(shown).save(data / "photos" / "upright.png")
    for o, stored in STORED.items():
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = o
        Image.fromarray(shown).transpose(stored).save(data / "photos" / f"o{o}.png", exif=exif)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(shown).transpose(STORED[6]).save(data / "photos" / "o6.jpg", exif=exif, quality=95)
    write_lossless_video(data / "videos" / "upright.mp4", shown)
    for rotation, o in ((90, 8), (-90, 6), (180, 3)):
        stored = np.asarray(Image.fromarray(shown).transpose(STORED[o]))
        write_lossless_video(data / "videos" / f"r{rotation}.mp4", stored, rotation)
    write_params(tmp_path, data, tiny_clip, ("photos", "photos"), ("videos", "videos"), per_video=2)
    settings, outputs = load(tmp_path / "params.yaml"), Outputs(tmp_path)
    with caplog.at_level("INFO", logger="pipeline.manifest"):
        table = manifest.run(settings, outputs).to_pandas().set_index("path")
    assert "11 files are stored turned" in caplog.text and "the way they are shown, e.g. photos/o2.png" in caplog.text
    sha = {p: images.inspect_file(data / p).digest for p in table.index}

    # The key says how the bytes are shown (`^<EXIF orientation>`), so a cache made by a reader that
    # ignored the orientation can never serve its sideways vector for them.
    expected = {"photos/upright.png": sha["photos/upright.png"], "photos/o6.jpg": sha["photos/o6.jpg"] + "^6"}
    expected |= {f"photos/o{o}.png": f"{sha[f'photos/o{o}.png']}^{o}" for o in STORED}
    assert table.loc[list(expected), "digest"].to_dict() == expected
    assert table.loc[["photos/o6.jpg", "photos/o8.png"], "orientation"].tolist() == [6, 8]
    videos = {"videos/upright.mp4": "", "videos/r90.mp4": "^8", "videos/r-90.mp4": "^6", "videos/r180.mp4": "^3"}
    for p, turn in videos.items():
        assert table.loc[[p], "digest"].tolist() == [f"{sha[p]}{turn}@{i}" for i in (0, 2)]
    # A manifest made before orientations were read (no such column, plain keys) is read again in full.
    old = pq.read_table(outputs.manifest).drop_columns(["orientation"]).to_pydict()
    old["digest"] = [frames.key(frames.file_digest(k), i) for k, i in zip(old["digest"], old["frame"], strict=True)]
    pq.write_table(pa.table(old), outputs.manifest)
    assert manifest.run(settings, outputs).to_pandas().set_index("path").digest.equals(table.digest)

    summary = extract.run(settings, outputs)
    assert summary.failed == 0
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    for upright in ("photos/upright.png", "videos/upright.mp4"):  # each shows `shown` (a video within 2 levels)
        turned = [p for p in table.index.unique() if p.startswith(upright[:6]) and p != upright and p[-4:] != ".jpg"]
        rows = table.loc[[upright, *turned]]
        vectors, found = store.read(rows.digest.tolist(), "projection")
        assert found.all() and len(vectors) > 4
        for p, vector in zip(rows.index, vectors, strict=True):
            np.testing.assert_allclose(vector, vectors[0], rtol=1e-4, atol=1e-5, err_msg=p)

    # The key alone decides how a file is decoded: its plain sha256 reads it as stored, as before.
    jpg = data / "photos" / "o6.jpg"
    items = [embedder.Item(key, "o6.jpg", jpg) for key in (sha["photos/o6.jpg"], expected["photos/o6.jpg"])]
    as_stored, as_shown = (b.pixels.numpy()[0] for b in embedder.read_batches(items, np.asarray, 1, 0, False))
    assert np.array_equal(as_stored, np.asarray(Image.open(jpg).convert("RGB")))
    assert np.array_equal(as_shown, np.rot90(as_stored, -1))


def write_vfr_video(path, n: int = FRAMES, seed: int = 0) -> None:
    """`write_video`'s frames (frame i at level(i)) shown at a variable frame rate, as phones record:
    gaps of 1/30 s and 1/24 s mixed at random, with jitter (time base 1/90000)."""
    rng = np.random.default_rng(seed)
    gaps = np.where(rng.random(n) < 0.3, 1 / 24, 1 / 30) + rng.normal(0, 0.002, n)
    times = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 10
        stream.options = {"crf": "18", "bf": "2"}
        stream.codec_context.time_base = stream.time_base = Fraction(1, 90000)
        for i, t in enumerate(times):
            pixels = np.full((48, 64, 3), level(i), np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = round(t * 90000), Fraction(1, 90000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frame_i_of_a_video_with_a_variable_frame_rate_is_its_ith_frame(tmp_path, tiny_clip):
    # A phone records at a variable frame rate. Frame i used to be the frame shown at i / (average
    # fps): some frames were never sampled, others twice, and some sampled indices had no frame at
    # all ("the video has no frame 19", recorded as a failure). Frame i is now the i-th frame shown,
    # as DeepfakeBench (cv2, reading frame after frame) counts; the key says so (`#<i>`, not `@<i>`),
    # so a cache made the other way never serves its vector for it.
    from pipeline import embedder, file_index

    data = tmp_path / "data"
    write_vfr_video(data / "phone" / "vfr.mp4")
    write_video(data / "camera" / "cfr.mp4")
    vfr, cfr = images.inspect_file(data / "phone" / "vfr.mp4"), images.inspect_file(data / "camera" / "cfr.mp4")
    assert (vfr.frame_count, vfr.ranked, cfr.frame_count, cfr.ranked) == (FRAMES, True, FRAMES, False)
    decoded = frames.decode_many((data / "phone" / "vfr.mp4").read_bytes(), range(FRAMES), ranked=True)
    got = [round((np.asarray(decoded[i], dtype=float).mean() - 20) / 6) if not isinstance(decoded[i], str) else None
           for i in range(FRAMES)]  # fmt: skip
    assert got == list(range(FRAMES))
    one = frames.decode((data / "phone" / "vfr.mp4").read_bytes(), 17, ranked=True)
    assert np.array_equal(np.asarray(one), np.asarray(decoded[17]))

    write_params(tmp_path, data, tiny_clip, ("camera", "camera"), ("phone", "phone"), per_video=4)
    settings, outputs = load(tmp_path / "params.yaml"), Outputs(tmp_path)
    table = manifest.run(settings, outputs).to_pandas().set_index("path")
    assert table.loc[["phone/vfr.mp4"], "digest"].tolist() == [f"{vfr.digest}#{i}" for i in (0, 9, 19, 29)]
    assert table.loc[["camera/cfr.mp4"], "digest"].tolist() == [f"{cfr.digest}@{i}" for i in (0, 9, 19, 29)]
    known = file_index.read_known(outputs.manifest)  # what the next scan knows without reading the file
    assert known["phone/vfr.mp4"][1] == vfr and known["camera/cfr.mp4"][1] == cfr
    file_index.write_known(known, tmp_path / "known.parquet")
    assert file_index.read_known(tmp_path / "known.parquet") == known

    file = data / "phone" / "vfr.mp4"
    items = [embedder.Item(key, "phone/vfr.mp4", file, i) for key, i in zip(table.loc[["phone/vfr.mp4"], "digest"],
                                                                        (0, 9, 19, 29), strict=True)]  # fmt: skip
    (batch,) = embedder.read_batches(items, np.asarray, 8, 0, False)
    assert batch.errors == [None] * 4
    for k, i in enumerate((0, 9, 19, 29)):
        assert abs(batch.pixels[k].float().mean().item() - level(i)) < 2.5
    summary = extract.run(settings, outputs)
    assert summary.failed == 0 and summary.embedded == 8

    # A manifest made when every video was read by time keeps its keys (and the frames they name,
    # whose vectors its cache holds) until the file changes.
    old = pq.read_table(outputs.manifest)
    before = [k.replace("#", "@") for k in old.column("digest").to_pylist()]
    pq.write_table(old.set_column(old.schema.get_field_index("digest"), "digest", pa.array(before)), outputs.manifest)
    assert manifest.run(settings, outputs).column("digest").to_pylist() == before


def test_a_clip_cut_without_reencoding_counts_only_the_frames_it_shows(tmp_path):
    # `ffmpeg -ss 0.12 -c copy` cuts between keyframes: the clip keeps the frames from the keyframe
    # before the cut, and its edit list hides them (packets flagged discard; no decoder shows them).
    # They were counted: 30 frames for 27 shown, and the last 3 sampled indices had no frame.
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(i), np.uint8), format="rgb24")
            frame.pts, frame.time_base = i - 3, Fraction(1, 25)  # the first 3 before the clip's start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    facts = frames.inspect(data)
    assert (facts.frame_count, facts.ranked) == (FRAMES - 3, False)  # evenly spaced: keys and frames as before
    decoded = frames.decode_many(data, range(FRAMES - 3))
    assert [round((np.asarray(decoded[i], dtype=float).mean() - 20) / 6) for i in range(FRAMES - 3)] == list(
        range(3, FRAMES)
    )
