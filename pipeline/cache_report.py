"""`python -m pipeline cache info|verify|repair`: what each embedding cache holds, whether it is
sound, and dropping what is not (so the next extract re-embeds exactly those rows)."""

from __future__ import annotations

import contextlib

import pyarrow.parquet as pq

from pipeline import perturb
from pipeline.config import ConfigError
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore, StoreError, cache_dirs
from pipeline.store.summary import ExtractSummary


def _manifest_digests(outputs: Outputs) -> set[str] | None:
    if not outputs.manifest.exists():
        return None
    return set(pq.read_table(outputs.manifest, columns=["digest"]).column("digest").to_pylist())


def _current(outputs: Outputs) -> str | None:
    with contextlib.suppress(ConfigError, OSError):
        return ExtractSummary.read(outputs.extract_summary).fingerprint
    return None


def describe(store: EmbeddingStore, wanted: set[str] | None, current: str | None) -> str:
    card, keys, failures = store.card, store.keys(), store.failures()
    marker = "  (current)" if card["fingerprint"] == current else ""
    if wanted is None:
        coverage = f"{len(keys)} embedded, {len(failures)} failed"
    else:
        failed = len(wanted & set(failures))
        coverage = f"{len(wanted & keys)} / {len(wanted)} manifest images embedded, {failed} failed"
        extra = keys - wanted
        variants = {k for k in extra if perturb.split(k)[0] in wanted}  # `<key>~<perturbation>` rows
        if variants:
            coverage += f", and {len(variants)} robustness variants of them"
        if len(extra) > len(variants):
            coverage += f" ({len(extra) - len(variants)} more not in the manifest)"
    layers = ", ".join(f"{k} ({v})" for k, v in store.header.dims.items())
    precision = card["description"].get("precision")
    shards = store.shard_paths()
    return "\n".join(
        [
            f"{store.directory}{marker}",
            f"  model      {card['model']}",
            f"  images     {coverage}",
            f"  layers     {layers}; stored as {store.header.dtype}, computed in {precision}",
            f"  on disk    {len(shards)} shards, {store.size_on_disk() / 1e6:.1f} MB",
        ]
    )


def _open_all(outputs: Outputs) -> tuple[list[EmbeddingStore], list[str]]:
    """The caches that open, and one line per cache directory that does not (a damaged card)."""
    stores, problems = [], []
    for directory in cache_dirs(outputs.embeddings):
        try:
            stores.append(EmbeddingStore.open(directory))
        except StoreError as exc:
            problems.append(str(exc))
    return stores, problems


def run(outputs: Outputs, action: str) -> int:
    found, unopened = _open_all(outputs)
    if not found and not unopened:
        print(f"no embedding caches under {outputs.embeddings}; run the extract stage first.")
        return 0 if action == "info" else 1
    for line in unopened:
        print(line)
    if action == "info":
        wanted, current = _manifest_digests(outputs), _current(outputs)
        described, damaged = [], 0
        for store in found:
            try:
                described.append(describe(store, wanted, current))
            except StoreError as exc:  # a damaged or missing shard: say so under its cache, describe the rest
                described.append(f"{store.directory}\n  damaged    {exc}")
                damaged += 1
        print("\n\n".join(described))
        return 1 if unopened or damaged else 0
    bad = len(unopened)
    for store in found:
        if action == "repair":
            with store.writer_lock():
                done = store.repair()
                store.remove_leftovers()
            print(f"{store.directory}: {len(done)} repair(s)" + "".join(f"\n  {d}" for d in done))
            if done:
                print("  run the extract stage again (`dvc repro`) to re-embed the rows of the shards dropped")
            continue
        problems = store.verify()
        bad += len(problems)
        status = "ok" if not problems else f"{len(problems)} problem(s); `python -m pipeline cache repair` drops them"
        print(f"{store.directory}: {len(store.shard_paths())} shards, {status}")
        for p in problems:
            print(f"  {p}")
    return 1 if bad else 0
