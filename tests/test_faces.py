"""Face crops on a real face photograph (scikit-image's astronaut, shipped in its wheel): every
detector finds the face where it was pasted, crops are squares of scale x the box, frames
without a face follow `no_face`, and re-cropping never runs the detector again."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import signal

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import backbones, check, cli, demo, extract, faces, frames, images, manifest, manifest_table
from pipeline.config import ConfigError, FacesSettings, ModelSettings, load
from pipeline.outputs import Outputs
from pipeline.store import caches
from tests.conftest import demo_params, run_to_end, start_extract, update_params, wait_for_shards, wait_until_paused

skimage_data = pytest.importorskip("skimage.data")

REGION = (120, 20, 320, 230)  # x0, y0, x1, y1 of the astronaut photo around her face
FACE = (175, 76, 265, 166)  # dlib HOG's box of the face in the photo


def face_frame(x: int, y: int, seed: int = 0, size=(400, 300)) -> tuple[Image.Image, tuple]:
    """A frame with the face region pasted at (x, y) on dim noise, and the face's known box."""
    rng = np.random.default_rng(seed)
    canvas = (rng.integers(0, 255, (size[1], size[0], 3)) * 0.3 + 60).astype(np.uint8)
    x0, y0, x1, y1 = REGION
    canvas[y : y + y1 - y0, x : x + x1 - x0] = skimage_data.astronaut()[y0:y1, x0:x1]
    box = (FACE[0] - x0 + x, FACE[1] - y0 + y, FACE[2] - x0 + x, FACE[3] - y0 + y)
    return Image.fromarray(canvas), box


def noise_frame(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (300, 400, 3), dtype=np.uint8))


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name", ["dlib_hog", "dlib_cnn", "mtcnn"])
def test_every_detector_finds_the_face_where_it_was_pasted_and_none_in_noise(name):
    if importlib.util.find_spec(faces.REQUIRES[name]) is None:
        pytest.skip(f"{faces.REQUIRES[name]} is not installed (`{faces.INSTALL[faces.REQUIRES[name]]}`)")
    found = faces.detector(FacesSettings(detector=name))
    pasted = [face_frame(x, y) for x, y in ((30, 40), (170, 60))]
    for frame, box in pasted:
        detection = found.detect(np.asarray(frame))
        assert detection.box is not None and iou(detection.box, box) >= 0.5, (name, detection, box)
    assert found.detect(np.asarray(noise_frame(1))).box is None
    # A batch (what the reader hands over: mtcnn runs it as one) finds what one frame at a time does.
    batch = [np.asarray(f) for f, _ in pasted] + [np.asarray(noise_frame(1))]
    for one, many in zip(map(found.detect, batch), found.detect_many(batch), strict=True):
        assert (one.box is None) == (many.box is None) and one.boxes == many.boxes, name
        if one.box is not None:
            np.testing.assert_allclose(many.box, one.box, atol=0.5)
            np.testing.assert_allclose(many.points, one.points, atol=0.5)


def test_upsample_auto_skips_upsampling_for_big_faces_and_falls_back_for_small_ones():
    pytest.importorskip("dlib")
    auto = faces.detector(FacesSettings(detector="dlib_hog", upsample="auto"))
    big, _ = face_frame(60, 40)
    assert auto.detect(np.asarray(big)).box == auto._run(np.asarray(big), 0).box != auto._run(np.asarray(big), 1).box
    small = big.resize((200, 150))  # the face is ~45 px: found only when upsampled
    assert auto._run(np.asarray(small), 0).box is None
    found = auto.detect(np.asarray(small))
    assert found.box == auto._run(np.asarray(small), 1).box and found.points is not None


def test_a_crop_is_a_square_of_scale_times_the_box_padded_black_outside_the_frame():
    frame = Image.new("RGB", (100, 80), (255, 255, 255))
    out = faces.crop(frame, (10, 10, 50, 30), scale=1.5, size=32)
    assert out.size == (32, 32)
    pixels = np.asarray(out)
    assert pixels[0, 0].sum() == 0 and pixels[16, 16].min() == 255  # the corner lies outside the frame


class SpawnedReaders(faces.FacePreprocess):
    """What a detector on a GPU gets (spawned reader processes), exercised on the CPU."""

    multiprocessing_context = "spawn"


