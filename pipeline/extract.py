"""extract stage: embed every manifest image that no committed shard holds yet.

Plans what is missing (`embedder.plan`: wanted - done, a pure function), hands it to the
embedder that `extract.scheduler` names (this machine's reader -> model -> writer loop, or a
dask cluster), embeds the zero-shot prompts, and writes the summary that train and evaluate
read (`cache/extract.json`). "Done" is whatever committed shards hold, so a crash or Ctrl-C
loses at most the shard in flight and the next run resumes from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import numpy as np

from pipeline import atomic, frames, manifest_table, perturb
from pipeline.config import ConfigError, Settings
from pipeline.embedder import Item, LocalEmbedder, Redescribed, plan, recorded_failures, where
from pipeline.outputs import Outputs
from pipeline.store import (
    EmbeddingStore,
    StoreError,
    cache_dirs,
    differences,
    differences_shown,
    existing_cache,
    fingerprint,
    reasons_counted,
    text,
)
from pipeline.store.summary import ExtractSummary

log = logging.getLogger(__name__)


def embedder_for(settings: Settings, embedder: LocalEmbedder | None = None):
    """The embedder `extract.scheduler` asks for (a context manager: a cluster is shut down after)."""
    if embedder is not None:
        return embedder
    if settings.extract.scheduler == "dask":
        from pipeline import distributed

        return distributed.DaskEmbedder(settings)
    return LocalEmbedder(settings)


def _model_caches(settings: Settings, outputs: Outputs) -> tuple[ExtractSummary | None, list[dict]]:
    """What `cache/extract.json` records (None without it) and the cards of this project's caches
    of `model.name` stored as `model.dtype`, the one extract.json names first; an unreadable card
    is left out."""
    summary = None
    with contextlib.suppress(ConfigError, OSError):
        summary = ExtractSummary.read(outputs.extract_summary)
    named = outputs.embeddings / summary.embeddings if summary else None
    cards = []
    for directory in sorted(cache_dirs(outputs.embeddings), key=lambda d: d != named):
        with contextlib.suppress(ValueError, OSError, AttributeError, KeyError, TypeError, StoreError):
            card = EmbeddingStore.open(directory).card
            if card["model"] == settings.model.name and card["dtype"] == settings.model.dtype:
                cards.append({
                    **card, "layers": list(card["layers"]), "precision": card["description"]["precision"],
                    "directory": directory.name,
                })  # fmt: skip
    return summary, cards


def shared_precision(settings: Settings, summary: ExtractSummary | None, cards: list[dict]) -> Settings:
    """`extract.precision: auto` means the precision of the cache this project already has for
    the model (the one `cache/extract.json` names, shared through git and DVC, else any cache of
    the model here), so that teammates on other kinds of machine extend one cache instead of
    starting a second one; without such a cache, the device class decides (backbones).
    `summary`, `cards`: `_model_caches`."""
    if settings.extract.precision != "auto":
        return settings
    recorded = [summary.precision] if summary and summary.model == settings.model.name else []
    recorded += [card["precision"] for card in cards if card["layers"] == settings.model.layers]
    precision = next((p for p in recorded if p in ("fp32", "bf16", "fp16")), None)
    if precision is None:
        return settings
    log.info("extract.precision auto: %s, the precision of this project's cache of %s", precision, settings.model.name)
    return dataclasses.replace(settings, extract=dataclasses.replace(settings.extract, precision=precision))


def shared_layer_order(settings: Settings, cards: list[dict]) -> Settings:
    """`model.layers` in the order of this project's cache of the same layers of the model (the
    one `cache/extract.json` names first, else the first here; of `extract.precision`'s, unless
    auto), where none has them in the order asked for: the order changes no number, so listing
    the layers in another order extends that cache instead of embedding every image again.
    `cards`: `_model_caches`'s."""
    wanted, precision = settings.model.layers, settings.extract.precision
    orders = [
        card["layers"]
        for card in cards
        if precision in ("auto", card["precision"]) and sorted(card["layers"]) == sorted(wanted)
    ]
    if not orders or wanted in orders:
        return settings
    log.info("model.layers: %s, the order of this project's cache of these layers (the order changes no number)",
             ", ".join(orders[0]))  # fmt: skip
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, layers=orders[0]))


