"""Videos as frames: N evenly spaced frames per video, decoded with exact seeks (PyAV, which
bundles FFmpeg in its wheel).

A sampled frame is identified by the video file's sha256 and the frame's index: its cache key
is `<sha256>@<index>` or `<sha256>#<index>`. Frame i is the i-th frame shown, as DeepfakeBench
(cv2, reading frame after frame) counts. In a video whose frames are evenly spaced in time (a
constant frame rate, as FF++, Celeb-DF and DFDC videos have) that is the frame shown at i / fps
from the first, found from its time alone (`@`). A video whose frames are not (a phone's variable
frame rate: frame i shown at i / fps would skip frames, take others twice, and find no frame at
some i) has its frames ranked by presentation time from the packet index, which decodes nothing
(`#`); the key says which, so a cache made when every video was read by time never serves its
vector for a ranked frame. Either way the frame is found by seeking to the keyframe before it
and decoding forward, never by decoding the whole video. Several frames
of one video (`decode_many`) come from one pass: the file is opened once, and the decoder only
seeks when the next frame lies past a keyframe it has not reached yet (decoding through a short
gap is cheaper than seeking back to the same keyframe for every frame).

A file stored turned (a phone's portrait photo or video) is embedded the way it is shown, as
cv2 (DeepfakeBench's reader), ffmpeg and every viewer show it: its EXIF orientation, or a video's
display matrix as an EXIF orientation (`inspect`), is part of its key, `<sha256>^<orientation>`,
and the key alone says how the bytes are turned (`orientation`), so a cache made before a file's
orientation was read keeps its vectors under the plain sha256, never mixed with upright ones.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
KEY_SEPARATOR = "@"  # frame <index>: the frame shown at index / fps (frames evenly spaced in time)
RANK_SEPARATOR = "#"  # frame <index>: the index-th frame shown (a variable frame rate)
_FRAME_SEPARATORS = re.compile("[@#]")
ORIENTATION_SEPARATOR = "^"
VIDEO_FRAMES = 32  # frames sampled per video when data.frames.per_video is not set
# A video's display rotation (degrees counter-clockwise) as the EXIF orientation that shows it.
_ROTATION_ORIENTATION = {0: 1, 90: 8, 180: 3, -180: 3, 270: 6, -90: 6}


def key(file_digest: str, index: int = -1, orientation: int = 1, ranked: bool = False) -> str:
    """The cache key of the file whose bytes hash to `file_digest` (an image: `index` -1), or of
    its frame `index` (`@<index>`; `#<index>` in a `ranked` video); `^<orientation>` when the file
    is shown turned (EXIF 2-8). A ranked video itself (`index` -1, in the file tables) is `<sha256>#`."""
    turned = f"{file_digest}{ORIENTATION_SEPARATOR}{orientation}" if orientation != 1 else file_digest
    if index < 0:
        return turned + RANK_SEPARATOR if ranked else turned
    return f"{turned}{RANK_SEPARATOR if ranked else KEY_SEPARATOR}{index}"


def file_digest(row_key: str) -> str:
    """The sha256 of the file a cache key refers to: the key itself for an image, without its
    orientation (`^<orientation>`), the frame index of a video frame (`@<index>`, `#<index>`) or a
    robustness perturbation (`~<spec>`)."""
    return _file_part(row_key).split(ORIENTATION_SEPARATOR, 1)[0]


def orientation(row_key: str) -> int:
    """How the bytes of a cache key's file are turned to be shown: its EXIF orientation, 1 (as
    stored) for a key without `^<orientation>`."""
    _, turned, code = _file_part(row_key).partition(ORIENTATION_SEPARATOR)
    return int(code) if turned else 1


def is_ranked(row_key: str) -> bool:
    """Whether a cache key's frame index is a rank among the frames shown (`#`), not a time."""
    return RANK_SEPARATOR in row_key.split("~", 1)[0]


def frame_index(row_key: str) -> int:
    """The frame index a cache key names; -1 for an image."""
    parts = _FRAME_SEPARATORS.split(row_key.split("~", 1)[0], 1)
    return int(parts[1]) if len(parts) > 1 and parts[1] else -1


def _file_part(row_key: str) -> str:
    """A cache key without its frame index and perturbation: `<sha256>[^<orientation>]`."""
    return _FRAME_SEPARATORS.split(row_key.split("~", 1)[0], 1)[0]


