"""What every shard format stores: a header describing the numbers, and the rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ShardHeader:
    fingerprint: str
    layers: list[str]
    dims: dict[str, int]
    dtype: str
    format_version: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardHeader:
        return cls(
            d["fingerprint"],
            list(d["layers"]),
            {k: int(v) for k, v in d["dims"].items()},
            d["dtype"],
            int(d["format_version"]),
        )


@dataclass
class ShardData:
    """Rows of one shard. `errors[i]` is None when image i embedded fine; then the rows of
    `arrays[layer]` hold its embedding (and zeros for failed rows)."""

    digests: list[str]
    paths: list[str]
    errors: list[str | None]
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.digests)
