"""Tiny random-weight checkpoints of every backbone family, built from each family's own config
class (or `open_clip` / `timm` with small dims) and saved the way the authors publish them:
`save_pretrained` (safetensors) with the family's image processor, `open_clip_config.json` +
`open_clip_model.safetensors`, timm's `config.json` + `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.demo import tiny_tokenizer

TEXT = {
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
}
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def siglip(directory: Path) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(0)
    text = {**TEXT, "projection_size": VISION["hidden_size"]}  # the joint space: as wide as the image side
    config = SiglipConfig(text_config=text, vision_config={**VISION, "image_size": 32, "patch_size": 8})
    SiglipModel(config).save_pretrained(directory)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def siglip2(directory: Path) -> Path:
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    torch.manual_seed(0)
    text = {**TEXT, "projection_size": VISION["hidden_size"]}
    config = Siglip2Config(text_config=text, vision_config={**VISION, "num_patches": 16, "patch_size": 8})
    Siglip2Model(config).save_pretrained(directory)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def metaclip_2(directory: Path) -> Path:
    from transformers import CLIPImageProcessorPil, MetaClip2Config, MetaClip2Model

    torch.manual_seed(0)
    config = MetaClip2Config(
        text_config=TEXT, vision_config={**VISION, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    MetaClip2Model(config).save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def dinov2(directory: Path, registers: int = 0) -> Path:
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(0)
    kwargs = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kwargs, num_register_tokens=registers)).save_pretrained(
            directory
        )
    else:
        Dinov2Model(Dinov2Config(**kwargs)).save_pretrained(directory)
    BitImageProcessorPil(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    ).save_pretrained(directory)
    return directory


def dinov2_with_registers(directory: Path) -> Path:
    return dinov2(directory, registers=2)


def dinov3_vit(directory: Path) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, num_register_tokens=2,
    )  # fmt: skip
    DINOv3ViTModel(config).save_pretrained(directory)
    DINOv3ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD).save_pretrained(directory)
    return directory


def open_clip(directory: Path) -> Path:
    import open_clip as oc
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": MEAN, "std": STD, "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = oc.create_model(f"local-dir:{directory}")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors")
    )
    return directory


def timm(directory: Path) -> Path:
    import timm as tm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}
    model = tm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    return directory


BUILDERS = {
    "siglip": siglip,
    "siglip2": siglip2,
    "metaclip_2": metaclip_2,
    "dinov2": dinov2,
    "dinov2_with_registers": dinov2_with_registers,
    "dinov3_vit": dinov3_vit,
    "open_clip": open_clip,
    "timm": timm,
}