_DIGITS = re.compile(r"([0-9]+)")


def name_order(path: str) -> list[int | str]:
    """A frame file's place among its video's frames: its name with runs of digits compared as
    numbers (`2.png` before `10.png`, as DeepfakeBench sorts frames; zero-padded names keep
    their order as text). Text and numbers alternate, text first, so two keys compare like with like."""
    parts: list[int | str] = _DIGITS.split(path[path.rfind("/") + 1 :])
    parts[1::2] = map(int, parts[1::2])
    return parts


def sample(count: int, per_video: int | None) -> list[int]:
    """`per_video` frame indices evenly spaced over `count` frames, first and last included
    (DeepfakeBench's `np.linspace(0, count - 1, n, dtype=int)`); all of them when there are no
    more than `per_video`, or `per_video` is None."""
    if per_video is None or count <= per_video:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, per_video, dtype=int)})


def sampled(frame_count: int, per_video: int | None) -> list[int]:
    """The frames a video contributes: `per_video` (else VIDEO_FRAMES) evenly spaced ones; one,
    frame 0, for a video whose frames cannot be counted, so that its failure is recorded."""
    return sample(frame_count, per_video or VIDEO_FRAMES) if frame_count > 0 else [0]


@dataclass(frozen=True)
class VideoFacts:
    format: str
    width: int
    height: int
    frame_count: int
    orientation: int = 1  # the EXIF orientation that shows the frames as the display matrix says
    ranked: bool = False  # frames not evenly spaced in time: frame i is found by its rank (`#`)


def inspect(data: bytes) -> VideoFacts:
    """Header facts, the number of frames shown (from the container, less those its edit list
    hides, as in a clip cut without re-encoding; or from the packets, demuxed without decoding),
    whether they are evenly spaced in time (from the packets' timestamps), and the orientation
    (from the first frame, which carries the display matrix); ValueError if the bytes are not a
    video with a video stream."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            packets, whole = [], False
            with contextlib.suppress(av.FFmpegError):  # a damaged stretch: the packets before it
                packets = [(packet.pts, packet.is_discard) for packet in container.demux(stream) if packet.size]
                whole = True
            with contextlib.suppress(av.FFmpegError):  # damaged: the orientation from where the demux stopped
                container.seek(0)
            shown = [pts for pts, discard in packets if not discard]  # not those an edit list hides
            ranked = whole and len(shown) > 0 and None not in shown and not _Clock(stream).spaced(sorted(shown))
            hidden = len(packets) - len(shown)
            count = len(shown) if ranked or not stream.frames else stream.frames - hidden
            fmt = container.format.name.split(",")[0]
            return VideoFacts(
                fmt, stream.codec_context.width, stream.codec_context.height, count, _orientation(container), ranked
            )
    except av.FFmpegError as exc:
        raise ValueError(f"not a readable video ({exc})") from None


class _Clock:
    """Where a frame stands among a video's frames, from its pts, and the pts to seek to for a
    frame: by time (frame i is shown i / fps after the first) or, given every frame's pts in the
    order shown (`shown`, a ranked video), by rank."""

    def __init__(self, stream, shown: list[int] | None = None):
        self.rate = stream.average_rate or stream.guessed_rate
        self.start = stream.start_time or 0
        self.time_base = stream.time_base
        self.rank = None if shown is None else {pts: i for i, pts in enumerate(shown)}
        self.shown = shown

    def spaced(self, shown: list[int]) -> bool:
        """Whether frames shown at `shown` (sorted) are where their time says: frame i at i / fps."""
        return bool(self.rate) and all(self.position(pts) == i for i, pts in enumerate(shown))

    def position(self, pts: int) -> int:
        """The frame index of the frame shown at `pts`; -1 for a pts no frame of a ranked video has."""
        if self.rank is not None:
            return self.rank.get(pts, -1)
        return round((pts - self.start) * self.time_base * self.rate)

    def target(self, index: int) -> int:
        """The pts to seek to (backwards, to a keyframe) for frame `index`."""
        if self.shown is not None:
            return self.shown[min(index, len(self.shown) - 1)] if self.shown else 0  # past the end: the last
        return self.start + round(index / (self.rate * self.time_base))


def _shown(container, stream) -> list[int]:
    """Every frame's pts in the order shown (a ranked video's frames), from the packet index (what
    precedes a damaged stretch; not the frames an edit list hides); the container is left for a seek."""
    import av

    shown: list[int] = []
    with contextlib.suppress(av.FFmpegError):
        shown.extend(
            packet.pts
            for packet in container.demux(stream)
            if packet.size and packet.pts is not None and not packet.is_discard
        )
    return sorted(shown)


def _orientation(container) -> int:
    """The EXIF orientation of a video's display rotation, from its first frame; 1 (as stored)
    when it has none, turns by another angle, or its first frame does not decode (extract
    records that frame by frame)."""
    import av

    try:
        first = next(iter(container.decode(container.streams.video[0])), None)
    except av.FFmpegError:
        return 1
    angle = first.rotation if first is not None else 0
    return _ROTATION_ORIENTATION.get(round(angle), 1) if angle == angle else 1  # NaN: a matrix that is no rotation


def decode(data: bytes, index: int, ranked: bool = False) -> Image.Image:
    """Frame `index` of the video in `data` (by rank among the frames shown if `ranked`, else by
    time), as an RGB image; ValueError if it has no such frame."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            clock = _Clock(stream, _shown(container, stream) if ranked else None)
            container.seek(clock.target(index), stream=stream, backward=True, any_frame=False)
            first = True
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                at = clock.position(frame.pts)
                if first and at > index:  # the seek overshot (a container without a usable index)
                    break
                first = False
                if at == index:
                    return frame.to_image()
                if at > index:
                    break
            container.seek(clock.start, stream=stream, backward=True, any_frame=False)  # from the start, exactly
            for frame in container.decode(stream):
                if frame.pts is not None and clock.position(frame.pts) == index:
                    return frame.to_image()
    except av.FFmpegError as exc:
        raise ValueError(f"unreadable video ({exc})") from None
    raise ValueError(f"the video has no frame {index}")


