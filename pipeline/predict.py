"""predict: score image and video files, or folders of them, with a trained probe.

Images already in the probe's cache (same bytes = same digest) are not embedded again; the
others are embedded with the model in params.yaml, which must give the cache the probe was
trained on. They go to a separate, untracked layer (`cache/predict/<cache>/`), never into the
DVC-tracked cache: predict never makes `dvc repro` rerun anything, and the absolute paths of
this machine's files never reach a file that teammates pull. A video is scored by the frames the
manifest would sample from it (`data.frames.per_video`), pooled as evaluate pools a video's
frames (`evaluate.video_pooling`). Writes a CSV: path, digest, score, label, error, frames
(for a video: frames scored / frames sampled).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipeline import atomic, features, file_index, frames, images, probes
from pipeline.config import ConfigError, Settings
from pipeline.metrics import video_level
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore, caches

log = logging.getLogger(__name__)


def collect(paths: list[Path]) -> list[Path]:
    """Files named directly, and the image and video files under the given folders found as the
    manifest finds them (through linked folders, without hidden files; what cannot be read is
    named in a warning), in order, without repeats."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            problems: list[str] = []
            found += sorted(Path(f) for f, _ in file_index.walk_images(p, problems))
            if problems:
                log.warning(
                    "%d files or folders under %s could not be read: %s", len(problems), p, "; ".join(problems[:5])
                )
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


def rows_of(settings: Settings, file: Path, facts: images.FileFacts | None) -> list[tuple[str, int]]:
    """(cache key, frame) of each row that scores `file`: the image itself (frame -1), or the
    frames the manifest samples from a video (`frames.sampled`); none for a file that cannot be read."""
    if facts is None:
        return []
    if file.suffix.lower() not in frames.VIDEO_SUFFIXES:
        return [(frames.key(facts.digest, -1, facts.orientation), -1)]
    sampled = frames.sampled(facts.frame_count, settings.data.frames.per_video)
    return [(frames.key(facts.digest, i, facts.orientation, facts.ranked), i) for i in sampled]


def embed_missing(
    settings: Settings, store: EmbeddingStore, layer: EmbeddingStore, wanted: dict[str, tuple[Path, int]]
) -> None:
    """Embed the rows of `wanted` (key -> (file, frame)) that neither the cache nor the predict
    layer holds, into the predict layer."""
    from pipeline import embedder

    done = store.keys() | layer.keys()
    failed = embedder.recorded_failures(store) | embedder.recorded_failures(layer)
    todo = embedder.plan(wanted, done, failed)
    if not todo:
        return
    if settings.extract.precision == "auto":  # the probe's cache decides, whatever this machine's default
        precision = store.card["description"]["precision"]
        settings = dataclasses.replace(settings, extract=dataclasses.replace(settings.extract, precision=precision))
    if set(settings.model.layers) <= set(store.layers):  # the cache's layers, in its order (more serve fewer)
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, layers=list(store.layers)))
    local = embedder.LocalEmbedder(settings, faces_dir=layer.directory.parent / "faces")  # not the tracked one
    if local.description != store.card["description"]:
        raise ConfigError(
            f"params.yaml's model settings do not reproduce the probe's cache {store.directory.name}; "
            "set model (and extract.precision) as they were when the probe's cache was made."
        )
    log.info("embedding %d images not in the cache (%d already there)", len(todo), len(wanted) - len(todo))
    with layer.writer_lock():
        local.embed([embedder.Item(k, str(wanted[k][0]), *wanted[k]) for k in todo], layer)
        EmbeddingStore.open(layer.directory).write_index()


def run(settings: Settings, outputs: Outputs, paths: list[Path], probe_dir: Path | None, out: Path) -> list[dict]:
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the CSV file, e.g. {out / 'predictions.csv'}.")
    probe, card = probes.load(probe_dir or outputs.probe)
    files = collect(paths)
    if not files:
        raise ConfigError("no image or video files found in the given paths.")
    facts = file_index.read_all(files, images.inspect_file, "hashing")  # in threads, with progress
    keys_of = [rows_of(settings, f, x) for f, x in zip(files, facts, strict=True)]
    wanted = {k: (f, frame) for f, keys in zip(files, keys_of, strict=True) for k, frame in keys}
    store = cache_for(outputs, card["fingerprint"])
    layer = predict_layer(outputs, store)
    embed_missing(settings, store, layer, wanted)

    layer = EmbeddingStore.open(layer.directory)  # re-read: new shards
    known = list(wanted)
    X, found = features.read_layers(store, known, card["layer"])
    if not found.all():
        X_new, found_new = features.read_layers(layer, known, card["layer"])
        X = np.where(found[:, None], X, X_new)
        found = found | found_new
    scores = dict(zip(known, probe.predict_proba(X), strict=True))
    found_of = dict(zip(known, found, strict=True))
    failures = {**layer.failures(), **store.failures()}
    threshold = card.get("threshold", 0.5)
    # One score per file: an image's own, a video's frames pooled as evaluate pools them.
    scored = [(i, scores[k]) for i, keys in enumerate(keys_of) for k, _ in keys if found_of[k]]
    pooled: dict[int, float] = {}
    if scored:
        index, values = (np.array(column) for column in zip(*scored, strict=True))
        pooling = settings.evaluate.video_pooling
        by_file, _, which = video_level(values, np.zeros(len(index), int), index, pooling)
        pooled = dict(zip(which.tolist(), by_file.tolist(), strict=True))
    rows = []
    for i, (f, x, keys) in enumerate(zip(files, facts, keys_of, strict=True)):
        row = {"path": str(f), "digest": x.digest if x else "", "score": "", "label": "", "error": ""}
        n_scored = sum(bool(found_of[k]) for k, _ in keys)
        row["frames"] = f"{n_scored}/{len(keys)}" if f.suffix.lower() in frames.VIDEO_SUFFIXES else ""
        if x is None:
            row["error"] = "unreadable file"
        elif i not in pooled:
            row["error"] = failures.get(keys[0][0], (None, "not embedded"))[1]
        else:
            row["score"] = f"{pooled[i]:.6f}"
            row["label"] = "fake" if pooled[i] >= threshold else "real"
        rows.append(row)
    with atomic.atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "digest", "score", "label", "error", "frames"])
        writer.writeheader()
        writer.writerows(rows)
    n_fake = sum(r["label"] == "fake" for r in rows)
    log.info(
        "%d files: %d fake, %d real, %d failed (threshold %.3f) -> %s",
        len(rows),
        n_fake,
        sum(r["label"] == "real" for r in rows),
        sum(bool(r["error"]) for r in rows),
        threshold,
        out,
    )
    return rows
