"""params.yaml -> typed, validated settings.

Only this module parses the params file. Every problem is raised as a `ConfigError` whose
message is one sentence naming the key and the fix; the CLI prints it and exits with 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(Exception):
    """A problem in the user's input, worded for the user."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    label: Literal["real", "fake", "mixed"]  # mixed: each video's label from `labels`
    method: str | None = None
    # label: mixed only: a labels file, e.g. DFDC's metadata.json ({"<video>.mp4": {"label": "FAKE"}}),
    # or lines "<real|fake> <video path>"; relative to params.yaml
    labels: str | None = None


@dataclass(frozen=True)
class SplitSpec:
    val: float = 0.14
    test: float = 0.14
    seed: int = 0
    split_dir: str | None = None


# A frame file name such as `000_003_0042.png` or `000_0042.png`: the video id is everything
# before the last `_<digits>` (used only for frames that sit directly in a dataset folder).
DEFAULT_VIDEO_PATTERN = r"^(?P<video>.+?)_\d+$"


@dataclass(frozen=True)
class FramesSettings:
    per_video: int | None = None  # frames kept per video: evenly spaced; None: every frame of a
    # frame folder, and 32 frames of a video file
    sampling: Literal["linspace"] = "linspace"


@dataclass(frozen=True)
class FacesSettings:
    detector: str = "dlib_hog"  # dlib_hog | dlib_cnn | mtcnn | onnx:<path to an SCRFD .onnx file>
    scale: float = 1.3  # the crop's side, as a multiple of the face box's longer side
    size: int = 256  # the crop is resized to size x size pixels
    align: bool = False  # DeepfakeBench's 5-landmark similarity alignment before the crop
    no_face: Literal["skip", "full_frame", "nearest"] = "skip"
    # dlib detectors: times the frame is upsampled before detection (1: DeepfakeBench's, finds
    # faces from about 40 px); auto: not upsampled (faces from about 80 px), and once where that
    # finds no face
    upsample: Literal[0, 1, 2, "auto"] = "auto"
    save_crops: bool = False  # also write each embedded crop as a PNG under cache/crops/


@dataclass(frozen=True)
class DataSettings:
    root: str
    datasets: dict[str, DatasetSpec]
    split: SplitSpec = SplitSpec()
    video_pattern: str = DEFAULT_VIDEO_PATTERN
    frames: FramesSettings = FramesSettings()
    faces: FacesSettings | None = None  # None: embed whole frames


@dataclass(frozen=True)
class ModelSettings:
    name: str
    layers: list[str] = field(default_factory=lambda: ["projection"])
    revision: str | None = None
    dtype: Literal["float32", "float16"] = "float32"  # how embeddings are stored


@dataclass(frozen=True)
class DaskSettings:
    address: str | None = None  # a running scheduler, e.g. tcp://10.0.0.5:8786; empty: start a LocalCluster
    n_workers: int = 2  # LocalCluster processes (one per GPU on a multi-GPU machine)


@dataclass(frozen=True)
class ExtractSettings:
    format: Literal["parquet", "hdf5"] = "parquet"
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the forward pass (GPU throughput; compiling takes a minute)
    shard_size: int = 4096
    scheduler: Literal["local", "dask"] = "local"
    dask: DaskSettings = DaskSettings()


@dataclass(frozen=True)
class TrainSettings:
    datasets: list[str]
    probe: Literal["logreg", "linear_svm", "mlp"] = "logreg"
    C: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    normalize: Literal["none", "l2", "standardize", "l2+standardize"] = "standardize"
    layer: str | list[str] = "projection"  # a list: the probe reads those layers concatenated, each L2-normalised
    max_iter: int = 2000
    # Caches larger than memory: read shard by shard and fit with SGD (partial_fit) instead.
    stream: bool = False
    epochs: int = 5  # SGD passes over the training rows when streaming
    hidden: int = 256  # mlp: width of its one hidden layer
    seed: int = 0  # mlp: weight initialisation and minibatch order (deterministic for a seed)

    @property
    def layers(self) -> list[str]:
        """The layers the probe reads (train.layer as a list)."""
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)


@dataclass(frozen=True)
class ZeroShotSettings:
    # Text prompts embedded by the model's text tower at extract time; an image's zero-shot
    # score is softmax(cos(image, fake prompts) vs cos(image, real prompts)) with CLIP's scale.
    prompts: dict[str, list[str]] = field(
        default_factory=lambda: {
            "real": ["a photo of a real human face"],
            "fake": ["a photo of a fake, manipulated human face", "a deepfake face"],
        }
    )