def run(
    settings: Settings, outputs: Outputs, retry_failed: bool = False, embedder: LocalEmbedder | None = None
) -> ExtractSummary:
    """Extract; `embedder` replaces the one `extract.scheduler` names (tests, benchmarks)."""
    table = manifest_table.read(outputs.manifest)
    faces_folder(outputs.faces)
    summary, cards = _model_caches(settings, outputs)  # read once: the three choices below use them
    settings = shared_precision(shared_layer_order(settings, cards), summary, cards)
    try:
        return _run(settings, outputs, table, cards, embedder, retry_failed)
    except Redescribed as changed:  # a remote cluster's workers upgraded since they last described the model
        log.info("%s; extract starts again with the model as they load it now", changed)
    try:
        return _run(settings, outputs, table, cards, embedder, retry_failed)
    except Redescribed as changed:
        raise ConfigError(
            f"{changed}, and it changed again within this run: the workers load it in different ways; give every "
            "worker the same model files and library versions."
        ) from None


def _run(settings: Settings, outputs: Outputs, table, cards: list[dict], embedder, retry_failed: bool):
    with embedder_for(settings, embedder) as built:
        wider = None if embedder is not None else wider_cache(settings, cards, built.description)
        if wider is None:
            explain_new_cache(outputs, cards, built.description)
            return _extract_into(settings, outputs, table, built, retry_failed)
    log.info(
        "model.layers: %s served by this project's cache of %s (a cache of more layers serves fewer: nothing is "
        "embedded again; new images get all of its layers)", ", ".join(settings.model.layers), ", ".join(wider),
    )  # fmt: skip
    settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, layers=wider))
    with embedder_for(settings) as built:
        return _extract_into(settings, outputs, table, built, retry_failed)


# cache/faces, a DVC output of this stage, holds no detection without data.faces, and DVC warned
# "'cache/faces' is empty" on every run: it holds this note, the same bytes on every machine.
FACES_NOTE = (
    b"Face detections of data.faces, made by the extract stage: a folder per detector, of Parquet parts.\n"
    b"Without data.faces this note is all there is.\n"
)


def faces_folder(directory) -> None:
    """Make the detection cache's folder (`Outputs.faces`) with its note (`FACES_NOTE`)."""
    directory.mkdir(parents=True, exist_ok=True)
    note = directory / "README.txt"
    if not note.is_file() or note.read_bytes() != FACES_NOTE:
        atomic.write_bytes(note, FACES_NOTE)


def explain_new_cache(outputs: Outputs, cards: list[dict], description: dict) -> None:
    """Where this project has caches of the model but none for `description`, say what sets the
    nearest apart before every image is embedded again: a library upgrade, other weights, a
    teammate's other versions, or a setting. `cards`: `_model_caches`'s."""
    if not cards or existing_cache(outputs.embeddings, fingerprint(description)):
        return
    nearest = min(cards, key=lambda card: len(differences(description, card["description"])))
    log.info(
        "model settings as loaded here match none of this project's caches of %s: the nearest, %s, differs in %s; "
        "every image is embedded again, into a new cache",
        nearest["model"], nearest["directory"], differences_shown(description, nearest["description"]),
    )  # fmt: skip


def wider_cache(settings: Settings, cards: list[dict], description: dict) -> list[str] | None:
    """The layers of this project's cache of more layers than `model.layers` that the model, as
    `description` describes it, fills (the same description but for its layers), where there is
    no cache of exactly `model.layers`: after a layer sweep, one layer of it is read from the
    sweep's cache instead of embedding every image again. None where there is no such cache.
    `cards`: `_model_caches`'s, extract.json's first."""
    exact = fingerprint(description)
    if any(card["fingerprint"] == exact for card in cards):
        return None
    wanted = set(settings.model.layers)
    for card in cards:
        if (
            set(card["layers"]) > wanted
            and fingerprint({**description, "layers": card["layers"]}) == card["fingerprint"]
        ):
            return card["layers"]
    return None


def _extract_into(settings, outputs, table, embedder, retry_failed: bool) -> ExtractSummary:
    store = EmbeddingStore.create(outputs.embeddings, settings.model.name, embedder.description, embedder.dims)
    with store.writer_lock():
        return _extract(settings, outputs, table, embedder, store, retry_failed)


