"""predict: score image files or folders with a trained probe.

Images already in the probe's cache (same bytes = same digest) are not embedded again; the
others are embedded with the model in params.yaml, which must give the cache the probe was
trained on, and added to that cache. Writes a CSV: path, digest, score, label, error.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pipeline import atomic, manifest
from pipeline.config import ConfigError, Settings
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe
from pipeline.store import EmbeddingStore, caches

log = logging.getLogger(__name__)


def collect(paths: list[Path]) -> list[Path]:
    """Image files named directly or found under the given folders, in order, without repeats."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in manifest.IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise ConfigError(f"{p} does not exist; pass image files or folders to predict.")
    return list(dict.fromkeys(found))


def cache_for(outputs: Outputs, fingerprint: str) -> EmbeddingStore:
    for store in caches(outputs.embeddings):
        if store.header.fingerprint == fingerprint:
            return store
    raise ConfigError(
        f"no embedding cache with fingerprint {fingerprint} (the probe's) under {outputs.embeddings}; "
        "run extract with the probe's model settings, or `dvc pull` the cache."
    )


def embed_missing(settings: Settings, store: EmbeddingStore, files: list[Path], digests: list[str | None]) -> None:
    from pipeline import extract

    todo = extract.plan((d for d in digests if d), store.keys(), set(store.failures()))
    if not todo:
        return
    embedder = extract.LocalEmbedder(settings)
    if embedder.description != store.card["description"]:
        raise ConfigError(
            f"params.yaml's model settings do not reproduce the probe's cache {store.directory.name}; "
            "set model (and extract.precision) as they were when the probe's cache was made."
        )
    path_of = {d: f for f, d in zip(files, digests, strict=True) if d}
    n_known = len(set(filter(None, digests)))
    log.info("embedding %d images not in the cache (%d already there)", len(todo), n_known - len(todo))
    with store.writer_lock():
        embedder.embed([extract.Item(d, str(path_of[d]), path_of[d]) for d in todo], store)


def run(settings: Settings, outputs: Outputs, paths: list[Path], probe_dir: Path | None, out: Path) -> list[dict]:
    probe, card = LinearProbe.load(probe_dir or outputs.probe)
    files = collect(paths)
    if not files:
        raise ConfigError("no image files found in the given paths.")
    facts = [manifest.inspect_file(f) for f in files]
    digests = [x.digest if x else None for x in facts]
    store = cache_for(outputs, card["fingerprint"])
    embed_missing(settings, store, files, digests)

    store = EmbeddingStore.open(store.directory)  # re-read: new shards
    known = [d for d in digests if d]
    X, found = store.read(known, card["layer"])
    scores = dict(zip(known, probe.predict_proba(X), strict=True))
    found_of = dict(zip(known, found, strict=True))
    failures = store.failures()
    threshold = card.get("threshold", 0.5)
    rows = []
    for f, d in zip(files, digests, strict=True):
        row = {"path": str(f), "digest": d or "", "score": "", "label": "", "error": ""}
        if d is None:
            row["error"] = "unreadable file"
        elif not found_of[d]:
            row["error"] = failures.get(d, (None, "not embedded"))[1]
        else:
            row["score"] = f"{scores[d]:.6f}"
            row["label"] = "fake" if scores[d] >= threshold else "real"
        rows.append(row)
    with atomic.atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "digest", "score", "label", "error"])
        writer.writeheader()
        writer.writerows(rows)
    n_fake = sum(r["label"] == "fake" for r in rows)
    log.info(
        "%d images: %d fake, %d real, %d failed (threshold %.3f) -> %s",
        len(rows),
        n_fake,
        sum(r["label"] == "real" for r in rows),
        sum(bool(r["error"]) for r in rows),
        threshold,
        out,
    )
    return rows
