"""Transition-free scenes of a source video (PySceneDetect), and the 8–10 s training clips cut from them.

Detection runs PySceneDetect's ``ContentDetector`` (hard cuts: a jump in HSV content between two frames) and
``ThresholdDetector`` (fades through black: the mean RGB level crossing ``fade_threshold``, the cut placed in the
middle of the dark stretch) in one decoding pass. A cut ends a scene at the first frame of the next shot.

A fade leaves its ramp in the scenes on either side, so each scene is then trimmed: leading and trailing frames
darker than ``fade_trim`` × the scene's median brightness are dropped, and a scene whose median brightness is below
``fade_threshold`` (the black stretch itself) is dropped whole. Cross-dissolves between two bright shots are not
detected reliably by either detector.

Clips: a scene shorter than ``min_seconds`` is dropped; one up to ``max_seconds`` becomes one clip; a longer scene
is split into the fewest consecutive clips no longer than ``max_seconds`` — equal parts covering the whole scene
when they are at least ``min_seconds`` long, else as many ``max_seconds`` clips as fit, centred in the scene.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import InputMismatchError
from .video import VideoInfo, probe

BRIGHTNESS = "average_rgb"  # ThresholdDetector's per-frame metric


@dataclass(frozen=True)
class SceneConfig:
    """Detection settings (PySceneDetect's defaults for the two thresholds)."""

    cut_threshold: float = 27.0  # ContentDetector: weighted HSV change between frames that makes a hard cut
    fade_threshold: float = 12.0  # ThresholdDetector: mean RGB level (0..255) below which a frame is faded out
    fade_trim: float = 0.9  # scene ends darker than this fraction of the scene's median brightness are dropped
    min_gap: float = 0.25  # seconds: a cut closer than this to the previous one is ignored (flash filtering)

    def key(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClipBounds:
    """Clip length bounds in seconds (the paper's 8–10 s)."""

    min_seconds: float = 8.0
    max_seconds: float = 10.0

    def __post_init__(self):
        if not 0 < self.min_seconds <= self.max_seconds:
            raise InputMismatchError(f"clip bounds must satisfy 0 < min <= max, got min {self.min_seconds} s, "
                                     f"max {self.max_seconds} s")


def detect_scenes(path: str | Path, config: SceneConfig = SceneConfig()) -> tuple[VideoInfo, list[tuple[int, int]]]:
    """The video's header and its transition-free scenes as ``(start, end)`` frame ranges (end exclusive)."""
    from scenedetect import ContentDetector, SceneManager, StatsManager, ThresholdDetector, VideoOpenFailure
    from scenedetect.backends import VideoStreamAv
    from scenedetect.video_stream import FrameRateUnavailable

    path = Path(path)
    info = probe(path)  # the rate PySceneDetect's PyAV backend numbers frames with, and the one clips are cut at
    try:
        video = VideoStreamAv(str(path), suppress_output=True)  # keep FFmpeg's logging as the application set it
    except (VideoOpenFailure, FrameRateUnavailable, OSError) as err:
        raise InputMismatchError(f"'{path.name}' is not a readable video ({err or type(err).__name__})") from err
    gap = max(1, round(config.min_gap * float(info.rate)))
    stats = StatsManager()
    manager = SceneManager(stats)
    manager.add_detector(ContentDetector(threshold=config.cut_threshold, min_scene_len=gap))
    manager.add_detector(ThresholdDetector(threshold=config.fade_threshold, min_scene_len=gap, fade_bias=0.0,
                                           add_final_scene=True))
    decoded = manager.detect_scenes(video)
    if decoded == 0:
        raise InputMismatchError(f"'{path.name}' has no decodable video frames")
    frames = max(decoded, video.frame_number)
    starts = {start.frame_num for start, _ in manager.get_scene_list(start_in_scene=True)}
    bounds = [0, *sorted(n for n in starts if 0 < n < frames), frames]
    brightness = np.array([stats.get_metrics(n, [BRIGHTNESS])[0] if stats.metrics_exist(n, [BRIGHTNESS]) else np.nan
                           for n in range(frames)], dtype=np.float64)
    info = VideoInfo(info.rate, frames, info.width, info.height)
    return info, trim_fades(list(zip(bounds[:-1], bounds[1:])), brightness, config)


def trim_fades(scenes: list[tuple[int, int]], brightness: np.ndarray, config: SceneConfig) -> list[tuple[int, int]]:
    """Drop fade ramps from the ends of ``scenes`` and black scenes (see the module docstring).

    brightness: ``(frames,)`` mean RGB level per frame; NaN (not measured) counts as bright."""
    out = []
    for start, end in scenes:
        level = brightness[start:end]
        reference = np.nanmedian(level) if np.isfinite(level).any() else np.inf
        if reference < config.fade_threshold:
            continue
        dark = np.nan_to_num(level, nan=np.inf) < config.fade_trim * reference
        lit = np.flatnonzero(~dark)
        if len(lit):
            out.append((start + int(lit[0]), start + int(lit[-1]) + 1))
    return out


def clip_ranges(scenes: list[tuple[int, int]], rate: Fraction, bounds: ClipBounds) -> list[tuple[int, int]]:
    """The clips ``(start, end)`` cut from ``scenes`` at frame ``rate`` (see the module docstring)."""
    shortest = math.ceil(bounds.min_seconds * float(rate) - 1e-6)
    longest = math.floor(bounds.max_seconds * float(rate) + 1e-6)
    clips = []
    for start, end in scenes:
        length = end - start
        if length < shortest or longest < shortest:
            continue
        parts = math.ceil(length / longest)
        if length // parts >= shortest:
            edges = [start + round(i * length / parts) for i in range(parts + 1)]
        else:
            parts = length // longest
            first = start + (length - parts * longest) // 2
            edges = [first + i * longest for i in range(parts + 1)]
        clips += list(zip(edges[:-1], edges[1:]))
    return clips
