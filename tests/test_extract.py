"""The extractor: embeds what the cache lacks, matches the model, survives bad images."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from tqdm import tqdm
from transformers import AutoImageProcessor, CLIPModel

from pipeline import backbones, cli, config, demo, embedder, evaluate, extract, manifest, predict, train
from pipeline.outputs import Outputs
from pipeline.probes import LinearProbe
from pipeline.store import EmbeddingStore, caches, text
from tests.conftest import CUDA, REPO, update_params

FORKS: list[str] = []  # every os.fork of this test process (reader processes), for the tests to count
sys.addaudithook(lambda event, args: FORKS.append(event) if event == "os.fork" else None)


def run_stages(project, **kwargs):
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    return extract.run(settings, outputs, **kwargs), outputs


def test_plan_is_wanted_minus_done_minus_failed():
    wanted = ["a", "b", "a", "c", "d"]
    assert embedder.plan(wanted, done={"b"}, failed={"d"}) == ["a", "c"]
    assert embedder.plan(wanted, done={"b"}, failed={"d"}, retry_failed=True) == ["a", "c", "d"]


def test_a_device_this_machine_lacks_is_one_sentence():
    from pipeline.backbones.base import resolve_device

    gpus = torch.cuda.device_count()  # none here: cuda:0 is missing; on a GPU machine, cuda:<count>
    with pytest.raises(config.ConfigError, match="no CUDA GPU is visible" if not gpus else f"sees {gpus} CUDA GPU"):
        resolve_device(f"cuda:{gpus}")
    if not torch.backends.mps.is_available():  # every machine but a Mac
        with pytest.raises(config.ConfigError, match="asks for MPS but this machine has no Apple GPU"):
            resolve_device("mps")


def test_precision_auto_on_a_gpu_is_bf16_only_where_its_tensor_cores_have_it():
    """`precision: auto` on CUDA: bf16 from Ampere (compute capability 8) on, fp16 before it (a T4,
    a V100), where torch runs bf16 emulated, far slower (`torch.cuda.is_bf16_supported()` counts
    the emulation: it says yes on a T4); on ROCm, bf16, as torch says."""
    from pipeline.backbones.base import gpu_precision

    assert [gpu_precision((major, 0)) for major in (6, 7, 8, 9, 10)] == ["fp16", "fp16", "bf16", "bf16", "bf16"]
    assert gpu_precision((7, 5)) == "fp16" and gpu_precision((9, 4), rocm=True) == "bf16"
    if torch.cuda.is_available():
        assert backbones.base.resolve_precision("auto", torch.device("cuda")) == gpu_precision(
            torch.cuda.get_device_capability()
        )


def test_a_precision_the_device_would_emulate_is_warned_about(monkeypatch, caplog):
    """bf16 on a GPU before Ampere (asked for, or the precision of the cache auto extends: a
    teammate's A100 made it) and bf16/fp16 on a CPU without native bf16 run emulated: one warning
    that says what is faster; the precision stays what was asked for."""
    from pipeline.backbones import base

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    t4 = base.emulated("bf16", cuda, capability=(7, 5))
    assert t4 is not None and "compute capability 7.5" in t4 and "extract.precision: fp16" in t4
    assert base.emulated("fp16", cuda, capability=(7, 5)) is None
    assert base.emulated("bf16", cuda, capability=(8, 0)) is None
    monkeypatch.setattr(base, "cpu_supports_bf16", lambda: False)
    assert base.emulated("fp32", cpu) is None
    with caplog.at_level(logging.WARNING, logger=base.log.name):
        assert base.resolve_precision("fp16", cpu) == "fp16"
    warned = "this CPU has no native bf16/fp16: fp16 is emulated and slower than fp32"
    assert [r.getMessage() for r in caplog.records] == [warned]
    monkeypatch.setattr(base, "cpu_supports_bf16", lambda: True)
    assert base.emulated("bf16", cpu) is None


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_every_image_is_embedded_once_and_matches_clip(project, tiny_clip, device):
    """Also on a GPU, where the readers pin their batches, several batches are in flight and the
    device normalises uint8 crops: the same vectors as the plain Hugging Face way on the CPU."""
    if device == "cuda":
        update_params(project, "extract", device="cuda", num_workers=2)
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, whatever an earlier test loaded
    summary, outputs = run_stages(project)
    if device == "cuda":
        assert not torch.backends.cudnn.allow_tf32, "fp32 on a GPU: no TF32 convolutions"
    table = pq.read_table(outputs.manifest).to_pandas()
    assert summary.images == summary.embedded == table.digest.nunique()
    assert summary.failed == 0

    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    sample = table.iloc[[0, 7, len(table) - 1]]
    got, found = store.read(sample.digest.tolist(), "projection")
    assert found.all()

    # Reference: the plain Hugging Face way, one image at a time.
    model = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")  # the reference processor
    for row, embedding in zip(sample.itertuples(), got, strict=True):
        with Image.open(project / "data" / row.path) as im:
            pixels = processor(images=im, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pooled = model.vision_model(pixel_values=pixels).pooler_output
            expected = model.visual_projection(pooled)[0].numpy()
        np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-5)


def test_a_rerun_embeds_nothing_and_new_images_only_themselves(project, caplog):
    """...and a run as small as the new images here (no more than one batch per reader) reads in
    threads of this process: forking the reader processes would cost more (each fork copies the
    page tables of this process, which holds the model: 0.1 s per reader from 5 GB of tensors)."""
    update_params(project, "extract", num_workers=2, batch_size=4)
    del FORKS[:]
    run_stages(project)
    assert len(FORKS) == 2, "a full run reads in 2 reader processes"
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_stages(project)
    assert "0 to embed" in caplog.text

    src = project / "data" / "Train_Real" / "Real_youtube" / "000"
    shutil.copytree(src, project / "data" / "Train_Real" / "Real_youtube" / "900")  # same bytes: no work
    new = project / "data" / "Train_Real" / "Real_youtube" / "901"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (i * 40, 10, 200)).save(new / f"{i:04d}.png")
    caplog.clear()
    del FORKS[:]
    summary, _ = run_stages(project)
    assert "3 to embed" in caplog.text
    assert summary.embedded == summary.images
    assert FORKS == [], "3 new images (2 readers, batches of 4) are read without forking"


def test_nothing_to_embed_loads_no_model_and_unchanged_weights_are_not_hashed_again(project, monkeypatch, tiny_clip):
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    first = extract.run(settings, outputs)
    assert (project / "cache" / "backbones.json").is_file()

    real_load = backbones.load
    loads = []
    monkeypatch.setattr(backbones, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    assert extract.run(settings, outputs) == first and loads == [], "a no-op extract never loads the model"

    # A model file with a new mtime: the model is loaded (the same fingerprint), but only the
    # files that changed are hashed; the weights, unchanged, come from the remembered digests.
    hashed = []
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, alg: hashed.append(fh.name) or real_digest(fh, alg))
    project_model = project / "model"
    shutil.copytree(tiny_clip, project_model)
    update_params(project, "model", name=str(project_model))
    settings = config.load(project / "params.yaml")
    assert extract.run(settings, outputs).fingerprint == first.fingerprint and len(loads) == 1
    assert any(name.endswith(".safetensors") for name in hashed), "a new path is hashed once"
    hashed.clear()
    config_file = project_model / "config.json"
    os.utime(config_file, ns=(config_file.stat().st_atime_ns, config_file.stat().st_mtime_ns + 10**9))
    assert extract.run(settings, outputs).fingerprint == first.fingerprint and len(loads) == 2
    assert not any(name.endswith(".safetensors") for name in hashed), "unchanged weights are not read again"


def test_a_second_run_with_precision_auto_loads_no_model_either(project, monkeypatch):
    """`precision: auto` on the first run; on the next, auto means the precision of the cache the
    first made (fp32 here), and what the first run learned about the model is still used: a run
    with nothing to embed (an extract param changed, `dvc repro -f`) does not load the model."""
    update_params(project, "extract", precision="auto")
    outputs = Outputs(project)
    manifest.run(config.load(project / "params.yaml"), outputs)
    first = extract.run(config.load(project / "params.yaml"), outputs)
    real_load = backbones.load
    loads = []
    monkeypatch.setattr(backbones, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    for _ in range(2):
        assert extract.run(config.load(project / "params.yaml"), outputs) == first
    assert loads == [], "a no-op extract never loads the model"


def test_a_model_that_cannot_embed_prompts_is_not_loaded_again_to_find_that_out(project, monkeypatch, tiny_clip):
    """A vision-only model (DINOv2, or a checkpoint without tokenizer files) cannot embed the
    zero-shot prompts. A run with nothing to embed (the rerun DVC makes after an `evaluate` param
    changed) must not load it again only to learn that once more; the fact is remembered per set of
    model files, so giving the model its tokenizer later embeds the prompts."""
    vision_only = project / "vision-only"
    shutil.copytree(tiny_clip, vision_only)
    tokenizer = project / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(vision_only / name, tokenizer / name)
    update_params(project, "model", name=str(vision_only))
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    assert "zero_shot" in settings.evaluate.protocols
    manifest.run(settings, outputs)
    first = extract.run(settings, outputs)

    real_load = backbones.load
    loads = []
    monkeypatch.setattr(backbones, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    assert extract.run(settings, outputs) == first and loads == [], "nothing to embed: no model loaded"

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(tokenizer / name, vision_only / name)
    extract.run(settings, outputs)
    assert len(loads) == 1 and text.prompts_in(EmbeddingStore.open(outputs.embeddings / first.embeddings).directory)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's calling card)."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def strip_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 2_000_000), 128).save(buf, "PNG")
    assert len(buf.getvalue()) < 10_000
    return buf.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP's settings display: Linux's torch")
def test_the_extract_command_lets_torchs_idle_openmp_threads_sleep_unless_told_otherwise(project):
    """`python -m pipeline extract` loads torch with OMP_WAIT_POLICY=PASSIVE (its threads spun
    between a model's operations on cores the readers could have used); a policy the user set is
    kept. GNU OpenMP says what it read as it loads (OMP_DISPLAY_ENV): the spin count tells passive
    (0) from its default (300,000), which it displays as PASSIVE too."""
    manifest.run(config.load(project / "params.yaml"), Outputs(project))
    command = [sys.executable, "-m", "pipeline", "extract", "--params", str(project / "params.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, shown in ((None, "GOMP_SPINCOUNT = '0'"), ("ACTIVE", "OMP_WAIT_POLICY = 'ACTIVE'")):
        run = subprocess.run(
            command,
            env={**env, "OMP_DISPLAY_ENV": "VERBOSE", **({"OMP_WAIT_POLICY": given} if given else {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert shown in run.stderr, run.stderr[:2000]


def test_odd_modes_are_embedded_and_bad_files_recorded_without_stopping_the_run(project, caplog):
    folder = project / "data" / "Train_Real" / "Real_youtube" / "000"
    good = (folder / "0000.png").read_bytes()
    bad = {
        "9000.png": b"",  # zero bytes
        "9001.png": b"not an image at all, just text with an image extension",
        "9002.png": good[: len(good) // 3],  # truncated
        "9003.png": png_claiming_size(60_000, 60_000),  # decompression bomb
        "9005.png": strip_png(),  # 1 x 2,000,000 pixels: the resize alone would need gigabytes
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    rgb = Image.open(folder / "0000.png").convert("RGB")
    rgb.convert("RGBA").save(folder / "9100.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "9101.png", transparency=0)
    rgb.convert("L").save(folder / "9102.jpg")
    rgb.convert("CMYK").save(folder / "9103.jpg")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "9104.png")
    rgb.save(folder / "9105.webp")
    rgb.save(folder / "9106.bmp")

    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    caplog.set_level(logging.INFO)
    summary = extract.run(settings, outputs)
    assert summary.failed == 5
    assert summary.embedded == summary.images - 5
    assert "5 images could not be embedded" in caplog.text
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in store.failures().values()}
    assert "unrecognised format" in reasons["9000.png"] and "unrecognised format" in reasons["9001.png"]
    assert "unreadable image" in reasons["9002.png"]
    assert "too large" in reasons["9003.png"]
    assert "extreme aspect ratio (1x2000000" in reasons["9005.png"]

    caplog.clear()
    extract.run(settings, outputs)
    assert "0 to embed" in caplog.text, "failed images are not retried by default"
    caplog.clear()
    extract.run(settings, outputs, retry_failed=True)
    assert "5 to embed" in caplog.text


def test_nan_or_inf_from_the_model_is_never_cached(project, tiny_clip, caplog):
    """NaN or inf out of the forward pass (fp16 overflowing, a broken checkpoint, a miscompiled
    kernel) is the model's fault, not the images': the run stops at that batch with one sentence
    naming the precision to change, and neither vectors nor failures of it reach the cache, so a
    rerun with the fix embeds every image. From the text tower, the prompts are not cached either
    (the images are: zero-shot is auxiliary). Values that the storage dtype (float16) would turn
    into inf are refused the same way."""
    from safetensors.numpy import load_file, save_file

    def broken_copy(name: str, tensor: str, value: float = np.nan) -> str:
        copy = project / name
        shutil.copytree(tiny_clip, copy)
        tensors = load_file(str(copy / "model.safetensors"))
        tensors[tensor].flat[0] = value
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
        return str(copy)

    update_params(project, "model", name=broken_copy("broken-vision", "vision_model.post_layernorm.weight"))
    with pytest.raises(config.ConfigError, match=r"NaN or inf .* extract\.precision fp32") as raised:
        run_stages(project)
    assert "\n" not in str(raised.value)
    (store,) = caches(Outputs(project).embeddings)
    assert store.count() == 0 and not store.failures()

    update_params(project, "model", name=broken_copy("broken-text", "text_model.final_layer_norm.weight"))
    caplog.set_level(logging.WARNING)
    summary, outputs = run_stages(project)
    assert summary.embedded == summary.images
    assert not text.prompts_in(outputs.embeddings / summary.embeddings)
    assert "NaN or inf for the zero-shot prompts" in caplog.text

    # Finite in float32, but past float16's 65504: `model.dtype: float16` would store inf.
    large = broken_copy("large-projection", "visual_projection.weight", 1e6)
    update_params(project, "model", name=large, dtype="float16")
    with pytest.raises(config.ConfigError, match=r"beyond float16's range .* model\.dtype: float32"):
        run_stages(project)
    assert not next(s for s in caches(Outputs(project).embeddings) if "large-projection" in s.directory.name).count()


def test_batches_larger_than_a_shard_make_several_atomic_shards(project):
    update_params(project, "extract", shard_size=40)
    summary, outputs = run_stages(project)
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    shards = store.shard_paths()
    assert len(shards) >= summary.images // 48
    assert not [p for p in (store.directory / "shards").iterdir() if p.name.startswith(".tmp")]
    card = json.loads((store.directory / "card.json").read_text())
    assert card["layers"] == ["projection"] and card["dims"] == {"projection": 32}


def test_several_layers_in_one_pass(project):
    update_params(project, "model", layers=["projection", "pooled", "block_1"])
    assert config.load(project / "params.yaml").model.layers == ["projection", "pooled", "block_1"]
    summary, outputs = run_stages(project)
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    assert store.header.dims == {"projection": 32, "pooled": 128, "block_1": 128}
    digest = pq.read_table(outputs.manifest).column("digest")[0].as_py()
    pooled, _ = store.read([digest], "pooled")
    block, _ = store.read([digest], "block_1")
    assert not np.allclose(pooled, block)  # pooled = post-layernorm CLS, block_1 = raw CLS

    # The same layers in another order change no number: the cache is extended, not made again,
    # and predict, with the reordered params, embeds its new images beside it.
    train.run(config.load(project / "params.yaml"), outputs)
    update_params(project, "model", layers=["block_1", "projection", "pooled"])
    again, _ = run_stages(project)
    assert again == summary and [c.directory for c in caches(outputs.embeddings)] == [store.directory]
    new = project / "new.png"
    Image.new("RGB", (72, 64), (200, 10, 40)).save(new)
    out = project / "predictions.csv"
    predict.run(config.load(project / "params.yaml"), outputs, [new], None, out)
    assert out.read_text().splitlines()[1].split(",")[2], "the new image is scored"

    # A cache of more layers serves fewer (after a layer sweep, one layer): nothing is embedded
    # again, train reads its layer from that cache, and predict embeds new images with its layers.
    update_params(project, "model", layers=["pooled", "projection"])
    update_params(project, "evaluate", protocols=["heldout", "layers"], bootstrap=0)
    narrowed, _ = run_stages(project)
    assert narrowed == summary and [c.directory for c in caches(outputs.embeddings)] == [store.directory]
    card = train.run(config.load(project / "params.yaml"), outputs)
    assert card["fingerprint"] == summary.fingerprint
    layers = evaluate.run(config.load(project / "params.yaml"), outputs)["layers"]
    assert layers["layers"] == ["projection", "pooled"], "the layers asked for, in the cache's order"
    newer = project / "newer.png"
    Image.new("RGB", (72, 64), (20, 210, 40)).save(newer)
    predict.run(config.load(project / "params.yaml"), outputs, [newer], None, out)
    assert out.read_text().splitlines()[1].split(",")[2], "the new image is scored"


@pytest.mark.parametrize("workers", [2])
def test_worker_processes_give_the_same_embeddings(project, workers):
    summary, outputs = run_stages(project)
    store = EmbeddingStore.open(outputs.embeddings / summary.embeddings)
    digests = sorted(store.keys())
    single, _ = store.read(digests, "projection")
    shutil.rmtree(outputs.embeddings)
    update_params(project, "extract", num_workers=workers)
    summary, outputs = run_stages(project)
    multi, _ = EmbeddingStore.open(outputs.embeddings / summary.embeddings).read(digests, "projection")
    np.testing.assert_array_equal(single, multi)


def test_a_new_cache_of_a_model_the_project_has_says_what_sets_it_apart(project, monkeypatch, caplog):
    # A teammate (or this machine after an upgrade) whose transformers differs gets another
    # fingerprint, so every image is embedded again: extract says why before it starts.
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    first = extract.run(settings, outputs)
    versions = backbones.base.library_versions
    monkeypatch.setattr(backbones.base, "library_versions", lambda *n: {**versions(*n), "transformers": "9.9"})
    (project / "cache" / "backbones.json").unlink()  # what this machine remembers of the model
    caplog.set_level(logging.INFO, logger="pipeline.extract")
    second = extract.run(settings, outputs)
    assert second.fingerprint != first.fingerprint
    ours = versions("transformers")["transformers"]
    assert (
        f"match none of this project's caches of {settings.model.name}: the nearest, {first.embeddings}, differs in "
        f"libraries.transformers (9.9 here, {ours} there); every image is embedded again"
    ) in caplog.text
    caplog.clear()
    extract.run(settings, outputs)
    assert "match none" not in caplog.text, "said once, when the cache is started"


def test_moving_images_and_switching_models_back_re_embed_nothing(project, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_stages(project)
    shutil.move(project / "data" / "Test_Fake", project / "data" / "Moved_Fake")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for spec in params["data"]["datasets"].values():
        spec["path"] = spec["path"].replace("Test_Fake", "Moved_Fake")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    caplog.clear()
    run_stages(project)
    assert "0 to embed" in caplog.text, "moved images keep their digests"

    other = tmp_path / "other-clip"
    demo.make_tiny_clip(other, seed=1)
    original = config.load(project / "params.yaml").model.name
    update_params(project, "model", name=str(other))
    caplog.clear()
    summary_b, outputs = run_stages(project)
    assert "0 already cached" in caplog.text, "other weights, other cache"
    update_params(project, "model", name=original)
    caplog.clear()
    summary_a, _ = run_stages(project)
    assert "0 to embed" in caplog.text, "switching back finds the first cache"
    assert summary_a.fingerprint != summary_b.fingerprint
    assert len(list(outputs.embeddings.iterdir())) == 2


@pytest.mark.skipif(
    not backbones.cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 is slow"
)
def test_bf16_embeddings_stay_close_to_fp32(project):
    summary32, outputs = run_stages(project)
    update_params(project, "extract", precision="bf16")
    summary16, _ = run_stages(project)
    assert summary16.fingerprint != summary32.fingerprint, "precision is part of the fingerprint"
    digests = sorted(EmbeddingStore.open(outputs.embeddings / summary32.embeddings).keys())
    a, _ = EmbeddingStore.open(outputs.embeddings / summary32.embeddings).read(digests, "projection")
    b, _ = EmbeddingStore.open(outputs.embeddings / summary16.embeddings).read(digests, "projection")
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_training_is_identical_whichever_format_holds_the_cache(project):
    cards = {}
    for fmt in ("parquet", "hdf5"):
        shutil.rmtree(project / "cache", ignore_errors=True)
        update_params(project, "extract", format=fmt)
        update_params(project, "model", dtype="float16")
        settings = config.load(project / "params.yaml")
        outputs = Outputs(project)
        manifest.run(settings, outputs)
        extract.run(settings, outputs)
        train.run(settings, outputs)
        cards[fmt] = (LinearProbe.load(outputs.probe)[0].coef_, evaluate.run(settings, outputs))
    np.testing.assert_array_equal(cards["parquet"][0], cards["hdf5"][0])
    assert cards["parquet"][1] == cards["hdf5"][1]


def test_cache_info_and_verify_commands(project, capsys):
    run_stages(project)
    params = str(project / "params.yaml")
    assert cli.main(["cache", "info", "--params", params]) == 0
    out = capsys.readouterr().out
    assert "(current)" in out and "manifest images embedded, 0 failed" in out and "shards" in out
    assert cli.main(["cache", "verify", "--params", params]) == 0
    shown = capsys.readouterr()
    assert ", ok" in shown.out
    size = tqdm.format_sizeof(sum(p.stat().st_size for p in (project / "cache" / "embeddings").glob("*/shards/*")))
    assert re.search(rf"verifying tiny-clip-\w+: 100%.*\| {size}/{size} ", shown.err), "progress in bytes read"

    shard = next((project / "cache" / "embeddings").glob("*/shards/*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli.main(["cache", "verify", "--params", params]) == 1
    out = capsys.readouterr().out
    assert shard.name in out and "do not match the checksum in its name" in out


def test_cache_check_re_embeds_a_sample_here_and_says_whether_it_matches_the_cache(project, monkeypatch, capsys):
    # A teammate pulls a cache whose vectors another machine computed. Its fingerprint names the
    # model, preprocessing and model libraries, not torch, Pillow or FFmpeg: `cache check` tells
    # whether this machine computes what the cache holds before anything is embedded into it.
    from pipeline import images

    run_stages(project)
    params = str(project / "params.yaml")
    assert cli.main(["cache", "check", "--rows", "8", "--params", params]) == 0
    out = capsys.readouterr().out
    assert "8 rows re-embedded on this machine (fp32, seed 0)" in out and "every vector agrees" in out
    assert re.search(r"projection \d\.\de[-+]\d\d \(tolerance 1e-04\)", out)
    tracked = sorted(p.name for p in (project / "cache").rglob("*") if p.is_file())

    # Another decoder that returns every pixel one level brighter (what another Pillow or FFmpeg
    # could do, unseen by the fingerprint): the sample's vectors no longer match the cache's.
    original = images.to_rgb
    monkeypatch.setattr(images, "to_rgb", lambda im: original(im).point(lambda v: min(v + 1, 255)))
    assert cli.main(["cache", "check", "--rows", "8", "--seed", "3", "--params", params]) == 1
    out = capsys.readouterr().out
    assert "8 rows differ and 0 could not be embedded" in out and out.count("  differs: ") == 5
    assert re.search(r"differs: \w+/\w+/[\d_]+/\d+\.png: projection by \d\.\de-0[1-3]\n", out)
    assert sorted(p.name for p in (project / "cache").rglob("*") if p.is_file()) == tracked, "the cache is untouched"
