"""Video files through PyAV: decoded frames numbered as PySceneDetect numbers them, clips cut at exact frames,
H.264 writing.

A frame's number is its presentation time (relative to the stream start) times the stream's frame rate, rounded —
PySceneDetect's PyAV backend counts the same way, so its cut frames and ours agree. Clips are re-encoded (a stream
copy could only cut at keyframes) at a constant frame rate: a frame number the source skips repeats the frame
before it, a number it repeats is dropped, as ``ffmpeg -vsync cfr`` does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputMismatchError
from .store import atomic_path

log = logging.getLogger("dreamoving.data")

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DEFAULT_CRF = 18  # x264 constant quality: visually lossless for training data


@dataclass(frozen=True)
class VideoInfo:
    """A video's frame ``rate`` (frames per second, exact), ``frames`` (0 when the container does not say),
    ``width`` × ``height``."""

    rate: Fraction
    frames: int
    width: int
    height: int


def _open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise InputMismatchError(f"'{path.name}' is not a readable video ({err})") from err
    if not container.streams.video:
        container.close()
        raise InputMismatchError(f"'{path.name}' has no video stream")
    return container, container.streams.video[0]


def _rate(stream, name: str) -> Fraction:
    rate = stream.guessed_rate or stream.average_rate  # PySceneDetect's choice, so frame numbers agree
    if not rate or rate <= 0:
        raise InputMismatchError(f"'{name}' has no frame rate")
    return Fraction(rate.numerator, rate.denominator)


def probe(path: str | Path) -> VideoInfo:
    """Rate, frame count and size from the container header (nothing decoded)."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        return VideoInfo(_rate(stream, path.name), int(stream.frames or 0), stream.codec_context.width,
                         stream.codec_context.height)


def output_size(width: int, height: int, short_side: int = 0) -> tuple[int, int]:
    """``(width, height)`` scaled down so the shorter side is ``short_side`` (0, or a smaller video: unchanged),
    rounded down to even numbers as H.264 4:2:0 needs."""
    k = min(1.0, short_side / min(width, height)) if short_side > 0 else 1.0
    return max(2, int(width * k) // 2 * 2), max(2, int(height * k) // 2 * 2)


def read_frames(path: str | Path, short_side: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame number, (H, W, 3) uint8 RGB)`` for every decodable frame, in decoding order: turned upright by the
    stream's display rotation (phone videos) and scaled by :func:`output_size` (area interpolation). Packets that
    fail to decode are skipped with a warning, as PySceneDetect does."""
    import av

    path = Path(path)
    container, stream = _open(path)
    with container:
        rate, start = _rate(stream, path.name), stream.start_time or 0
        stream.thread_type = "AUTO"
        failures = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                failures += 1
                continue
            for frame in frames:
                if frame.pts is None:
                    continue
                seconds = (frame.pts - start) * Fraction(frame.time_base.numerator, frame.time_base.denominator)
                quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, as FFmpeg displays it
                width, height = (frame.height, frame.width) if quarter_turns % 2 else (frame.width, frame.height)
                width, height = output_size(width, height, short_side)
                if quarter_turns % 2:
                    width, height = height, width
                if (width, height) != (frame.width, frame.height):
                    frame = frame.reformat(width=width, height=height, interpolation="AREA")
                image = frame.to_ndarray(format="rgb24")
                yield round(seconds * rate), np.ascontiguousarray(np.rot90(image, quarter_turns))
        if failures:
            log.warning("%s: %d packets could not be decoded and were skipped", path.name, failures)


class _Lookahead:
    """An iterator with one item of look-ahead (``None`` once exhausted)."""

    def __init__(self, items: Iterator):
        self._items = items
        self.head = next(items, None)

    def pop(self):
        head, self.head = self.head, next(self._items, None)
        return head


def _range_frames(frames: _Lookahead, start: int, end: int) -> Iterator[np.ndarray]:
    """Frames ``start`` .. ``end - 1`` from ascending numbered ``frames``, one per number: a missing number repeats
    the frame before it (the next one when the range starts with a gap), a repeated number is dropped; stops early
    if the video ends."""
    want, last = start, None
    while want < end and frames.head is not None:
        number, image = frames.head
        if number < want:
            frames.pop()
            last = image if number >= start else last
        elif number == want:
            frames.pop()
            last = image
            yield image
            want += 1
        else:
            yield last if last is not None else image
            want += 1


class VideoWriter:
    """An H.264 (yuv420p) MP4 at ``path`` with frames ``(H, W, 3)`` uint8 RGB of one even size."""

    def __init__(self, path: str | Path, rate: Fraction, width: int, height: int, crf: int = DEFAULT_CRF):
        import av

        if width % 2 or height % 2:
            raise InputMismatchError(f"H.264 needs an even frame size, got {width}x{height}")
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "medium"})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        import av

        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames: Iterable[np.ndarray], rate: Fraction | float,
                crf: int = DEFAULT_CRF) -> int:
    """Write ``frames`` (each ``(H, W, 3)`` uint8 RGB, even size) as an H.264 MP4, atomically; the frame count."""
    frames = iter(frames)
    first = next(frames)
    with atomic_path(path) as tmp, VideoWriter(tmp, Fraction(rate).limit_denominator(1_000_000),
                                               first.shape[1], first.shape[0], crf) as writer:
        writer.write(first)
        for image in frames:
            writer.write(image)
    return writer.frames


@dataclass(frozen=True)
class ClipJob:
    """Frames ``start`` .. ``end - 1`` of a source, written to ``clip`` with its centre frame as ``keyframe``."""

    start: int
    end: int
    clip: Path
    keyframe: Path

    @property
    def centre(self) -> int:
        return (self.start + self.end) // 2


def cut_clips(source: str | Path, jobs: list[ClipJob], rate: Fraction, short_side: int = 0,
              crf: int = DEFAULT_CRF) -> None:
    """Decode ``source`` once and write every job's clip (frames as :func:`read_frames` gives them) and keyframe
    (PNG). ``jobs`` must not overlap."""
    frames = _Lookahead(read_frames(source, short_side))
    for job in sorted(jobs, key=lambda j: j.start):
        if frames.head is None:
            raise InputMismatchError(f"'{Path(source).name}' ended before frame {job.start}")
        kept = {}

        def frames_of(job=job):
            for number, image in enumerate(_range_frames(frames, job.start, job.end), job.start):
                if number <= job.centre:  # the centre frame, or the last one of a clip the video cut short
                    kept["keyframe"] = image
                yield image

        write_video(job.clip, frames_of(), rate, crf)
        write_image(job.keyframe, kept["keyframe"])


def clip_frames(path: str | Path, chunk: int) -> Iterator[np.ndarray]:
    """The frames of a clip in chunks ``(≤ chunk, H, W, 3)`` uint8 RGB."""
    batch = []
    for _, image in read_frames(path):
        batch.append(image)
        if len(batch) == chunk:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB, turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputMismatchError(f"'{path.name}' is not a readable image ({err})") from err


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Save ``image`` ``(H, W, 3)`` uint8 RGB (or float in [0, 1]) as PNG, atomically."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
