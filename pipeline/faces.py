"""Faces: detect the face in each frame, crop a square around it, embed the crop.

Detectors behind one interface, all offline (weights ship inside their wheels):
  dlib_hog   dlib's HOG frontal face detector, DeepfakeBench's (the `dlib-bin` wheel; built in)
  dlib_cnn   dlib's CNN (MMOD) detector (weights in `face-recognition-models`)
  mtcnn      facenet-pytorch's MTCNN (weights in its wheel; install it with `--no-deps`, it pins
             an old torch; needs torchvision); also gives 5 landmarks
The most confident box is kept; frames where a second box scores above half of the best are
counted and reported (HOG also fires on non-faces). The crop is a square of `scale` x the box's
longer side around the box's centre (padded with black where it leaves the frame), resized to
`size` px (bicubic). A frame without a face follows `no_face`: `skip` records it as a failure
with its reason, like a bad image; `full_frame` embeds the whole frame; `nearest` crops it with
the box of the nearest frame of the same video that has a face (a second pass after the others;
a video without any face keeps its frames recorded as `no face found`).

Detections are cached per (frame key, detector) in `cache/faces/<detector>/` (Parquet shards
written atomically), so changing `scale` or `size` re-crops without detecting again; the crop
spec is part of the embedding cache's fingerprint, so full-frame and face caches coexist.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import atomic, images
from pipeline.config import ConfigError, FacesSettings

log = logging.getLogger(__name__)

NO_FACE = "no face found"


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 in frame pixels; None: no face
    score: float  # the kept box's score (detector units)
    boxes: int  # boxes found; more than one means the kept one had competition


class Detector:
    """One detector: `detect(rgb array) -> Detection`, built lazily in each process."""

    name = ""

    def describe(self) -> dict:
        return {"detector": self.name}

    def detect(self, rgb: np.ndarray) -> Detection:
        raise NotImplementedError


def _best(boxes: list, scores: list) -> Detection:
    if not boxes:
        return Detection(None, 0.0, 0)
    order = np.argsort(scores)[::-1]
    best = order[0]
    competing = sum(1 for i in order if scores[i] > 0.5 * scores[best]) if scores[best] > 0 else len(boxes)
    return Detection(tuple(float(v) for v in boxes[best]), float(scores[best]), int(competing))


class DlibHog(Detector):
    name = "dlib_hog"

    def __init__(self, upsample: int = 1):
        self.upsample = upsample
        self._detector = None

    def describe(self) -> dict:
        import dlib

        return {"detector": self.name, "upsample": self.upsample, "dlib": dlib.__version__}

    def detect(self, rgb: np.ndarray) -> Detection:
        if self._detector is None:
            import dlib

            self._detector = dlib.get_frontal_face_detector()
        rects, scores, _ = self._detector.run(np.ascontiguousarray(rgb), self.upsample, 0.0)
        return _best([(r.left(), r.top(), r.right(), r.bottom()) for r in rects], list(scores))


class DlibCnn(DlibHog):
    name = "dlib_cnn"

    def detect(self, rgb: np.ndarray) -> Detection:
        if self._detector is None:
            import dlib

            self._detector = dlib.cnn_face_detection_model_v1(model_file("mmod_human_face_detector.dat"))
        found = self._detector(np.ascontiguousarray(rgb), self.upsample)
        boxes = [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in found]
        return _best(boxes, [d.confidence for d in found])


class Mtcnn(Detector):
    name = "mtcnn"

    def __init__(self):
        self._detector = None

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"detector": self.name, "facenet_pytorch": version("facenet-pytorch")}

    def detect(self, rgb: np.ndarray) -> Detection:
        if self._detector is None:
            import torch
            from facenet_pytorch import MTCNN

            if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6):
                raise ConfigError("mtcnn needs torch >= 2.6 (whose torch.load reads weights only, never pickles).")
            self._detector = MTCNN(keep_all=True, device="cpu")
        boxes, probs = self._detector.detect(Image.fromarray(rgb))
        if boxes is None:
            return Detection(None, 0.0, 0)
        return _best([tuple(b) for b in boxes], [float(p) for p in probs])


def model_file(name: str) -> str:
    """A weights file of the `face-recognition-models` wheel, found without importing it (its
    own __init__ needs pkg_resources)."""
    found = importlib.util.find_spec("face_recognition_models")
    if found is None or found.origin is None:
        raise ConfigError("data.faces.detector dlib_cnn needs its weights: `pip install face-recognition-models`.")
    return os.path.join(os.path.dirname(found.origin), "models", name)


DETECTORS = {"dlib_hog": DlibHog, "dlib_cnn": DlibCnn, "mtcnn": Mtcnn}
REQUIRES = {"dlib_hog": "dlib", "dlib_cnn": "dlib", "mtcnn": "facenet_pytorch"}
INSTALL = {
    "dlib": "pip install dlib-bin face-recognition-models",
    "facenet_pytorch": "pip install --no-deps facenet-pytorch",
}


def detector(settings: FacesSettings) -> Detector:
    module = REQUIRES[settings.detector]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"data.faces.detector {settings.detector} needs {module}: `{INSTALL[module]}`.")
    return DETECTORS[settings.detector]()


def crop(rgb: Image.Image, box: tuple[float, float, float, float], scale: float, size: int) -> Image.Image:
    """A `size` x `size` crop: the square of `scale` x the box's longer side, centred on the box."""
    x0, y0, x1, y1 = box
    side = scale * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    return rgb.crop(region).resize((size, size), Image.Resampling.BICUBIC)  # outside the frame: black


