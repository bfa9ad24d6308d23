"""The four DreaMoving training stages: what each trains, what stays frozen, how its result is saved.

=================  =========================================  ===================================  ====================
stage              trained                                    frozen                               output (loader node)
=================  =========================================  ===================================  ====================
content_guider     Content Guider: face/cloth projections     U-Net, VAE, text encoder, CLIP       Load Content Guider
                   and their per-layer K/V (Eq. 1)            image tower
long_frame         the U-Net's motion blocks (16 → 64         U-Net, VAE, text encoder             Load Motion Module
                   positions)
video_controlnet   Video ControlNet: ControlNet blocks and    U-Net and its motion blocks, VAE,    Load Video ControlNet
                   its motion blocks                          text encoder
expression         the U-Net's motion blocks                  U-Net, Video ControlNet, VAE, text   Load Motion Module
                                                              encoder
=================  =========================================  ===================================  ====================

Only the trained module is a registered child of :class:`Denoiser`, so DDP, the optimizer and ``save_state`` see
exactly it; the frozen ones are held beside it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..control.format import MOTION_PREFIX, load_video_controlnet, save_video_controlnet
from ..control.model import VideoControlNet
from ..errors import ModelFormatError
from ..guider.clip_image import ClipImageEncoder
from ..guider.format import SD15_CONTEXT_DIM, ProjectionConfig, SourceWeights, guider_state_dict
from ..guider.model import ContentGuider, ContentSource, ImageFeatures, ImageProjection, load_content_guider
from ..io import save_state_dict
from ..motion.format import load_motion_module, save_motion_module
from ..motion.model import MotionModule
from .base import BaseModel, checkpoint_shapes
from .config import ConfigError, GuiderConfig, TrainConfig
from .unet import DreaMovingUNet, GuidanceTerm

ARCFACE_WIDTH = 512


@dataclass(frozen=True)
class StageSpec:
    """``data``: ``"clips"`` or ``"faces"``; ``output``: the result's file name; ``loader`` / ``folder``: the node
    that loads it and the ComfyUI models folder it goes in; ``trains``: which module is trained."""

    name: str
    data: str
    trains: str
    output: str
    loader: str
    folder: str


SPECS = {
    "content_guider": StageSpec("content_guider", "faces", "guider", "dreamoving_content_guider.safetensors",
                                "Load Content Guider", "models/dreamoving/content_guider"),
    "long_frame": StageSpec("long_frame", "clips", "motion", "dreamoving_motion_long_frame.safetensors",
                            "Load Motion Module", "models/dreamoving/motion"),
    "video_controlnet": StageSpec("video_controlnet", "clips", "controlnet", "dreamoving_video_controlnet.safetensors",
                                  "Load Video ControlNet", "models/dreamoving/video_controlnet"),
    "expression": StageSpec("expression", "clips", "motion", "dreamoving_motion_expression.safetensors",
                            "Load Motion Module", "models/dreamoving/motion"),
}


class Denoiser(nn.Module):
    """One noise prediction of a stage: Video ControlNet residuals (when the stage has one) → the U-Net with motion
    blocks and Content Guider attention → ``(B·F, 4, h, w)``.

    ``trainable`` is the stage's trained module (motion module, Video ControlNet or Content Guider) and the only
    registered child. ``controlnet`` / ``guider`` name the modules the forward uses (one of them may be
    ``trainable``); a frozen ControlNet runs without gradients.
    """

    def __init__(self, unet: DreaMovingUNet, trainable: nn.Module, controlnet: VideoControlNet | None = None,
                 guider: ContentGuider | None = None):
        super().__init__()
        self.trainable = trainable
        object.__setattr__(self, "unet", unet)  # frozen: deliberately not registered
        object.__setattr__(self, "controlnet", controlnet)
        object.__setattr__(self, "guider", guider)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, num_frames: int,
                hint: torch.Tensor | None = None, features: Mapping[str, ImageFeatures] | None = None
                ) -> torch.Tensor:
        """sample: noisy latents ``(B·F, 4, h, w)``; timesteps ``(B·F,)``; text ``(B·F, 77, 768)``; hint
        ``(B·F, 3, 8h, 8w)`` in [0, 1]; features: per guider slot, one row per video."""
        control = None
        if self.controlnet is not None and hint is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.controlnet is self.trainable):
                control = self.controlnet(sample, hint.to(sample.dtype), timesteps, text, num_frames)
        guidance = [GuidanceTerm(1.0, self.guider.sources[slot], self.guider.sources[slot].project(f))
                    for slot, f in (features or {}).items()]
        return self.unet(sample, timesteps, text, num_frames, control=control, guidance=guidance)


@dataclass
class Parts:
    """A stage's own modules, loaded on the CPU and checked before the base model: the U-Net's motion blocks, the
    Video ControlNet, a starting guider file, the CLIP image tower."""

    motion: MotionModule | None = None
    motion_name: str = ""
    controlnet: VideoControlNet | None = None
    guider: ContentGuider | None = None
    clip: ClipImageEncoder | None = None
    notes: list[str] = field(default_factory=list)


def _required(config: TrainConfig, key: str, why: str) -> str:
    path = getattr(config.models, key)
    if path is None:
        raise ConfigError(f"models.{key} is not set; the {config.stage} stage needs {why}")
    if not Path(path).exists():
        raise ConfigError(f"models.{key}: '{path}' does not exist ({why})")
    return path


def _check_controlnet_fit(controlnet: VideoControlNet, unet_config: dict, name: str) -> None:
    widths, layers = list(unet_config["block_out_channels"]), unet_config["layers_per_block"]
    if list(controlnet.config.level_widths) != widths or set(controlnet.config.num_res_blocks) != {layers}:
        raise ModelFormatError(f"ControlNet '{name}' has levels of widths {list(controlnet.config.level_widths)} with "
                               f"{list(controlnet.config.num_res_blocks)} layers, the base U-Net {widths} with "
                               f"{layers} each; use an SD1.5 ControlNet")


def _has_own_motion(path: str) -> bool:
    keys = checkpoint_shapes(path)
    return keys is not None and any(k.startswith(MOTION_PREFIX) for k in keys)


def load_parts(config: TrainConfig, unet_config: dict) -> Parts:
    """Load and check the stage's own modules (raises ``ConfigError`` / ``ModelFormatError`` naming the setting or
    file). ``unet_config``: the base U-Net's diffusers config."""
    from .unet import check_motion_fit

    stage, models, length = config.stage, config.models, config.positional_length
    parts = Parts()
    if stage == "content_guider":
        parts.clip = ClipImageEncoder.from_file(_required(config, "clip_vision", "the OpenCLIP ViT-H/14 image tower "
                                                          "(CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)"))
        if models.content_guider is not None:
            parts.guider = load_content_guider(_required(config, "content_guider", "a starting guider"))
        return parts
    why = "the U-Net's motion blocks (an AnimateDiff file such as mm_sd_v15.ckpt or a DreaMoving motion module)"
    path = _required(config, "motion_module", why)
    parts.motion, parts.motion_name = load_motion_module(path, positional_length=length), Path(path).name
    check_motion_fit(unet_config, parts.motion, parts.motion_name)
    if stage == "long_frame":
        return parts
    path = _required(config, "controlnet", "an image ControlNet to start from (e.g. control_v11p_sd15_openpose.pth)"
                      if stage == "video_controlnet" else "the Video ControlNet trained in the video_controlnet stage")
    motion = models.controlnet_motion
    if stage == "video_controlnet" and motion is None and not _has_own_motion(path):
        motion = models.motion_module
    parts.controlnet = load_video_controlnet(path, motion, positional_length=length, dtype=torch.float32)
    _check_controlnet_fit(parts.controlnet, unet_config, Path(path).name)
    if not parts.controlnet.has_motion:
        parts.notes.append(f"'{Path(path).name}' has no motion blocks: it runs as a per-frame ControlNet")
    return parts


