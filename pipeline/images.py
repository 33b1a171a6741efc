"""Image files, read safely: digests and header facts (`inspect_file`), and decoding to RGB
(`load`) with every failure a value, never an exception that stops a run.

Preprocessing belongs to the backbone (`pipeline.backbones`): `load` hands the decoded RGB
image to the backbone's preprocess callable, which may refuse it by raising `Rejected`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from pipeline import frames

# Refuse decompression bombs: at most this many pixels (a 16k x 8k frame is already absurd),
# decoded or after the resize (a 1 x 2,000,000 strip would become 224 x 448,000,000).
MAX_PIXELS = 128_000_000
# Why a file the manifest lists was not read as listed: its bytes are not the ones the manifest
# hashed, or it is not on this machine. Neither is a fact about the content, so neither is ever
# recorded in the cache under the manifest's key (extract names such files and stops instead).
CHANGED = "changed since the manifest was built"
MISSING = "file not found"
STALE = frozenset({CHANGED, MISSING})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


class HeldBytes:
    """A budget of bytes that threads hold in memory at once: each video file is read whole (its
    hash and its facts, or its frames, come from the same bytes), and the threads that hash files
    (8 at most) or read a dask worker's frames could otherwise hold 8 long videos at a time (8 x
    2 GB on a 16 GB laptop). A file larger than the budget is read alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        """Nothing held: in a forked child, whose copy of the parent's holdings (and perhaps of its
        held lock) belongs to threads the child does not have."""
        self.held = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def holding(self, size: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.limit)
            self.held += size
        try:
            yield
        finally:
            with self._changed:
                self.held -= size
                self._changed.notify_all()


VIDEO_BYTES = HeldBytes(1 << 30)  # whole video files in this process's memory at once (1 GiB)
os.register_at_fork(after_in_child=VIDEO_BYTES.reset)


class Rejected(Exception):
    """Raised by a preprocess callable for an image it cannot use; the message is the reason."""


def check_resize(size: tuple[int, int], shortest_edge: int) -> None:
    """Refuse an image whose shortest edge resized to `shortest_edge` would exceed MAX_PIXELS."""
    w, h = size
    new_long = int(shortest_edge * max(w, h) / max(min(w, h), 1))
    if new_long * shortest_edge > MAX_PIXELS:
        raise Rejected(f"extreme aspect ratio ({w}x{h} pixels would resize to {shortest_edge}x{new_long} or more)")


# IJG's standard luminance quantisation table (quality 50), for estimating JPEG quality.
_IJG_LUMINANCE_SUM = sum(
    (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
)  # fmt: skip


@dataclass(frozen=True)
class FileFacts:
    digest: str
    format: str = "unknown"
    width: int = -1
    height: int = -1
    jpeg_quality: int = -1
    frame_count: int = -1  # frames of a video; -1 for an image
    orientation: int = 1  # EXIF orientation (a video's display rotation as one): 1 as stored, 2-8 turned
    ranked: bool = False  # a video whose frames are not evenly spaced in time: frame i is the i-th shown (`frames`)


# EXIF orientation -> the transpose that shows the stored pixels upright (PIL's exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def inspect_file(path: Path) -> FileFacts | None:
    """sha256 of the file's bytes plus its header facts (and a video's frame count); None if it
    cannot be read at all."""
    read = inspect_file_md5(path, md5=False)
    return read and read[0]


def inspect_file_md5(path: Path, md5: bool = True) -> tuple[FileFacts, str] | None:
    """`inspect_file`'s facts and the md5 of the same bytes (the hash DVC keeps), from one read;
    None if the file cannot be read at all. Without `md5`, the md5 is "" and costs nothing."""
    hashes = [hashlib.sha256()] + ([hashlib.md5()] if md5 else [])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO that replaced the file never blocks
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with os.fdopen(fd, "rb") as fh:
            if Path(path).suffix.lower() in frames.VIDEO_SUFFIXES:
                with VIDEO_BYTES.holding(os.fstat(fh.fileno()).st_size):
                    data = fh.read()
                    for h in hashes:
                        h.update(data)
                    facts = _video_facts(hashes[0].hexdigest(), data)
                    del data  # before the budget is released, not when this frame ends
                return facts, hashes[-1].hexdigest() if md5 else ""
            _hash_stream(fh, hashes)
            fh.seek(0)
            return _image_facts(hashes[0].hexdigest(), fh), hashes[-1].hexdigest() if md5 else ""
    except OSError:
        return None


def _video_facts(digest: str, data: bytes) -> FileFacts:
    try:
        v = frames.inspect(data)
    except ValueError:  # not a readable video: extract records why, frame by frame
        return FileFacts(digest, frame_count=0)
    return FileFacts(digest, v.format, v.width, v.height, -1, v.frame_count, v.orientation, v.ranked)


def _image_facts(digest: str, fh: io.BufferedReader) -> FileFacts:
    try:
        with Image.open(fh) as im:  # reads the header only
            quality = jpeg_quality(im.quantization) if im.format == "JPEG" else -1
            return FileFacts(digest, im.format.lower(), im.width, im.height, quality, orientation=exif_orientation(im))
    except Exception:  # not an image, or a header PIL cannot parse: extract records why
        return FileFacts(digest)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation in an opened image's header (JPEG's APP1, WebP's and PNG's EXIF
    chunks before the pixels); 1 when it has none or an invalid one. Never decodes the pixels,
    as `im.getexif()` would for a PNG."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a damaged EXIF block: shown as stored, as viewers do
        return 1
    value = exif.get(ExifTags.Base.Orientation, 1)
    return value if value in _UPRIGHT else 1