def spec(settings: FacesSettings) -> dict:
    """The part of the embedding fingerprint that face cropping contributes."""
    return {**asdict(settings), **detector(settings).describe()}


class FaceCrop:
    """A preprocess callable for one item: detect (or reuse the cached detection), crop, then the
    backbone's own preprocessing. `detection` holds what was found, for the detection cache."""

    def __init__(self, settings: FacesSettings, found: Detector, preprocess, cached: Detection | None):
        self.settings, self.found, self.preprocess, self.detection = settings, found, preprocess, cached

    def __call__(self, rgb: Image.Image) -> np.ndarray:
        if self.detection is None:
            self.detection = self.found.detect(np.asarray(rgb))
        if self.detection.box is None:
            if self.settings.no_face == "full_frame":
                return self.preprocess(rgb)
            raise images.Rejected(NO_FACE)
        return self.preprocess(crop(rgb, self.detection.box, self.settings.scale, self.settings.size))


class FacePreprocess:
    """The preprocess the reader gets when `data.faces` is set: one `FaceCrop` per item, with the
    item's cached detection when there is one (read once, before the reader's processes start)."""

    def __init__(self, settings: FacesSettings, found: Detector, preprocess, cached: dict[str, Detection]):
        self.settings, self.found, self.preprocess, self.cached = settings, found, preprocess, cached
        self.borrowed: dict[str, Detection] = {}  # `nearest`: boxes lent by other frames (never cached)

    def for_item(self, key: str) -> FaceCrop:
        return FaceCrop(self.settings, self.found, self.preprocess, self.borrowed.get(key) or self.cached.get(key))


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
    [("key", pa.string()), ("box", pa.list_(pa.float64(), 4)), ("score", pa.float64()), ("boxes", pa.int32())]
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
            out[r["key"]] = Detection(tuple(r["box"]) if r["box"] is not None else None, r["score"], r["boxes"])
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

    def __init__(self, settings: FacesSettings, preprocess, directory: Path):
        found = detector(settings)
        self.spec = spec(settings)
        self.directory = cache_dir(directory, found)
        cached = read_cache(self.directory)
        self.preprocess = FacePreprocess(settings, found, preprocess, cached)
        self._known, self._new = set(cached), {}
        self.competing = self.missing = 0

    @classmethod
    def create(cls, settings, preprocess) -> FaceStage:
        return cls(settings.data.faces, preprocess, settings.base_dir / "cache" / "faces")

    def found(self, keys: list[str], detections: list) -> None:
        for key, detection in zip(keys, detections, strict=True):
            if detection is None or key in self._known:
                continue
            self._known.add(key)
            self._new[key] = detection
            self.competing += detection.boxes > 1
            self.missing += detection.box is None
        if len(self._new) >= self.COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        write_cache(self.directory, self._new)
        self._new = {}
        if self.competing or self.missing:
            log.info(
                "face detection: %d frames without a face (data.faces.no_face decides), %d with competing boxes "
                "(the most confident was kept)",
                self.missing,
                self.competing,
            )
