"""Tiny random-weight checkpoints of every backbone family, built from each family's own config
class (or `open_clip` / `timm` with small dims) and saved the way the authors publish them:
`save_pretrained` (safetensors) with the family's image processor, `open_clip_config.json` +
`open_clip_model.safetensors`, timm's `config.json` + `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.demo import TINY_TEXT, tiny_tokenizer

TEXT = TINY_TEXT
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
# ViT-B/16 shapes (random weights: speed does not depend on them), for benchmarks/families_bench.py
BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
SIZE = {"tiny": (VISION, 32, 8), "base": (BASE, 224, 16)}  # vision tower, image side, patch side
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def clip(directory: Path, size: str = "tiny") -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    vision, side, patch = SIZE[size]
    torch.manual_seed(0)
    config = CLIPConfig(text_config=TEXT, vision_config={**vision, "image_size": side, "patch_size": patch})
    CLIPModel(config).save_pretrained(directory)
    crop = {"height": side, "width": side}
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def siglip(directory: Path, size: str = "tiny") -> Path:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    vision, side, patch = SIZE[size]
    torch.manual_seed(0)
    text = {**TEXT, "projection_size": vision["hidden_size"]}  # the joint space: as wide as the image side
    config = SiglipConfig(text_config=text, vision_config={**vision, "image_size": side, "patch_size": patch})
    SiglipModel(config).save_pretrained(directory)
    SiglipImageProcessorPil(size={"height": side, "width": side}).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def siglip2(directory: Path, size: str = "tiny") -> Path:
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    vision, side, patch = SIZE[size]
    patches = (side // patch) ** 2
    torch.manual_seed(0)
    text = {**TEXT, "projection_size": vision["hidden_size"]}
    config = Siglip2Config(text_config=text, vision_config={**vision, "num_patches": patches, "patch_size": patch})
    Siglip2Model(config).save_pretrained(directory)
    Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=patches).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def metaclip_2(directory: Path, size: str = "tiny") -> Path:
    from transformers import CLIPImageProcessorPil, MetaClip2Config, MetaClip2Model

    vision, side, patch = SIZE[size]
    torch.manual_seed(0)
    config = MetaClip2Config(
        text_config=TEXT, vision_config={**vision, "image_size": side, "patch_size": patch}, projection_dim=16
    )
    MetaClip2Model(config).save_pretrained(directory)
    crop = {"height": side, "width": side}
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def dinov2(directory: Path, size: str = "tiny", registers: int = 0) -> Path:
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    vision, side, patch = SIZE[size]
    torch.manual_seed(0)
    kwargs = {k: vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    kwargs.update(image_size=side, patch_size=patch)
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kwargs, num_register_tokens=registers)).save_pretrained(
            directory
        )
    else:
        Dinov2Model(Dinov2Config(**kwargs)).save_pretrained(directory)
    BitImageProcessorPil(
        size={"shortest_edge": side * 8 // 7}, crop_size={"height": side, "width": side}, image_mean=MEAN, image_std=STD
    ).save_pretrained(directory)
    return directory


def dinov2_with_registers(directory: Path, size: str = "tiny") -> Path:
    return dinov2(directory, size, registers=2)


def dinov3_vit(directory: Path, size: str = "tiny") -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    vision, side, patch = SIZE[size]
    torch.manual_seed(0)
    config = DINOv3ViTConfig(**vision, image_size=side, patch_size=patch, num_register_tokens=2)
    DINOv3ViTModel(config).save_pretrained(directory)
    crop = {"height": side, "width": side}
    DINOv3ViTImageProcessor(size=crop, image_mean=MEAN, image_std=STD).save_pretrained(directory)
    return directory


def open_clip(directory: Path, size: str = "tiny") -> Path:
    import open_clip as oc
    from safetensors.torch import save_file

    vision, side, patch = SIZE[size]
    width, layers = vision["hidden_size"], vision["num_hidden_layers"]
    directory.mkdir(parents=True)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {
                "image_size": side,
                "layers": layers,
                "width": width,
                "head_width": 64 if size == "base" else 32,
                "patch_size": patch,
            },
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


def timm(directory: Path, size: str = "tiny") -> Path:
    import timm as tm
    from timm.models._hub import save_for_hf

    vision, side, patch = SIZE[size]
    torch.manual_seed(0)
    shape = {"embed_dim": vision["hidden_size"], "depth": vision["num_hidden_layers"]}
    args = {
        "img_size": side,
        "patch_size": patch,
        **shape,
        "num_heads": vision["num_attention_heads"],
        "num_classes": 0,
    }
    model = tm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    return directory


BUILDERS = {  # every family but CLIP (the demo's tiny CLIP covers it; `clip` is for benchmarks)
    "siglip": siglip,
    "siglip2": siglip2,
    "metaclip_2": metaclip_2,
    "dinov2": dinov2,
    "dinov2_with_registers": dinov2_with_registers,
    "dinov3_vit": dinov3_vit,
    "open_clip": open_clip,
    "timm": timm,
}
