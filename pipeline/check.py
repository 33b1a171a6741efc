"""`python -m pipeline cache check`: does this machine compute the vectors the cache holds?

A cache travels between machines (`dvc pull`) whose CPUs, GPUs and libraries differ. Its
fingerprint holds the model, the preprocessing and the model libraries' versions, not torch's,
Pillow's or FFmpeg's (their releases rarely move a number, and naming them would re-embed every
cache at each one). Before embedding more into a teammate's cache, or trusting a number
computed from it here, this re-embeds a sample of the cache's rows on this machine, the way
extract embeds them (reader, decoding, face crops from the cached detections, perturbations,
precision, layers), into a throwaway store, and compares every vector with the cached one.

The measure is the relative difference |here - cached| / |cached| of each vector; a row passes
within TOLERANCE of the precision the cache was computed in (fp32: the last bits that batch
composition and CPU kernels move; bf16 and fp16: their rounding).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import embedder, faces, manifest_table, perturb
from pipeline.config import ConfigError, Settings
from pipeline.embedder import where
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore, differences_shown
from pipeline.store.summary import ExtractSummary

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}  # largest relative difference of a vector that agrees


@dataclasses.dataclass
class Checked:
    """What `check` found: the rows compared, the worst relative difference per layer, the rows
    beyond the tolerance (key -> (where, layer, difference)) and those that failed here."""

    cache: str
    precision: str
    rows: int
    worst: dict[str, float]
    differ: dict[str, tuple[str, str, float]]
    failed: dict[str, tuple[str, str]]

    @property
    def agrees(self) -> bool:
        return not self.differ and not self.failed


def sample(settings: Settings, outputs: Outputs, store: EmbeddingStore, rows: int, seed: int) -> list[embedder.Item]:
    """Up to `rows` cached rows of the manifest's images and frames (and their robustness
    variants), drawn at random with `seed`, whose files are on this machine."""
    table = pq.read_table(outputs.manifest, columns=["digest", "path", "frame"]).to_pydict()
    first: dict[str, tuple[str, int]] = {}
    for d, p, f in zip(table["digest"], table["path"], table["frame"], strict=True):
        first.setdefault(d, (p, f))
    held = store.keys()
    cached = sorted(k for k in held if perturb.split(k)[0] in first)
    order = np.random.default_rng(seed).permutation(len(cached))
    items = []
    for i in order:
        key = cached[i]
        path, frame = first[perturb.split(key)[0]]
        file = manifest_table.absolute_path(path, settings.data_root)
        if file.is_file():
            items.append(embedder.Item(key, path, file, frame))
            if len(items) == rows:
                break
    return items


def check(settings: Settings, outputs: Outputs, rows: int = 16, seed: int = 0) -> Checked:
    """Re-embed a sample of the cache extract last filled and compare (see the module's doc)."""
    try:
        summary = ExtractSummary.read(outputs.extract_summary)
    except (ConfigError, OSError):
        raise ConfigError(f"{outputs.extract_summary} is missing or unreadable; run the extract stage first.") from None
    if not outputs.manifest.is_file():
        raise ConfigError(f"{outputs.manifest} is missing; run the manifest stage first (`dvc repro manifest`).")
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings, expect_fingerprint=summary.fingerprint)
    precision = store.card["description"].get("precision", "fp32")
    extract = dataclasses.replace(settings.extract, precision=precision)
    model = dataclasses.replace(settings.model, layers=list(store.layers))
    settings = dataclasses.replace(settings, extract=extract, model=model)
    items = sample(settings, outputs, store, rows, seed)
    if not items:
        raise ConfigError(
            f"none of the files of the rows cached in {store.directory.name} is on this machine; "
            "check where data.root points, or get the images."
        )
    with tempfile.TemporaryDirectory(prefix="cache-check-") as tmp:
        here, items = embed_sample(settings, outputs, store, items, Path(tmp))
        return compare(store, here, items, precision)


