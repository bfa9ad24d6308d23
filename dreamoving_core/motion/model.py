"""Motion blocks: AnimateDiff's temporal transformer, placed after the U-Net's blocks to mix features across frames.

DreaMoving (like AnimateDiff) keeps the SD1.5 U-Net per-frame and inserts a ``MotionBlock`` after every res(+attention)
layer of the down and up blocks (and, for formats that have one, after the middle block's attention). Frames travel
folded into the batch, ``(B·F, C, H, W)``; a motion block unfolds them, lets every pixel attend over the ``F``
frames, and adds the result back as a residual. The output projection starts at zero, so a freshly initialised block
is the identity.

Positions are encoded with a sinusoidal table of ``positional_length`` rows (AnimateDiff v1: 24, v2/v3: 32,
DreaMoving: 64); a window of ``F`` frames uses rows ``0..F-1``. ``extend_positional_encoding`` stretches a table to
any length, by recomputing the sinusoid for the new rows or by interpolating the stored ones.

Module names follow AnimateDiff's checkpoints (``temporal_transformer.proj_in``,
``transformer_blocks.0.attention_blocks.1.pos_encoder.pe``, ``ff.net.0.proj``...), see ``motion.format`` for the
file key maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..attention import AttentionFn, sdpa_attention
from ..errors import InputMismatchError
from ..ops import TORCH_OPS
from ..unet.blocks import FeedForward
from ..unet.topology import Layout, module_layout

DEFAULT_POSITIONAL_LENGTH = 64
PE_EXTENSIONS = ("sinusoid", "interpolate")
PeExtension = Literal["sinusoid", "interpolate"]


def sinusoidal_positions(length: int, channels: int) -> torch.Tensor:
    """AnimateDiff's positional table ``(1, length, channels)``: sines in even channels, cosines in odd ones."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    pe = torch.zeros(1, length, channels)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def extend_positional_encoding(pe: torch.Tensor, length: int, method: PeExtension = "sinusoid") -> torch.Tensor:
    """Resize a positional table ``(1, L, C)`` to ``(1, length, C)``.

    ``"sinusoid"`` keeps the stored rows and computes rows ``L..length-1`` from the sinusoid formula (exact for
    AnimateDiff's fixed tables; positions past ``L`` were never seen in training). ``"interpolate"`` resamples the
    stored rows linearly onto ``length`` positions (first and last rows kept), so a window of ``length`` frames
    spans the positions the module was trained on. Shrinking with ``"sinusoid"`` truncates.
    """
    if method not in PE_EXTENSIONS:
        raise ValueError(f"unknown positional-encoding extension '{method}'; expected one of {PE_EXTENSIONS}")
    if length < 1:
        raise ValueError(f"positional length must be at least 1, got {length}")
    stored = pe.shape[1]
    if length == stored:
        return pe
    if method == "interpolate":
        if stored == 1:
            return pe.expand(1, length, pe.shape[2]).clone()
        resized = F.interpolate(rearrange(pe.float(), "1 l c -> 1 c l"), size=length, mode="linear",
                                align_corners=True)
        return rearrange(resized, "1 c l -> 1 l c").to(pe.dtype)
    if length < stored:
        return pe[:, :length].clone()
    fresh = sinusoidal_positions(length, pe.shape[2]).to(device=pe.device, dtype=pe.dtype)
    fresh[:, :stored] = pe
    return fresh


@dataclass(frozen=True)
class MotionModuleConfig:
    """Shape of a motion module, read from a file's keys or chosen for a new module.

    ``channels`` are the U-Net's widths per level, outermost first (SD1.5: 320, 640, 1280, 1280). Each down level
    holds ``down_layers`` motion blocks (one per res layer) and each up level ``up_layers`` (res layers + 1).
    ``up_blocks[0]`` is the innermost up level, as in the U-Net's decoder order. ``version`` names the source
    format (``"v1"``, ``"v2"``, ``"v3"``, ``"dreamoving"``); it does not change the motion blocks' maths, only how
    the U-Net around them normalises (``unet_norms_span_frames``).
    """

    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_layers: int = 2
    up_layers: int = 3
    mid_block: bool = True
    positional_length: int = DEFAULT_POSITIONAL_LENGTH
    num_heads: int = 8
    attention_blocks: int = 2
    transformer_layers: int = 1
    ff_mult: int = 4
    norm_groups: int = 32
    version: str = "dreamoving"

    @property
    def mid_channels(self) -> int:
        return self.channels[-1]

    @property
    def unet_norms_span_frames(self) -> bool:
        """AnimateDiff v1 was trained in a U-Net whose ResBlock and output group norms take their statistics over all
        frames of a video (its "inflated" 3D U-Net without ``use_inflated_groupnorm``); v2, v3 and ours per frame."""
        return self.version == "v1"