def test_a_gpu_detector_gets_spawned_readers_and_they_crop_as_forked_ones_do(tmp_path, tiny_clip):
    from pipeline import embedder

    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed (`pip install --no-deps facenet-pytorch`)")
    settings = FacesSettings(detector="mtcnn")
    found = faces.detector(settings)
    assert faces.FacePreprocess(settings, found, None, {}).multiprocessing_context is None
    assert faces.FacePreprocess(settings, faces.detector(settings, "cuda"), None, {}).multiprocessing_context == "spawn"
    items = []
    for i, (x, y) in enumerate(((30, 40), (170, 60), (90, 20))):
        face_frame(x, y)[0].save(tmp_path / f"{i}.png")
        digest = images.inspect_file(tmp_path / f"{i}.png").digest
        items.append(embedder.Item(digest, f"{i}.png", tmp_path / f"{i}.png"))
    preprocess = backbones.load(ModelSettings(name=str(tiny_clip)), "cpu", "fp32").preprocess
    batches = {}
    for kind in (faces.FacePreprocess, SpawnedReaders):
        (batch,) = embedder.read_batches(items, kind(settings, found, preprocess, {}), 4, 1, False)
        assert batch.errors == [None] * 3
        batches[kind] = batch
    assert torch.equal(batches[faces.FacePreprocess].pixels, batches[SpawnedReaders].pixels)