def upright(rgb: Image.Image, orientation: int) -> Image.Image:
    """`rgb` (the pixels as stored) turned the way its EXIF `orientation` says it is shown."""
    return rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb


def _hash_stream(fh: io.BufferedReader, hashes: list) -> None:
    """Feed every hash the file's bytes, read once in chunks of up to 1 MiB (hashlib releases the GIL)."""
    buffer = bytearray(min(max(os.fstat(fh.fileno()).st_size, 1), 1 << 20))
    view = memoryview(buffer)
    while n := fh.readinto(buffer):
        for h in hashes:
            h.update(view[:n])


def jpeg_quality(tables: dict) -> int:
    """IJG quality (1-100) that would produce this luminance quantisation table, estimated."""
    if not tables or 0 not in tables:
        return -1
    scale = 100.0 * sum(tables[0]) / _IJG_LUMINANCE_SUM
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return round(min(max(quality, 1.0), 100.0))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (the HF processor's convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255; scale to 8 bits instead.
        arr = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((arr >> 8).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file; a FIFO or device named like an image is refused, never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def failure(exc: BaseException) -> str:
    """The reason recorded for a file that could not be decoded (re-raises anything unexpected)."""
    if isinstance(exc, Rejected):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return MISSING
    if isinstance(exc, IsADirectoryError):
        return "not a regular file"
    if isinstance(exc, MemoryError):
        return "image too large to decode in memory"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "image too large (decompression bomb)"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if isinstance(exc, (OSError, ValueError, SyntaxError)):  # truncated or corrupt data
        return f"unreadable image ({exc})"
    raise exc


def _read(path: Path, digest: str | None) -> bytes | None:
    """The file's bytes; None if they are not the bytes the manifest hashed (`digest`)."""
    data = read_regular_file(path)
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        return None
    return data


def decode(path: Path, digest: str | None = None, orientation: int = 1) -> Image.Image | str:
    """One image file decoded to RGB, or the reason it failed. With `digest`, the bytes decoded are
    the bytes hashed: a file whose sha256 is not `digest` (it changed after the manifest hashed
    it) comes back as the reason CHANGED, not decoded. `orientation` (EXIF): how to turn the
    pixels to show them (the cache key's, `frames.orientation`; not read from the file here)."""
    try:
        data = _read(path, digest)
        if data is None:
            return CHANGED
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    return f"image too large ({im.width}x{im.height} pixels)"
                im.load()
                return upright(to_rgb(im), orientation)
    except Exception as exc:
        return failure(exc)


def decode_frames(
    path: Path, digest: str | None, indices: list[int], orientation: int = 1, ranked: bool = False
) -> list[Image.Image | str]:
    """Frames `indices` of one video file (by rank if `ranked`: the cache key's, `frames.is_ranked`),
    read, hashed and decoded once (one pass, exact seeks), each an RGB image turned by
    `orientation` (as `decode`) or the reason it failed (CHANGED for all if the bytes changed)."""
    try:
        with VIDEO_BYTES.holding(os.stat(path).st_size):
            data = _read(path, digest)
            if data is None:
                return [CHANGED] * len(indices)
            decoded = frames.decode_many(data, indices, ranked)
            del data
    except Exception as exc:
        return [failure(exc)] * len(indices)
    out: list[Image.Image | str] = []
    for i in indices:
        rgb = decoded[i]
        if isinstance(rgb, str):
            out.append(f"unreadable image ({rgb})")
        elif rgb.width * rgb.height > MAX_PIXELS:
            out.append(f"video frame too large ({rgb.width}x{rgb.height} pixels)")
        else:
            out.append(upright(rgb, orientation))
    return out


def apply(
    preprocess: Callable[[Image.Image], np.ndarray], rgb: Image.Image | str
) -> tuple[np.ndarray | None, str | None]:
    """A decoded image through `preprocess` -> (array, None), or (None, why it failed)."""
    if isinstance(rgb, str):
        return None, rgb
    try:
        return preprocess(rgb), None
    except Exception as exc:
        return None, failure(exc)


def load(
    path: Path, preprocess: Callable[[Image.Image], np.ndarray], digest: str | None = None, frame: int = -1
) -> tuple[np.ndarray | None, str | None]:
    """Decode one file (or frame `frame` of a video) to RGB and preprocess it -> (array, None) or
    (None, reason it failed); see `decode` for `digest`."""
    rgb = decode(path, digest) if frame < 0 else decode_frames(path, digest, [frame])[0]
    return apply(preprocess, rgb)
