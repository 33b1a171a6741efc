"""Vision-language backbones: load (local dir or Hugging Face id), fingerprint, embed a batch.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, ModelSettings
from pipeline.images import Preprocess

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


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files; a clear error (before anything is loaded) if it has none."""
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"only {', '.join(pickled)} (pickle files, never loaded here)" if pickled else "no weight files"
        raise ConfigError(
            f"model directory {directory} has {found}; convert it once to safetensors where you trust it: "
            '`python -c "from transformers import CLIPModel; '
            "CLIPModel.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\"`."
        )
    return files


def weights_digest(directory: Path) -> str:
    """sha256 over the model's weight files (names and bytes), in name order."""
    h = hashlib.sha256()
    for p in weight_files(directory):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"extract.device '{device}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("extract.device asks for CUDA but no CUDA GPU is visible; use device: auto or cpu.")
    return dev


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is one fixed precision per device class: bf16 (fp16 where the GPU lacks bf16) on
    CUDA, fp32 on CPU and MPS. On CPU it never depends on the processor's features, so teammates
    with and without native bf16 fill the same cache (bf16 on CPU is there to ask for).
    `extract.run` resolves `auto` to the precision of the cache already shared, when there is one."""
    if precision != "auto":
        if device.type == "cpu" and precision in ("bf16", "fp16") and not cpu_supports_bf16():
            log.warning("this CPU has no native bf16/fp16: %s is emulated and slower than fp32", precision)
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@dataclass
class Backbone:
    """A loaded vision tower that turns preprocessed batches into {layer: embeddings}."""

    name: str
    model: torch.nn.Module
    preprocess: Preprocess
    layers: list[str]
    dims: dict[str, int]
    device: torch.device
    precision: str
    description: dict  # everything that changes the numbers -> the cache fingerprint

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """A batch (n, 3, h, w) float32 -> {layer: float32 array (n, dim)}."""
        non_blocking = self.device.type == "cuda"
        pixels = pixels.to(self.device, non_blocking=non_blocking)
        blocks = [int(m.group(1)) for layer in self.layers if (m := _BLOCK.match(layer))]
        with self.autocast():
            out = self.model.vision_model(pixel_values=pixels, output_hidden_states=bool(blocks))
            pooled = out.pooler_output
            result: dict[str, torch.Tensor] = {}
            for layer in self.layers:
                if layer == "projection":
                    result[layer] = self.model.visual_projection(pooled)
                elif layer == "pooled":
                    result[layer] = pooled
                else:
                    index = int(_BLOCK.match(layer).group(1))
                    result[layer] = out.hidden_states[index + 1][:, 0]
        return {k: v.float().cpu().numpy() for k, v in result.items()}


def load(model: ModelSettings, device: str = "auto", precision: str = "auto") -> Backbone:
    """Load the vision tower with projection from safetensors, ready for `embed`."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    directory = resolve_directory(model)
    config = _read_json(directory / "config.json")
    weight_files(directory)  # refuse pickle-only checkpoints before loading anything
    if config.get("model_type") not in ("clip", "clip_vision_model"):
        raise ConfigError(
            f"model '{model.name}' is a {config.get('model_type')!r} model; this version supports CLIP checkpoints."
        )
    try:
        preprocess = Preprocess.from_hf_config(_read_json(directory / "preprocessor_config.json"))
    except ValueError as exc:
        raise ConfigError(f"model '{model.name}': {exc}.") from None

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's unused weights are expected, not news
    try:
        if config["model_type"] == "clip":
            # The projection width lives on the full config; the vision sub-config may not carry it.
            full = CLIPConfig.from_pretrained(directory)
            vision_config = full.vision_config
            vision_config.projection_dim = full.projection_dim
        else:
            vision_config = CLIPVisionConfig.from_pretrained(directory)
        net = CLIPVisionModelWithProjection.from_pretrained(directory, config=vision_config, use_safetensors=True)
    except Exception as exc:  # any failure to build the model from these files is a problem with the files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model '{model.name}' could not be loaded from {directory} ({first}); "
            "check its config.json and weights against the original checkpoint."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    net = net.eval().to(dev)

    vision = net.config
    n_blocks = vision.num_hidden_layers
    dims: dict[str, int] = {}
    for layer in model.layers:
        m = _BLOCK.match(layer)
        if layer == "projection":
            dims[layer] = net.config.projection_dim
        elif layer == "pooled" or (m and int(m.group(1)) < n_blocks):
            dims[layer] = vision.hidden_size
        else:
            raise ConfigError(f"model.layers has '{layer}'; use projection, pooled or block_0 .. block_{n_blocks - 1}.")
    description = {
        "embedding_version": EMBEDDING_VERSION,
        "model": {"weights_sha256": weights_digest(directory), "config": _config_digest(config)},
        "preprocess": preprocess.describe(),
        "layers": list(model.layers),
        "precision": prec,
        "dtype": model.dtype,
    }
    log.info("loaded %s on %s (%s), layers %s", model.name, dev, prec, dims)
    return Backbone(model.name, net, preprocess, list(model.layers), dims, dev, prec, description)


@dataclass
class TextTower:
    """The text side of a CLIP model, for zero-shot prompts."""

    model: torch.nn.Module
    tokenizer: object
    logit_scale: float
    device: torch.device

    @torch.inference_mode()
    def embed(self, prompts: list[str]) -> np.ndarray:
        """L2-normalised projected text embeddings, float32 (n, dim)."""
        limit = self.model.config.max_position_embeddings  # the tower's limit, whatever the tokenizer says
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = tokens.to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy()


def load_text(model: ModelSettings, device: torch.device) -> TextTower | None:
    """The model's text tower and tokenizer, or None when the checkpoint has none."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    directory = resolve_directory(model)
    if _read_json(directory / "config.json").get("model_type") != "clip":
        return None
    if not any((directory / name).exists() for name in ("tokenizer.json", "vocab.json")):
        # Without its files AutoTokenizer would build an empty-vocabulary tokenizer: garbage prompts.
        log.warning("model '%s' has no tokenizer files; zero-shot prompts cannot be embedded", model.name)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        log.warning("model '%s' has no tokenizer; zero-shot prompts cannot be embedded", model.name)
        return None
    full = CLIPConfig.from_pretrained(directory)
    text_config = full.text_config
    text_config.projection_dim = full.projection_dim
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        net = CLIPTextModelWithProjection.from_pretrained(directory, config=text_config, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    scale = 100.0
    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), framework="np") as f:
            if "logit_scale" in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                scale = float(np.exp(f.get_tensor("logit_scale")))
    return TextTower(net.eval().to(device), tokenizer, scale, device)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} is missing; a model directory needs config.json and preprocessor_config.json.")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore it from the model's original files.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object; restore it from the model's original files.")
    return value


def _config_digest(config: dict) -> str:
    # Version stamps do not change the numbers; everything else in config.json might.
    stable = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
