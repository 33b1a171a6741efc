"""Text prompt embeddings for zero-shot scoring, stored beside a model's image embeddings.

`<cache>/text.parquet`: one row per prompt (prompt, L2-normalised projected embedding), and how
the model scores image-text pairs in the file metadata: `{"logit_scale", "logit_bias",
"scoring": "softmax" | "sigmoid"}` (CLIP-style softmax, or SigLIP's sigmoid with its bias).
Rewritten atomically when prompts are added; page checksums are written and checked on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import atomic

FILENAME = "text.parquet"
SCORING_KEYS = ("logit_scale", "logit_bias", "scoring")
_META_KEY = b"pipeline.text"


def prompts_in(directory: Path) -> set[str]:
    """The prompts stored (none when the table is missing or damaged: extract then re-embeds them)."""
    try:
        return set(read_all(directory)[0]) if (Path(directory) / FILENAME).exists() else set()
    except Exception:
        return set()


def add(directory: Path, embeddings: dict[str, np.ndarray], scoring: dict) -> None:
    """Store these prompt embeddings (merged with those already stored) and the model's `scoring`."""
    path = Path(directory) / FILENAME
    rows = {}
    with contextlib.suppress(Exception):  # a damaged table is replaced, not merged
        rows = read_all(directory)[0] if path.exists() else {}
    rows.update({p: np.asarray(e, dtype=np.float32).tolist() for p, e in embeddings.items()})
    prompts = sorted(rows)
    dim = len(rows[prompts[0]])
    schema = pa.schema([("prompt", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    table = pa.table({"prompt": prompts, "embedding": [rows[p] for p in prompts]}, schema=schema)
    scoring = {k: scoring[k] for k in SCORING_KEYS}
    meta = {**scoring, "sha256": _content_hash(prompts, [rows[p] for p in prompts], scoring)}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def _content_hash(prompts: list[str], embeddings: list, scoring: dict) -> str:
    h = hashlib.sha256(json.dumps([prompts, scoring], sort_keys=True).encode())
    h.update(np.asarray(embeddings, dtype=np.float32).tobytes())
    return h.hexdigest()


def read_all(directory: Path) -> tuple[dict[str, list[float]], dict]:
    """Every stored prompt with its embedding, and the scoring; raises on a damaged file (the
    checksum of the content, kept in the file's metadata, must match)."""
    t = pq.read_table(Path(directory) / FILENAME, page_checksum_verification=True)
    meta = json.loads(t.schema.metadata[_META_KEY])
    prompts, embeddings = t.column("prompt").to_pylist(), t.column("embedding").to_pylist()
    scoring = {k: meta[k] for k in SCORING_KEYS}
    if _content_hash(prompts, embeddings, scoring) != meta["sha256"]:
        raise ValueError(f"{Path(directory) / FILENAME} does not match its checksum")
    return dict(zip(prompts, embeddings, strict=True)), scoring


def read(directory: Path, real: list[str], fake: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(real prompt embeddings, fake prompt embeddings, scoring); KeyError names a missing prompt."""
    path = Path(directory) / FILENAME
    if not path.exists():
        raise KeyError("the cache holds no text prompt embeddings (the model may have no text tower or tokenizer)")
    try:
        rows, scoring = read_all(directory)
    except Exception as exc:
        raise KeyError(f"{path} is damaged ({type(exc).__name__})") from None
    for p in real + fake:
        if p not in rows:
            raise KeyError(f"the prompt {p!r} has not been embedded")
    return np.array([rows[p] for p in real], np.float32), np.array([rows[p] for p in fake], np.float32), scoring
