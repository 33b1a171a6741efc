"""predict: score image files or folders with a trained probe.

Images already in the probe's cache (same bytes = same digest) are not embedded again; the
others are embedded with the model in params.yaml, which must give the cache the probe was
trained on. They go to a separate, untracked layer (`cache/predict/<cache>/`), never into the
DVC-tracked cache: predict never makes `dvc repro` rerun anything, and the absolute paths of
this machine's files never reach a file that teammates pull. Writes a CSV: path, digest,
score, label, error.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipeline import atomic, features, images, probes
from pipeline.config import ConfigError, Settings
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore, caches

log = logging.getLogger(__name__)


def collect(paths: list[Path]) -> list[Path]:
    """Image files named directly or found under the given folders, in order, without repeats."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in images.IMAGE_SUFFIXES)
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


def predict_layer(outputs: Outputs, store: EmbeddingStore) -> EmbeddingStore:
    """The untracked layer beside `store` for predict's own images (the same card, so the same numbers)."""
    directory = outputs.predict_embeddings / store.directory.name
    if not (directory / "card.json").exists():
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        atomic.write_json(directory / "card.json", store.card)
    return EmbeddingStore.open(directory, expect_fingerprint=store.header.fingerprint)


def embed_missing(
    settings: Settings, store: EmbeddingStore, layer: EmbeddingStore, files: list[Path], digests: list[str | None]
) -> None:
    from pipeline import embedder

    done = store.keys() | layer.keys()
    failed = set(store.failures()) | set(layer.failures())
    todo = embedder.plan((d for d in digests if d), done, failed)
    if not todo:
        return
    if settings.extract.precision == "auto":  # the probe's cache decides, whatever this machine's default
        precision = store.card["description"]["precision"]
        settings = dataclasses.replace(settings, extract=dataclasses.replace(settings.extract, precision=precision))
    local = embedder.LocalEmbedder(settings)
    if local.description != store.card["description"]:
        raise ConfigError(
            f"params.yaml's model settings do not reproduce the probe's cache {store.directory.name}; "
            "set model (and extract.precision) as they were when the probe's cache was made."
        )
    path_of = {d: f for f, d in zip(files, digests, strict=True) if d}
    n_known = len(set(filter(None, digests)))
    log.info("embedding %d images not in the cache (%d already there)", len(todo), n_known - len(todo))
    with layer.writer_lock():
        local.embed([embedder.Item(d, str(path_of[d]), path_of[d]) for d in todo], layer)
        EmbeddingStore.open(layer.directory).write_index()


def run(settings: Settings, outputs: Outputs, paths: list[Path], probe_dir: Path | None, out: Path) -> list[dict]:
    probe, card = probes.load(probe_dir or outputs.probe)
    files = collect(paths)
    if not files:
        raise ConfigError("no image files found in the given paths.")
    facts = [images.inspect_file(f) for f in files]
    digests = [x.digest if x else None for x in facts]
    store = cache_for(outputs, card["fingerprint"])
    layer = predict_layer(outputs, store)
    embed_missing(settings, store, layer, files, digests)

    layer = EmbeddingStore.open(layer.directory)  # re-read: new shards
    known = [d for d in digests if d]
    X, found = features.read_layers(store, known, card["layer"])
    if not found.all():
        X_new, found_new = features.read_layers(layer, known, card["layer"])
        X = np.where(found[:, None], X, X_new)
        found = found | found_new
    scores = dict(zip(known, probe.predict_proba(X), strict=True))
    found_of = dict(zip(known, found, strict=True))
    failures = {**layer.failures(), **store.failures()}
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
