"""Extraction on a dask.distributed cluster (`extract.scheduler: dask`).

The digests the cache lacks are split into partitions of `extract.shard_size`; each partition
is one task. A worker builds the backbone once (inside its own process: the model is never
pickled) and commits its own shards straight into the shared cache directory (atomic,
content-named, so workers never collide). The client holds the cache's writer lock for the
whole run and shows progress. A task whose worker dies is rerun elsewhere by dask; a run that
is stopped loses only uncommitted partitions, and the next run embeds just what is missing.

`extract.dask.address` connects to a running scheduler (`tcp://host:8786`; every worker must
see the cache directory and the images at the same paths: a shared filesystem); left empty, a
`LocalCluster` with `extract.dask.n_workers` processes is started (one per GPU on a multi-GPU
machine: worker i uses GPU i modulo the GPU count).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ConfigError, ExtractSettings, ModelSettings, Settings

log = logging.getLogger(__name__)

_BACKBONES: dict = {}  # per worker process: (model, device, precision) -> Backbone


def _worker_device(device: str) -> str:
    """Spread workers over GPUs: worker i of a cluster takes cuda:(i mod GPU count)."""
    import torch
    from distributed import get_worker

    if device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return device  # one GPU visible (e.g. CUDA_VISIBLE_DEVICES per worker), or none
    name = get_worker().name  # LocalCluster names its workers 0 .. n-1
    index = name if isinstance(name, int) else 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _backbone(model: ModelSettings, extract: ExtractSettings):
    from pipeline import backbones

    device = _worker_device(extract.device)
    key = (repr(model), device, extract.precision)
    if key not in _BACKBONES:
        _BACKBONES[key] = backbones.load(model, device, extract.precision)
    return _BACKBONES[key]


def _describe(model: ModelSettings, extract: ExtractSettings) -> tuple[dict, dict[str, int]]:
    """Runs on a worker: the fingerprint description and dims, as the workers will compute them."""
    backbone = _backbone(model, extract)
    return backbone.description, backbone.dims


def _embed_text(model: ModelSettings, extract: ExtractSettings, prompts: list[str]):
    return _backbone(model, extract).embed_text(prompts)


def embed_partition(items: list, store_dir: str, model: ModelSettings, extract: ExtractSettings) -> tuple[int, list]:
    """Runs on a worker: embed `items` and commit them as shard(s) of the cache at `store_dir`;
    returns (items done, paths of files that changed since the manifest)."""
    from pipeline import embedder
    from pipeline.store import EmbeddingStore

    backbone = _backbone(model, extract)
    store = EmbeddingStore.open(Path(store_dir))
    if backbone.description != store.card["description"]:
        raise RuntimeError(f"worker {os.getpid()} computes another fingerprint than the cache {store_dir}")
    writer = embedder.ShardWriter(store, extract.shard_size, extract.format)
    try:
        # Decode in the task's thread: dask worker processes are daemonic and cannot fork loaders.
        changed = embedder.embed_items(items, backbone, writer, extract.batch_size, num_workers=0, progress=False)
    finally:
        writer.close()
    return len(items), changed


class DaskEmbedder:
    """Embeds on a dask.distributed cluster; the same interface as embedder.LocalEmbedder."""

    def __init__(self, settings: Settings):
        if settings.data.faces is not None:
            raise ConfigError(
                "data.faces is not available with extract.scheduler: dask yet; use scheduler: local for face crops."
            )
        self.extract = settings.extract
        # Workers resolve the model themselves: a relative model path must mean the same to them.
        local = Path(settings.model.name).expanduser()
        self.model = replace(settings.model, name=str(local.resolve())) if local.is_dir() else settings.model
        self.client = self.cluster = None

    def __enter__(self) -> DaskEmbedder:
        from distributed import Client, LocalCluster

        if self.extract.dask.address:
            self.client = Client(self.extract.dask.address)
        else:
            self.cluster = LocalCluster(
                n_workers=self.extract.dask.n_workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
            self.client = Client(self.cluster)
        log.info("dask: %s", self.client)
        self.description, self.dims = self.client.submit(_describe, self.model, self.extract, pure=False).result()
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def embed(self, items: list, store) -> list[str]:
        from distributed import as_completed

        size = self.extract.shard_size
        partitions = [items[i : i + size] for i in range(0, len(items), size)]
        log.info("dask: %d partitions of up to %d images", len(partitions), size)
        futures = [
            self.client.submit(
                embed_partition, part, str(store.directory), self.model, self.extract, pure=False, retries=2
            )
            for part in partitions
        ]
        changed: list[str] = []
        with tqdm(total=len(items), desc="embedding (dask)", unit="img", smoothing=0.1) as bar:
            for future in as_completed(futures):
                n, partition_changed = future.result()
                changed += partition_changed
                bar.update(n)
        return changed

    def embed_text(self, prompts: list[str]):
        return self.client.submit(_embed_text, self.model, self.extract, prompts, pure=False).result()