def _extract(settings, outputs, table, embedder, store: EmbeddingStore, retry_failed: bool) -> ExtractSummary:
    removed = store.remove_leftovers()
    if removed:
        log.info("removed %d unfinished temp files of an interrupted run", removed)
    digests = table.column("digest").to_pylist()
    paths = table.column("path").to_pylist()
    todo = plan(digests, store.keys(), recorded_failures(store), retry_failed)
    frame_numbers = table.column("frame").to_pylist()
    first = {}
    for d, p, f in zip(digests, paths, frame_numbers, strict=True):
        first.setdefault(d, (p, f))
    root = settings.data_root

    def items_of(keys: list[str]) -> list[Item]:
        return [Item(d, first[d][0], manifest_table.absolute_path(first[d][0], root), first[d][1]) for d in keys]

    items = items_of(todo)
    unique = len(set(digests))
    log.info(
        "extract: %d unique images in the manifest, %d already cached, %d to embed -> %s",
        unique,
        unique - len(todo),
        len(todo),
        store.directory,
    )

    started = time.perf_counter()
    stale: list[str] = []
    if items:
        try:
            stale = embed_here(embedder, items, store)
        finally:
            store = EmbeddingStore.open(store.directory)  # re-read: shards may come from other processes
            store.write_index()  # what was committed, also when the run stops early
    seconds = time.perf_counter() - started
    if todo:
        log.info("embedded %d images in %.1f s (%.1f img/s)", len(todo), seconds, len(todo) / max(seconds, 1e-9))
    if settings.data.faces is not None and settings.data.faces.no_face == "nearest":
        store, more = embed_nearest(settings, table, items_of, embedder, store)
        stale += more
    if settings.data.faces is not None and settings.data.faces.save_crops:
        save_missing_crops(settings, table, items_of, embedder, store)
    store, more = embed_perturbed(settings, table, items_of, embedder, store, retry_failed)
    stale += more
    if stale:
        raise stale_files(list(dict.fromkeys(stale)), root)

    embed_prompts(settings, store, embedder)
    summary = summarize(store, set(digests), settings.model.name, outputs)
    report_failures(store, set(digests))
    summary.write(outputs.extract_summary)
    return summary


def embed_here(embedder, items: list[Item], store: EmbeddingStore) -> list[str]:
    """`embedder.embed(items, store)`, unless none of their files is on this machine (a teammate
    who pulled the cache but not the images): then one sentence, before anything is embedded
    (and before the model is loaded, where `backbones.Known` gave the description).
    Returns the paths of the files not embedded as listed (`images.STALE`)."""
    files = dict.fromkeys(item.file for item in items)
    if not any(f.exists() for f in files):  # stops at the first file that is here
        raise stale_files(list(dict.fromkeys(item.path for item in items)), None)
    return embedder.embed(items, store)


def stale_files(paths: list[str], root) -> ConfigError:
    """The sentence for manifest files that were not embedded as listed: not on this machine, or
    changed since the manifest hashed them (`root`: where the manifest's paths are; None: all
    are known to be absent)."""
    gone = paths if root is None else [p for p in paths if not manifest_table.absolute_path(p, root).exists()]
    if gone:
        return ConfigError(
            f"{_files(len(gone))} the manifest lists {'is' if len(gone) == 1 else 'are'} not on this machine "
            f"(e.g. {gone[0]}), so {'it was' if len(gone) == 1 else 'they were'} not embedded: run extract where "
            "the images are (or put them under data.root here), or, if they were deleted, rerun the manifest "
            "stage (`dvc repro -f manifest`, then `dvc repro`); everything else is cached."
        )
    return ConfigError(
        f"{_files(len(paths), 'image ')} changed since the manifest was built (e.g. {paths[0]}) and "
        f"{'was' if len(paths) == 1 else 'were'} not embedded; "
        "rerun the manifest stage (`dvc repro -f manifest`, then `dvc repro`): everything else is cached."
    )


def _files(n: int, kind: str = "") -> str:
    return f"{n} {kind}file{'' if n == 1 else 's'}"


