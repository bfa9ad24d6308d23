"""Image batches from users: the checks and conversions every image input gets before a model sees it."""
from __future__ import annotations

import torch

from .errors import InputMismatchError

MIN_SIDE = 8  # pixels; smaller frames are no use to any model here (ZoeDepth's padding needs 5 or more)


def rgb_frames(images: torch.Tensor, label: str, min_side: int = MIN_SIDE) -> torch.Tensor:
    """``images`` ``(F, H, W, C)`` float in [0, 1] (ComfyUI IMAGE) as RGB ``(F, H, W, 3)``: RGBA loses its alpha,
    grayscale (C = 1) is repeated to three channels, RGB is returned as it is (the same tensor).

    Raises ``InputMismatchError`` naming ``label`` for anything else: another rank or channel count, no frame, a
    frame smaller than ``min_side`` pixels, an integer dtype, or NaN / infinite pixels."""
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[-1] not in (1, 3, 4):
        raise InputMismatchError(f"{label} must be an image batch (frames, height, width, 3 channels), got a tensor "
                                 f"of shape {shape}")
    if not images.is_floating_point():
        raise InputMismatchError(f"{label} holds {images.dtype} pixels; expected float pixels in 0..1 (an IMAGE "
                                 "from Load Image or Load Video)")
    if shape[0] == 0:
        raise InputMismatchError(f"{label} holds no image")
    if min(shape[1:3]) < min_side:
        raise InputMismatchError(f"{label} is {shape[2]}×{shape[1]} pixels; images must be at least {min_side}×"
                                 f"{min_side}")
    if not torch.isfinite(images).all():
        raise InputMismatchError(f"{label} has NaN or infinite pixels; check the node that made it")
    if shape[-1] == 4:
        return images[..., :3].contiguous()
    if shape[-1] == 1:
        return images.expand(*shape[:3], 3).contiguous()
    return images
