"""Per-frame hints of a clip with our own preprocessors, in the formats of :class:`~.manifest.ClipRecord`.

``pose``: DWPose (:class:`dreamoving_core.preprocess.dwpose.DWPose`, frames scaled to a 512-pixel shorter side
for detection as the DWPose node does) → ``POSE_KEYPOINT`` JSON, raw per frame (no smoothing: apply
:func:`~dreamoving_core.preprocess.smoothing.smooth_poses` when loading, as the node does before rendering).
``depth``: ZoeDepth (:class:`dreamoving_core.preprocess.zoedepth.ZoeDepth`) metric depth, ``(F, h, w)`` float16
in a safetensors file under ``depth``, scaled down (area average) to at most ``DEPTH_SIDE`` pixels on its shorter
side: no training stage runs larger, and a 1080p clip's full-size depth would be ~1 GB per 10 s. The clip is decoded
once, in chunks, for both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..io import save_state_dict
from ..preprocess.pose import to_pose_keypoint
from .store import atomic_path, write_text
from .video import clip_frames

POSE_DETECT_RESOLUTION = 512  # the DWPose node's default
CHUNK_FRAMES = 32
DEPTH_SIDE = 512  # the largest training resolution (the expression stage's 512²)


def bounded_depth(depth: torch.Tensor, side: int = DEPTH_SIDE) -> torch.Tensor:
    """``depth`` ``(F, H, W)`` area-scaled so that its shorter side is at most ``side`` (aspect kept), as float16."""
    h, w = depth.shape[-2:]
    scale = side / min(h, w)
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        depth = F.interpolate(depth[:, None].float(), size=size, mode="area")[:, 0]
    return depth.half()


def extract_hints(clip: Path, pose_path: Path | None, depth_path: Path | None, dwpose=None, zoedepth=None,
                  depth_batch: int = 4, progress: Callable[[int], None] | None = None) -> None:
    """Write the pose hints of ``clip`` to ``pose_path`` (with ``dwpose``) and its depth to ``depth_path`` (with
    ``zoedepth``); either path may be ``None``. ``progress(frames_done)`` after every chunk."""
    poses, depth, done = [], [], 0
    for chunk in clip_frames(clip, CHUNK_FRAMES):
        if pose_path is not None:
            poses += dwpose.video(chunk, POSE_DETECT_RESOLUTION)
        if depth_path is not None:
            frames = torch.from_numpy(chunk).float() / 255.0
            depth.append(bounded_depth(zoedepth.depth(frames, batch_size=depth_batch)))
        done += len(chunk)
        if progress:
            progress(done)
    if pose_path is not None:
        write_text(pose_path, json.dumps(to_pose_keypoint(poses)))
    if depth_path is not None:
        with atomic_path(depth_path) as tmp:
            save_state_dict({"depth": torch.cat(depth)}, tmp, metadata={"format": "dreamoving_depth",
                                                                       "unit": "metres"})