def embed_nearest(
    settings: Settings, table, items_of, embedder, store: EmbeddingStore
) -> tuple[EmbeddingStore, list[str]]:
    """`data.faces.no_face: nearest`: the frames recorded without a face are embedded again,
    cropped with the box of the nearest frame of their video that has one (a later success
    replaces a recorded failure). The frames of their videos that this machine has no detection
    of (its detection cache is local: a teammate's who pulled the embeddings lacks the frames
    embedded elsewhere) are detected first, so the same box is lent on every machine. Returns the
    store and the paths `embed_here` returns."""
    from pipeline import faces

    crops = embedder.crops
    failures = store.failures()
    faceless = [k for k, (_, reason) in failures.items() if reason == faces.NO_FACE]
    if not faceless:
        return store, []
    videos, without = frames_in_time_order(table), set(faceless)
    lenders = [k for keys in videos.values() if not without.isdisjoint(keys) for k in keys]
    ex = settings.extract
    crops.detect(items_of([k for k in lenders if k not in failures or k in faceless]), embedder.reader,
                 ex.batch_size, ex.num_workers)  # fmt: skip
    lent = lent_boxes(table, crops, videos)
    todo = [k for k in faceless if k in lent]
    if not todo:
        return store, []
    log.info("no_face nearest: %d frames without a face take the box of the nearest frame with one", len(todo))
    crops.preprocess.borrowed = lent
    try:
        stale = embed_here(embedder, items_of(todo), store)
    finally:
        crops.preprocess.borrowed = {}
        store = EmbeddingStore.open(store.directory)
        store.write_index()
    return store, stale


def embed_perturbed(
    settings: Settings, table, items_of, embedder, store: EmbeddingStore, retry_failed: bool
) -> tuple[EmbeddingStore, list[str]]:
    """`evaluate.robustness`: every perturbed variant of the test images the cache lacks, embedded
    like any other row under `<key>~<perturbation>` (incremental and resumable, as the clean rows).
    Returns the store and the paths `embed_here` returns."""
    specs = perturb.specs(settings.evaluate.robustness)
    if not specs:
        return store, []
    embedded = store.keys()
    clean = [k for k in perturb.test_keys(settings, table) if k in embedded]  # failed clean rows would fail again
    sides = perturb.shorter_sides(table, clean)
    variants = {spec: [perturb.variant(k, spec, sides) for k in clean] for spec in specs}
    wanted = [k for keys in variants.values() for k in keys if perturb.split(k)[1] is not None]
    todo = plan(wanted, store.keys(), recorded_failures(store), retry_failed)
    log.info(
        "robustness: %d perturbations x %d test images, %d cached, %d to embed", len(specs), len(clean),
        len(wanted) - len(todo), len(todo),
    )  # fmt: skip
    for spec, keys in variants.items():
        if same := sum(perturb.split(k)[1] is None for k in keys):
            how_many = f"all {same}" if same == len(keys) else f"{same} of {len(keys)}"
            log.info("robustness: %s leaves %s test images as they are: their clean rows serve it", spec, how_many)
    if not todo:
        return store, []
    clean_items = {i.digest: i for i in items_of(list(dict.fromkeys(perturb.split(k)[0] for k in todo)))}
    items = [dataclasses.replace(clean_items[perturb.split(k)[0]], digest=k) for k in todo]
    crops = getattr(embedder, "crops", None)
    if crops is not None:  # crops of perturbed frames use the clean frames' boxes (and lent ones)
        ex = settings.extract
        crops.detect(list(clean_items.values()), embedder.reader, ex.batch_size, ex.num_workers)
        if settings.data.faces.no_face == "nearest":
            crops.preprocess.borrowed = lent_boxes(table, crops)
    try:
        stale = embed_here(embedder, items, store)
    finally:
        if crops is not None:
            crops.preprocess.borrowed = {}
        store = EmbeddingStore.open(store.directory)
        store.write_index()
    return store, stale


def lent_boxes(table, crops, videos: dict[str, list[str]] | None = None) -> dict:
    """`no_face: nearest`: per frame without a face, the detection of the nearest frame with one,
    from the detections `crops.detect` has just read (`videos`: `frames_in_time_order(table)`)."""
    from pipeline import faces

    return faces.nearest_boxes(videos or frames_in_time_order(table), crops.preprocess.cached)


