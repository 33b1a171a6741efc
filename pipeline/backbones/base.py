"""The backbone interface and what every family shares: finding the checkpoint (local directory
or Hugging Face cache), refusing pickle-only weights, device and precision policy, and the
description that becomes the cache fingerprint.

Layers a cache can store, chosen by `model.layers`:
  projection   the projected image embedding (CLIP's `image_embeds`), the default
  pooled       the pooled CLS token before the projection
  block_<i>    the CLS token after transformer block i (0-based; before the final layer norm)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import images
from pipeline.config import ConfigError, ModelSettings

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^block_(\d+)$")
WEIGHT_SUFFIXES = (".safetensors",)

# The version of the embedding code: bump it whenever a change alters the numbers an unchanged
# model gives for unchanged images (preprocessing, pooling, layer definitions, autocast policy).
# It is part of every cache fingerprint, so old caches are never read as new ones; the golden
# test (tests/test_golden.py) fails when the numbers move without a bump.
EMBEDDING_VERSION = 1


def resolve_directory(model: ModelSettings) -> Path:
    """A local directory holding the model: the path itself, or its Hugging Face cache snapshot."""
    local = Path(model.name).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.name, revision=model.revision, local_files_only=True))
    except Exception:
        raise ConfigError(
            f"model.name '{model.name}' is neither a local directory nor in the Hugging Face cache; "
            f"download it first (`huggingface-cli download {model.name}`) or point model.name at a local copy."
        ) from None


def weight_files(directory: Path, convert: str | None = None) -> list[Path]:
    """The checkpoint's safetensors files; a clear error (before anything is loaded) if it has
    none, with `convert` (a command with DIR for the directory) as the fix."""
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"only {', '.join(pickled)} (pickle files, never loaded here)" if pickled else "no weight files"
        command = (convert or "").replace("DIR", str(directory))
        raise ConfigError(
            f"model directory {directory} has {found}; convert it once to safetensors where you trust it: `{command}`."
        )
    return files


# sha256 of weight files already hashed, by (resolved path, size, mtime_ns): a file whose size
# and mtime are unchanged is not read again (`pipeline.backbones.Known` keeps it across runs).
FILE_DIGESTS: dict[str, str] = {}


def file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def weights_digest(directory: Path) -> str:
    """sha256 over the model's weight files (names and bytes), in name order."""
    h = hashlib.sha256()
    for p in weight_files(directory):
        h.update(p.name.encode())
        stamp = file_stamp(p)
        if stamp not in FILE_DIGESTS:
            with open(p, "rb") as fh:
                FILE_DIGESTS[stamp] = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(bytes.fromhex(FILE_DIGESTS[stamp]))
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"extract.device '{device}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("extract.device asks for CUDA but no CUDA GPU is visible; use device: auto or cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"extract.device is {device!r}, but this machine sees {torch.cuda.device_count()} CUDA GPU(s) "
            "(cuda:0 first); use one of them, or device: cuda."
        )
    if dev.type == "mps" and not _mps_available():
        raise ConfigError("extract.device asks for MPS but this machine has no Apple GPU; use device: auto or cpu.")
    return dev


