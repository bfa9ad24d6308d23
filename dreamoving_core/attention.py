"""Multi-head softmax attention: the one attention function of every DreaMoving block, with a pluggable backend.

The SD1.5 blocks (Video ControlNet), the motion blocks, the Content Guider (Eq. 1 and its resamplers) and the CLIP
image tower all attend through an ``AttentionFn``: ``fn(q, k, v, heads) -> out`` on ``(B, L, heads·d)`` queries and
``(B, S, heads·d)`` keys and values, returning ``(B, L, heads·d)`` = ``softmax(Q Kᵀ/√d) V`` per head. Blocks take it
per call (``attention=``), so a host chooses the kernel at run time without any global state: plain Python gets
:func:`sdpa_attention` (torch's fused SDPA); ComfyUI passes its ``optimized_attention`` (xformers, sage, split or
PyTorch attention, and a model's ``optimized_attention_override``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(q (B, L, h·d), k (B, S, h·d), v (B, S, h·d), heads) -> (B, L, h·d)``."""


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(Q Kᵀ/√d) V`` per head with torch's ``scaled_dot_product_attention``: ``(B, L, h·d)``."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
