"""DreaMoving's Video ControlNet: an SD1.5 ControlNet with a motion block after each of its encoder blocks.

The image ControlNet (hint encoder, the U-Net's encoder half, zero convolutions, middle block) runs on every frame,
frames folded into the batch ``(B·F, C, H, W)``. After each encoder layer (ResBlock + SpatialTransformer) and in the
middle block, a temporal ``MotionBlock`` mixes features across the ``F`` frames, so the residuals of one frame depend
on the pose/depth hints of its neighbours. The residuals come out in U-Net order: one per encoder block (the
U-Net's ``input_blocks``, which its decoder consumes in reverse) and one for the middle block.

With ``motion_down`` / ``motion_mid`` absent (or with zero-initialised motion output projections) the model is exactly
the per-frame image ControlNet. The motion blocks sit where ``unet.topology`` places them in any U-Net encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..attention import AttentionFn, sdpa_attention
from ..ops import TORCH_OPS
from ..unet.blocks import (Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, conv3x3, run_layers,
                           timestep_embedding, zero_conv)
from ..unet.topology import Block, MotionSites, motion_sites

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
"""Channel widths of ControlNet's hint encoder convolutions (before the last one, which maps to model_channels).
Every second conv after the first halves the resolution: the hint enters at 8x the latent size."""


@dataclass(frozen=True)
class ControlNetConfig:
    """Shape of an SD-family ControlNet encoder; defaults are SD1.5's.

    ``num_res_blocks`` and ``transformer_depth`` are per level (``len(channel_mult)`` entries); a level with
    transformer depth 0 has no SpatialTransformer (SD1.5's lowest level).
    """

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int = 8
    context_dim: int = 768
    in_channels: int = 4
    hint_channels: int = 3

    @property
    def level_widths(self) -> tuple[int, ...]:
        """Output width of each encoder level."""
        return tuple(self.model_channels * mult for mult in self.channel_mult)

    @property
    def block_layout(self) -> list[tuple[str, int, int]]:
        """``(kind, level, index)`` of each ``input_blocks`` entry: ``("conv_in", 0, 0)``, ``("layer", level, j)``,
        ``("downsample", level, 0)``, in order. Block ``n`` gives residual ``n``."""
        layout = [("conv_in", 0, 0)]
        for level in range(len(self.channel_mult)):
            layout += [("layer", level, j) for j in range(self.num_res_blocks[level])]
            if level != len(self.channel_mult) - 1:
                layout.append(("downsample", level, 0))
        return layout


class ControlResiduals(NamedTuple):
    """Residuals for the U-Net: ``down[n]`` for input block ``n`` (each ``(B·F, C_n, H_n, W_n)``) and ``mid`` for the
    middle block."""

    down: list[torch.Tensor]
    mid: torch.Tensor


class VideoControlNet(nn.Module):
    """SD1.5 ControlNet + motion blocks. Parameter names of the ControlNet part match ``control_model.*`` checkpoints.

    ``motion_down[level][j]`` follows encoder layer ``j`` of ``level`` and ``motion_mid`` follows the middle block's
    attention (where AnimateDiff places it in the U-Net, so a motion module's down/mid blocks fit as trained). Each
    motion block maps ``(B·F, C, H, W), num_frames -> (B·F, C, H, W)``; ``None`` gives a plain ControlNet.
    ``motion_config`` (the blocks' ``MotionModuleConfig``) is kept for saving. ``ops``: the layer classes
    (``dreamoving_core.ops``; the motion blocks come built).
    """

    def __init__(self, config: ControlNetConfig = ControlNetConfig(),
                 motion_down: list[list[nn.Module]] | None = None, motion_mid: nn.Module | None = None,
                 motion_config: object | None = None, ops=TORCH_OPS):
        super().__init__()
        self.config = config
        self.motion_config = motion_config
        ch = config.model_channels
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(ops.Linear(ch, emb_dim), nn.SiLU(), ops.Linear(emb_dim, emb_dim))

        hint_layers: list[nn.Module] = []
        widths = (config.hint_channels, *HINT_WIDTHS)
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            hint_layers += [conv3x3(w_in, w_out, stride=2 if i in (2, 4, 6) else 1, ops=ops), nn.SiLU()]
        hint_layers.append(zero_conv(widths[-1], ch, kernel_size=3, ops=ops))
        self.input_hint_block = nn.Sequential(*hint_layers)

        blocks: list[nn.Module] = []
        for kind, level, _ in config.block_layout:
            width = config.level_widths[level]
            if kind == "conv_in":
                blocks.append(TimestepEmbedSequential(conv3x3(config.in_channels, ch, ops=ops)))
            elif kind == "layer":
                layers = [ResBlock(ch, emb_dim, width, ops)]
                ch = width
                if config.transformer_depth[level] > 0:
                    layers.append(SpatialTransformer(ch, config.num_heads, config.context_dim,
                                                     config.transformer_depth[level], ops))
                blocks.append(TimestepEmbedSequential(*layers))
            else:
                blocks.append(TimestepEmbedSequential(Downsample(ch, ops)))
        self.input_blocks = nn.ModuleList(blocks)
        self.zero_convs = nn.ModuleList(
            TimestepEmbedSequential(zero_conv(self.block_widths[n], ops=ops)) for n in range(len(blocks)))
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ops=ops),
            SpatialTransformer(ch, config.num_heads, config.context_dim, config.transformer_depth_middle, ops),
            ResBlock(ch, emb_dim, ops=ops))
        self.middle_block_out = TimestepEmbedSequential(zero_conv(ch, ops=ops))

        self.motion_down = None if motion_down is None else nn.ModuleList(nn.ModuleList(level) for level in motion_down)
        self.motion_mid = motion_mid
        sites = self.motion_sites
        self._motion_after = {site.index: (level, j) for level, level_sites in enumerate(sites.down)
                              for j, site in enumerate(level_sites)}
        self._mid_motion_at = sites.mid.before

    @property
    def block_widths(self) -> list[int]:
        """Channels of each residual in ``ControlResiduals.down``."""
        widths, ch = [], self.config.model_channels
        for kind, level, _ in self.config.block_layout:
            if kind == "layer":
                ch = self.config.level_widths[level]
            widths.append(ch)
        return widths

    @property
    def motion_sites(self) -> MotionSites:
        """Where motion blocks go in this encoder (``unet.topology``: after each res(+attention) layer, and after
        the middle block's attention)."""
        return motion_sites([_describe(block) for block in self.input_blocks], _describe(self.middle_block))

    @property
    def has_motion(self) -> bool:
        return self.motion_down is not None or self.motion_mid is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                num_frames: int, attention: AttentionFn = sdpa_attention) -> ControlResiduals:
        """Residuals for one denoising step.

        x: noisy latents ``(B·F, 4, h, w)``; hint: control images ``(B·F, 3, 8h, 8w)`` in [0, 1];
        timesteps: ``(B·F,)``; context: text embeddings ``(B·F, L, 768)``; ``num_frames``: F (frames are the inner
        index of the folded batch, as ComfyUI lays out video latents); ``attention``: the backend
        (``dreamoving_core.attention``).
        """
        if x.shape[0] % num_frames:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of num_frames={num_frames}")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        guided_hint = self.input_hint_block(hint)

        down = []
        h = x
        for n, (block, out_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context, attention)
            if n == 0:
                h = h + guided_hint
            if n in self._motion_after and self.motion_down is not None:
                level, j = self._motion_after[n]
                h = self.motion_down[level][j](h, num_frames, attention=attention)
            down.append(out_conv(h, emb, context))

        middle = list(self.middle_block)
        h = run_layers(middle[:self._mid_motion_at], h, emb, context, attention)
        if self.motion_mid is not None:
            h = self.motion_mid(h, num_frames, attention=attention)
        h = run_layers(middle[self._mid_motion_at:], h, emb, context, attention)
        return ControlResiduals(down, self.middle_block_out(h, emb, context))


def _describe(block: TimestepEmbedSequential) -> Block:
    """A block's layer kinds and width for ``unet.topology``."""
    kinds = tuple("res" if isinstance(layer, ResBlock) else "attn" if isinstance(layer, SpatialTransformer)
                  else "down" if isinstance(layer, Downsample) else "other" for layer in block)
    width = next((layer.out_layers[-1].out_channels for layer in block if isinstance(layer, ResBlock)), None)
    return Block(kinds, width)
