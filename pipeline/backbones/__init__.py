"""Backbones: the frozen models that turn images into embeddings, behind one interface
(`base.Backbone`: preprocess, embed a batch into {layer: array}, optionally embed text, and a
description of everything that changes the numbers, for the cache fingerprint).

The family is chosen from the checkpoint itself (its config.json `model_type`), never from its
name. Adding a family means adding one module that defines `load(...)` and one line in
`FAMILIES`; a family's module (and its libraries) is imported only when a checkpoint needs it.
"""

from __future__ import annotations

import importlib
import logging

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

__all__ = ["EMBEDDING_VERSION", "FAMILIES", "Backbone", "cpu_supports_bf16", "load"]

log = logging.getLogger(__name__)

# config.json model_type -> the module that loads that family
FAMILIES = {
    "clip": "pipeline.backbones.clip",
    "clip_vision_model": "pipeline.backbones.clip",
}


def load(model: ModelSettings, device: str = "auto", precision: str = "auto") -> Backbone:
    """The backbone `model` names (a local directory or a Hugging Face cache entry), on `device`
    in `precision` (`auto`: see `base.resolve_precision`), ready for `embed`."""
    directory = resolve_directory(model)
    config = read_json(directory / "config.json")
    weight_files(directory)  # refuse pickle-only checkpoints before loading anything
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model '{model.name}' is a {model_type!r} checkpoint (its config.json model_type); "
            f"supported model types: {', '.join(sorted(FAMILIES))}."
        )
    dev = resolve_device(device)
    family = importlib.import_module(FAMILIES[model_type])
    backbone = family.load(directory, config, model, dev, resolve_precision(precision, dev))
    log.info("loaded %s on %s (%s), layers %s", model.name, dev, backbone.precision, backbone.dims)
    return backbone