def frames_in_time_order(table) -> dict[str, list[str]]:
    """Each video (`dataset/video`) -> its frames' keys in time order: a video file's by frame
    index, a frame folder's by `frames.name_order` (the manifest lists rows by path, as text)."""
    videos: dict[str, list[tuple]] = {}
    columns = (table.column(c).to_pylist() for c in ("digest", "dataset", "video", "path", "frame"))
    for key, dataset, video, path, frame in zip(*columns, strict=True):
        videos.setdefault(f"{dataset}/{video}", []).append((frame, frames.name_order(path), path, key))
    return {video: [row[-1] for row in sorted(rows)] for video, rows in videos.items()}


def save_missing_crops(settings: Settings, table, items_of, embedder, store: EmbeddingStore) -> None:
    """`data.faces.save_crops`: crops are written as frames are embedded; the crops of frames
    embedded before it was set are written here (no model runs, no detector for cached frames)."""
    crops = embedder.crops
    embedded = store.keys()
    keys = [d for d in dict.fromkeys(table.column("digest").to_pylist()) if d in embedded]
    missing = crops.missing_crops(items_of(keys))
    if not missing:
        return
    log.info("data.faces.save_crops: writing %d crops of frames embedded earlier -> %s", len(missing), crops.crops)
    crops.detect(missing, embedder.reader, settings.extract.batch_size, settings.extract.num_workers)
    if settings.data.faces.no_face == "nearest":
        crops.preprocess.borrowed = lent_boxes(table, crops)
    try:
        crops.save_crops(missing, embedder.reader, settings.extract.batch_size, settings.extract.num_workers)
    finally:
        crops.preprocess.borrowed = {}


def embed_prompts(settings: Settings, store: EmbeddingStore, embedder) -> None:
    """Embed the zero-shot prompts the cache does not hold yet (a handful: instant)."""
    prompts = settings.evaluate.zero_shot.prompts
    wanted = [p for p in prompts["real"] + prompts["fake"] if p not in text.prompts_in(store.directory)]
    if not wanted:
        return
    try:
        embedded = embedder.embed_text(wanted)
    except Redescribed:
        raise  # the prompts are embedded into the cache of the model as the workers load it now
    except Exception as exc:  # auxiliary: the images are committed; zero_shot will say what is missing
        log.warning("zero-shot prompts could not be embedded (%s); the zero_shot protocol will be unavailable", exc)
        return
    if embedded is None:
        log.warning(
            "model '%s' has no text tower (or tokenizer): the zero_shot protocol is unavailable", settings.model.name
        )
        return
    vectors, scoring = embedded
    if not np.isfinite(vectors).all():
        precision = embedder.description["precision"]
        log.warning(
            "model '%s' gave NaN or inf for the zero-shot prompts at extract.precision %s; they are not cached and the "
            "zero_shot protocol is unavailable (%s)",
            settings.model.name,
            precision,
            "check the model's text weights" if precision == "fp32" else "use extract.precision fp32",
        )
        return
    text.add(store.directory, dict(zip(wanted, vectors, strict=True)), scoring)
    log.info("embedded %d zero-shot prompts", len(wanted))


def summarize(store: EmbeddingStore, wanted: set[str], model_name: str, outputs: Outputs) -> ExtractSummary:
    """What train/evaluate need to find the cache; the same bytes whenever the cache is the same."""
    return ExtractSummary(
        model=model_name,
        fingerprint=store.header.fingerprint,
        embeddings=store.directory.relative_to(outputs.embeddings).as_posix(),
        layers=store.header.dims,
        precision=store.card["description"]["precision"],
        images=len(wanted),
        embedded=len(wanted & store.keys()),
        failed=len(wanted & set(store.failures())),
    )


def report_failures(store: EmbeddingStore, wanted: set[str]) -> None:
    failed = {d: v for d, v in store.failures().items() if d in wanted}
    if not failed:
        return
    log.warning(
        "%d images could not be embedded (%s); they are recorded in the cache and skipped. First few:\n%s",
        len(failed),
        reasons_counted(reason for _, reason in failed.values()),
        "\n".join(f"  {where(d, p)}: {r}" for d, (p, r) in list(failed.items())[:5]),
    )
