"""The manifest table (`cache/manifest.parquet`): one row per image, the hand-off from the
manifest stage to every later stage. Its schema, reading and writing live here, so the stages
that read it never import the stage that writes it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import atomic
from pipeline.config import ConfigError
from pipeline.splits import SPLITS

LABELS = {"real": 0, "fake": 1}

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # relative to data.root (posix), or absolute if outside it
        ("dataset", pa.string()),
        ("label", pa.int8()),  # 0 real, 1 fake
        ("method", pa.string()),
        ("video", pa.string()),
        ("split", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),  # with size and mtime, says whether the stat cache may reuse the digest
        # The cache key: sha256 of the file bytes (hex), `^<orientation>` if shown turned, `@<frame>` for a video frame.
        ("digest", pa.string()),
        # Header facts, for the shortcut audit (-1 / "unknown" when the header is unreadable).
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("jpeg_quality", pa.int16()),  # estimated from the quantisation tables; -1 if not JPEG
        ("frame", pa.int32()),  # the frame's index in its video file; -1 for an image file
        ("frame_count", pa.int32()),  # frames in the video file; -1 for an image file
        ("orientation", pa.int8()),  # EXIF orientation (a video's display rotation as one); 1: shown as stored
    ]
)
# Facts that depend only on a file's bytes: reused while its size, mtime and ctime are unchanged
# (a manifest without one of them, made by an older version, is read again in full, once).
CONTENT_COLUMNS = ("digest", "format", "width", "height", "jpeg_quality", "frame_count", "orientation")


def absolute_path(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def write(table: pa.Table, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read(path: Path) -> pa.Table:
    if not path.exists():
        raise ConfigError(f"{path} does not exist; run the manifest stage first (`dvc repro manifest`).")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:  # cut short (a full disk, a stopped copy), or not Parquet
        raise ConfigError(f"{path} is damaged ({exc}); rerun the manifest stage (`dvc repro manifest`).") from None


def summary(table: pa.Table) -> str:
    rows = table.select(["dataset", "split"]).to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["dataset"], dict.fromkeys(SPLITS, 0))[r["split"]] += 1
    lines = [f"{'dataset':<20} {'train':>7} {'val':>7} {'test':>7}"]
    lines += [f"{d:<20} {c['train']:>7} {c['val']:>7} {c['test']:>7}" for d, c in sorted(counts.items())]
    return "\n".join(lines)
