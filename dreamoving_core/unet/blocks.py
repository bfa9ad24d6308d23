"""Stable Diffusion 1.5 U-Net building blocks in plain torch, named like the original LDM code.

Parameter names follow the LDM / ControlNet checkpoints (``in_layers.2.weight``, ``transformer_blocks.0.attn2.to_k``,
``op.weight``, ...), so a ``control_model.*`` state dict loads into modules built from these blocks without any key
translation. Only what the ControlNet encoder half needs is here: timestep embedding, ResBlock, SpatialTransformer
(self-attention, cross-attention, GEGLU feed-forward), Downsample and the small conv helpers.

Layers come from ``ops`` (``dreamoving_core.ops``: ``torch.nn`` by default, a host's casting layers in ComfyUI) and
attention from the ``attention`` backend passed per call (``dreamoving_core.attention``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..attention import AttentionFn, sdpa_attention
from ..ops import TORCH_OPS


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding ``(N,) -> (N, dim)``, cosines first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def group_norm(channels: int, eps: float = 1e-5, ops=TORCH_OPS) -> nn.GroupNorm:
    """The 32-group normalisation every SD block uses."""
    return ops.GroupNorm(32, channels, eps=eps)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, ops=TORCH_OPS) -> nn.Conv2d:
    return ops.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def zero_conv(in_channels: int, out_channels: int | None = None, kernel_size: int = 1, ops=TORCH_OPS) -> nn.Conv2d:
    """A convolution initialised to zero (ControlNet's outputs, silent until trained); 1x1 by default."""
    conv = ops.Conv2d(in_channels, out_channels or in_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class TimestepBlock(nn.Module):
    """A block that also takes the timestep embedding ``emb: (N, E)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ContextBlock(nn.Module):
    """A block that also takes the text context ``context: (N, L, D)`` and the attention backend."""

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to ResBlocks and ``context`` (and ``attention``) to transformers (LDM's
    container, so child indices, and with them the checkpoint keys, stay ``input_blocks.N.M``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        return run_layers(self, x, emb, context, attention)


def run_layers(layers: Iterable[nn.Module], x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
               attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """Run ``layers`` in order as ``TimestepEmbedSequential`` does (a part of a block, e.g. up to a motion block)."""
    for layer in layers:
        if isinstance(layer, TimestepBlock):
            x = layer(x, emb)
        elif isinstance(layer, ContextBlock):
            x = layer(x, context, attention)
        else:
            x = layer(x)
    return x


class ResBlock(TimestepBlock):
    """LDM residual block: ``(N, C_in, H, W), emb (N, E) -> (N, C_out, H, W)``."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, ops=TORCH_OPS):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(group_norm(channels, ops=ops), nn.SiLU(),
                                       conv3x3(channels, out_channels, ops=ops))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, ops=ops), nn.SiLU(), nn.Dropout(0.0),
                                        conv3x3(out_channels, out_channels, ops=ops))
        self.skip_connection = nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: ``(N, C, H, W) -> (N, C, H/2, W/2)``."""

    def __init__(self, channels: int, ops=TORCH_OPS):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Attention(nn.Module):
    """Multi-head attention of ``x: (N, L, C)`` over ``context: (N, S, D)`` (itself when ``context`` is None)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, ops=TORCH_OPS):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """Gated GELU projection ``(N, L, C) -> (N, L, C_out)``: ``a * gelu(b)`` of the two halves of one projection."""

    def __init__(self, dim_in: int, dim_out: int, ops=TORCH_OPS):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``(N, L, C) -> (N, L, C)`` with a ``mult``-times wider hidden layer."""

    def __init__(self, dim: int, mult: int = 4, ops=TORCH_OPS):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult, ops), nn.Dropout(0.0), ops.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; pre-norm residuals. ``(N, L, C) -> (N, L, C)``."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, ops=TORCH_OPS):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head, ops=ops)
        self.ff = FeedForward(dim, ops=ops)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, ops=ops)
        self.norm1 = ops.LayerNorm(dim)
        self.norm2 = ops.LayerNorm(dim)
        self.norm3 = ops.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), attention=attention)
        x = x + self.attn2(self.norm2(x), context, attention)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ContextBlock):
    """SD1.5 spatial transformer (1x1 conv projections): ``(N, C, H, W), context (N, L, D) -> (N, C, H, W)``."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1, ops=TORCH_OPS):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6, ops=ops)
        self.proj_in = ops.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, ops) for _ in range(depth))
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = rearrange(self.proj_in(self.norm(x)), "n c h w -> n (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context, attention)
        h = rearrange(h, "n (h w) c -> n c h w", h=height, w=width)
        return x + self.proj_out(h)
