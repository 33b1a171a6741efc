"""Every backbone family, end to end at small size: a tiny random-weight checkpoint saved the way
its authors publish it runs manifest -> extract -> train -> evaluate, and the cache holds what the
family's own reference path (its processor or transform, its model forward) computes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import backbones, embedder, evaluate, extract, images, manifest, manifest_table, train
from pipeline.config import ConfigError, ModelSettings, load
from pipeline.outputs import Outputs
from pipeline.store import caches
from tests import checkpoints
from tests.conftest import update_params

HF = {  # family -> (transformers class, has a joint image-text space)
    "siglip": ("SiglipModel", True),
    "siglip2": ("Siglip2Model", True),
    "metaclip_2": ("MetaClip2Model", True),
    "dinov2": ("Dinov2Model", False),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", False),
    "dinov3_vit": ("DINOv3ViTModel", False),
}
NEEDS = {"open_clip": "open_clip", "timm": "timm", "dinov3_vit": "torchvision"}
FAMILIES = list(checkpoints.BUILDERS)


def available(family: str) -> bool:
    return NEEDS.get(family) is None or importlib.util.find_spec(NEEDS[family]) is not None


def skip_unless_installed(family: str) -> None:
    if not available(family):
        pytest.skip(f"{NEEDS[family]} is not installed (`pip install -c constraints.txt -e '.[open_clip,timm]'`)")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    built = {}

    def get(family: str):
        skip_unless_installed(family)
        if family not in built:
            built[family] = checkpoints.BUILDERS[family](tmp_path_factory.mktemp("ckpt") / family)
        return built[family]

    return get


def layers_of(family: str) -> list[str]:
    joint = family in ("open_clip",) or HF.get(family, (None, False))[1]
    return (["projection"] if joint else []) + ["pooled", "block_1", "patch_mean"]


def reference(family: str, directory, files) -> dict[str, np.ndarray]:
    """The family's own path: its processor/transform on the file, its model's own forward."""
    with torch.inference_mode():
        if family == "open_clip":
            import open_clip

            model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{directory}")
            x = torch.stack([transform(Image.open(f)) for f in files])
            return {"projection": model.eval().encode_image(x).numpy()}
        if family == "timm":
            import timm
            import timm.data

            model = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
            transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
            return {"pooled": model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()}
        import transformers
        from transformers import AutoImageProcessor

        backend = {} if family == "dinov3_vit" else {"backend": "pil"}  # DINOv3 has only a torchvision processor
        processor = AutoImageProcessor.from_pretrained(directory, **backend)
        model = getattr(transformers, HF[family][0]).from_pretrained(directory).eval()
        inputs = dict(processor(images=[Image.open(f) for f in files], return_tensors="pt"))
        out = {}
        if HF[family][1]:
            features = model.get_image_features(**inputs)
            out["projection"] = getattr(features, "pooler_output", features).numpy()
        vision = getattr(model, "vision_model", model)
        out["pooled"] = vision(**inputs).pooler_output.numpy()
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_pipeline_and_caches_what_its_own_code_computes(family, project, checkpoint_dir, caplog):
    directory = checkpoint_dir(family)
    update_params(project, "model", name=str(directory), layers=layers_of(family))
    update_params(project, "train", layer="pooled")
    update_params(project, "evaluate", protocols=["heldout", "zero_shot"], bootstrap=0)
    settings, outputs = load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    caplog.set_level(logging.WARNING)
    summary = extract.run(settings, outputs)
    assert summary.embedded == summary.images and set(summary.layers) == set(layers_of(family))
    train.run(settings, outputs)
    results = evaluate.run(settings, outputs)
    assert set(results["heldout"]) == set(settings.evaluate.datasets)
    if family in ("open_clip", "siglip", "siglip2", "metaclip_2"):
        assert set(results["zero_shot"]) == set(settings.evaluate.datasets)
    else:  # vision only: a clear warning, and the protocol writes {}
        assert "zero_shot" not in results and "no text tower" in caplog.text
        assert json.loads(outputs.protocol_metrics("zero_shot").read_text()) == {}

    (store,) = caches(outputs.embeddings)
    assert store.card["description"]["family"] == family
    table = manifest_table.read(outputs.manifest).slice(0, 4)
    files = [manifest_table.absolute_path(p, settings.data_root) for p in table.column("path").to_pylist()]
    expected = reference(family, directory, files)
    for layer, ref in expected.items():
        cached, found = store.read(table.column("digest").to_pylist(), layer)
        assert found.all()
        cosine = (cached * ref).sum(1) / np.linalg.norm(cached, axis=1) / np.linalg.norm(ref, axis=1)
        assert cosine.min() >= 0.9999, (family, layer, cosine)


def image_file(tmp_path, mode: str, size: tuple[int, int]):
    rng = np.random.default_rng(0)
    w, h = size
    im = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"x-{mode}-{w}x{h}{'.jpg' if mode == 'CMYK' else '.png'}"
    im.save(path)
    return path


def own_preprocessing(family: str, directory):
    """The family's own preprocessing of a file, as its authors' code runs it on a PIL image."""
    if family == "open_clip":
        import open_clip

        transform = open_clip.create_model_and_transforms(f"local-dir:{directory}")[2]
        # open_clip converts to RGB only after resizing, so a palette image would be resized by its
        # indices (nearest neighbour): like every family, it gets the file decoded to RGB first.
        return lambda path: transform(Image.open(path).convert("RGB")).numpy()
    if family == "timm":
        import timm
        import timm.data

        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
        return lambda path: transform(Image.open(path).convert("RGB")).numpy()
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(directory, **({} if family == "dinov3_vit" else {"backend": "pil"}))

    def run(path):
        out = {k: v[0] for k, v in processor(images=Image.open(path).convert("RGB"), return_tensors="np").items()}
        return out["pixel_values"] if len(out) == 1 else out

    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_is_the_familys_own_bit_for_bit(family, checkpoint_dir, tmp_path):
    """The pixels the extractor feeds the model equal the family's own processor or transform on
    the same file decoded to RGB, for RGB, L, P and CMYK files of several sizes and aspect ratios;
    also after the preprocess went to a spawned reader (pickled: a dask worker's readers, a GPU
    face detector's, any reader where the start method is not fork)."""
    directory = checkpoint_dir(family)
    backbone = backbones.load(ModelSettings(name=str(directory), layers=["pooled"]), "cpu", "fp32")
    spawned = pickle.loads(pickle.dumps(backbone.preprocess))
    theirs_of = own_preprocessing(family, directory)
    for mode in ("RGB", "L", "P", "CMYK"):
        for size in ((72, 64), (40, 30), (200, 90)):
            path = image_file(tmp_path, mode, size)
            ours, error = images.load(path, backbone.preprocess)
            assert error is None
            there, _ = images.load(path, spawned)
            pairs = [(there[k], ours[k]) for k in ours] if isinstance(ours, dict) else [(there, ours)]
            for got, want in pairs:
                np.testing.assert_array_equal(got, want, err_msg=f"{family} {mode} {size} pickled")
            theirs = theirs_of(path)
            if isinstance(ours, dict):
                for key in ours:
                    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{family} {mode} {size} {key}")
            else:
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{family} {mode} {size}")


def test_a_processor_with_several_outputs_reads_the_same_batches_whole_or_in_parts(checkpoint_dir, tmp_path):
    """SigLIP2's processor gives each image its patches, their mask and the patch grid: batches
    read in parts by several readers and joined (a GPU's way) hold what batches read whole hold,
    also where a part, or a whole batch, failed."""
    directory = checkpoint_dir("siglip2")
    preprocess = backbones.load(ModelSettings(name=str(directory), layers=["pooled"]), "cpu", "fp32").preprocess
    sizes = [(72, 64), (40, 30), (200, 90), (64, 64), (90, 200), (30, 40), (50, 50), (33, 77)]
    files = [image_file(tmp_path, "RGB", size) for size in sizes]
    items = [embedder.Item(hashlib.sha256(f.read_bytes()).hexdigest(), f.name, f) for f in files]
    for n in (2, 4, 5):  # changed since the manifest: a failure inside a part, then a part of failures
        items[n] = dataclasses.replace(items[n], digest="0" * 64)
    whole = list(embedder.threaded_batches(items, preprocess, 4, 0, False, in_parts=False))
    assert whole[0].errors[2] is not None
    assert set(whole[1].pixels) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    for reader in (embedder.read_batches, embedder.threaded_batches):
        parts = list(reader(items + items[4:6], preprocess, 4, 2, False, in_parts=True))  # the last batch: all failed
        assert parts[-1].pixels is None and all(parts[-1].errors)
        for got, want in zip(parts, whole, strict=False):
            assert (got.digests, got.errors) == (want.digests, want.errors), reader.__name__
            assert set(got.pixels) == set(want.pixels)
            for key, values in want.pixels.items():
                assert torch.equal(got.pixels[key], values), (reader.__name__, key)


@pytest.mark.parametrize(
    ("family", "pickle_name"),
    [("dinov2", "pytorch_model.bin"), ("open_clip", "open_clip_pytorch_model.bin"), ("timm", "pytorch_model.bin")],
)
def test_a_pickle_only_checkpoint_is_refused_before_loading_with_the_conversion_command(
    family, pickle_name, checkpoint_dir, tmp_path
):
    source = checkpoint_dir(family)
    target = tmp_path / family
    target.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    (target / pickle_name).write_bytes(b"not even read")
    with pytest.raises(ConfigError) as err:
        backbones.load(ModelSettings(name=str(target), layers=["pooled"]), "cpu", "fp32")
    message = str(err.value)
    assert pickle_name in message and "never loaded" in message and "safetensors" in message
    assert str(target) in message.split("`")[1], "the command names the directory"


def test_a_directory_that_is_no_known_checkpoint_names_what_it_found(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"found: weights\.safetensors"):
        backbones.load(ModelSettings(name=str(tmp_path)), "cpu", "fp32")


def test_two_families_never_share_a_cache_directory(checkpoint_dir):
    names = set()
    for family in ("dinov2", "dinov2_with_registers", "siglip"):
        backbone = backbones.load(ModelSettings(name=str(checkpoint_dir(family)), layers=["pooled"]), "cpu", "fp32")
        description = backbone.description
        assert description["family"] == family and "transformers" in description["libraries"]
        from pipeline.store import fingerprint

        names.add(fingerprint(description))
    assert len(names) == 3


def test_an_open_clip_model_on_a_timm_tower_as_eva_clip_is_built(tmp_path):
    """EVA-CLIP and other open_clip releases put a timm trunk under a linear head."""
    skip_unless_installed("open_clip")
    import open_clip
    from safetensors.torch import save_file

    vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear", "image_size": 224}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}, "preprocess_cfg": {}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    backbone = backbones.load(ModelSettings(name=str(tmp_path), layers=["projection", "pooled"]), "cpu", "fp32")
    x = torch.randn(2, 3, 224, 224)
    out = backbone.embed(x)
    with torch.inference_mode():
        np.testing.assert_allclose(out["projection"], model.encode_image(x).numpy(), rtol=1e-5, atol=1e-6)
    assert out["pooled"].shape == (2, 192) and backbone.dims == {"projection": 16, "pooled": 192}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_forward_pass_compiles_into_one_graph(family, checkpoint_dir):
    """`extract.compile`: dynamo traces each family's forward pass whole (block layers and the
    patch mean included), so a compiled model never returns to Python in the middle of a batch.
    SigLIP2 is the one exception, in transformers' own code: its variable-resolution position
    embeddings read each image's patch grid as Python numbers (`Tensor.item`)."""
    directory = checkpoint_dir(family)
    backbone = backbones.load(ModelSettings(name=str(directory), layers=layers_of(family)), "cpu", "fp32")
    pixels = backbone.preprocess(Image.new("RGB", (40, 30)))
    pixels = (
        {k: torch.from_numpy(np.stack([v, v])) for k, v in pixels.items()}
        if isinstance(pixels, dict)
        else torch.from_numpy(np.stack([pixels, pixels]))
    )
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    backbone.compile(backend="eager")  # dynamo's tracing only, no kernels
    with torch.inference_mode():
        backbone.forward(pixels)
    breaks = [reason.splitlines()[0] for reason in counters["graph_break"]]
    if family == "siglip2":
        assert breaks and all("item()" in reason for reason in breaks), breaks
    else:
        assert not breaks and counters["stats"]["unique_graphs"] == 1, breaks
