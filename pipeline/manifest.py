"""manifest stage: scan dataset folders into one row per image, with digests and splits.

Splits are assigned to *groups* of linked videos: a fake `000_003` is made from real videos
`000` and `003`, so all three (and `003_000`, and the same ids in every other method) land in
the same split. Digests of files whose size and mtime are unchanged are taken from the
previous manifest instead of re-reading the file, and the output is byte-identical when
nothing changed, so DVC skips every downstream stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline import atomic
from pipeline.config import ConfigError, Settings, SplitSpec
from pipeline.outputs import Outputs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
SPLITS = ("train", "val", "test")
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
        ("digest", pa.string()),  # sha256 of the file bytes, hex
        # Header facts, for the shortcut audit (-1 / "unknown" when the header is unreadable).
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("jpeg_quality", pa.int16()),  # estimated from the quantisation tables; -1 if not JPEG
    ]
)
# Facts that depend only on a file's bytes: reused while its size and mtime are unchanged.
CONTENT_COLUMNS = ("digest", "format", "width", "height", "jpeg_quality")

# IJG's standard luminance quantisation table (quality 50), for estimating JPEG quality.
_IJG_LUMINANCE_SUM = sum(
    (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
)  # fmt: skip


@dataclass(frozen=True)
class ImageFile:
    path: str
    dataset: str
    video: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0  # changes on every write, even one that restores the mtime


# --------------------------------------------------------------------------- scanning


def check_folders(settings: Settings) -> dict[str, Path]:
    """Each dataset's folder, resolved; an error for a missing folder or two datasets that share
    files (the same folder, or one inside the other: every image would be counted twice)."""
    folders: dict[str, Path] = {}
    for name in sorted(settings.data.datasets):
        folder = settings.dataset_dir(name)
        if not folder.is_dir():
            raise ConfigError(
                f"dataset '{name}' folder {folder} does not exist; fix data.datasets.{name}.path "
                "or data.root in params.yaml (or run `python -m pipeline demo` for the demo data)."
            )
        folders[name] = folder.resolve()
    for a, fa in folders.items():
        for b, fb in folders.items():
            if a < b and (fa == fb or fa in fb.parents or fb in fa.parents):
                how = "the same folder" if fa == fb else "folders inside one another"
                raise ConfigError(
                    f"datasets '{a}' and '{b}' point at {how} ({fa} and {fb}); give each dataset its own folder "
                    "in data.datasets."
                )
    return folders


def walk_images(folder: Path, problems: list[str]) -> Iterable[tuple[Path, os.stat_result]]:
    """(path, stat) of every regular image file under `folder`, following links but never a loop
    or a folder twice. What is skipped goes into `problems` (unreadable folders, FIFOs and
    devices named like images, names that are not valid UTF-8), so nothing is left out silently."""
    seen: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        problems.append(f"{exc.filename}: folder not readable ({exc.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked: a loop
            problems.append(f"{dirpath}: a link to a folder already scanned (a loop?), skipped")
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for d in list(dirnames):
            if not _utf8(d):
                problems.append(f"{Path(dirpath) / d!r}: folder name is not valid UTF-8; rename it")
                dirnames.remove(d)
        dirnames.sort()
        for fname in sorted(filenames):
            if Path(fname).suffix.lower() not in IMAGE_SUFFIXES or fname.startswith("."):
                continue
            full = Path(dirpath) / fname
            if not _utf8(fname):
                problems.append(f"{full!r}: file name is not valid UTF-8; rename it")
                continue
            try:
                st = full.stat()
            except OSError as exc:  # a broken link, a permission problem: skip, never stop
                problems.append(f"{full}: {exc.strerror}")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{full}: not a regular file (a FIFO, socket or device)")
                continue
            yield full, st


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk hands undecodable bytes over as surrogates
        return False
    return True


def scan(settings: Settings) -> list[ImageFile]:
    """Every image file of every dataset, sorted by path; errors for missing folders."""
    pattern = re.compile(settings.data.video_pattern)
    root = settings.data_root
    files: list[ImageFile] = []
    unmatched: dict[str, int] = {}
    unreadable: list[str] = []
    check_folders(settings)
    for name in sorted(settings.data.datasets):
        folder = settings.dataset_dir(name)
        for full, st in walk_images(folder, unreadable):
            video = video_id(full.relative_to(folder), pattern)
            if video is None:
                unmatched[name] = unmatched.get(name, 0) + 1
                video = full.stem
            files.append(ImageFile(_display_path(full, root), name, video, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if not any(f.dataset == name for f in files):
            log.warning("dataset '%s' (%s) holds no image files", name, folder)
    for name, count in unmatched.items():
        log.warning(
            "dataset '%s': %d frames sit directly in the folder and match no data.video_pattern; each is "
            "treated as its own video, so frames of one video may land in different splits",
            name,
            count,
        )
    warn_unreadable(unreadable)
    files.sort(key=lambda f: f.path)
    return files


def warn_unreadable(problems: list[str]) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        log.warning(
            "%d files or folders could not be read and are left out of the manifest:\n%s%s",
            len(problems),
            "\n".join(f"  {p}" for p in problems[:10]),
            more,
        )


def video_id(relative: Path, pattern: re.Pattern[str]) -> str | None:
    """The video a frame belongs to: its parent folder, or a regex on a flat file name."""
    if len(relative.parts) > 1:
        return relative.parts[-2]
    m = pattern.match(relative.stem)
    return m.group("video") if m else None


def _display_path(full: Path, root: Path) -> str:
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return full.resolve().as_posix()


# --------------------------------------------------------------------------- digests


@dataclass(frozen=True)
class FileFacts:
    digest: str
    format: str = "unknown"
    width: int = -1
    height: int = -1
    jpeg_quality: int = -1


def inspect_file(path: Path) -> FileFacts | None:
    """sha256 of the file's bytes plus its header facts; None if it cannot be read at all."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO that replaced the file never blocks
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with os.fdopen(fd, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            fh.seek(0)
            try:
                with Image.open(fh) as im:  # reads the header only
                    quality = jpeg_quality(im.quantization) if im.format == "JPEG" else -1
                    return FileFacts(digest, im.format.lower(), im.width, im.height, quality)
            except Exception:  # not an image, or a header PIL cannot parse: extract records why
                return FileFacts(digest)
    except OSError:
        return None


def jpeg_quality(tables: dict) -> int:
    """IJG quality (1-100) that would produce this luminance quantisation table, estimated."""
    if not tables or 0 not in tables:
        return -1
    scale = 100.0 * sum(tables[0]) / _IJG_LUMINANCE_SUM
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return round(min(max(quality, 1.0), 100.0))


def inspect_files(
    files: list[ImageFile], root: Path, previous: dict[str, tuple[tuple[int, int, int], FileFacts]]
) -> list[FileFacts | None]:
    """Facts of each file (None if unreadable), reusing `previous[path] = ((size, mtime_ns,
    ctime_ns), facts)` when all three are unchanged, so unchanged files are not read again."""
    out: list[FileFacts | None] = []
    todo: list[int] = []
    for i, f in enumerate(files):
        prev = previous.get(f.path)
        if prev is not None and prev[0] == (f.size, f.mtime_ns, f.ctime_ns):
            out.append(prev[1])
        else:
            out.append(None)
            todo.append(i)
    if todo:
        log.info("hashing %d new or changed files (%d reused)", len(todo), len(files) - len(todo))
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            jobs = pool.map(lambda i: inspect_file(absolute_path(files[i].path, root)), todo)
            bar = tqdm(jobs, total=len(todo), desc="hashing", unit="img", leave=False)
            for i, facts in zip(todo, bar, strict=True):
                out[i] = facts
    return out


def absolute_path(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def read_previous(path: Path) -> dict[str, tuple[tuple[int, int, int], FileFacts]]:
    """The stat cache: path -> ((size, mtime_ns, ctime_ns), facts) from an earlier manifest, if readable."""
    if not path.exists():
        return {}
    try:
        t = pq.read_table(path, columns=["path", "size", "mtime_ns", "ctime_ns", *CONTENT_COLUMNS])
    except (pa.ArrowInvalid, OSError, KeyError):
        log.warning("previous manifest %s is unreadable or from an older version; hashing every file again", path)
        return {}
    cols = t.to_pydict()
    facts = [FileFacts(*values) for values in zip(*(cols[c] for c in CONTENT_COLUMNS), strict=True)]
    stats = zip(cols["size"], cols["mtime_ns"], cols["ctime_ns"], strict=True)
    return {p: (st, f) for p, st, f in zip(cols["path"], stats, facts, strict=True)}


# --------------------------------------------------------------------------- splits


def identities(video: str) -> list[str]:
    """The source identities a video id refers to.

    `000` -> [000]; `000_003` -> [000, 003] (FF++ target_source); `01_02__scene__X` (DeepFake
    Detection) -> [01, 02]; anything else is its own identity.
    """
    head = video.split("__", 1)[0]
    parts = head.split("_")
    if all(p.isdigit() for p in parts):
        return parts
    return [video]


def group_videos(videos: Iterable[str]) -> dict[str, str]:
    """Map each video id to a group key; linked videos (shared identities) share a group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    videos = sorted(set(videos))
    for v in videos:
        ids = identities(v)
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {v: find(identities(v)[0]) for v in videos}


def read_split_dir(split_dir: Path) -> dict[str, str]:
    """FF++ official split files: identity -> split, from `{train,val,test}.json` lists of pairs."""
    assignment: dict[str, str] = {}
    for split in SPLITS:
        f = split_dir / f"{split}.json"
        if not f.is_file():
            raise ConfigError(f"data.split.split_dir {split_dir} has no {split}.json; it needs train/val/test.json.")
        try:
            pairs = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{f} is not valid JSON; it should be a list of [id, id] pairs.") from None
        if not isinstance(pairs, list):
            raise ConfigError(f"{f} should be a list of [id, id] pairs.")
        for pair in pairs:
            for ident in pair if isinstance(pair, list) else [pair]:
                ident = str(ident)
                if assignment.get(ident, split) != split:
                    raise ConfigError(f"video {ident} appears in both {assignment[ident]}.json and {split}.json.")
                assignment[ident] = split
    return assignment


def assign_splits(videos: list[str], spec: SplitSpec, official: dict[str, str] | None = None) -> dict[str, str]:
    """Split per video group -> {video: split}; `videos` has one entry per image (the shares
    are shares of images).

    Groups named by the official split files take that split. The rest are ordered by a hash
    of (seed, group) and filled into test, then val, up to their share of images; the rest is
    train. Hash order keeps assignments stable when new videos are added.
    """
    groups = group_videos(videos)
    images_per_group: dict[str, int] = {}
    for v in videos:
        images_per_group[groups[v]] = images_per_group.get(groups[v], 0) + 1

    split_of_group: dict[str, str] = {}
    if official:
        members: dict[str, set[str]] = {}
        for v, g in groups.items():
            for ident in identities(v):
                if ident in official:
                    members.setdefault(g, set()).add(official[ident])
        for g, found in members.items():
            if len(found) > 1:
                raise ConfigError(
                    f"the split files put linked videos (group {g}) in different splits: {sorted(found)}."
                )
            split_of_group[g] = found.pop()
        uncovered = sorted(set(images_per_group) - set(split_of_group))
        if uncovered:
            log.warning(
                "%d video groups are not in the official split files; assigning them by the val/test ratios",
                len(uncovered),
            )
    rest = [g for g in images_per_group if g not in split_of_group]
    rest.sort(key=lambda g: hashlib.sha256(f"{spec.seed}:{g}".encode()).hexdigest())
    total = sum(images_per_group[g] for g in rest)
    quota = {"test": spec.test * total, "val": spec.val * total}
    filled = {"test": 0, "val": 0}
    for g in rest:
        split = next((s for s in ("test", "val") if filled[s] < quota[s]), "train")
        if split != "train":
            filled[split] += images_per_group[g]
        split_of_group[g] = split
    return {v: split_of_group[g] for v, g in groups.items()}


# --------------------------------------------------------------------------- stage


# --------------------------------------------------------------------------- honest labels and splits


def check_label_conflicts(paths: list[str], digests: list[str], labels: list[int]) -> None:
    """The same bytes labelled real in one place and fake in another cannot both be true."""
    first: dict[str, int] = {}
    conflicts = []
    for i, (d, y) in enumerate(zip(digests, labels, strict=True)):
        j = first.setdefault(d, i)
        if labels[j] != y:
            conflicts.append((j, i))
    if conflicts:
        j, i = conflicts[0]
        n = len({digests[i] for _, i in conflicts})
        raise ConfigError(
            f"{n} images have identical bytes labelled both real and fake, e.g. {paths[j]} "
            f"({'real' if labels[j] == 0 else 'fake'}) and {paths[i]} ({'real' if labels[i] == 0 else 'fake'}); "
            "remove the copies from the wrong dataset folder."
        )


def cross_split_duplicates(digests: list[str], splits: list[str]) -> list[int]:
    """Rows to drop so that the same bytes sit in one split only: the copy in test wins, then val
    (the held-out sets stay whole; a training copy of a test image would leak it)."""
    rank = {"test": 0, "val": 1, "train": 2}
    best: dict[str, str] = {}
    for d, sp in zip(digests, splits, strict=True):
        if d not in best or rank[sp] < rank[best[d]]:
            best[d] = sp
    return [i for i, (d, sp) in enumerate(zip(digests, splits, strict=True)) if sp != best[d]]


def build(settings: Settings, previous: dict[str, tuple[tuple[int, int, int], FileFacts]]) -> pa.Table:
    """The manifest table for the current folders (a pure function of files + settings)."""
    files = scan(settings)
    if not files:
        raise ConfigError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under the data.datasets folders."
        )
    facts = inspect_files(files, settings.data_root, previous)
    warn_unreadable([f.path for f, x in zip(files, facts, strict=True) if x is None])
    readable = [i for i, x in enumerate(facts) if x is not None]
    files, facts = [files[i] for i in readable], [facts[i] for i in readable]
    spec = settings.data.split
    official = read_split_dir(settings.resolve(spec.split_dir)) if spec.split_dir else None
    split_of = assign_splits([f.video for f in files], spec, official)
    datasets = settings.data.datasets
    columns = {
        "path": [f.path for f in files],
        "dataset": [f.dataset for f in files],
        "label": [LABELS[datasets[f.dataset].label] for f in files],
        "method": [datasets[f.dataset].method or f.dataset for f in files],
        "video": [f.video for f in files],
        "split": [split_of[f.video] for f in files],
        "size": [f.size for f in files],
        "mtime_ns": [f.mtime_ns for f in files],
        "ctime_ns": [f.ctime_ns for f in files],
        **{c: [getattr(x, c) for x in facts] for c in CONTENT_COLUMNS},
    }
    check_label_conflicts(columns["path"], columns["digest"], columns["label"])
    table = pa.table(columns, schema=SCHEMA)
    drop = cross_split_duplicates(columns["digest"], columns["split"])
    if drop:
        example = drop[0]
        log.warning(
            "%d images repeat the bytes of an image in another split (e.g. %s, %s); each is kept only in the "
            "held-out split (test, then val) so nothing leaks between splits",
            len(drop),
            columns["path"][example],
            columns["split"][example],
        )
        keep = sorted(set(range(table.num_rows)) - set(drop))
        table = table.take(keep)
    return table


def write(table: pa.Table, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read(path: Path) -> pa.Table:
    if not path.exists():
        raise ConfigError(f"{path} does not exist; run the manifest stage first (`dvc repro manifest`).")
    return pq.read_table(path)


def summary(table: pa.Table) -> str:
    rows = table.select(["dataset", "split"]).to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["dataset"], dict.fromkeys(SPLITS, 0))[r["split"]] += 1
    lines = [f"{'dataset':<20} {'train':>7} {'val':>7} {'test':>7}"]
    lines += [f"{d:<20} {c['train']:>7} {c['val']:>7} {c['test']:>7}" for d, c in sorted(counts.items())]
    return "\n".join(lines)


def run(settings: Settings, outputs: Outputs) -> pa.Table:
    out = outputs.manifest
    table = build(settings, read_previous(out))
    write(table, out)
    log.info("manifest: %d images -> %s\n%s", table.num_rows, out, summary(table))
    return table
