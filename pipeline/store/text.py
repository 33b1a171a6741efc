"""Text prompt embeddings for zero-shot scoring, stored beside a model's image embeddings.

`<cache>/text.parquet`: one row per prompt (prompt, L2-normalised projected embedding), and the
model's CLIP logit scale in the file metadata. Rewritten atomically when prompts are added.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import atomic

FILENAME = "text.parquet"
_META_KEY = b"pipeline.text"


def prompts_in(directory: Path) -> set[str]:
    path = Path(directory) / FILENAME
    return set(pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()) if path.exists() else set()


def add(directory: Path, embeddings: dict[str, np.ndarray], logit_scale: float) -> None:
    """Store these prompt embeddings (merged with those already stored)."""
    path = Path(directory) / FILENAME
    rows = {}
    if path.exists():
        t = pq.read_table(path)
        rows = dict(zip(t.column("prompt").to_pylist(), t.column("embedding").to_pylist(), strict=True))
    rows.update({p: np.asarray(e, dtype=np.float32).tolist() for p, e in embeddings.items()})
    prompts = sorted(rows)
    dim = len(rows[prompts[0]])
    schema = pa.schema(
        [("prompt", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
        metadata={_META_KEY: json.dumps({"logit_scale": logit_scale}).encode()},
    )
    table = pa.table({"prompt": prompts, "embedding": [rows[p] for p in prompts]}, schema=schema)
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read(directory: Path, real: list[str], fake: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """(real prompt embeddings, fake prompt embeddings, logit scale); KeyError names a missing prompt."""
    path = Path(directory) / FILENAME
    if not path.exists():
        raise KeyError("the cache holds no text prompt embeddings (the model may have no text tower or tokenizer)")
    t = pq.read_table(path)
    rows = dict(zip(t.column("prompt").to_pylist(), t.column("embedding").to_pylist(), strict=True))
    for p in real + fake:
        if p not in rows:
            raise KeyError(f"the prompt {p!r} has not been embedded")
    scale = json.loads(t.schema.metadata[_META_KEY])["logit_scale"]
    return (np.array([rows[p] for p in real], np.float32), np.array([rows[p] for p in fake], np.float32), float(scale))
