"""`cache/extract.json`: which cache the last extract run filled, the hand-off from the extract
stage to train, evaluate, `cache info` and the next extract. One writer, one reader."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import atomic
from pipeline.config import ConfigError


@dataclass(frozen=True)
class ExtractSummary:
    model: str  # model.name as the params file gives it
    fingerprint: str  # of the cache
    embeddings: str  # the cache directory, relative to cache/embeddings (posix)
    layers: dict[str, int]  # layer -> dimension
    precision: str  # what the embeddings were computed in: fp32 | bf16 | fp16
    images: int  # unique images in the manifest
    embedded: int  # of those, embedded
    failed: int  # of those, recorded as failed

    def write(self, path: Path) -> None:
        """Stable bytes: the same summary always writes the same file (DVC sees no change)."""
        atomic.write_json(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: Path) -> ExtractSummary:
        if not path.exists():
            raise ConfigError(f"{path} does not exist; run the extract stage first (`dvc repro extract`).")
        try:
            raw = json.loads(path.read_text())
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            raise ConfigError(
                f"{path} is not an extract summary (damaged, or from another version); rerun `dvc repro extract`."
            ) from None
