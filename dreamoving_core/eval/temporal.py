"""Temporal consistency: do consecutive frames hang together? CLIP image-embedding cosine of frame f and f+1 (the
"frame consistency" of video papers) and flicker, the frame-to-frame change of low-pass luminance."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
FLICKER_CELLS = 16  # cells along the shorter side


def clip_consistency(embed: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, batch: int = 16,
                     tick: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """``(F − 1,)`` cosine of the CLIP embeddings of frames f and f+1; ``frames`` ``(F, H, W, 3)`` in 0 … 1.

    ``embed``: images ``(B, H, W, 3)`` → embeddings ``(B, D)``, called on ``batch`` frames at a time;
    ``tick(n)`` after each call."""
    parts = []
    for chunk in frames.split(batch):
        parts.append(embed(chunk).float().cpu())
        tick(len(chunk))
    embeddings = F.normalize(torch.cat(parts), dim=-1)
    return (embeddings[1:] * embeddings[:-1]).sum(-1)


def low_pass_luma(frames: torch.Tensor) -> torch.Tensor:
    """``(F, H, W, 3)`` in 0 … 1 → BT.601 luma averaged over cells of 1/16 of the shorter side ``(F, h, w)``."""
    luma = frames[..., :3].float() @ torch.tensor(LUMA, device=frames.device)
    scale = FLICKER_CELLS / min(frames.shape[1:3])
    cells = (max(1, round(frames.shape[1] * scale)), max(1, round(frames.shape[2] * scale)))
    return F.adaptive_avg_pool2d(luma[:, None], cells)[:, 0]


def flicker(frames: torch.Tensor) -> torch.Tensor:
    """``(F − 1,)`` mean absolute change of :func:`low_pass_luma` from frame f to f+1 (0 … 1)."""
    luma = low_pass_luma(frames)
    return (luma[1:] - luma[:-1]).abs().flatten(1).mean(1)