def embed_sample(
    settings: Settings, outputs: Outputs, store: EmbeddingStore, items: list[embedder.Item], tmp: Path
) -> tuple[EmbeddingStore, list[embedder.Item]]:
    """`items` embedded as extract embeds them into a store under `tmp` with `store`'s card (face
    crops from a copy of the detection cache, so the tracked one is untouched), and the items
    embedded: not the frames whose box was lent by another frame (`no_face: nearest`), which only
    extract crops."""
    detections = tmp / "faces"
    if settings.data.faces is not None and outputs.faces.is_dir():
        shutil.copytree(outputs.faces, detections)
    local = embedder.LocalEmbedder(settings, faces_dir=detections)
    if local.description != store.card["description"]:
        raise ConfigError(
            f"this machine computes another fingerprint than the cache {store.directory.name} holds: "
            f"{differences_shown(local.description, store.card['description'])}; it would embed into a "
            "new cache, and nothing here can be compared with that one."
        )
    if local.crops is not None:
        known = local.crops.preprocess.cached
        faceless = {k for k, d in known.items() if d.box is None}
        items = [i for i in items if perturb.split(i.digest)[0] not in faceless]
    directory = tmp / "embeddings" / store.directory.name
    (directory / "shards").mkdir(parents=True)
    (directory / "card.json").write_text((store.directory / "card.json").read_text())
    here = EmbeddingStore.open(directory, expect_fingerprint=store.header.fingerprint)
    with here.writer_lock():
        local.embed(items, here)
    here = EmbeddingStore.open(directory)
    if settings.data.faces is not None and settings.data.faces.no_face == "nearest":
        failures = here.failures()  # faceless frames the copied detections lacked: extract lent them a box
        items = [i for i in items if failures.get(i.digest, (None, ""))[1] != faces.NO_FACE]
    return here, items


def compare(store: EmbeddingStore, here: EmbeddingStore, items: list[embedder.Item], precision: str) -> Checked:
    """The vectors of `items` in `here` against `store`'s, within TOLERANCE[precision]."""
    keys = [i.digest for i in items]
    paths = {i.digest: i.path for i in items}
    failures = here.failures()
    failed = {k: (where(k, paths[k]), failures[k][1]) for k in keys if k in failures}
    compared = [k for k in keys if k not in failed]
    worst: dict[str, float] = {}
    differ: dict[str, tuple[str, str, float]] = {}
    for name in store.layers:
        cached, _ = store.read(compared, name)
        again, found = here.read(compared, name)
        for k in (k for k, ok in zip(compared, found, strict=True) if not ok):
            failed[k] = (where(k, paths[k]), "not embedded here")
        diff = np.linalg.norm(again - cached, axis=1) / np.maximum(np.linalg.norm(cached, axis=1), 1e-12)
        diff = np.where(found, diff, 0.0)
        worst[name] = float(diff.max()) if len(diff) else 0.0
        for k, d in zip(compared, diff, strict=True):
            if d > TOLERANCE.get(precision, TOLERANCE["fp32"]) and k not in differ:
                differ[k] = (where(k, paths[k]), name, float(d))
    return Checked(store.directory.name, precision, len(keys), worst, differ, failed)


def run(settings: Settings, outputs: Outputs, rows: int, seed: int) -> int:
    """`cache check` for people: what was compared, how close, and what differs; 1 if anything does."""
    found = check(settings, outputs, rows, seed)
    tolerance = TOLERANCE.get(found.precision, TOLERANCE["fp32"])
    closest = ", ".join(f"{name} {d:.1e}" for name, d in found.worst.items())
    print(
        f"{found.cache}: {found.rows} rows re-embedded on this machine ({found.precision}, seed {seed}); "
        f"largest relative difference per layer: {closest} (tolerance {tolerance:.0e})"
    )
    if found.agrees:
        print("  every vector agrees: this machine computes what the cache holds")
        return 0
    for where_, layer, d in list(found.differ.values())[:5]:
        print(f"  differs: {where_}: {layer} by {d:.1e}")
    for where_, reason in list(found.failed.values())[:5]:
        print(f"  cached, but not embedded here: {where_}: {reason}")
    print(
        f"  {len(found.differ)} rows differ and {len(found.failed)} could not be embedded: vectors computed here "
        "would not match the cache's. Compare this machine's torch, Pillow and PyAV versions with the ones "
        "that made the cache before embedding more into it."
    )
    return 1
