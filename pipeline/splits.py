"""Splits by linked video group: the one place that decides which split a video lands in.

A fake `000_003` is made from real videos `000` and `003`, so all three (and `003_000`, and the
same ids in every other method) form one group and land in the same split. The manifest stage
assigns splits with it; the evaluate stage re-draws train/val with it for `evaluate.seeds`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, SplitSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


_CELEB_DF_FAKE = re.compile(r"^(id\d+)_id\d+_(\d+)$")


def identities(video: str) -> list[str]:
    """The source identities a video id refers to.

    `000` -> [000]; `000_003` -> [000, 003] (FF++ target_source); `01_02__scene__X` (DeepFake
    Detection) -> [01, 02]; `id0_id16_0000` (Celeb-DF: real clip `id0_0000` with id16's face,
    whose donor is a person, not a clip) -> [id0_0000]; anything else is its own identity.
    """
    celeb_df = _CELEB_DF_FAKE.match(video)
    if celeb_df:
        return [f"{celeb_df[1]}_{celeb_df[2]}"]
    head = video.split("__", 1)[0]
    parts = head.split("_")
    if all(p.isdigit() for p in parts):
        return parts
    return [video]


class _Linked:
    """Union-find over strings; each set is named by its smallest member."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def link(self, x: str, y: str) -> None:
        a, b = self.find(x), self.find(y)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def group_videos(videos: Iterable[str]) -> dict[str, str]:
    """Map each video id to a group key; linked videos (shared identities) share a group."""
    linked = _Linked()
    videos = sorted(set(videos))
    for v in videos:
        ids = identities(v)
        for other in ids[1:]:
            linked.link(ids[0], other)
    return {v: linked.find(identities(v)[0]) for v in videos}


def read_listing(path: Path, expected: str, json_shape: str) -> str | dict:
    """A user's file of videos (a labels file, a test list): its JSON object where the name ends in
    .json, else its text. `expected` says what such a file is, `json_shape` what its JSON must be;
    both for the one-sentence errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; {expected}.") from None
    if path.suffix.lower() != ".json":
        return text
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix it there.") from None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path} must {json_shape}.")
    return entries


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


def assign_splits(
    videos: list[str], spec: SplitSpec, official: dict[str, str] | None = None, datasets: list[str] | None = None
) -> dict[str, str]:
    """Split per video group -> {video: split}; `videos` has one entry per image (the shares
    are shares of images), `datasets` each image's dataset.

    Groups named by the official split files take that split. The rest are ordered by a hash
    of (seed, group) and filled into test, then val, up to their share of images; the rest is
    train. Hash order keeps assignments stable when new videos are added. Datasets that share
    no video group (FF++ and Celeb-DF) are separate families, each filled to its own shares, so
    adding one never moves another's videos between splits."""
    groups = group_videos(videos)
    images_per_group: dict[str, int] = {}
    for v in videos:
        images_per_group[groups[v]] = images_per_group.get(groups[v], 0) + 1

    family = dataset_families(groups, videos, datasets)
    split_of_group: dict[str, str] = {}
    if official:
        members: dict[str, set[str]] = {}
        for v, g in groups.items():
            for ident in identities(v):
                if ident in official:
                    members.setdefault(g, set()).add(official[ident])
        for g, found in members.items():
            if len(found) > 1:
                raise ConfigError(_split_across(g, groups, official))
            split_of_group[g] = found.pop()
        covered = {family[g] for g in split_of_group}  # a family the files say nothing of (Celeb-DF) takes the ratios
        uncovered = sorted(g for g in images_per_group if g not in split_of_group and family[g] in covered)
        if uncovered:
            log.warning(
                "%d video groups of data the split files cover are not in them (e.g. %s); assigning them by the "
                "val/test ratios",
                len(uncovered),
                uncovered[0],
            )
    rest = [g for g in images_per_group if g not in split_of_group]
    rest.sort(key=lambda g: hashlib.sha256(f"{spec.seed}:{g}".encode()).hexdigest())
    for name in sorted(set(family.values())):
        mine = [g for g in rest if family[g] == name]
        total = sum(images_per_group[g] for g in mine)
        quota = {"test": spec.test * total, "val": spec.val * total}
        filled = {"test": 0, "val": 0}
        for g in mine:
            split = next((s for s in ("test", "val") if filled[s] < quota[s]), "train")
            if split != "train":
                filled[split] += images_per_group[g]
            split_of_group[g] = split
    return {v: split_of_group[g] for v, g in groups.items()}


def dataset_families(groups: dict[str, str], videos: list[str], datasets: list[str] | None) -> dict[str, str]:
    """Each video group's family: the datasets linked to one another through shared video groups
    (FF++'s real videos and every method made from them are one family); all one without `datasets`."""
    if datasets is None:
        return dict.fromkeys(groups.values(), "")
    linked = _Linked()
    first: dict[str, str] = {}  # group -> the first dataset seen holding it
    for v, d in zip(videos, datasets, strict=True):
        linked.link(first.setdefault(groups[v], d), d)
    return {g: linked.find(d) for g, d in first.items()}


def _split_across(group: str, groups: dict[str, str], official: dict[str, str]) -> str:
    """The sentence for a video group that the official split files put in two splits: the video
    that links identities of different splits (or the identities, where the link is indirect)."""
    members = sorted(v for v, g in groups.items() if g == group)
    placed = {i: official[i] for v in members for i in identities(v) if i in official}
    linking = next((v for v in members if len({placed.get(i) for i in identities(v)} - {None}) > 1), None)
    named = " and ".join(
        f"{i} ({placed[i]}.json)" for i in (identities(linking) if linking else sorted(placed)) if i in placed
    )
    via = f"video {linking} is made from videos {named}" if linking else f"linked videos join {named} in one group"
    return (
        f"{via} of the split files, so it cannot sit in one split without leaking into another; the split "
        "files fit FaceForensics++'s own pairs only: for other data, set data.split's val/test ratios "
        "instead of split_dir."
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


def redraw_train_val(
    split: np.ndarray, videos: np.ndarray, pool: np.ndarray, seed: int, datasets: np.ndarray | None = None
) -> np.ndarray:
    """`split` (one entry per row) with the train/val rows in `pool` re-drawn by video group for
    `seed`, keeping the share of val images of each family of `datasets` (each row's dataset; one
    family without them), as the manifest fills each family to its own shares; test rows and rows
    outside `pool` are untouched. `videos` holds each row's video id."""
    pool = pool & np.isin(split, ["train", "val"])
    pooled = np.array([str(v) for v in videos[pool]], dtype=object)
    groups = group_videos(pooled.tolist())
    family = dataset_families(groups, pooled.tolist(), None if datasets is None else datasets[pool].tolist())
    family_of_row = np.array([family[groups[v]] for v in pooled], dtype=object)
    was, drawn = split[pool], np.empty(len(pooled), dtype=object)
    for name in sorted(set(family_of_row)):
        rows = family_of_row == name
        spec = SplitSpec(val=float((was[rows] == "val").mean()), test=0.0, seed=seed)
        assignment = assign_splits(pooled[rows].tolist(), spec)
        drawn[rows] = [assignment[v] for v in pooled[rows]]
    out = split.copy()
    out[pool] = drawn
    return out
