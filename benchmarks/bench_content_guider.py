"""Cost of the Content Guider's cross-attention (Eq. 1: text + face + cloth) against text-only, as a time ratio
next to the FLOP ratio (``torch.utils.flop_counter``). Target: time ratio ≤ 1.1 × FLOP ratio, i.e. face + cloth add
only their own attention — the text attention is computed once.

One SD1.5 cross-attention layer (``attn2``: to_q/to_k/to_v, attention, to_out) at the first U-Net level, CFG batch
of 2 × frames, with 77 text tokens, 4 face tokens (FaceID-Plus) and 16 cloth tokens (plus resampler).

    python benchmarks/bench_content_guider.py                      # CPU, small: 8 frames at 256²
    python benchmarks/bench_content_guider.py --frames 16 --size 512 --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamoving_core.guider.model import AttentionTerm, ContentKV, decoupled_cross_attention, sdpa_attention  # noqa: E402
from dreamoving_core.guider.kernel import fused_decoupled_cross_attention  # noqa: E402


def matmul_attention(q, k, v, heads):
    """softmax(Q Kᵀ/√d) V with explicit matmuls (the FLOP counter does not see CPU SDPA kernels)."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return rearrange(weights @ v, "b h n d -> b n (h d)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image size; latent tokens = (size/8)²")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", choices=["sdpa", "matmul"], default=None,
                        help="default: sdpa on CUDA, matmul on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    attention = {"sdpa": sdpa_attention, "matmul": matmul_attention}[
        args.attention or ("sdpa" if device.type == "cuda" else "matmul")]

    dim, heads, context = 320, 8, 768
    batch, tokens = 2 * args.frames, (args.size // 8) ** 2
    g = torch.Generator().manual_seed(0)
    layers = {n: torch.nn.Linear(i, o, bias=n == "to_out").to(device, dtype)
              for n, i, o in (("to_q", dim, dim), ("to_k", context, dim), ("to_v", context, dim), ("to_out", dim, dim))}
    x = torch.randn(batch, tokens, dim, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, context, generator=g).to(device, dtype)
    face = ContentKV([torch.randn(2, 4, dim, generator=g)], [torch.randn(2, 4, dim, generator=g)])
    cloth = ContentKV([torch.randn(2, 16, dim, generator=g)], [torch.randn(2, 16, dim, generator=g)])
    cond_or_uncond = [0, 1]

    def attn2(mode: str) -> torch.Tensor:
        q, k, v = layers["to_q"](x), layers["to_k"](text), layers["to_v"](text)
        terms = [AttentionTerm(a, *kv.for_batch(0, cond_or_uncond, batch, device, dtype))
                 for a, kv in ((1.0, face), (0.8, cloth))] if mode != "text" else []
        out = fused_decoupled_cross_attention(q, k, v, heads, terms) if mode == "fused" else None
        if out is None:
            out = decoupled_cross_attention(q, k, v, heads, terms, attention=attention)
        return layers["to_out"](out)

    def timed(mode: str) -> float:
        with torch.inference_mode():
            for _ in range(2):
                attn2(mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                attn2(mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.repeats

    modes = ["text", "separate"] + (["fused"] if device.type == "cuda" else [])
    flops = {}
    for mode in modes:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            attn2(mode)
        flops[mode] = counter.get_total_flops()
    flops["fused"] = flops["separate"]  # the kernel does the same math; the counter cannot see inside Triton
    times = {}
    for mode in modes * 2:  # interleaved, best of two
        times[mode] = min(times.get(mode, math.inf), timed(mode))
    if "fused" in modes:
        with torch.inference_mode():
            err = (attn2("fused") - attn2("separate")).abs().max().item()
    print(f"device={device} dtype={args.dtype} attention={attention.__name__} batch={batch} tokens={tokens}")
    flop_ratio = flops["separate"] / flops["text"]
    for mode in modes:
        label = {"text": "text-only", "separate": "face+cloth, one call per term",
                 "fused": "face+cloth, one fused kernel"}[mode]
        line = f"{label:32s}: {times[mode] * 1e3:8.3f} ms  {flops[mode] / 1e9:8.2f} GFLOP"
        if mode != "text":
            ratio = times[mode] / times["text"]
            line += f"  time ratio {ratio:.3f}  FLOP ratio {flop_ratio:.3f}  time/FLOP {ratio / flop_ratio:.3f}"
        print(line)
    if "fused" in modes:
        print(f"fused vs separate max abs difference: {err:.2e}")
    print("target: time/FLOP ≤ 1.10")

if __name__ == "__main__":
    main()