class PositionalEncoding(nn.Module):
    """Adds ``pe[:, :F]`` to a ``(N, F, C)`` sequence of frames."""

    def __init__(self, channels: int, length: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(length, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        if frames > self.pe.shape[1]:
            raise InputMismatchError(
                f"{frames} frames in one pass but the motion module has only {self.pe.shape[1]} positions; use "
                f"context windows of at most {self.pe.shape[1]} frames, or load the motion module with a longer "
                "positional length")
        return x + self.pe[:, :frames].to(dtype=x.dtype, device=x.device)


class TemporalSelfAttention(nn.Module):
    """Self-attention over frames: ``(N, F, C) -> (N, F, C)``, every spatial position ``N`` on its own."""

    def __init__(self, channels: int, num_heads: int, positional_length: int, ops=TORCH_OPS):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = ops.Linear(channels, channels, bias=False)
        self.to_k = ops.Linear(channels, channels, bias=False)
        self.to_v = ops.Linear(channels, channels, bias=False)
        self.to_out = nn.Sequential(ops.Linear(channels, channels), nn.Dropout(0.0))
        self.pos_encoder = PositionalEncoding(channels, positional_length)

    def forward(self, x: torch.Tensor, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        x = self.pos_encoder(x)
        return self.to_out(attention(self.to_q(x), self.to_k(x), self.to_v(x), self.num_heads))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal attention blocks, then a GEGLU feed-forward, each with a residual: ``(N, F, C)``."""

    def __init__(self, channels: int, config: MotionModuleConfig, ops=TORCH_OPS):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalSelfAttention(channels, config.num_heads, config.positional_length, ops)
            for _ in range(config.attention_blocks))
        self.norms = nn.ModuleList(ops.LayerNorm(channels) for _ in range(config.attention_blocks))
        self.ff = FeedForward(channels, config.ff_mult, ops)
        self.ff_norm = ops.LayerNorm(channels)

    def forward(self, x: torch.Tensor, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        for block, norm in zip(self.attention_blocks, self.norms):
            x = block(norm(x), attention) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    """The temporal residual of AnimateDiff's temporal transformer: ``(B·F, C, H, W) -> (B, F, C, H, W)``.

    Group norm per frame, projection in, the transformer blocks over frames at each pixel, projection out (zero at
    initialisation). The input itself is not added here. The frames are folded once, into the projection in; the
    residual comes back as a strided view of the ``(B·H·W, F, C)`` sequences, so unfolding costs no copy: the
    caller's residual add reads it in place.
    """

    def __init__(self, channels: int, config: MotionModuleConfig, ops=TORCH_OPS):
        super().__init__()
        self.norm = ops.GroupNorm(config.norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = ops.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, config, ops) for _ in range(config.transformer_layers))
        self.proj_out = ops.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        _, _, height, width = hidden_states.shape
        x = self.norm(hidden_states)
        x = rearrange(x, "(b f) c h w -> (b h w) f c", f=num_frames)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, attention)
        x = self.proj_out(x)
        return rearrange(x, "(b h w) f c -> b f c h w", h=height, w=width)


class MotionBlock(nn.Module):
    """One AnimateDiff motion module (``motion_modules.N`` in AnimateDiff files), inserted after a U-Net layer.

    ``forward(hidden_states (B·F, C, H, W), num_frames, scale, attention) -> (B·F, C, H, W)`` returns
    ``hidden_states + scale * temporal_residual``; ``scale == 0`` returns the input untouched (bit-exact).
    Frames of different videos in the batch (e.g. cond and uncond) never attend to each other. ``attention``: the
    backend (``dreamoving_core.attention``).
    """

    def __init__(self, channels: int, config: MotionModuleConfig | None = None, ops=TORCH_OPS):
        super().__init__()
        config = config or MotionModuleConfig()
        self.channels = channels
        self.temporal_transformer = TemporalTransformer(channels, config, ops)

    @property
    def positional_length(self) -> int:
        return self.temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe.shape[1]

    def forward(self, hidden_states: torch.Tensor, num_frames: int, scale: float = 1.0,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        if scale == 0:
            return hidden_states
        if hidden_states.ndim != 4 or hidden_states.shape[1] != self.channels:
            raise InputMismatchError(f"motion block of width {self.channels} got features of shape "
                                     f"{tuple(hidden_states.shape)}; expected (B·F, {self.channels}, H, W)")
        if num_frames < 1 or hidden_states.shape[0] % num_frames:
            raise InputMismatchError(f"a batch of {hidden_states.shape[0]} feature maps does not split into videos of "
                                     f"{num_frames} frames")
        residual = self.temporal_transformer(hidden_states, num_frames, attention)
        videos = hidden_states.view(residual.shape)
        out = videos + residual if scale == 1 else torch.add(videos, residual, alpha=scale)
        return out.view(hidden_states.shape)


class MotionModule(nn.Module):
    """All motion blocks of one U-Net: ``down_blocks[level][j]``, ``mid_block`` (or ``None``), ``up_blocks[level][j]``.

    ``down_blocks[level][j]`` follows the ``j``-th res(+attention) layer of down level ``level``; ``up_blocks[0]`` is
    the innermost up level. ``mid_block`` follows the middle block's attention, before its second res layer.
    """

    def __init__(self, config: MotionModuleConfig | None = None, ops=TORCH_OPS):
        super().__init__()
        self.config = config = config or MotionModuleConfig()
        self.down_blocks = nn.ModuleList(
            nn.ModuleList(MotionBlock(c, config, ops) for _ in range(config.down_layers)) for c in config.channels)
        self.mid_block = MotionBlock(config.mid_channels, config, ops) if config.mid_block else None
        self.up_blocks = nn.ModuleList(
            nn.ModuleList(MotionBlock(c, config, ops) for _ in range(config.up_layers))
            for c in reversed(config.channels))

    @property
    def layout(self) -> Layout:
        """The widths of the U-Net sites this module's blocks are made for (``unet.topology``)."""
        return module_layout(self.down_blocks, self.mid_block, self.up_blocks)

    def blocks(self) -> list[MotionBlock]:
        """Every motion block, in U-Net execution order (down, mid, up)."""
        found = [block for level in self.down_blocks for block in level]
        if self.mid_block is not None:
            found.append(self.mid_block)
        return found + [block for level in self.up_blocks for block in level]
