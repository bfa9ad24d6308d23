"""Validation during training: sample a video from the model being trained, write its frames, score it.

The **scorer seam**: any callable of the :class:`Scorer` shape, e.g. ``dreamoving_core.eval``'s entry point
wrapped to a flat dict, named in the config as ``validation.scorer: "package.module:callable"`` or passed to
:func:`dreamoving_core.train.train`. Its numbers are logged as ``val/<name>`` beside the loss.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from einops import rearrange, repeat

from ..data.video import write_image
from ..guider.model import ImageFeatures
from ..preprocess.pose import from_pose_keypoint, to_pose_keypoint
from .config import ConfigError


@runtime_checkable
class Scorer(Protocol):
    """Scores of generated ``frames`` ``(F, H, W, 3)`` in [0, 1]: ``driving`` is the clip's ``POSE_KEYPOINT`` (one
    OpenPose dict per frame, in the frames' pixels) or None, ``face`` the reference face ``(H, W, 3)`` in [0, 1] or
    None. Returns ``{name: value}``."""

    def __call__(self, frames: torch.Tensor, *, driving: Sequence[dict] | None,
                 face: torch.Tensor | None) -> Mapping[str, float]: ...


def load_scorer(spec: str) -> Scorer:
    """The callable named ``"package.module:attribute"``; ``ConfigError`` if it cannot be imported."""
    module_name, _, attribute = spec.partition(":")
    try:
        scorer = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"validation.scorer '{spec}' cannot be imported ({err})") from err
    if not callable(scorer):
        raise ConfigError(f"validation.scorer '{spec}' is not callable")
    return scorer


def crop_poses(poses: Sequence[dict], size: int) -> list[dict]:
    """``POSE_KEYPOINT`` frames moved from their canvas onto its ``size``² centre crop after the shorter side was
    resized to ``size`` (the transform :func:`~dreamoving_core.train.data.resize_center_crop` applies to frames)."""
    frames = from_pose_keypoint(list(poses))
    out = []
    for frame in frames:
        scale = size / min(frame.height, frame.width)
        top = (max(size, round(frame.height * scale)) - size) // 2
        left = (max(size, round(frame.width * scale)) - size) // 2
        people = []
        for person in frame.people:
            moved = person.scaled(scale, scale)
            for part in moved.parts().values():
                present = part[:, 2] > 0
                part[present, 0] -= left
                part[present, 1] -= top
            people.append(moved)
        frame.people, frame.height, frame.width = people, size, size
        out.append(frame)
    return to_pose_keypoint(out)


def ddim_scheduler(noise_schedule: str, steps: int):
    """diffusers' DDIM sampler on the training schedule (SD1.5's sampling settings)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule=noise_schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def _pair(cond: ImageFeatures, blank: ImageFeatures) -> ImageFeatures:
    """Features of two videos, (reference, blank), for the cond and uncond halves."""
    def both(a, b):
        return None if a is None else torch.cat([a, b.to(a)])
    return ImageFeatures(both(cond.image_embeds, blank.image_embeds),
                         both(cond.penultimate_hidden_states, blank.penultimate_hidden_states),
                         both(cond.arcface, blank.arcface))


@torch.no_grad()
def sample_frames(denoiser, vae, text: torch.Tensor, uncond: torch.Tensor, num_frames: int, resolution: int,
                  noise_schedule: str, steps: int, cfg: float, generator: torch.Generator,
                  hint: torch.Tensor | None = None, features: Mapping[str, ImageFeatures] | None = None,
                  blank: Mapping[str, ImageFeatures] | None = None) -> torch.Tensor:
    """A video from ``denoiser`` by DDIM with classifier-free guidance: cond and uncond run as two videos in one
    batch (uncond: empty prompt ``uncond``, blank image features). text / uncond: ``(1, 77, 768)``; hint ``(F, 3,
    R, R)``. Returns frames ``(F, R, R, 3)`` in [0, 1]."""
    scheduler = ddim_scheduler(noise_schedule, steps)
    param = next(vae.parameters())
    device, dtype = param.device, param.dtype
    size = resolution // 8
    latents = torch.randn(num_frames, 4, size, size, generator=generator).to(device)
    context = repeat(torch.cat([text, uncond]).to(device), "v l c -> (v f) l c", f=num_frames)
    hints = None if hint is None else torch.cat([hint, hint]).to(device)
    pairs = {slot: _pair(f, blank[slot]) for slot, f in (features or {}).items()}
    for t in scheduler.timesteps:
        timesteps = torch.full((2 * num_frames,), int(t), device=device)
        pred = denoiser(torch.cat([latents, latents]).to(dtype), timesteps, context.to(dtype), num_frames,
                        hint=hints, features=pairs).float()
        cond, free = pred.chunk(2)
        latents = scheduler.step(free + cfg * (cond - free), t, latents).prev_sample
    pixels = vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample.float()
    return rearrange((pixels.clamp(-1, 1) + 1) / 2, "f c h w -> f h w c").cpu()


def write_frames(frames: torch.Tensor, folder: str | Path) -> list[Path]:
    """PNG files ``frame_0000.png``... of ``frames`` ``(F, H, W, 3)`` in [0, 1] in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{i:04d}.png" for i in range(len(frames))]
    for path, frame in zip(paths, (frames.numpy() * 255).round().astype(np.uint8)):
        write_image(path, frame)
    return paths