@pytest.fixture
def face_project(tmp_path, tiny_clip):
    """8 real and 8 fake two-frame videos with the face at varying places (fakes blurred), and
    two fake frames without any face."""
    data = tmp_path / "data"
    for i in range(8):
        partner = i + 1 if i % 2 == 0 else i - 1
        for j in range(2):
            frame, _ = face_frame(20 + 20 * i, 10 + 30 * j, seed=i * 10 + j)
            (data / "real" / f"{i:03d}").mkdir(parents=True, exist_ok=True)
            frame.save(data / "real" / f"{i:03d}" / f"{j:04d}.png")
            fake, _ = face_frame(40 + 15 * i, 20 + 25 * j, seed=100 + i * 10 + j)
            fake = Image.fromarray((np.asarray(fake) * 0.8 + 30).astype(np.uint8))
            (data / "fake" / f"{i:03d}_{partner:03d}").mkdir(parents=True, exist_ok=True)
            fake.save(data / "fake" / f"{i:03d}_{partner:03d}" / f"{j:04d}.png")
    noise_frame(7).save(data / "fake" / "000_001" / "0002.png")
    noise_frame(8).save(data / "fake" / "003_002" / "0002.png")
    params = demo_params(data, tiny_clip)
    params["data"]["datasets"] = {"real": {"path": "real", "label": "real"}, "fake": {"path": "fake", "label": "fake"}}
    params["data"]["faces"] = {"detector": "dlib_hog", "scale": 1.3, "size": 64, "no_face": "skip"}
    params["train"]["datasets"] = ["real", "fake"]
    params["evaluate"].update(datasets=["fake"], protocols=["heldout"], bootstrap=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def detections_dir(project) -> pathlib.Path:
    """The one detector's folder of the project's detection cache (beside the folder's note)."""
    (found,) = [p for p in (project / "cache" / "faces").iterdir() if p.is_dir()]
    return found


def set_faces(project, **values) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"]["faces"].update(values)
    path.write_text(yaml.safe_dump(params))


def test_face_crops_are_embedded_no_face_is_a_policy_and_recropping_never_detects_again(
    face_project, monkeypatch, caplog, capsys
):
    settings, outputs = load(face_project / "params.yaml"), Outputs(face_project)
    table = manifest.run(settings, outputs)
    capsys.readouterr()
    summary = extract.run(settings, outputs)
    assert summary.images == 34 and summary.failed == 2 and summary.embedded == 32
    assert "face detection: 100%" in capsys.readouterr().err, "detection shows its own progress (rate, ETA)"
    (store,) = caches(outputs.embeddings)
    reasons = {reason for _, reason in store.failures().values()}
    assert reasons == {faces.NO_FACE}, "frames without a face are recorded, never dropped silently"
    assert store.card["description"]["faces"]["detector"] == "dlib_hog"

    # The cached vector is the model's output on the crop around the detected face.
    row = table.to_pandas().iloc[0]
    frame = Image.open(manifest_table.absolute_path(row.path, settings.data_root)).convert("RGB")
    backbone = backbones.load(settings.model, "cpu", "fp32")
    detection = faces.detector(settings.data.faces).detect(np.asarray(frame))
    pixels = backbone.preprocess(faces.crop(frame, detection.box, 1.3, 64))
    expected = backbone.embed(torch.from_numpy(pixels[None]))["projection"][0]
    cached, found = store.read([row.digest], "projection")
    assert found.all()
    np.testing.assert_allclose(cached[0], expected, rtol=1e-4, atol=1e-5)

    # Another scale, then another no_face policy: new caches, and not one detection more.
    def no_detecting(self, rgb):
        raise AssertionError("the detector ran although every frame's detection is cached")

    monkeypatch.setattr(faces.DlibHog, "detect", no_detecting)
    set_faces(face_project, scale=1.6)
    assert extract.run(load(face_project / "params.yaml"), outputs).embedded == 32
    set_faces(face_project, no_face="full_frame")
    full = extract.run(load(face_project / "params.yaml"), outputs)
    assert full.embedded == 34 and full.failed == 0
    assert len(caches(outputs.embeddings)) == 3, "each crop spec is its own cache; the first is untouched"
    set_faces(face_project, no_face="skip", align=True)  # the cached landmarks align: still no detection
    assert extract.run(load(face_project / "params.yaml"), outputs).embedded == 32
    set_faces(face_project, align=False)

    # nearest: a frame without a face is cropped with the box of the nearest frame of its video.
    set_faces(face_project, no_face="nearest", scale=1.3)
    nearest = extract.run(load(face_project / "params.yaml"), outputs)
    assert nearest.embedded == 34 and nearest.failed == 0
    rows = table.to_pandas()
    lonely = rows[rows.path.str.endswith("000_001/0002.png")].iloc[0]
    neighbour = rows[rows.path.str.endswith("000_001/0001.png")].iloc[0]
    (store,) = [s for s in caches(outputs.embeddings) if s.card["description"]["faces"]["no_face"] == "nearest"]
    box = faces.read_cache(detections_dir(face_project))[neighbour.digest].box
    frame = Image.open(manifest_table.absolute_path(lonely.path, settings.data_root)).convert("RGB")
    pixels = backbone.preprocess(faces.crop(frame, box, 1.3, 64))
    cached, found = store.read([lonely.digest], "projection")
    assert found.all()
    expected = backbone.embed(torch.from_numpy(pixels[None]))["projection"][0]
    np.testing.assert_allclose(cached[0], expected, rtol=1e-4, atol=1e-5)

    # save_crops set afterwards: the same cache (nothing re-embedded), the crops of every embedded
    # frame written from the cached and lent boxes, exactly what was embedded.
    set_faces(face_project, save_crops=True)
    caplog.set_level(logging.INFO, logger="pipeline.extract")
    before = len(caches(outputs.embeddings))
    again = extract.run(load(face_project / "params.yaml"), outputs)
    assert again.fingerprint == nearest.fingerprint and len(caches(outputs.embeddings)) == before
    (folder,) = (face_project / "cache" / "crops").iterdir()
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert written == sorted(str(pathlib.PurePosixPath(p).with_suffix(".png")) for p in rows.path)
    saved = Image.open(folder / pathlib.PurePosixPath(lonely.path).with_suffix(".png"))
    assert np.array_equal(np.asarray(saved), np.asarray(faces.crop(frame, box, 1.3, 64)))
    assert "writing 34 crops of frames embedded earlier" in caplog.text
    caplog.clear()
    set_faces(face_project, scale=1.4)  # a new crop spec: its crops are written while it is embedded
    extract.run(load(face_project / "params.yaml"), outputs)
    assert len(list((face_project / "cache" / "crops").rglob("*.png"))) == 2 * len(written)
    assert "embedded earlier" not in caplog.text


def test_nearest_on_a_machine_without_the_detection_cache_lends_the_boxes_the_first_machine_would(face_project):
    # The detection cache is local (not DVC-tracked): a teammate who pulled the embeddings and
    # adds frames to a video must lend its new faceless frames the boxes the first machine would
    # have lent, from every frame of the video, not only from the frames it detected itself.
    set_faces(face_project, no_face="nearest")
    settings, outputs = load(face_project / "params.yaml"), Outputs(face_project)
    manifest.run(settings, outputs)
    extract.run(settings, outputs)
    boxes = faces.read_cache(detections_dir(face_project))
    shutil.rmtree(face_project / "cache" / "faces")

    video = face_project / "data" / "fake" / "000_001"  # 0000 and 0001 have a face, 0002 has none
    noise_frame(9).save(video / "0003.png")
    noise_frame(10).save(video / "0004.png")
    face_frame(150, 60, seed=99)[0].save(video / "0005.png")
    table = manifest.run(settings, outputs)
    summary = extract.run(settings, outputs)
    assert summary.failed == 0
    digest = table.to_pandas().set_index("path")["digest"]
    # 0003 lies two frames from 0001 and two from 0005: the tie goes to the earlier, 0001.
    frame = Image.open(video / "0003.png").convert("RGB")
    backbone = backbones.load(settings.model, "cpu", "fp32")
    pixels = backbone.preprocess(faces.crop(frame, boxes[digest["fake/000_001/0001.png"]].box, 1.3, 64))
    (store,) = caches(outputs.embeddings)
    cached, found = store.read([digest["fake/000_001/0003.png"]], "projection")
    assert found.all()
    expected = backbone.embed(torch.from_numpy(pixels[None]))["projection"][0]
    np.testing.assert_allclose(cached[0], expected, rtol=1e-4, atol=1e-5)

    # `cache check` crops a face frame with its cached box (a copy of the detection cache); the 4
    # frames that were lent a box are left out (only extract lends): 3 with a faceless detection
    # cached, and 003_002/0002, which only the first machine detected (found faceless again here).
    detected = faces.read_cache(detections_dir(face_project))
    assert sum(d.box is None for d in detected.values()) == 3
    found = check.check(settings, outputs, rows=1000)
    assert found.agrees and found.rows == len(set(digest)) - 4
    assert faces.read_cache(detections_dir(face_project)) == detected


def test_predict_keeps_the_detections_of_new_images_out_of_the_tracked_cache(face_project, tmp_path):
    # cache/faces is a DVC output of extract: predict must not add to it (the next `dvc repro`
    # would rerun extract), as it keeps new images' embeddings out of the tracked cache.
    params = str(face_project / "params.yaml")
    for stage in ("manifest", "extract", "train"):
        assert cli.main([stage, "--params", params]) == 0
    tracked = face_project / "cache" / "faces"
    before = {p: p.read_bytes() for p in tracked.rglob("*") if p.is_file()}
    face_frame(60, 40, seed=123)[0].save(tmp_path / "new.png")
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(tmp_path / "new.png"), "--params", params, "--out", str(out)]) == 0
    (row,) = csv.DictReader(out.open())
    assert row["error"] == "" and 0.0 <= float(row["score"]) <= 1.0
    assert {p: p.read_bytes() for p in tracked.rglob("*") if p.is_file()} == before
    assert list((face_project / "cache" / "predict").rglob("part-*.parquet")), "its detection is kept beside"


