"""A small synthetic FF++-like dataset and a tiny random-weight CLIP, so everything runs offline.

Layout (the original script's)::

    data/demo/Train_Real/Real_youtube/000/0000.png
    data/demo/Train_Fake/FaceSwap/000_001/0000.png
    data/demo/Test_Fake/{NeuralTextures,Deepfakes,Face2Face}/000_001/0000.png
    data/tiny-clip/{config.json,model.safetensors,preprocessor_config.json}

Real videos are cartoon faces (one identity per video, jittered per frame). Fake `A_B` is made
from target A and source B, and each method leaves its own artefact: FaceSwap pastes B's face
with a visible seam, NeuralTextures leaves an upsampling checkerboard on the mouth, Deepfakes
blurs and re-tints the face, Face2Face warps the mouth. The numbers it produces show that the
pipeline works, not how good CLIP is: the model's weights are random.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

HEIGHT, WIDTH = 72, 64  # not square, so the resize + centre crop path is exercised
METHODS = {
    "FaceSwap": "Train_Fake",
    "NeuralTextures": "Test_Fake",
    "Deepfakes": "Test_Fake",
    "Face2Face": "Test_Fake",
}


def _identity(rng: np.random.Generator) -> dict:
    return {
        "bg": rng.uniform(0.1, 0.9, size=(2, 3)),
        "skin": rng.uniform([0.55, 0.35, 0.25], [0.95, 0.75, 0.6]),
        "center": (rng.uniform(0.45, 0.55) * HEIGHT, rng.uniform(0.42, 0.58) * WIDTH),
        "axes": (rng.uniform(0.28, 0.36) * HEIGHT, rng.uniform(0.26, 0.34) * WIDTH),
        "eye": rng.uniform(0.0, 0.25, size=3),
        "lips": rng.uniform([0.5, 0.1, 0.1], [0.9, 0.35, 0.35]),
        "texture": rng.normal(0, 0.03, size=(HEIGHT, WIDTH, 1)),
    }


def _render(ident: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """One frame -> (float image HxWx3 in [0,1], face mask HxW, mouth box)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(float)
    dy, dx = rng.integers(-2, 3, size=2)
    cy, cx = ident["center"][0] + dy, ident["center"][1] + dx
    ay, ax = ident["axes"]
    t = (xx / WIDTH)[..., None]
    img = ident["bg"][0] * (1 - t) + ident["bg"][1] * t
    face = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
    img[face] = ident["skin"]
    for ex in (cx - 0.4 * ax, cx + 0.4 * ax):
        eye = ((yy - (cy - 0.25 * ay)) / (0.12 * ay)) ** 2 + ((xx - ex) / (0.18 * ax)) ** 2 <= 1.0
        img[eye] = ident["eye"]
    mouth = ((yy - (cy + 0.45 * ay)) / (0.1 * ay)) ** 2 + ((xx - cx) / (0.4 * ax)) ** 2 <= 1.0
    img[mouth] = ident["lips"]
    img = img + ident["texture"] + rng.normal(0, 0.01, size=img.shape)
    img = img * rng.uniform(0.97, 1.03)
    my, mx = int(cy + 0.45 * ay), int(cx)
    box = (slice(max(my - 12, 0), min(my + 10, HEIGHT)), slice(max(mx - 18, 0), min(mx + 18, WIDTH)))
    return np.clip(img, 0, 1), face, box


def _faceswap(target, source, face, box, rng):
    tinted = np.clip(source * np.array([1.25, 1.0, 0.8]), 0, 1)
    inner = face & (np.roll(face, 3, 0) & np.roll(face, -3, 0) & np.roll(face, 3, 1) & np.roll(face, -3, 1))
    out = target.copy()
    out[inner] = tinted[inner]
    seam = face & ~inner
    out[seam] = 0.5 * target[seam] + 0.5 * tinted[seam] + 0.2
    return np.clip(out, 0, 1)