def new_source(slot: str, config: GuiderConfig, clip_width: int, to_k: list[torch.Tensor],
               to_v: list[torch.Tensor], name: str) -> ContentSource:
    """A fresh image source for ``slot``: face = FaceID-Plus (ArcFace → tokens refined by a perceiver over the face
    crop's CLIP hidden states; ArcFace only when ``perceiver_depth`` is 0), cloth = a plus resampler; K/V start as
    copies of the U-Net's text ``to_k`` / ``to_v`` (IP-Adapter's initialisation)."""
    dim, depth = config.perceiver_dim, config.perceiver_depth
    if slot == "face":  # FaceID-Plus refines the identity tokens themselves: its perceiver is token-wide
        cfg = ProjectionConfig("faceid", SD15_CONTEXT_DIM, "penultimate" if depth else None,
                               clip_width if depth else None, config.face_tokens, arcface_width=ARCFACE_WIDTH,
                               depth=depth, dim=SD15_CONTEXT_DIM if depth else 0,
                               heads=SD15_CONTEXT_DIM // 64 if depth else 0)
    else:
        cfg = ProjectionConfig("resampler", SD15_CONTEXT_DIM, "penultimate", clip_width, config.cloth_tokens,
                               depth=max(depth, 1), dim=dim, heads=dim // 64)
    projection = ImageProjection(cfg)
    if cfg.kind == "resampler":
        nn.init.normal_(projection.resampler.latents, std=dim ** -0.5)
    weights = SourceWeights(cfg, projection.file_weights(), [w.detach().clone() for w in to_k],
                            [w.detach().clone() for w in to_v])
    return ContentSource(weights, name)


def build_guider(config: TrainConfig, parts: Parts, unet: DreaMovingUNet) -> ContentGuider:
    """The Content Guider to train: the starting file's sources (an IP-Adapter serves as the face), new ones for the
    slots it lacks; checked against the U-Net's cross-attention layers."""
    layers = unet.cross_attention_layers()
    to_k, to_v = [a.to_k.weight for a in layers], [a.to_v.weight for a in layers]
    sources = {}
    if parts.guider is not None:
        sources = {("face" if slot == "any" else slot): source for slot, source in parts.guider.sources.items()}
    slots = ("face", "cloth") if config.guider.cloth else ("face",)
    with torch.random.fork_rng(devices=[]):  # new projections start from the run's seed, on every process
        torch.manual_seed(config.seed)
        for slot in slots:
            if slot not in sources:
                sources[slot] = new_source(slot, config.guider, parts.clip.config.width, to_k, to_v, "new guider")
    if not sources["face"].config.needs_arcface:
        parts.notes.append("the starting face source takes no ArcFace embedding (not a FaceID projection)")
    guider = ContentGuider(parts.guider.name if parts.guider else "new guider", "dreamoving_content_guider", sources)
    guider.check_layers([a.to_k.out_features for a in layers])
    return guider


def checkpointed(module: nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass instead of keeping them (gradient checkpointing
    for modules of ours that diffusers does not manage)."""
    forward = module.forward

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = run


def enable_gradient_checkpointing(unet: DreaMovingUNet, controlnet: VideoControlNet | None) -> None:
    """diffusers' checkpointing for the U-Net, ours for the motion blocks and the Video ControlNet's blocks."""
    unet.unet.enable_gradient_checkpointing()
    unet.checkpointing = True
    if controlnet is not None:
        for block in [*controlnet.input_blocks, *controlnet.middle_block]:
            checkpointed(block)
        motion = [b for level in controlnet.motion_down or [] for b in level] + \
            ([controlnet.motion_mid] if controlnet.motion_mid is not None else [])
        for block in motion:
            checkpointed(block)


@dataclass
class Stage:
    """A stage ready to run: the :class:`Denoiser` (its ``trainable`` child is what is trained), every frozen
    module by name, the base model and the CLIP tower (content_guider)."""

    spec: StageSpec
    denoiser: Denoiser
    frozen: dict[str, nn.Module]
    base: BaseModel
    clip: ClipImageEncoder | None
    notes: list[str]

    @property
    def trainable(self) -> nn.Module:
        return self.denoiser.trainable


def build_stage(config: TrainConfig, base: BaseModel, parts: Parts) -> Stage:
    """Assemble the stage from the loaded base and parts (all on the CPU, trainable module in float32)."""
    spec = SPECS[config.stage]
    unet = DreaMovingUNet(base.unet, parts.motion, parts.motion_name, guided=spec.trains == "guider")
    guider = build_guider(config, parts, unet) if spec.trains == "guider" else None
    trainable = {"motion": parts.motion, "controlnet": parts.controlnet, "guider": guider}[spec.trains]
    trainable.float().train().requires_grad_(True)
    frozen = dict(base.modules())
    if parts.clip is not None:
        frozen["clip_vision"] = parts.clip
    if parts.motion is not None and parts.motion is not trainable:
        frozen["motion_module"] = parts.motion
    if parts.controlnet is not None and parts.controlnet is not trainable:
        frozen["controlnet"] = parts.controlnet
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(unet, parts.controlnet if parts.controlnet is trainable else None)
    denoiser = Denoiser(unet, trainable, parts.controlnet, guider)
    return Stage(spec, denoiser, frozen, base, parts.clip, parts.notes)


def export(spec: StageSpec, module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Write a trained ``module`` in the pack's own format for ``spec``'s loader node, with ``metadata``."""
    if spec.trains == "motion":
        save_motion_module(module, path, metadata)
    elif spec.trains == "controlnet":
        save_video_controlnet(module, path, metadata=metadata)
    else:
        weights, meta = guider_state_dict({slot: source.source_weights() for slot, source in module.sources.items()})
        save_state_dict(weights, path, {**meta, **metadata})