def out_of_memory(device: torch.device, doing: str, fix: str) -> ConfigError:
    """The sentence for `torch.OutOfMemoryError` on `device` while `doing`, with the `fix`."""
    where = str(device)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device)
        where = f"{device} ({gpu.name}, {gpu.total_memory / 2**30:.1f} GiB)"
    return ConfigError(f"{where} ran out of memory {doing}; {fix}.")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is one fixed precision per device class: bf16 (fp16 where the GPU lacks native
    bf16: `gpu_precision`) on CUDA, fp32 on CPU and MPS. On CPU it never depends on the
    processor's features, so teammates with and without native bf16 fill the same cache (bf16
    on CPU is there to ask for).
    `extract.run` resolves `auto` to the precision of the cache already shared, when there is one."""
    if precision != "auto":
        if (warning := emulated(precision, device)) is not None:
            log.warning(warning)
        return precision
    if device.type == "cuda":
        return gpu_precision(torch.cuda.get_device_capability(device), rocm=bool(torch.version.hip))
    return "fp32"


def gpu_precision(capability: tuple[int, int], rocm: bool = False) -> str:
    """`auto`'s precision on a CUDA GPU of this compute capability: bf16 where its tensor cores
    have it (Ampere, 8.0, and later; every ROCm GPU, as torch counts them), else fp16 (a T4, a
    V100), where torch would run bf16 emulated, far slower: `torch.cuda.is_bf16_supported()`
    counts the emulation and says yes there."""
    return "bf16" if rocm or capability[0] >= 8 else "fp16"


def emulated(precision: str, device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """The warning for a precision that `device` runs emulated, slower than another, else None:
    bf16/fp16 on a CPU without native bf16, bf16 on a CUDA GPU before Ampere (`gpu_precision`;
    a T4 meets it where a teammate's A100 made the bf16 cache that auto extends). `capability`:
    the GPU's compute capability, read from it when not given."""
    if device.type == "cpu" and precision in ("bf16", "fp16") and not cpu_supports_bf16():
        return f"this CPU has no native bf16/fp16: {precision} is emulated and slower than fp32"
    if device.type == "cuda" and precision == "bf16":
        capability = capability or torch.cuda.get_device_capability(device)
        if gpu_precision(capability, rocm=bool(torch.version.hip)) != "bf16":
            return (
                f"this GPU (compute capability {capability[0]}.{capability[1]}) has no bf16 tensor cores: torch "
                "emulates bf16, several times slower than fp16; set extract.precision: fp16 for a cache of "
                "its own, unless this run must extend the project's bf16 cache"
            )
    return None


class Backbone(ABC):
    """A loaded vision tower that turns preprocessed batches into {layer: embeddings}.

    A family implements `forward` (and `embed_text` where it has a text tower); `preprocess`
    is a picklable callable (it runs in DataLoader workers) from an RGB PIL image to a float32
    array (3, h, w), raising `images.Rejected` for an image it cannot use."""

    def __init__(
        self,
        name: str,
        preprocess: Callable[[Image.Image], np.ndarray],
        layers: list[str],
        dims: dict[str, int],
        device: torch.device,
        precision: str,
        description: dict,
    ):
        self.name = name
        self.preprocess = preprocess
        self.layers = layers
        # {layer: i} for each `block_<i>` layer, worked out once: `forward` does no work on layer
        # names, which torch.compile (`extract.compile`) could not trace (a graph break per batch)
        self.blocks = {layer: i for layer in layers if (i := block_index(layer)) is not None}
        self.dims = dims
        self.device = device
        self.precision = precision
        self.description = description  # everything that changes the numbers -> the cache fingerprint

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch on the device -> {layer: (n, dim) tensor}, for every layer in `self.layers`."""

    def embed_text(self, prompts: list[str]) -> tuple[np.ndarray, dict] | None:
        """(L2-normalised text embeddings (n, dim) in the `projection` space, the model's scoring
        {"logit_scale", "logit_bias", "scoring": "softmax" | "sigmoid"}), or None when the family
        or checkpoint has no text tower."""
        return None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def embed(self, pixels: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """A batch (n, 3, h, w) float32 (uint8 from a deferred preprocessing; or a dict of float32
        batches, for processors with several outputs) -> {layer: float32 array (n, dim)}."""
        return self.submit(pixels).result()

    @torch.inference_mode()
    def submit(self, pixels: torch.Tensor | dict[str, torch.Tensor]) -> Pending:
        """Start one batch without waiting for it: on a GPU the host->device copy (non-blocking;
        from pinned memory when the reader pinned it), the forward pass and the device->host copy
        of the embeddings into pinned buffers are queued on the current stream and an event marks
        their end, so the caller can read and submit the next batch while this one runs
        (`embedder.embed_items` keeps a few in flight). On a CPU the work is done here."""
        cuda = self.device.type == "cuda"
        if isinstance(pixels, dict):
            pixels = {k: v.to(self.device, non_blocking=cuda) for k, v in pixels.items()}
        else:
            pixels = pixels.to(self.device, non_blocking=cuda)
            if pixels.dtype == torch.uint8:  # a deferred preprocessing: normalised here, on the device
                pixels = self.preprocess.normalize(pixels)
        with self.autocast():
            result = self.forward(pixels)
        host = {k: torch.empty(v.shape, dtype=torch.float32, pin_memory=cuda) for k, v in result.items()}
        for k, v in result.items():
            host[k].copy_(v.float(), non_blocking=cuda)
        done = torch.cuda.Event() if cuda else None
        if done is not None:
            done.record()
        return Pending(host, done)

    def compile(self, batch_size: int = 0, **options) -> None:
        """`extract.compile`: the forward pass through torch.compile (kernels fused for this model
        and batch shape), compiled once per process: every batch reaches it as `batch_size` rows
        (`extract.batch_size`; 0: the first batch's size) and as an inference tensor. A smaller
        batch (a run's last; one whose images partly failed to decode, also the first) is padded
        with copies of its last image, whose rows are dropped (a model in eval mode computes each
        image on its own); a batch made outside `torch.inference_mode`, as a CPU reader's is, is
        copied: dynamo would otherwise compile again for either. `options` go to torch.compile
        (the tests trace with `backend="eager"`: dynamo's graphs, no kernels)."""
        compiled = torch.compile(self.forward, **options)
        shape: list[int] = [batch_size] if batch_size > 0 else []  # the size every batch is padded to

        def forward(pixels: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            named = pixels if isinstance(pixels, dict) else {"": pixels}
            n = next(iter(named.values())).shape[0]
            if not shape:
                shape.append(n)
            padded = {k: _padded(v, shape[0]) for k, v in named.items()}
            result = compiled(padded if isinstance(pixels, dict) else padded[""])
            return {k: v[:n] for k, v in result.items()}

        forward.compiled = compiled
        self.forward = forward


def _padded(batch: torch.Tensor, size: int) -> torch.Tensor:
    """`batch` as an inference tensor of at least `size` rows (its last row repeated)."""
    missing = size - batch.shape[0]
    if missing > 0:
        return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])])
    return batch if batch.is_inference() else batch.clone()


def install_output_hooks(module: torch.nn.Module) -> None:
    """Before compiling a transformers model: transformers 5 installs the hooks that collect
    hidden states on the first call that asks for them, under a threading lock, which dynamo cannot
    trace (the compiled forward pass would break its graph there for good). Installed now, the
    call finds them in place. Older transformers have no such hooks."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    maybe_install_capturing_hooks(module)


class Pending:
    """A submitted batch's embeddings; `result()` waits for this batch only (a CUDA event)."""

    def __init__(self, host: dict[str, torch.Tensor], done=None):
        self.host, self.done = host, done

    def result(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return {k: v.numpy() for k, v in self.host.items()}


class LibraryTransform:
    """A library's own image transform (open_clip's, timm's: torchvision) for one RGB image ->
    float32 array (3, h, w); an image whose resize would be absurd is refused first."""

    def __init__(self, transform, shortest_edge: int):
        self.transform, self.shortest_edge = transform, shortest_edge

    def __call__(self, image: Image.Image) -> np.ndarray:
        images.check_resize(image.size, self.shortest_edge)
        return self.transform(image).numpy().astype(np.float32, copy=False)


def require(module: str, kind: str, extra: str):
    """Import an optional family's library, or one clear sentence on how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"this is {kind} checkpoint and {module} cannot be imported ({exc}); install the extra with the torch "
            f"you have: `pip install -c constraints.txt -e '.[{extra}]'` (it needs torchvision)."
        ) from None


@contextlib.contextmanager
def building(name: str, directory: Path):
    """Around building a transformers model from checkpoint files: its warnings about weights the
    vision side leaves unused (the text tower) silenced, and any failure one error naming the files."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    except Exception as exc:  # any failure to build the model from these files is a problem with the files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model '{name}' could not be loaded from {directory} ({first}); "
            "check its config.json and weights against the original checkpoint."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def block_index(layer: str) -> int | None:
    """i for `block_<i>`, None for any other layer name."""
    m = _BLOCK.match(layer)
    return int(m.group(1)) if m else None


def describe(
    directory: Path,
    config: dict,
    preprocess: dict,
    model: ModelSettings,
    precision: str,
    family: str,
    libraries: dict[str, str],
) -> dict:
    """What the cache fingerprint hashes: the family, the embedding code's version, the weights
    and config, the effective preprocessing, the layers, the compute precision, the storage dtype
    and the versions of the libraries whose code computes the numbers."""
    return {
        "family": family,
        "embedding_version": EMBEDDING_VERSION,
        "model": {"weights_sha256": weights_digest(directory), "config": config_digest(config)},
        "preprocess": preprocess,
        "layers": list(model.layers),
        "precision": precision,
        "dtype": model.dtype,
        "libraries": libraries,
    }


def fields(
    directory: Path,
    config: dict,
    model: ModelSettings,
    device: torch.device,
    precision: str,
    preprocess: Callable[[Image.Image], np.ndarray],
    preprocess_description: dict,
    dims: dict[str, int],
    family: str,
    libraries: tuple[str, ...],
) -> dict:
    """The keyword arguments of `Backbone.__init__` that every family passes the same way,
    with the fingerprint description (`describe`) and the libraries' versions."""
    description = describe(
        directory, config, preprocess_description, model, precision, family=family,
        libraries=library_versions(*libraries),
    )  # fmt: skip
    return {
        "name": model.name,
        "preprocess": preprocess,
        "layers": list(model.layers),
        "dims": dims,
        "device": device,
        "precision": precision,
        "description": description,
    }


def library_versions(*names: str) -> dict[str, str]:
    """major.minor of each library: a minor release may change a model's code or transforms."""
    from importlib.metadata import version

    return {name: ".".join(version(name).split(".")[:2]) for name in names}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} is missing; a model directory needs config.json and preprocessor_config.json.")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore it from the model's original files.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object; restore it from the model's original files.")
    return value


def config_digest(config: dict) -> str:
    # Version stamps do not change the numbers; everything else in config.json might.
    stable = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
