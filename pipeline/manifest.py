"""manifest stage: scan dataset folders into one row per image, with digests and splits.

Splits are assigned to *groups* of linked videos (`pipeline.splits`): a fake `000_003` is made
from real videos `000` and `003`, so all three land in the same split. Digests of files whose
size, mtime and ctime are unchanged are taken from the previous manifest, or from the scan
stage that read them just before (`pipeline.scan`), instead of re-reading the file, and the
output is byte-identical when nothing changed, so DVC skips every downstream stage. The
table's schema and reader live in `pipeline.manifest_table`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import file_index, frames, images
from pipeline.config import ConfigError, Settings
from pipeline.images import FileFacts
from pipeline.manifest_table import CONTENT_COLUMNS, LABELS, SCHEMA, absolute_path, summary, write
from pipeline.outputs import Outputs
from pipeline.splits import assign_splits, cross_split_duplicates, read_listing, read_split_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFile:
    path: str
    dataset: str
    video: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0  # changes on every write, even one that restores the mtime

    @property
    def is_video(self) -> bool:
        return os.path.splitext(self.path)[1].lower() in frames.VIDEO_SUFFIXES  # not Path(): 300,000 of them


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
        for found, st in file_index.walk_images(folder, unreadable):
            full = Path(found)
            is_video = full.suffix.lower() in frames.VIDEO_SUFFIXES
            video = full.stem if is_video else video_id(full.relative_to(folder), pattern)  # FF++: 000_003.mp4
            if video is None:
                unmatched[name] = unmatched.get(name, 0) + 1
                video = full.stem
            path = file_index.display_path(found, root)
            files.append(ImageFile(path, name, video, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
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
    warn_videos_in_several_folders(files)
    files.sort(key=lambda f: f.path)
    return cap_frames(files, settings.data.frames.per_video)


def warn_videos_in_several_folders(files: list[ImageFile]) -> None:
    """A video id whose files lie in more than one folder of its dataset: frames of different
    videos (c23/ and c40/ copies), or files that are not frames (DeepfakeBench's masks/ beside
    frames/), pooled as one video; said per dataset, with one example."""
    folders: dict[tuple[str, str], set[str]] = {}
    for f in files:
        folders.setdefault((f.dataset, f.video), set()).add(f.path.rpartition("/")[0])  # paths use "/"
    merged: dict[str, list[tuple[str, list[str]]]] = {}
    for (dataset, video), where in folders.items():
        if len(where) > 1:
            merged.setdefault(dataset, []).append((video, sorted(where)))
    for dataset, videos in sorted(merged.items()):
        video, where = min(videos)
        log.warning(
            "dataset '%s': %d video ids name files in more than one folder (e.g. '%s' in %s); a frame's video "
            "is its folder's name (a video file's, its stem), so the files of each are pooled as one video. "
            "If they are different videos, or not all frames (DeepfakeBench's masks/ beside frames/), point the "
            "dataset at the folder that holds its videos (a folder of frames, or a file, per video) and nothing else.",
            dataset,
            len(videos),
            video,
            ", ".join(where[:3]) + (", ..." if len(where) > 3 else ""),
        )


def cap_frames(files: list[ImageFile], per_video: int | None) -> list[ImageFile]:
    """At most `per_video` frames of each frame folder video, evenly spaced over its frames in
    `frames.name_order` (the frame count per video changes results, so it is a setting, as for videos)."""
    if per_video is None:
        return files
    is_video = [f.is_video for f in files]
    by_video: dict[tuple[str, str], list[ImageFile]] = {}
    for f, video in zip(files, is_video, strict=True):
        if not video:
            by_video.setdefault((f.dataset, f.video), []).append(f)
    for group in by_video.values():
        if len(group) > per_video:  # else every frame is kept, in any order
            group.sort(key=lambda f: (frames.name_order(f.path), f.path))
    keep = {id(f) for group in by_video.values() for i in frames.sample(len(group), per_video) for f in [group[i]]}
    return [f for f, video in zip(files, is_video, strict=True) if video or id(f) in keep]


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


# --------------------------------------------------------------------------- digests


def inspect_files(
    files: list[ImageFile], root: Path, known: file_index.Known, keep: Callable[[file_index.Known], None]
) -> list[FileFacts | None]:
    """Facts of each file (None if unreadable), taken from `known` when the file's stamp (size,
    mtime, ctime) is unchanged, so unchanged files are not read again. Stopped while reading
    (SIGTERM, Ctrl-C, an error), it hands `keep` the facts of the files it read."""
    out: list[FileFacts | None] = []
    todo: list[int] = []
    for i, f in enumerate(files):
        prev = known.get(f.path)
        if prev is not None and prev[0] == (f.size, f.mtime_ns, f.ctime_ns):
            out.append(prev[1])
        else:
            out.append(None)
            todo.append(i)
    if todo:
        log.info("hashing %d new or changed files (%d reused)", len(todo), len(files) - len(todo))
        paths = [absolute_path(files[i].path, root) for i in todo]
        read: file_index.Known = {}

        def take(j: int, facts: FileFacts | None) -> None:
            f = files[todo[j]]
            out[todo[j]] = facts
            if facts is not None:
                read[f.path] = ((f.size, f.mtime_ns, f.ctime_ns), facts)

        try:
            file_index.read_into(paths, images.inspect_file, "hashing", take)
        except BaseException:
            keep(read)
            raise
    return out


def read_previous(outputs: Outputs) -> file_index.Known:
    """The stat cache: the previous manifest's facts, and the scan stage's for files read since."""
    known = file_index.read_known(outputs.manifest)
    if not known and outputs.manifest.exists():
        log.warning(
            "previous manifest %s is unreadable or from an older version; hashing every file again", outputs.manifest
        )
    return known | file_index.read_known(outputs.scanned)


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


def expand(files: list[ImageFile], facts: list[FileFacts], per_video: int | None) -> list[tuple]:
    """One (file, facts, frame) per manifest row: an image file is one row (frame -1), a video
    file one row per sampled frame (`frames.sampled`: a video whose frames cannot be counted keeps
    one row, so extract records why it fails instead of dropping it)."""
    rows = []
    for f, x in zip(files, facts, strict=True):
        if not f.is_video:
            rows.append((f, x, -1))
            continue
        rows += [(f, x, i) for i in frames.sampled(x.frame_count, per_video)]
    return rows


def read_labels(path: Path) -> dict[str, int]:
    """A labels file -> {video id (the file's stem): 0 real | 1 fake}. JSON: {"<video file>": "REAL"
    or {"label": "FAKE", ...}} (DFDC's metadata.json, DFDCP's dataset.json); otherwise one
    "<real|fake> <video path>" (or "<video path>,<real|fake>") per line."""
    words = {"real": 0, "fake": 1}

    def label(value: object, where: str) -> int:
        word = value.get("label") if isinstance(value, dict) else value
        if not isinstance(word, str) or word.lower() not in words:
            raise ConfigError(f"{path}: {where} has label {word!r}; use real or fake.")
        return words[word.lower()]

    listing = read_listing(
        path,
        "a labels file is JSON or lines of '<real|fake> <video path>'",
        "map video file names to labels, like DFDC's metadata.json",
    )
    if isinstance(listing, dict):
        return {PurePosixPath(k).stem: label(v, k) for k, v in listing.items()}
    out = {}
    for number, line in enumerate(listing.splitlines(), 1):
        parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
        if not parts:
            continue
        if len(parts) != 2:
            raise ConfigError(f"{path}, line {number}: expected '<real|fake> <video path>', got {line!r}.")
        word, video = parts if parts[0].lower() in words else parts[::-1]
        out[PurePosixPath(video).stem] = label(word, f"line {number}")
    return out


def row_labels(settings: Settings, rows: list[tuple[str, str, str]]) -> list[int]:
    """Each row's label (rows: dataset, video id, path): its dataset's, or for a `label: mixed`
    dataset its video's entry in the dataset's labels file (a video missing there is an error)."""
    datasets = settings.data.datasets
    files = {
        name: read_labels(settings.resolve(spec.labels)) for name, spec in datasets.items() if spec.label == "mixed"
    }
    out, missing = [], []
    for dataset, video, path in rows:
        if dataset not in files:
            out.append(LABELS[datasets[dataset].label])
        elif video in files[dataset]:
            out.append(files[dataset][video])
        else:
            out.append(-1)
            missing.append((dataset, path))
    if missing:
        dataset, path = missing[0]
        raise ConfigError(
            f"{len(missing)} files of dataset '{dataset}' (label: mixed) belong to videos its labels file does not "
            f"list, e.g. {path}; add them to {datasets[dataset].labels} or remove them from the folder."
        )
    return out


def build(
    settings: Settings, previous: file_index.Known, keep: Callable[[file_index.Known], None] = lambda read: None
) -> tuple[pa.Table, file_index.Known]:
    """The manifest table for the current folders (a pure function of files + settings), and the
    facts of the files it leaves out as copies of a held-out image (no row of their own). Stopped
    while hashing, it hands `keep` what it read (`inspect_files`)."""
    files = scan(settings)
    if not files:
        raise ConfigError(
            f"no image or video files ({', '.join(sorted(file_index.MEDIA_SUFFIXES))}) found under the "
            "data.datasets folders."
        )
    facts = inspect_files(files, settings.data_root, previous, keep)
    warn_unreadable([f.path for f, x in zip(files, facts, strict=True) if x is None])
    readable = [i for i, x in enumerate(facts) if x is not None]
    rows = expand([files[i] for i in readable], [facts[i] for i in readable], settings.data.frames.per_video)
    spec = settings.data.split
    official = read_split_dir(settings.resolve(spec.split_dir)) if spec.split_dir else None
    split_of = assign_splits([f.video for f, _, _ in rows], spec, official, [f.dataset for f, _, _ in rows])
    datasets = settings.data.datasets
    columns = {
        "path": [f.path for f, _, _ in rows],
        "dataset": [f.dataset for f, _, _ in rows],
        "label": row_labels(settings, [(f.dataset, f.video, f.path) for f, _, _ in rows]),
        "method": [datasets[f.dataset].method or f.dataset for f, _, _ in rows],
        "video": [f.video for f, _, _ in rows],
        "split": [split_of[f.video] for f, _, _ in rows],
        "size": [f.size for f, _, _ in rows],
        "mtime_ns": [f.mtime_ns for f, _, _ in rows],
        "ctime_ns": [f.ctime_ns for f, _, _ in rows],
        **{c: [getattr(x, c) for _, x, _ in rows] for c in CONTENT_COLUMNS},
        "digest": [frames.key(x.digest, i, x.orientation, x.ranked) for _, x, i in rows],
        "frame": [i for _, _, i in rows],
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
    rowed = set(table.column("path").to_pylist())
    left_out = {
        f.path: ((f.size, f.mtime_ns, f.ctime_ns), x)
        for f, x in zip(files, facts, strict=True)
        if x is not None and f.path not in rowed
    }
    return table, left_out


def remember(outputs: Outputs, left_out: file_index.Known) -> None:
    """The facts of files the manifest leaves out join the scan stage's table, which keeps them
    while the files are unchanged (`scan.new_files`), so that no later manifest reads them again:
    the manifest is the other place that remembers what each file holds, and they are not in it.
    So do those a stopped run read, which it has not written (`build`)."""
    scanned = file_index.read_known(outputs.scanned)
    if scanned | left_out != scanned:
        file_index.write_known(scanned | left_out, outputs.scanned)


def run(settings: Settings, outputs: Outputs) -> pa.Table:
    out = outputs.manifest
    table, left_out = build(settings, read_previous(outputs), lambda read: remember(outputs, read))
    write(table, out)
    remember(outputs, left_out)
    log.info("manifest: %d images -> %s\n%s", table.num_rows, out, summary(table))
    turned = pc.unique(table.filter(pc.not_equal(table["orientation"], 1))["path"])
    if len(turned):
        log.info(
            "manifest: %d files are stored turned (an EXIF orientation, a video's display rotation) and are embedded "
            "the way they are shown, e.g. %s",
            len(turned),
            pc.min(turned).as_py(),
        )
    return table
