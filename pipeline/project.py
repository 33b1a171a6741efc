"""A project's cached features from Python (a notebook, a probe of your own): every manifest row
with its embedding, read as train and evaluate read it, without running a stage.

    from pipeline.project import load_features
    frames = load_features("params.yaml")                  # train.layer; or layer="block_11"
    train = frames.select(["real_youtube", "faceswap"], ["train"])   # .X .y .dataset .video .path

No stage imports this module: it is an entry point beside the CLI, and like the CLI it reads the
params file.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import config, features, manifest_table
from pipeline.outputs import Outputs


def load_features(params: str | Path = "params.yaml", layer: str | list[str] | None = None) -> features.FeatureTable:
    """The features of `layer` (default: the params' `train.layer`; a list reads layers side by
    side, each row L2-normalised) for every row of the project's manifest, from the cache the last
    extract filled. Rows whose image failed to embed have `found` False and are left out by
    `select`; a cache that lacks rows of the manifest is refused, as train refuses it."""
    settings = config.load(params)
    outputs = Outputs(settings.base_dir)
    table = manifest_table.read(outputs.manifest)
    return features.FeatureTable.load(table, features.open_cache(outputs), layer or settings.train.layer)