def test_nearest_takes_the_closest_frame_with_a_face_and_the_earlier_on_ties():
    face, none = faces.Detection((0, 0, 10, 10), 1.0, 1), faces.Detection(None, 0.0, 0)
    other = faces.Detection((5, 5, 15, 15), 2.0, 1)
    detections = {"a": none, "b": face, "c": none, "d": none, "e": other, "x": none, "p": face, "q": none, "r": other}
    lent = faces.nearest_boxes({"v": ["a", "b", "c", "d", "e"], "w": ["x"], "t": ["p", "q", "r"]}, detections)
    assert lent == {"a": face, "c": face, "d": other, "q": face}, "a video without a face lends nothing"


def test_nearest_counts_frames_in_time_order_not_text_order():
    # Frame folders named 1.png ... 10.png: as text, 10.png sits between 1.png and 2.png; the
    # frames of a video file, in index order. A frame's neighbours are the frames beside it in time.
    import pyarrow as pa

    paths = ["fs/v/1.png", "fs/v/10.png", "fs/v/2.png", "fs/v/9.png", "fs/x.mp4", "fs/x.mp4"]
    table = pa.table(
        {
            "digest": ["k1", "k10", "k2", "k9", "m@12", "m@3"],
            "dataset": ["fs"] * 6,
            "video": ["v", "v", "v", "v", "x", "x"],
            "path": paths,
            "frame": [-1, -1, -1, -1, 12, 3],
        }
    )
    assert extract.frames_in_time_order(table) == {"fs/v": ["k1", "k2", "k9", "k10"], "fs/x": ["m@3", "m@12"]}


