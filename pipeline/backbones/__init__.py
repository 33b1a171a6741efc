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

import importlib
import logging
from pathlib import Path

from pipeline.backbones.base import (
    EMBEDDING_VERSION,
    Backbone,
    cpu_supports_bf16,
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


def load(model: ModelSettings, device: str = "auto", precision: str = "auto") -> Backbone:
    """The backbone `model` names (a local directory or a Hugging Face cache entry), on `device`
    in `precision` (`auto`: see `base.resolve_precision`), ready for `embed`."""
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
    module = importlib.import_module(FAMILIES[family])
    backbone = module.load(directory, config, model, dev, resolve_precision(precision, dev))
    log.info("loaded %s on %s (%s), layers %s", model.name, dev, backbone.precision, backbone.dims)
    return backbone
