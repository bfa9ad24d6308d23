"""What motion blocks cost: U-Net step time with and without them next to their FLOP ratio, and peak memory by frames.

    python benchmarks/bench_motion.py                            # CPU: SD1.5 widths at 128², 16 frames (~10 min
                                                                 # on 2 cores; --channels 64 for a quick look)
    python benchmarks/bench_motion.py --device cuda --full-size  # full SD1.5 + full motion module, 512², 16 and 64
                                                                 # frames, fp16, CFG batch of 2 (add --diffusers)

Needs a ComfyUI tree (``COMFYUI_DIR``) and what its U-Net and node API import: Pillow, psutil, PyAV (av).

The U-Net is ComfyUI's own ``UNetModel`` (random weights) and the motion blocks are injected exactly as the Apply
Motion Module node does (``nodes/motion.py``: sites, ``MotionSlot``, ``forward_timestep_embed_patch``, ComfyUI's
casting layers). Each step is one U-Net call on cond and uncond videos together (batch ``2·F``). FLOPs are counted with
``torch.utils.flop_counter`` (attention through the math kernel so every matmul is seen). Target: time ratio at most
1.1x the FLOP ratio. ``--diffusers`` also times diffusers' ``UNetMotionModel`` (SD1.5 + MotionAdapter, random
weights) in the same run when diffusers is importable. Bare and patched steps alternate and the medians are compared,
so a busy machine slows both alike; diffusers' bare and motion U-Nets alternate the same way. Peak memory of one step beyond the weights: the CUDA allocator's peak, or on CPU
the peak of live tensor storage created during the step; "windowed" runs the frames in context windows of 16
(overlap 4) as ComfyUI's context windows do, so memory follows the window rather than the video.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
import weakref
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))

SD15 = dict(image_size=32, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
            num_heads=8, use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1,
            context_dim=768, use_linear_in_transformer=False)
WINDOW, OVERLAP = 16, 4


def setup_comfy(device: str):
    """Import ComfyUI (CPU or CUDA) and our node glue as ``dm_nodes.motion``."""
    from devtools.tiny import pack_nodes

    return pack_nodes("motion", cpu=device == "cpu")


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + (1.0 if "norm" in name and name.endswith("weight")
                                                                   else 0.0))
    return module


class Bench:
    """A ComfyUI U-Net with motion blocks that can be switched in and out."""

    def __init__(self, glue, channels: int, dtype: torch.dtype, device: str):
        import comfy.ops
        import comfy.utils
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        from dreamoving_core.motion.model import MotionModule, MotionModuleConfig

        self.glue, self.device, self.dtype = glue, device, dtype
        self.unet = randomise(UNetModel(model_channels=channels, **SD15, dtype=torch.float32)).to(device, dtype)
        config = MotionModuleConfig(channels=tuple(channels * m for m in SD15["channel_mult"]))
        self.motion = randomise(MotionModule(config, ops=comfy.ops.manual_cast)).to(device, dtype)
        sites = glue.injection_sites(self.unet)
        glue.check_motion_fit(self.motion.layout, sites.layout, "random", "the benchmark U-Net")
        pairs = [(f"{kind}.{s.index}", s, b) for kind, levels, blocks in (
                    ("input_blocks", sites.down, self.motion.down_blocks),
                    ("output_blocks", sites.up, self.motion.up_blocks))
                 for level, lb in zip(levels, blocks) for s, b in zip(level, lb)]
        pairs.append(("middle_block", sites.mid, self.motion.mid_block))
        self.swaps = []
        for path, site, block in pairs:
            original = comfy.utils.get_attr(self.unet, path)
            self.swaps.append((path, original, glue._with_slot(original, site.before, glue.MotionSlot(block, 1.0))))
        self.set_motion(False)

    def set_motion(self, on: bool) -> None:
        import comfy.utils

        for path, original, patched in self.swaps:
            comfy.utils.set_attr(self.unet, path, patched if on else original)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One U-Net call on ``x: (2·F, 4, h, w)`` (cond and uncond videos)."""
        t = torch.full((x.shape[0],), 500.0, device=self.device)
        context = torch.zeros(x.shape[0], 77, 768, device=self.device, dtype=self.dtype)
        options = {"patches": {"forward_timestep_embed_patch": [(self.glue.MotionSlot, self.glue.run_motion_slot)]},
                   "cond_or_uncond": [1, 0]}
        return self.unet(x, timesteps=t, context=context, transformer_options=options)

    def windowed_step(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """The step in context windows of ``WINDOW`` frames (ComfyUI's static schedule, flat fusion)."""
        import comfy.context_windows

        handler = types.SimpleNamespace(context_length=WINDOW, context_overlap=OVERLAP)
        videos = x.view(2, frames, *x.shape[1:])
        out = torch.zeros_like(videos)
        counts = torch.zeros(frames, device=x.device, dtype=x.dtype)
        for window in comfy.context_windows.create_windows_static_standard(frames, handler, {}):
            part = self.step(videos[:, window].reshape(-1, *x.shape[1:]))
            out[:, window] += part.view(2, len(window), *x.shape[1:])
            counts[window] += 1
        return (out / counts.view(1, -1, 1, 1, 1)).view_as(x)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(bench: Bench, x: torch.Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds per step without and with motion blocks, measured alternately."""
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for motion in (False, True):
                bench.set_motion(motion)
                sync(bench.device)
                start = time.perf_counter()
                bench.step(x)
                sync(bench.device)
                if i >= warmup:
                    times[motion].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def alternate_calls(fns, device: str, warmup: int, iters: int) -> list[float]:
    """Median seconds per call of each of ``fns``, called in turn in every round (as our pair is timed), so the
    reference's pair is measured under the same load."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for i in range(warmup + iters):
            for k, fn in enumerate(fns):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if i >= warmup:
                    times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the block and still alive (CPU has no allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.holders: dict[int, list[int]] = {}  # storage pointer -> [tensors alive, bytes]

    def _release(self, ptr: int) -> None:
        entry = self.holders.get(ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.holders[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.holders:
                    self.holders[ptr] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.holders[ptr][0] += 1
                weakref.finalize(tensor, self._release, ptr)
        return out


def peak_mib(fn, device: str, training: bool = False) -> float:
    """MiB that ``fn()`` adds at its peak: CUDA's allocator statistics, else the tensor storage it creates
    (``PeakTensorMemory``); run under inference mode unless ``training`` (a step that needs autograd)."""
    with torch.inference_mode(not training):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        with PeakTensorMemory() as tracker:
            fn()
        return tracker.peak / 2**20


def count_flops(fn, x) -> int:
    """FLOPs of ``fn(x)``. On CPU attention goes through the math kernel so every matmul is seen; on CUDA the flash /
    memory-efficient kernels are counted by their own formulas (the math kernel's attention matrices of 64 frames at
    512² do not fit in memory)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math_only = sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else nullcontext()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter, math_only:
        fn(x)
    return counter.get_total_flops()


def latent(frames: int, size: int, dtype, device) -> torch.Tensor:
    return torch.randn(2 * frames, 4, size // 8, size // 8, device=device, dtype=dtype)


def diffusers_models(channels: int, dtype, device):
    """diffusers' SD1.5-layout U-Net of base width ``channels`` and its AnimateDiff ``UNetMotionModel`` (random
    weights), or None without diffusers."""
    try:
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    except ImportError:
        return None
    widths = tuple(channels * m for m in SD15["channel_mult"])
    unet2d = UNet2DConditionModel(block_out_channels=widths, cross_attention_dim=768, sample_size=64)
    adapter = MotionAdapter(block_out_channels=widths, motion_max_seq_length=64)
    motion = UNetMotionModel.from_unet2d(unet2d, adapter)
    return unet2d.to(device, dtype).eval(), motion.to(device, dtype).eval()


def diffusers_rows(args) -> list[dict]:
    models = diffusers_models(args.channels, args.dtype, args.device)
    if models is None:
        print("diffusers is not importable: skipping its AnimateDiff U-Net")
        return []
    unet2d, motion = models
    rows = []
    for frames in args.frames:
        hidden = torch.zeros(2 * frames, 77, 768, device=args.device, dtype=args.dtype)  # per frame, as its pipeline
        flat = latent(frames, args.size, args.dtype, args.device)
        video = flat.view(2, frames, *flat.shape[1:]).transpose(1, 2)  # (videos, C, F, h, w)
        bare, with_motion = alternate_calls([lambda: unet2d(flat, 500, hidden).sample,
                                             lambda: motion(video, 500, hidden).sample],
                                            args.device, args.warmup, args.iters)
        peak = peak_mib(lambda: motion(video, 500, hidden).sample, args.device)
        rows.append({"impl": "diffusers", "frames": frames, "bare_ms": bare * 1e3, "motion_ms": with_motion * 1e3,
                     "motion_step_peak_mib": peak})
        print(f"diffusers  {frames:4d} frames: bare {bare * 1e3:8.1f} ms  with motion {with_motion * 1e3:8.1f} ms  "
              f"time ratio {with_motion / bare:.3f}  step peak {peak:.0f} MiB")
    return rows


def memory_rows(bench: Bench, args) -> list[dict]:
    bench.set_motion(True)
    rows = []
    for frames in args.memory_frames:
        x = latent(frames, args.size, args.dtype, args.device)
        row = {"frames": frames, "whole_mib": None}
        if frames <= bench.motion.config.positional_length:  # longer videos only run in windows
            try:
                row["whole_mib"] = peak_mib(partial(bench.step, x), args.device)
            except torch.OutOfMemoryError:
                row["whole_mib"] = float("inf")
        row["windowed_mib"] = peak_mib(partial(bench.windowed_step, x, frames), args.device)
        rows.append(row)
        del x
        whole = "n/a (more frames than positions)" if row["whole_mib"] is None else f"{row['whole_mib']:9.0f} MiB"
        print(f"memory {frames:4d} frames: whole video {whole}   windows of {WINDOW}: {row['windowed_mib']:9.0f} MiB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full-size", action="store_true", help="512², 16 and 64 frames, memory up to 128 frames")
    parser.add_argument("--channels", type=int, default=320, help="U-Net base width (SD1.5: 320)")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (latent is size/8)")
    parser.add_argument("--frames", type=int, nargs="+", default=[16])
    parser.add_argument("--memory-frames", type=int, nargs="*", default=[16, 32, 64],
                        help="frame counts for the peak-memory sweep (none: skip it)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' UNetMotionModel")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.full_size:
        args.channels, args.size = 320, 512
        args.frames = [16, 64] if args.frames == [16] else args.frames
        args.memory_frames = [16, 64, 128] if args.memory_frames == [16, 32, 64] else args.memory_frames
    args.dtype = torch.float16 if args.device == "cuda" else torch.float32

    glue = setup_comfy(args.device)
    bench = Bench(glue, args.channels, args.dtype, args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device_name}; U-Net width {args.channels}, {args.size}x{args.size}, {args.dtype}, CFG batch of 2; "
          f"motion blocks: {sum(p.numel() for p in bench.motion.parameters()) / 1e6:.1f} M parameters")
    rows = []
    for frames in args.frames:
        x = latent(frames, args.size, args.dtype, args.device)
        bench.set_motion(False)
        bare_flops = count_flops(bench.step, x)
        bench.set_motion(True)
        motion_flops = count_flops(bench.step, x)
        bare, with_motion = time_steps(bench, x, args.warmup, args.iters)
        time_ratio, flop_ratio = with_motion / bare, motion_flops / bare_flops
        rows.append({"impl": "ours", "frames": frames, "bare_ms": bare * 1e3, "motion_ms": with_motion * 1e3,
                     "bare_tflop": bare_flops / 1e12, "motion_tflop": motion_flops / 1e12, "time_ratio": time_ratio,
                     "flop_ratio": flop_ratio, "ratio_of_ratios": time_ratio / flop_ratio})
        print(f"ours       {frames:4d} frames: bare {bare * 1e3:8.1f} ms  with motion {with_motion * 1e3:8.1f} ms  "
              f"time ratio {time_ratio:.3f}  FLOP ratio {flop_ratio:.3f} ({bare_flops / 1e12:.2f} -> "
              f"{motion_flops / 1e12:.2f} TFLOP)  time/FLOP {time_ratio / flop_ratio:.3f} (target <= 1.1)")
        del x
    if args.diffusers:
        rows += diffusers_rows(args)
    memory = memory_rows(bench, args) if args.memory_frames else []
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "channels": args.channels, "size": args.size,
                                         "steps": rows, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
