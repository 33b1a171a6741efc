"""HDF5 shard format: one file per shard (never one growing file: an HDF5 file whose writer
dies mid-write can be unreadable as a whole).

Datasets: `digest`, `path` and `error` (variable-length UTF-8; an empty error means the image
embedded fine) and `layers/<name>` (n, dim) in the cache's dtype, with Fletcher-32
checksums. The shard header is the JSON attribute `pipeline.shard` of the root group.

Shards written before 2026-11-27 keep `digest` in fixed 64-byte fields: a key longer than an
image's digest (a video frame's `<digest>@<i>`, a robustness variant's `<digest>~jpeg=50`) was cut
to 64 characters, so its row stood under its video's or its clean image's digest. They read as
before; the store refuses those that hold a cut key (`fixed_width_keys`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.store.shard import ShardData, ShardHeader

SUFFIX = ".h5"
_META_KEY = "pipeline.shard"
_STR = h5py.string_dtype("utf-8")


def to_bytes(header: ShardHeader, data: ShardData) -> bytes:
    """The shard file's bytes, built in memory: the HDF5 library never writes to disk itself, so a
    full disk is a plain OSError from the store's atomic write (HDF5 itself can crash on one)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs[_META_KEY] = json.dumps(header.to_dict(), sort_keys=True)
        f.create_dataset("digest", data=np.array(data.digests, dtype=object), dtype=_STR)
        f.create_dataset("path", data=np.array(data.paths, dtype=object), dtype=_STR)
        f.create_dataset("error", data=np.array([e or "" for e in data.errors], dtype=object), dtype=_STR)
        layers = f.create_group("layers")
        for layer in header.layers:
            array = np.asarray(data.arrays[layer], dtype=header.dtype)
            layers.create_dataset(
                layer, data=array, fletcher32=True, chunks=(max(1, min(len(array), 1024)), array.shape[1])
            )
    return buffer.getvalue()


def read_header(path: Path) -> ShardHeader:
    with h5py.File(path, "r") as f:
        if _META_KEY not in f.attrs:
            raise ValueError(f"{path} has no pipeline shard header")
        return ShardHeader.from_dict(json.loads(f.attrs[_META_KEY]))


def fixed_width_keys(path: Path) -> bool:
    """Whether the shard keeps its keys in fixed 64-byte fields (written before 2026-11-27)."""
    with h5py.File(path, "r") as f:
        return f["digest"].dtype.kind == "S"


def read_keys(path: Path) -> tuple[list[str], list[str | None], list[str | None]]:
    with h5py.File(path, "r") as f:
        digests = [d.decode() for d in f["digest"][()]]
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["path"][()]]
        errors = [(e.decode() if isinstance(e, bytes) else e) or None for e in f["error"][()]]
    return digests, paths, errors


def read_layer(path: Path, layer: str, dim: int) -> tuple[list[str], np.ndarray]:
    with h5py.File(path, "r") as f:
        ok = np.array([len(e) == 0 for e in f["error"][()]], dtype=bool)
        digests = [d.decode() for d, good in zip(f["digest"][()], ok, strict=True) if good]
        array = f["layers"][layer][()][ok]
    return digests, array.astype(np.float32, copy=False).reshape(-1, dim)