def test_the_video_demo_has_a_face_in_every_frame_but_the_last_two_and_the_same_bytes_everywhere(tmp_path, monkeypatch):
    first, again = tmp_path / "first", tmp_path / "again"
    assert demo.make_video_dataset(first, n_videos=2, frames=6) == 2 + 2 * 2
    videos = sorted(first.rglob("*.mp4"))
    assert [v.relative_to(first).parts[:2] for v in videos].count(("original_sequences", "youtube")) == 2
    data = (first / "manipulated_sequences" / "FaceSwap" / "c23" / "videos" / "000_001.mp4").read_bytes()
    assert frames.inspect(data).frame_count == 6
    found = faces.detector(FacesSettings())
    assert found.detect(np.asarray(frames.decode(data, 0))).box is not None
    assert found.detect(np.asarray(frames.decode(data, 5))).box is None
    # The same bytes run after run (x264's AVX-512 code wrote others on a Zen 4), and the bytes x264's
    # plain C code writes, which every machine runs alike (no FMA rounding, no thread count).
    c_code = {"threads": "1", "x264-params": "no-asm=1"}
    for options in (demo.X264_OPTIONS, demo.X264_OPTIONS, c_code):
        monkeypatch.setattr(demo, "X264_OPTIONS", options)
        shutil.rmtree(again, ignore_errors=True)
        demo.make_video_dataset(again, n_videos=2, frames=6)
        for video in videos:
            assert (again / video.relative_to(first)).read_bytes() == video.read_bytes(), (video, options)


