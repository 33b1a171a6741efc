"""Backbones: the frozen models that turn images into embeddings, behind one interface
(`base.Backbone`: preprocess, embed a batch into {layer: array}, optionally embed text, and a
description of everything that changes the numbers, for the cache fingerprint).

The family is chosen from the checkpoint itself, never from its name: a transformers
`config.json` names its `model_type`; an open_clip checkpoint has `open_clip_config.json`; a timm
checkpoint has a `config.json` with `architecture`. Adding a family means adding one module
that defines `load(...)` and one line in `FAMILIES`; a family's module (and its libraries) is
imported only when a checkpoint needs it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.backbones import base
from pipeline.backbones.base import (
    EMBEDDING_VERSION,
    Backbone,
    cpu_supports_bf16,
    out_of_memory,
    read_json,
    resolve_device,
    resolve_directory,
    resolve_precision,
    weight_files,
)
from pipeline.config import ConfigError, ModelSettings

__all__ = ["EMBEDDING_VERSION", "FAMILIES", "Backbone", "cpu_supports_bf16", "family_of", "load"]

log = logging.getLogger(__name__)

# family (a transformers model_type, or open_clip / timm) -> the module that loads it
FAMILIES = {
    "clip": "pipeline.backbones.clip",
    "clip_vision_model": "pipeline.backbones.clip",
    "siglip": "pipeline.backbones.hf",
    "siglip2": "pipeline.backbones.hf",
    "metaclip_2": "pipeline.backbones.hf",
    "dinov2": "pipeline.backbones.hf",
    "dinov2_with_registers": "pipeline.backbones.hf",
    "dinov3_vit": "pipeline.backbones.hf",
    "open_clip": "pipeline.backbones.open_clip",
    "timm": "pipeline.backbones.timm",
}
# How to turn each kind of pickle-only checkpoint into safetensors, once, where you trust it.
CONVERT = {
    "open_clip": 'python -c "import open_clip; from safetensors.torch import save_file; '
    "m = open_clip.create_model('local-dir:DIR'); save_file(m.state_dict(), 'DIR/open_clip_model.safetensors')\"",
    "timm": 'python -c "import timm; from safetensors.torch import save_file; '
    "m = timm.create_model('local-dir:DIR', pretrained=True); save_file(m.state_dict(), 'DIR/model.safetensors')\"",
    "transformers": 'python -c "from transformers import AutoModel; '
    "AutoModel.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\"",
}


def family_of(directory: Path) -> tuple[str, dict]:
    """(family, config) of the checkpoint in `directory`, from its own files."""
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else None
    if config is not None and "model_type" in config:
        return config["model_type"], config
    if (directory / "open_clip_config.json").is_file():
        return "open_clip", read_json(directory / "open_clip_config.json")
    if config is not None and "architecture" in config:
        return "timm", config
    found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
    raise ConfigError(
        f"{directory} is not a checkpoint this version knows: it needs a transformers config.json with a "
        f"model_type, an open_clip_config.json, or a timm config.json with an architecture (found: {found})."
    )


def load(
    model: ModelSettings, device: str = "auto", precision: str = "auto", compiled: bool = False, batch_size: int = 0
) -> Backbone:
    """The backbone `model` names (a local directory or a Hugging Face cache entry), on `device`
    in `precision` (`auto`: see `base.resolve_precision`), its forward pass through torch.compile
    with `compiled` (`extract.compile`) for batches of `batch_size` (`Backbone.compile`), ready
    for `embed`."""
    directory = resolve_directory(model)
    family, config = family_of(directory)
    if family not in FAMILIES:
        raise ConfigError(
            f"model '{model.name}' is a {family!r} checkpoint (its config.json model_type); supported: "
            f"{', '.join(sorted(FAMILIES))} (transformers model types), open_clip and timm checkpoints."
        )
    # Refuse pickle-only checkpoints before anything is loaded.
    weight_files(directory, CONVERT.get(family, CONVERT["transformers"]))
    dev = resolve_device(device)
    resolved = resolve_precision(precision, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the fastest convolution (patch embedding) for the batch shape
        if resolved == "fp32":  # fp32 means fp32: cuDNN's convolutions default to TF32 (matmuls do not)
            torch.backends.cudnn.allow_tf32 = False
    module = importlib.import_module(FAMILIES[family])
    try:
        backbone = module.load(directory, config, model, dev, resolved)
    except torch.OutOfMemoryError:
        raise out_of_memory(
            dev,
            f"loading {model.name} in {resolved}",
            "free its memory (another process may hold it: see nvidia-smi), or use a larger GPU or extract.device: cpu "
            "(the weights stay float32 in every precision)",
        ) from None
    if compiled:
        backbone.compile(batch_size)
    log.info("loaded %s on %s (%s), layers %s", model.name, dev, backbone.precision, backbone.dims)
    return backbone


class Known:
    """What this project has learned about its models, in `cache/backbones.json` (local, never
    shared): per model stamp, the fingerprint description and dims that loading it gave and
    whether it could embed text prompts, and the sha256 of weight files by path, size and mtime.
    The stamp is read from file metadata only: every file of the model directory (name, size,
    mtime), the versions of the libraries that compute embeddings, this package's backbone code,
    and the settings. With it, an extract run that has nothing to embed neither loads nor hashes
    the model, also when the model has no text tower for the zero-shot prompts."""

    KEEP = 32  # models remembered

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            data = {}  # a damaged file is only a missed shortcut
        self.models: dict = data.get("models", {}) if isinstance(data, dict) else {}
        base.FILE_DIGESTS.update(data.get("weights", {}) if isinstance(data, dict) else {})

    @staticmethod
    def stamp(model: ModelSettings, device: str, precision: str, where: str = "") -> str:
        """`where`: the workers that load the model, where not this machine's (a dask scheduler's
        address): this machine's files and libraries then stand for theirs, which they confirm."""
        from dataclasses import asdict
        from importlib.metadata import PackageNotFoundError, version

        import torch

        directory = resolve_directory(model)
        files = sorted(
            (p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*")
            if p.is_file()
        )
        libraries = {}
        for name in ("torch", "transformers", "open_clip_torch", "timm", "pillow", "numpy", "safetensors"):
            try:
                libraries[name] = version(name)
            except PackageNotFoundError:
                libraries[name] = None
        code = hashlib.sha256()
        for source in sorted(Path(__file__).parent.glob("*.py")):
            code.update(source.read_bytes())
        what = {
            "directory": str(directory.resolve()),
            "files": files,
            "libraries": libraries,
            "code": code.hexdigest(),
            "model": asdict(model),
            "device": device,
            "precision": precision,
            "cuda": torch.cuda.is_available(),
        }
        if where:
            what["where"] = where
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def lookup(self, stamp: str) -> tuple[dict, dict[str, int]] | None:
        entry = self.models.get(stamp)
        return (entry["description"], entry["dims"]) if entry else None

    def find(
        self, model: ModelSettings, device: str, precision: str, where: str = ""
    ) -> tuple[str, tuple[dict, dict] | None]:
        """The stamp to remember the model under, and what is remembered (None: nothing). A run
        with `precision: auto` learns under auto's stamp; the next run asks for the precision of
        the cache the first made (`extract.shared_precision`), and takes what auto learned when
        auto gave that precision, so it does not load the model only to describe it again.
        `where`: as for `stamp`."""
        stamp = self.stamp(model, device, precision, where)
        found = self.lookup(stamp)
        if found is None and precision != "auto":
            auto = self.stamp(model, device, "auto", where)
            learned = self.lookup(auto)
            if learned is not None and learned[0].get("precision") == precision:
                return auto, learned
        return stamp, found

    def remember(self, stamp: str, description: dict, dims: dict[str, int]) -> None:
        entry = self.models.pop(stamp, {})
        self.models[stamp] = {**entry, "description": description, "dims": dims}
        self._write()

    def embed_text(self, stamp: str, embed: Callable[[], tuple | None]) -> tuple | None:
        """`embed()` (the model's embeddings of the zero-shot prompts, None without a text tower or
        tokenizer), unless this project already learned that the model with these files has none:
        then it is not loaded again to find out."""
        if self.models.get(stamp, {}).get("text") is False:
            return None
        embedded = embed()
        entry = self.models.get(stamp)  # after embed(): loading the model may have remembered it anew
        if entry is not None:
            entry["text"] = embedded is not None
            self._write()
        return embedded

    def _write(self) -> None:
        from pipeline import atomic

        self.models = dict(list(self.models.items())[-self.KEEP :])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.path, {"models": self.models, "weights": base.FILE_DIGESTS}, sort_keys=False)
        except OSError as exc:  # a read-only project still works, only slower
            log.warning("could not write %s (%s); the next run will load the model again", self.path, exc)