# Devices the extractor can run on (torch accepts more, e.g. meta, which computes nothing).
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

PROTOCOLS = ("heldout", "cross_manipulation", "leave_one_out", "zero_shot", "cross_dataset", "layers", "robustness")


@dataclass(frozen=True)
class RobustnessSettings:
    """Degradations of the test images (`pipeline.perturb`), each level embedded once and cached."""

    jpeg: list[int] = field(default_factory=list)  # JPEG quality, e.g. [100, 80, 60, 40, 20]
    blur: list[float] = field(default_factory=list)  # Gaussian blur sigma in pixels, e.g. [0.5, 1, 2, 3]
    noise: list[float] = field(default_factory=list)  # Gaussian noise sigma in 8-bit levels, e.g. [5, 10, 20]
    resize: list[int] = field(default_factory=list)  # shorter side downscaled to, then back, e.g. [112, 64]


@dataclass(frozen=True)
class CrossDatasetSpec:
    """A test set from another dataset, with its own reals (e.g. Celeb-DF v2: Celeb-real and
    YouTube-real vs Celeb-synthesis): all of its frames are test frames (no ratio split), or only
    those of the videos an official list names."""

    real: list[str]
    fake: list[str]
    # Celeb-DF's List_of_testing_videos.txt format: one "<1 real | 0 fake> <folder>/<video file>"
    # per line (or just the path), or a JSON split file ({"<folder>/<video>": {"set": "test", ...}});
    # relative to params.yaml
    test_list: str | None = None


@dataclass(frozen=True)
class EvaluateSettings:
    datasets: list[str]
    protocols: list[
        Literal["heldout", "cross_manipulation", "leave_one_out", "zero_shot", "cross_dataset", "layers", "robustness"]
    ] = field(default_factory=lambda: [p for p in PROTOCOLS if p != "layers"])  # layers: one probe per layer
    seeds: list[int] = field(default_factory=lambda: [0])
    bootstrap: int = 1000
    video_pooling: Literal["mean", "median", "max"] = "mean"  # a video's score from its frames' scores
    zero_shot: ZeroShotSettings = ZeroShotSettings()
    cross_dataset: dict[str, CrossDatasetSpec] = field(default_factory=dict)  # name -> its real and fake datasets
    robustness: RobustnessSettings = RobustnessSettings()  # perturbed test images (extract embeds them)


@dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSettings
    extract: ExtractSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    # Directory of the params file: relative paths in it are relative to this.
    base_dir: Path = Path(".")

    @property
    def data_root(self) -> Path:
        return self.resolve(self.data.root)

    def resolve(self, path: str) -> Path:
        """A path from params.yaml, made absolute against the params file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def dataset_dir(self, name: str) -> Path:
        p = Path(self.data.datasets[name].path).expanduser()
        return p if p.is_absolute() else self.data_root / p


# --------------------------------------------------------------------------- loading


def load(path: str | Path = "params.yaml") -> Settings:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist; pass --params PATH or run from the project root.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax there.") from None
    return from_dict(raw, base_dir=path.resolve().parent)


def from_dict(raw: object, base_dir: Path = Path(".")) -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping with sections data, model, extract, train, evaluate.")
    settings = _build(Settings, {**raw, "base_dir": base_dir}, "")
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    """Rules that span several keys."""
    sp = s.data.split
    for key in ("val", "test"):
        value = getattr(sp, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.split.{key} is {value}; use a fraction between 0 and 1.")
    if sp.val + sp.test >= 1.0:
        raise ConfigError("data.split.val + data.split.test must leave some data for training (sum below 1).")
    try:
        pattern = re.compile(s.data.video_pattern)
    except re.error as exc:
        raise ConfigError(f"data.video_pattern is not a valid regular expression ({exc}).") from None
    if "video" not in pattern.groupindex:
        raise ConfigError("data.video_pattern needs a named group (?P<video>...) that captures the video id.")
    if not s.data.datasets:
        raise ConfigError("data.datasets is empty; define at least one real and one fake dataset folder.")
    for name in s.data.datasets:
        if "/" in name or not name.strip():  # a video is keyed `<dataset>/<video id>`
            raise ConfigError(
                f"data.datasets has a dataset named {name!r}; a name may not be blank or hold '/' (videos are keyed "
                "'<dataset>/<video>'): rename it, e.g. with '_'."
            )
    faces = s.data.faces
    if (
        faces is not None
        and faces.detector not in ("dlib_hog", "dlib_cnn", "mtcnn")
        and not (faces.detector.startswith("onnx:") and len(faces.detector) > len("onnx:"))
    ):
        raise ConfigError(
            f"data.faces.detector '{faces.detector}' is not a detector: use dlib_hog, dlib_cnn, mtcnn or "
            "onnx:<path of an SCRFD .onnx file>."
        )
    if faces is not None and (faces.scale <= 0 or faces.size < 8):
        raise ConfigError("data.faces needs scale > 0 (e.g. 1.3) and size of at least 8 pixels (e.g. 256).")
    if s.data.frames.per_video is not None and s.data.frames.per_video < 1:
        raise ConfigError(f"data.frames.per_video is {s.data.frames.per_video}; use at least 1, or leave it out.")

    known = sorted(s.data.datasets)
    for section in ("train", "evaluate"):
        for name in getattr(s, section).datasets:
            if name not in s.data.datasets:
                raise ConfigError(
                    f"{section}.datasets names '{name}', which is not defined in data.datasets "
                    f"(defined: {', '.join(known)})."
                )
    for name, spec in s.data.datasets.items():
        if (spec.label == "mixed") != (spec.labels is not None):
            raise ConfigError(
                f"data.datasets.{name}: a labels file goes with label: mixed (and label: mixed needs one); "
                "set both, or neither."
            )
        if spec.labels is not None and not s.resolve(spec.labels).is_file():
            raise ConfigError(f"data.datasets.{name}.labels {s.resolve(spec.labels)} does not exist.")
        if spec.label == "mixed" and (name in s.train.datasets or name in s.evaluate.datasets):
            raise ConfigError(
                f"data.datasets.{name} has label: mixed (a labels file); use it as a cross-dataset test set "
                "(evaluate.cross_dataset), not in train.datasets or evaluate.datasets."
            )
    labels = {s.data.datasets[n].label for n in s.train.datasets}
    if labels != {"real", "fake"}:
        raise ConfigError("train.datasets must include at least one real and one fake dataset.")
    for name in s.evaluate.datasets:
        if s.data.datasets[name].label != "fake":
            raise ConfigError(
                f"evaluate.datasets names '{name}', a real dataset; list fake datasets there "
                "(each is scored together with the held-out real test split)."
            )
    for set_name, spec in s.evaluate.cross_dataset.items():
        where = f"evaluate.cross_dataset.{set_name}"
        if not spec.real or not spec.fake:
            raise ConfigError(f"{where} needs real: [...] and fake: [...] datasets (its own reals and its fakes).")
        for side, label in (("real", "real"), ("fake", "fake")):
            for name in getattr(spec, side):
                if name not in s.data.datasets:
                    raise ConfigError(f"{where}.{side} names '{name}', which is not defined in data.datasets.")
                if s.data.datasets[name].label not in (label, "mixed"):
                    raise ConfigError(f"{where}.{side} names '{name}', whose label is {s.data.datasets[name].label}.")
                if name in s.train.datasets:
                    raise ConfigError(
                        f"{where} names '{name}', which train.datasets trains on; a cross-dataset test set must be "
                        "unseen in training."
                    )
        if spec.test_list is not None and not s.resolve(spec.test_list).is_file():
            raise ConfigError(f"{where}.test_list {s.resolve(spec.test_list)} does not exist.")
    rb = s.evaluate.robustness
    if (
        any(not 1 <= q <= 100 for q in rb.jpeg)
        or any(v <= 0 for v in [*rb.blur, *rb.noise])
        or any(n < 8 for n in rb.resize)
    ):
        raise ConfigError(
            "evaluate.robustness: jpeg qualities are 1..100, blur and noise sigmas above 0, resize sides at least 8."
        )
    for i, sigma in enumerate(rb.noise):
        if sigma < 1:
            raise ConfigError(
                f"evaluate.robustness.noise[{i}] is {sigma:g}, in 8-bit levels (0-255), where it changes almost no "
                f"pixel; for a fraction of the range multiply by 255 ({sigma:g} -> {sigma * 255:g})."
            )
    prompts = s.evaluate.zero_shot.prompts
    if sorted(prompts) != ["fake", "real"] or not all(prompts.values()):
        raise ConfigError("evaluate.zero_shot.prompts needs two non-empty lists, real: [...] and fake: [...].")
    if not s.evaluate.seeds:
        raise ConfigError("evaluate.seeds is empty; use [0] for one split, or e.g. [0, 1, 2].")
    if s.evaluate.bootstrap < 0:
        raise ConfigError("evaluate.bootstrap must be 0 (no confidence intervals) or a number of resamples.")
    if not s.model.layers:
        raise ConfigError("model.layers is empty; keep at least 'projection'.")
    repeated = sorted({layer for layer in s.model.layers if s.model.layers.count(layer) > 1})
    if repeated:
        raise ConfigError(f"model.layers names '{repeated[0]}' more than once; list each layer once.")
    read = s.train.layers
    if not read or len(set(read)) != len(read):
        raise ConfigError("train.layer is an empty list or names a layer twice; name each layer once.")
    for layer in read:
        if layer not in s.model.layers:
            raise ConfigError(
                f"train.layer '{layer}' is not in model.layers {s.model.layers}; "
                "add it to model.layers and re-run extract."
            )
    if len(read) > 1 and s.train.stream:
        raise ConfigError("train.layer with several layers reads the cache in memory; set train.stream: false.")
    if s.train.probe == "mlp" and s.train.stream:
        raise ConfigError("train.probe mlp reads the cache in memory; set train.stream: false (or use logreg).")
    if s.train.hidden < 1:
        raise ConfigError(f"train.hidden is {s.train.hidden}; it must be at least 1.")
    if not s.train.C or any(c <= 0 for c in s.train.C):
        raise ConfigError("train.C must be a non-empty list of positive numbers, e.g. [0.01, 0.1, 1.0].")
    at_least_one = {"extract": ("batch_size", "shard_size"), "train": ("max_iter", "epochs")}
    for section, keys in at_least_one.items():
        for key in keys:
            value = getattr(getattr(s, section), key)
            if value < 1:
                raise ConfigError(f"{section}.{key} is {value}; it must be at least 1.")
    if not DEVICE_PATTERN.match(s.extract.device):
        raise ConfigError(f"extract.device is {s.extract.device!r}; use auto, cpu, cuda, cuda:N or mps.")
    if s.extract.dask.n_workers < 1:
        raise ConfigError("extract.dask.n_workers must be at least 1.")
    if s.extract.num_workers < 0:
        raise ConfigError("extract.num_workers must be 0 (decode in the main process) or more.")


# --------------------------------------------------------------------------- generic builder


def _build(cls: type, raw: object, where: str):
    """Instantiate dataclass `cls` from `raw`, checking keys and types against its annotations."""
    label = where or "params.yaml"
    if raw is None and where:
        raise ConfigError(f"{label} is empty; write `{label}: {{}}` for all its defaults, or give its keys.")
    if not isinstance(raw, dict):
        raise ConfigError(f"{label} must be a mapping of keys to values, not {_kind(raw)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{name}' in params.yaml; valid keys here are: {', '.join(sorted(fields))}.")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"params.yaml is missing the required key '{key}'.")
            continue
        values[name] = _coerce(hints[name], raw[name], key)
    return cls(**values)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Path:
        return Path(value)
    if origin in (typing.Union, types.UnionType):
        if (value is None or value == "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        if isinstance(value, list) and lists:  # e.g. str | list[str]: a list is the list form
            return _coerce(lists[0], value, key)
        return _coerce(next(a for a in inner if a not in lists), value, key)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{key} is {value!r}; choose one of: {choices}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, not {_kind(value)}.")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, not {_kind(value)}.")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {_kind(value)}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number, not {_kind(value)}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, not {_kind(value)}.")
        if not math.isfinite(value):
            raise ConfigError(f"{key} is {value}; it must be a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, not {_kind(value)}.")
        return value
    raise TypeError(f"unsupported settings type {tp!r} for {key}")  # a bug in this module, not user input


def _kind(value: object) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", str: f"the text {value!r}", bool: f"{value}"}.get(
        type(value), f"{value!r}"
    )


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"C": [0.5]}} -> {"train.C": "[0.5]"}: a nested dict's values by dotted path
    (strings as they are, the rest as JSON), for params (`compare`) and cache descriptions."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out