def decode_many(data: bytes, indices: Iterable[int], ranked: bool = False) -> dict[int, Image.Image | str]:
    """Frames `indices` of the video in `data` (by rank among the frames shown if `ranked`, else by
    time), decoded in one pass (one open, one demux of the packet index, a seek only past an
    unreached keyframe): each an RGB image, or why it is missing (the video has no such frame;
    the decoder's error for a frame past a damaged stretch, such as the end of a truncated
    download, whose frames before it are kept). ValueError if the bytes cannot be opened as a video."""
    import av

    wanted = sorted(set(indices))
    out: dict[int, Image.Image | str] = {}
    try:
        container = av.open(io.BytesIO(data))
    except av.FFmpegError as exc:
        raise ValueError(f"unreadable video ({exc})") from None
    with container:
        stream = container.streams.video[0]
        # A damaged stretch stops the pass; what it decoded stays, the rest is tried frame by frame.
        with contextlib.suppress(av.FFmpegError):
            packets = [  # (pts, keyframe, hidden by an edit list); not the packets themselves, which hold the bytes
                (p.pts, p.is_keyframe, p.is_discard) for p in container.demux(stream) if p.size and p.pts is not None
            ]
            clock = _Clock(stream, sorted(pts for pts, _, hidden in packets if not hidden) if ranked else None)
            keyframes = sorted(clock.position(pts) for pts, keyframe, _ in packets if keyframe)
            at, decoder = None, None  # the position of the last decoded frame; the running decoder
            for index in wanted:
                k = bisect.bisect_right(keyframes, index) - 1
                keyframe = keyframes[k] if k >= 0 else 0
                if decoder is None or at is None or at >= index or keyframe > at:
                    container.seek(clock.target(index), stream=stream, backward=True)
                    decoder, at = container.decode(stream), None
                for frame in decoder:
                    if frame.pts is None:
                        continue
                    first, at = at is None, clock.position(frame.pts)
                    if first and at > index:  # the seek overshot (a container without a usable index)
                        break
                    if at == index:
                        out[index] = frame.to_image()
                    if at >= index:
                        break
                else:
                    decoder, at = None, None  # the end of the video
    for index in wanted:  # what one pass missed, frame by frame (decode() falls back to the start)
        if index not in out:
            try:
                out[index] = decode(data, index, ranked)
            except ValueError as exc:  # the video has no such frame, or it lies past the damage
                out[index] = str(exc)
    return out