def test_sigkill_during_face_detection_then_resume_gives_the_uninterrupted_result(face_project, tmp_path):
    update_params(face_project, "extract", shard_size=4, batch_size=4)
    reference_project = tmp_path / "reference"
    shutil.copytree(face_project, reference_project, ignore=shutil.ignore_patterns("cache"))
    # The reference runs in its own folder, whose params point at the same images.
    manifest.run(load(reference_project / "params.yaml"), Outputs(reference_project))
    run_to_end(reference_project)

    manifest.run(load(face_project / "params.yaml"), Outputs(face_project))
    proc = start_extract(face_project, pause_after_images=14)
    wait_until_paused(proc)
    wait_for_shards(proc, face_project, 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    (killed,) = caches(face_project / "cache" / "embeddings")
    assert 0 < killed.count() < 34 and killed.verify() == []
    run_to_end(face_project)

    def contents(project):
        (store,) = caches(project / "cache" / "embeddings")
        keys = sorted(store.keys())
        return keys, store.read(keys, "projection")[0], store.failures()

    keys, vectors, failures = contents(face_project)
    ref_keys, ref_vectors, ref_failures = contents(reference_project)
    assert keys == ref_keys and {k: v[1] for k, v in failures.items()} == {k: v[1] for k, v in ref_failures.items()}
    np.testing.assert_array_equal(vectors, ref_vectors)


def test_the_similarity_estimate_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    for _ in range(20):
        angle, scale, shift = rng.uniform(-1, 1), rng.uniform(0.3, 3), rng.uniform(-50, 50, 2)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = rng.uniform(0, 200, (5, 2))
        m = faces.similarity(src, src @ rotation.T + shift)
        np.testing.assert_allclose(m, np.hstack([rotation, shift[:, None]]), atol=1e-9)


def test_alignment_levels_a_tilted_face_as_deepfakebench_does():
    """A face tilted by 12 degrees: the plain crop keeps the tilt; the aligned crop (5 landmarks onto
    DeepfakeBench's template) levels the eyes, measured by landmarks found on each crop."""
    canvas = np.full((300, 400, 3), 90, np.uint8)
    x0, y0, x1, y1 = REGION
    canvas[40:250, 100:300] = skimage_data.astronaut()[y0:y1, x0:x1]
    frame = Image.fromarray(canvas).rotate(12, resample=Image.Resampling.BICUBIC, fillcolor=(90, 90, 90))
    found = faces.detector(FacesSettings(detector="dlib_hog"))
    detection = found.detect(np.asarray(frame))
    assert detection.points is not None and len(detection.points) == 5

    def eye_angle(image: Image.Image) -> float:
        (lx, ly), (rx, ry) = found.detect(np.asarray(image)).points[:2]
        return float(np.degrees(np.arctan2(ry - ly, rx - lx)))

    plain = eye_angle(faces.crop(frame, detection.box, 1.3, 128))
    aligned_image = faces.aligned_crop(frame, detection.points, 1.3, 128)
    assert aligned_image.size == (128, 128)
    aligned = eye_angle(aligned_image)
    assert abs(aligned) < 5.0 and abs(plain) > abs(aligned) + 4.0, (plain, aligned)


def bright_cells(helper, stride: int) -> list:
    """ONNX nodes: `s<stride>` = sigmoid(k (mean grey of each stride x stride cell - t)), from the
    graph's `grey` image and its constants `k` and `t`; strides other than 8 compare with `never`."""
    return [
        helper.make_node("AveragePool", ["grey"], [f"pool{stride}"], kernel_shape=[stride] * 2, strides=[stride] * 2),
        helper.make_node("Sub", [f"pool{stride}", "t" if stride == 8 else "never"], [f"d{stride}"]),
        helper.make_node("Mul", [f"d{stride}", "k"], [f"z{stride}"]),
        helper.make_node("Sigmoid", [f"z{stride}"], [f"s{stride}"]),
    ]


def scrfd_like_onnx(path, with_points: bool = True) -> None:
    """A tiny ONNX model in SCRFD's layout (3 strides, 2 anchors per place, distances from the
    anchor at the cell's top left corner): a stride-8 cell scores high where the 64 px input is
    bright over the whole cell, its box is the cell, its 5 landmarks sit at fixed places in it.
    Real SCRFD weights cannot be downloaded here."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["input.1"], ["grey"], axes=[1], keepdims=1)]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("k", 40.0), ("t", 0.3), ("never", 2.0))]
    outputs, scores, boxes, points = [], [], [], []
    for stride in (8, 16, 32):
        cells = (64 // stride) ** 2
        nodes += [
            *bright_cells(helper, stride),
            helper.make_node("Reshape", [f"s{stride}", f"cells{stride}"], [f"r{stride}"]),
            helper.make_node("Concat", [f"r{stride}", f"r{stride}"], [f"a{stride}"], axis=1),
            helper.make_node("Reshape", [f"a{stride}", f"anchors{stride}"], [f"score_{stride}"]),
            helper.make_node("Identity", [f"dist{stride}"], [f"bbox_{stride}"]),
            helper.make_node("Identity", [f"kps{stride}"], [f"kps_{stride}"]),
        ]
        inits += [
            numpy_helper.from_array(np.array([cells, 1], np.int64), f"cells{stride}"),
            numpy_helper.from_array(np.array([2 * cells, 1], np.int64), f"anchors{stride}"),
            numpy_helper.from_array(np.tile([0.0, 0.0, 1.0, 1.0], (2 * cells, 1)).astype(np.float32), f"dist{stride}"),
            numpy_helper.from_array(np.tile(KPS.ravel(), (2 * cells, 1)).astype(np.float32), f"kps{stride}"),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [2 * cells, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [2 * cells, 4]))
        points.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [2 * cells, 10]))
    outputs = scores + boxes + (points if with_points else [])
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph(nodes, "scrfd_like", [image], outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def yunet_like_onnx(path, size: int | None = 64) -> None:
    """A tiny ONNX model in YuNet's layout (outputs cls/obj/bbox/kps per stride 8, 16, 32, one
    anchor per place, BGR 0..255 input): a stride-8 cell scores high where the input is bright over
    the whole cell, its box is the cell, its landmarks at fixed places. `size` None: a free
    input size, as OpenCV's own model has."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["input"], ["grey"], axes=[1], keepdims=1)]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("k", 0.2), ("t", 180.0), ("never", 1e4))]
    inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "column"))
    outputs = {}
    for stride in (8, 16, 32):
        nodes += [
            *bright_cells(helper, stride),
            helper.make_node("Reshape", [f"s{stride}", "column"], [f"cls_{stride}"]),
            helper.make_node("Sub", [f"cls_{stride}", f"cls_{stride}"], [f"zero{stride}"]),
            helper.make_node("Add", [f"zero{stride}", "one"], [f"obj_{stride}"]),
            helper.make_node("Add", [f"zero{stride}", "box"], [f"bbox_{stride}"]),  # broadcast to (cells, 4)
            helper.make_node("Add", [f"zero{stride}", "kps"], [f"kps_{stride}"]),
        ]
        for kind in ("cls", "obj", "bbox", "kps"):
            outputs[f"{kind}_{stride}"] = helper.make_tensor_value_info(f"{kind}_{stride}", TensorProto.FLOAT, None)
    inits += [
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([0.5, 0.5, 0.0, 0.0], np.float32), "box"),  # centre of the cell, 1 x stride
        numpy_helper.from_array(KPS.ravel().astype(np.float32), "kps"),
    ]
    dims = [1, 3, size, size] if size else [1, 3, "height", "width"]
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    order = [f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in (8, 16, 32)]
    graph = helper.make_graph(nodes, "yunet_like", [image], [outputs[n] for n in order], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


KPS = np.array([[0.25, 0.25], [0.75, 0.25], [0.5, 0.5], [0.3, 0.8], [0.7, 0.8]])  # x stride, from the anchor


def test_an_onnx_detector_in_scrfd_layout_is_decoded_to_frame_pixels(tmp_path):
    pytest.importorskip("onnxruntime")
    scrfd_like_onnx(tmp_path / "det.onnx")
    found = faces.detector(FacesSettings(detector="onnx:det.onnx"), base_dir=tmp_path)
    frame = np.zeros((96, 128, 3), np.uint8)  # into the 64 px input at half size, letterboxed
    frame[32:48, 80:96] = 255  # one stride-8 cell of the input: (40, 16) .. (48, 24)
    detection = found.detect(frame)
    assert detection.box == pytest.approx((80, 32, 96, 48)) and detection.boxes == 1  # 2 anchors, one after NMS
    np.testing.assert_allclose(detection.points, (80, 32) + KPS * 16)  # the anchor + offsets, in the frame
    assert found.detect(np.zeros((96, 128, 3), np.uint8)).box is None
    assert found.describe()["onnx_sha256"] == hashlib.sha256((tmp_path / "det.onnx").read_bytes()).hexdigest()

    scrfd_like_onnx(tmp_path / "boxes_only.onnx", with_points=False)  # 6 outputs: no landmarks
    plain = faces.detector(FacesSettings(detector=f"onnx:{tmp_path / 'boxes_only.onnx'}")).detect(frame)
    assert plain.box == detection.box and plain.points is None
    with pytest.raises(ConfigError, match="does not exist"):
        faces.detector(FacesSettings(detector="onnx:missing.onnx"), base_dir=tmp_path)
    (tmp_path / "page.onnx").write_text("<html>a download's error page</html>")
    with pytest.raises(ConfigError, match=r"page\.onnx is not a model onnxruntime can load"):
        faces.detector(FacesSettings(detector="onnx:page.onnx"), base_dir=tmp_path)

    # YuNet's layout (told apart by its output names), with a fixed and with a free input size.
    for size, scale in ((64, 0.5), (None, 1.0)):
        yunet_like_onnx(tmp_path / "yunet.onnx", size)
        yunet = faces.detector(FacesSettings(detector="onnx:yunet.onnx"), base_dir=tmp_path)
        assert yunet.describe()["layout"] == "yunet" and yunet.describe()["threshold"] == 0.9
        found = yunet.detect(frame)  # a box of one stride-8 cell, inside the square (free input: 2 x 2 cells)
        side = 8 / scale
        assert found.box is not None and (found.box[2] - found.box[0]) == pytest.approx(side), size
        assert found.box[0] >= 80 and found.box[2] <= 96 and found.box[1] >= 32 and found.box[3] <= 48, found.box
        if size:  # one cell, (40, 16) of the input: its landmarks, back in frame pixels
            np.testing.assert_allclose(found.points, (80, 32) + KPS * 16)
        assert yunet.detect(np.zeros((96, 128, 3), np.uint8)).box is None


def test_face_crops_on_a_dask_cluster_are_the_local_ones(face_project):
    settings, outputs = load(face_project / "params.yaml"), Outputs(face_project)
    manifest.run(settings, outputs)
    local = extract.run(settings, outputs)
    (store,) = caches(outputs.embeddings)
    keys, failures = sorted(store.keys()), store.failures()
    expected, _ = store.read(keys, "projection")
    shutil.rmtree(outputs.embeddings)
    shutil.rmtree(face_project / "cache" / "faces")

    update_params(face_project, "extract", scheduler="dask", dask={"address": "", "n_workers": 2}, shard_size=8)
    set_faces(face_project, no_face="nearest")  # lent boxes travel to the workers
    distributed = extract.run(load(face_project / "params.yaml"), outputs)
    assert distributed.failed == 0 and distributed.embedded == local.images == 34
    (store,) = caches(outputs.embeddings)
    got, _ = store.read(keys, "projection")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # the frames with a face: the local vectors
    assert set(failures) <= store.keys(), "frames without a face borrowed their neighbour's box on the workers"
    assert len(faces.read_cache(detections_dir(face_project))) == local.images


def test_robustness_variants_of_face_frames_are_cropped_with_the_clean_frames_boxes(face_project, monkeypatch):
    from pipeline import perturb

    settings, outputs = load(face_project / "params.yaml"), Outputs(face_project)
    table = manifest.run(settings, outputs)
    extract.run(settings, outputs)

    def no_detecting(self, rgb):
        raise AssertionError("a perturbed frame was detected again instead of using the clean frame's box")

    monkeypatch.setattr(faces.DlibHog, "detect", no_detecting)
    update_params(face_project, "evaluate", robustness={"blur": [2.0]})
    settings = load(face_project / "params.yaml")
    extract.run(settings, outputs)
    (store,) = caches(outputs.embeddings)
    embedded = store.keys()
    test_keys = [k for k in perturb.test_keys(settings, table) if k in embedded]
    assert test_keys and {perturb.key(k, "blur=2") for k in test_keys} <= embedded

    key = test_keys[0]
    row = table.to_pandas().set_index("digest").loc[key]
    frame = Image.open(manifest_table.absolute_path(row.path, settings.data_root)).convert("RGB")
    box = faces.read_cache(detections_dir(face_project))[key].box
    backbone = backbones.load(settings.model, "cpu", "fp32")
    pixels = backbone.preprocess(faces.crop(perturb.apply(frame, "blur=2", perturb.key(key, "blur=2")), box, 1.3, 64))
    cached, _ = store.read([perturb.key(key, "blur=2")], "projection")
    expected = backbone.embed(torch.from_numpy(pixels[None]))["projection"][0]
    np.testing.assert_allclose(cached[0], expected, rtol=1e-4, atol=1e-5)

    # A teammate who pulled the embeddings lacks the detection cache (local, not DVC-tracked): the
    # clean frames are detected again, never the degraded ones, so the variants are the crops the
    # first machine would have made, and none is recorded as a face the blur hid.
    boxes = faces.read_cache(detections_dir(face_project))
    shutil.rmtree(face_project / "cache" / "faces")
    monkeypatch.undo()
    update_params(face_project, "evaluate", robustness={"blur": [2.0, 8.0]})
    settings = load(face_project / "params.yaml")
    extract.run(settings, outputs)
    (store,) = caches(outputs.embeddings)
    assert not [k for k in store.failures() if perturb.split(k)[1]]
    paths = table.to_pandas().drop_duplicates("digest").set_index("digest").loc[test_keys, "path"]

    def crop_of_blurred(key: str, path: str) -> np.ndarray:
        frame = Image.open(manifest_table.absolute_path(path, settings.data_root)).convert("RGB")
        blurred = perturb.apply(frame, "blur=8", perturb.key(key, "blur=8"))
        return backbone.preprocess(faces.crop(blurred, boxes[key].box, 1.3, 64))

    pixels = np.stack([crop_of_blurred(k, p) for k, p in paths.items()])
    cached, found = store.read([perturb.key(k, "blur=8") for k in test_keys], "projection")
    assert found.all()
    expected = backbone.embed(torch.from_numpy(pixels))["projection"]
    np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-5)