def _neuraltextures(target, source, face, box, rng):
    out = target.copy()
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    checker = np.where(((yy // 2) + (xx // 2)) % 2 == 0, 1.0, -1.0)[..., None]
    region = face[..., None]
    out = np.where(region, out * (1 + rng.uniform(0.15, 0.25) * checker), out)
    return np.clip(out, 0, 1)


def _deepfakes(target, source, face, box, rng):
    pil = Image.fromarray((target * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(1.2, 1.8)))
    blurred = np.asarray(pil).astype(float) / 255 * np.array([1.06, 1.0, 0.92])
    out = target.copy()
    out[face] = blurred[face]
    return np.clip(out, 0, 1)


def _face2face(target, source, face, box, rng):
    out = target.copy()
    ys, xs = box
    yy, xx = np.mgrid[ys, xs]
    amp = rng.uniform(3.0, 4.5)
    src_y = np.clip(np.round(yy + amp * np.sin(xx / 3.0)).astype(int), 0, HEIGHT - 1)
    src_x = np.clip(np.round(xx + amp * np.cos(yy / 3.0)).astype(int), 0, WIDTH - 1)
    out[ys, xs] = target[src_y, src_x]
    return out


ARTEFACTS = {
    "FaceSwap": _faceswap,
    "NeuralTextures": _neuraltextures,
    "Deepfakes": _deepfakes,
    "Face2Face": _face2face,
}


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(path, optimize=False)


def make_dataset(root: Path, n_videos: int = 40, frames: int = 8, seed: int = 0) -> int:
    """Write the demo image tree under `root`; returns the number of images written."""
    rng = np.random.default_rng(seed)
    idents = [_identity(rng) for _ in range(n_videos)]
    ids = [f"{i:03d}" for i in range(n_videos)]
    # FF++ pairs videos mutually: fakes A_B and B_A for each pair (A, B).
    pairs = [(ids[i], ids[i + 1]) for i in range(0, n_videos - 1, 2)]
    fakes = [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]
    count = 0
    for i, vid in enumerate(ids):
        frame_rng = np.random.default_rng([seed, i])
        for f in range(frames):
            img, _, _ = _render(idents[i], frame_rng)
            _save(img, root / "Train_Real" / "Real_youtube" / vid / f"{f:04d}.png")
            count += 1
    for m, (method, top) in enumerate(METHODS.items()):
        artefact = ARTEFACTS[method]
        for a, b in fakes:
            frame_rng = np.random.default_rng([seed, 1000 + m, int(a), int(b)])
            for f in range(frames):
                target, face, box = _render(idents[int(a)], frame_rng)
                source, _, _ = _render(idents[int(b)], frame_rng)
                _save(artefact(target, source, face, box, frame_rng), root / top / method / f"{a}_{b}" / f"{f:04d}.png")
                count += 1
    return count


# A tiny text tower for `tiny_tokenizer`'s 514-token vocabulary (also used by tests/checkpoints.py).
TINY_TEXT = {
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


def make_tiny_clip(directory: Path, seed: int = 0) -> None:
    """A tiny CLIP with random weights, saved with save_pretrained (safetensors)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=TINY_TEXT,
        vision_config={
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    # Seed the vision tower on its own, so its weights do not depend on the text tower's size.
    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(
        config.vision_config.__class__(**{**config.vision_config.to_dict(), "projection_dim": 32})
    )
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    model.save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


def tiny_tokenizer():
    """A CLIP tokenizer whose vocabulary is just the 256 byte characters (each alone and as a
    word end) and the two special tokens: every text tokenizes, one character a token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def run(data_dir: Path, model_dir: Path, n_videos: int = 40, frames: int = 8, force: bool = False) -> None:
    if force or not any(data_dir.glob("*/*/*/*.png")):
        n = make_dataset(data_dir, n_videos=n_videos, frames=frames)
        log.info("demo dataset: %d images -> %s", n, data_dir)
    else:
        log.info("demo dataset already in %s (pass --force to rebuild)", data_dir)
    ensure_tiny_clip(model_dir, force)


def ensure_tiny_clip(model_dir: Path, force: bool = False) -> None:
    if force or not (model_dir / "config.json").exists():
        make_tiny_clip(model_dir)
        log.info("tiny random-weight CLIP -> %s", model_dir)
    else:
        log.info("tiny CLIP already in %s", model_dir)


# --------------------------------------------------------------------------- the video demo

VIDEO_SIZE = (320, 240)
FACE_REGION = (120, 20, 320, 230)  # x0, y0, x1, y1 of the face in scikit-image's astronaut photograph
VIDEO_METHODS = ("Deepfakes", "FaceSwap")


def _face_photo() -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        from pipeline.config import ConfigError

        raise ConfigError("the video demo uses scikit-image's astronaut photo: `pip install scikit-image`.") from None
    x0, y0, x1, y1 = FACE_REGION
    return data.astronaut()[y0:y1, x0:x1]


def _video_frame(face: np.ndarray, i: int, n: int, rng: np.random.Generator, look: dict) -> np.ndarray:
    """A 320x240 frame: the face photograph moving across a per-video background; the last two
    frames of every video show no face (the camera looks away)."""
    w, h = VIDEO_SIZE
    t = np.linspace(0, 1, w)[None, :, None]
    frame = (look["bg"][0] * (1 - t) + look["bg"][1] * t) * np.ones((h, 1, 1)) * 255
    frame = frame + rng.normal(0, 6, frame.shape)
    if i < n - 2:
        side = int(look["scale"] * face.shape[0])
        patch = np.asarray(Image.fromarray(face).resize((int(side * face.shape[1] / face.shape[0]), side)))
        x = int(look["x"] + (w - patch.shape[1] - 2 * look["x"]) * i / max(n - 3, 1))
        y = int(look["y"] + 8 * np.sin(i / 3))
        frame[y : y + patch.shape[0], x : x + patch.shape[1]] = patch * look["light"]
    return frame.clip(0, 255).astype(np.uint8)


def _manipulate(frame: np.ndarray, method: str, rng: np.random.Generator) -> np.ndarray:
    """The face region changed the way the method's artefact looks (Deepfakes: blurred and
    re-tinted; FaceSwap: colour-shifted with a hard seam)."""
    img = Image.fromarray(frame)
    if method == "Deepfakes":
        soft = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2))).astype(float) * [1.05, 0.95, 0.9]
        return soft.clip(0, 255).astype(np.uint8)
    shifted = frame.astype(float) * [0.9, 1.0, 1.12] + rng.normal(0, 3, frame.shape)
    return shifted.clip(0, 255).astype(np.uint8)


# The same demo videos on every machine, run after run. x264 writes other bytes per thread count,
# per float path (its FMA code rounds otherwise), and run to run with its AVX-512 code (seen on a
# Zen 4). One thread and SSE2-level code write what x264's plain C code writes.
X264_OPTIONS = {"threads": "1"} | ({"x264-params": "asm=SSE2"} if platform.machine() in ("x86_64", "AMD64") else {})


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 25, gop: int = 12) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = X264_OPTIONS
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_video_dataset(
    root: Path, n_videos: int = 12, frames: int = 48, seed: int = 0, upscale: int = 1, gop: int = 12
) -> int:
    """FF++'s video layout with a real face photograph in every video:
    `original_sequences/youtube/c23/videos/000.mp4` and
    `manipulated_sequences/<Method>/c23/videos/000_001.mp4`; returns the number of videos.
    `upscale` enlarges every frame (2: 640x480, as FF++'s smaller videos), `gop` is the
    keyframe interval (x264's default, as FF++'s c23 files have, is 250)."""
    face = _face_photo()
    rng = np.random.default_rng(seed)
    looks = [
        {
            "bg": rng.uniform(0.15, 0.85, size=(2, 3)),
            "scale": rng.uniform(0.75, 0.95),
            "x": int(rng.integers(5, 40)),
            "y": int(rng.integers(5, 40)),
            "light": rng.uniform(0.8, 1.1),
        }
        for _ in range(n_videos)
    ]
    ids = [f"{i:03d}" for i in range(n_videos)]
    w, h = VIDEO_SIZE

    def write(path: Path, clip: list[np.ndarray]) -> None:
        if upscale != 1:
            clip = [
                np.asarray(Image.fromarray(f).resize((w * upscale, h * upscale), Image.Resampling.BICUBIC))
                for f in clip
            ]
        _write_video(path, clip, gop=gop)

    written = 0
    for i, vid in enumerate(ids):
        frame_rng = np.random.default_rng([seed, i])
        clip = [_video_frame(face, f, frames, frame_rng, looks[i]) for f in range(frames)]
        write(root / "original_sequences" / "youtube" / "c23" / "videos" / f"{vid}.mp4", clip)
        written += 1
    pairs = [(ids[i], ids[i + 1]) for i in range(0, n_videos - 1, 2)]
    for m, method in enumerate(VIDEO_METHODS):
        for a, b in pairs + [(b, a) for a, b in pairs]:
            frame_rng = np.random.default_rng([seed, 100 + m, int(a), int(b)])
            clip = [_manipulate(_video_frame(face, f, frames, frame_rng, looks[int(a)]), method, frame_rng)
                    for f in range(frames)]  # fmt: skip
            write(root / "manipulated_sequences" / method / "c23" / "videos" / f"{a}_{b}.mp4", clip)
            written += 1
    return written


def run_video(data_dir: Path, model_dir: Path, force: bool = False) -> None:
    if force or not any(data_dir.glob("**/*.mp4")):
        n = make_video_dataset(data_dir)
        log.info("video demo: %d videos -> %s", n, data_dir)
    else:
        log.info("video demo already in %s (pass --force to rebuild)", data_dir)
    ensure_tiny_clip(model_dir, force)
