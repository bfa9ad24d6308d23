"""What the Video ControlNet costs: its step time against a plain per-frame ControlNet, next to their FLOP ratio.

    python benchmarks/bench_video_controlnet.py                            # CPU, 64-wide SD1.5 layout, 256², 8 frames
    python benchmarks/bench_video_controlnet.py --device cuda --full-size  # SD1.5 widths, 512², 16 frames, fp16,
                                                                           # + the full step (add --diffusers)

Both models are ``dreamoving_core.video_controlnet.VideoControlNet`` with random weights in the SD1.5 layout; the
Video ControlNet adds a motion block after each encoder layer and in the middle block (as loaded from a ControlNet +
an AnimateDiff v2-shaped motion module). One step is one call on the cond and uncond videos together (batch ``2·F``,
hints at 8x the latent size). FLOPs are counted with ``torch.utils.flop_counter`` (attention through the math
kernel so every matmul is seen); times are the best of ``--iters`` calls, plain and video alternating. Target: time
ratio at most 1.1x the FLOP ratio.

``--full-size`` (or ``--full-step`` at any size) also times the whole denoising step the nodes run: the Video
ControlNet's residuals fed to ComfyUI's SD1.5 ``UNetModel`` with motion blocks injected as Apply Motion Module does
(the harness of ``bench_motion.py``), against a per-frame ControlNet in the same step; ``--diffusers`` adds diffusers'
``UNetMotionModel`` + ``ControlNetModel`` (random weights) in the same run when diffusers is importable (the issue's
reference: 211 ms on an H100 for 16 frames).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))
sys.path.insert(0, str(PACK_DIR / "benchmarks"))

from bench_motion import Bench, count_flops, randomise, setup_comfy, sync  # noqa: E402
from dreamoving_core.motion.model import MotionModule, MotionModuleConfig  # noqa: E402
from dreamoving_core.control.model import ControlNetConfig, VideoControlNet  # noqa: E402


def controlnets(channels: int, dtype: torch.dtype, device: str) -> tuple[VideoControlNet, VideoControlNet]:
    """(plain, video) ControlNets sharing the same ControlNet weights; random, non-zero everywhere."""
    config = ControlNetConfig(model_channels=channels)
    plain = randomise(VideoControlNet(config)).to(device, dtype).eval()
    motion = randomise(MotionModule(MotionModuleConfig(channels=config.level_widths, up_layers=0)), seed=1)
    video = VideoControlNet(config, [list(level) for level in motion.down_blocks], motion.mid_block)
    video.load_state_dict(plain.state_dict(), strict=False)
    return plain, video.to(device, dtype).eval()


class ControlStep:
    """``fn(x)`` for the timers: the ControlNet on ``x: (2·F, 4, h, w)`` with fixed hints, text and timesteps."""

    def __init__(self, model: VideoControlNet, frames: int, size: int, dtype, device):
        self.model, self.frames = model, frames
        batch = 2 * frames
        self.hint = torch.rand(batch, 3, size, size, device=device, dtype=dtype)
        self.context = torch.zeros(batch, 77, 768, device=device, dtype=dtype)
        self.t = torch.full((batch,), 500.0, device=device)

    def __call__(self, x: torch.Tensor):
        return self.model(x, self.hint, self.t, self.context, self.frames)


class FullStep:
    """ControlNet residuals, then ComfyUI's U-Net (motion blocks on) consuming them: one denoising step."""

    def __init__(self, unet: Bench, control: ControlStep):
        self.unet, self.control = unet, control

    def __call__(self, x: torch.Tensor):
        res = self.control(x)
        options = {"patches": {"forward_timestep_embed_patch": [(self.unet.glue.MotionSlot,
                                                                 self.unet.glue.run_motion_slot)]},
                   "cond_or_uncond": [1, 0]}
        control = {"input": [], "middle": [res.mid], "output": list(res.down)}
        return self.unet.unet(x, timesteps=self.control.t, context=self.control.context, control=control,
                              transformer_options=options)


def interleaved_min_times(fns, x, device: str, warmup: int, iters: int) -> list[float]:
    """Best-of-``iters`` seconds per call of each ``fn``, alternating them so load changes on a shared machine
    hit both alike."""
    best = [float("inf")] * len(fns)
    with torch.inference_mode():
        for i in range(warmup + iters):
            for k, fn in enumerate(fns):
                sync(device)
                start = time.perf_counter()
                fn(x)
                sync(device)
                if i >= warmup:
                    best[k] = min(best[k], time.perf_counter() - start)
    return best


def compare(name: str, plain_fn, video_fn, x, args) -> dict:
    plain_flops, video_flops = count_flops(plain_fn, x), count_flops(video_fn, x)
    plain_s, video_s = interleaved_min_times([plain_fn, video_fn], x, args.device, args.warmup, args.iters)
    time_ratio, flop_ratio = video_s / plain_s, video_flops / plain_flops
    print(f"{name:28s} plain {plain_s * 1e3:9.1f} ms  video {video_s * 1e3:9.1f} ms  time ratio {time_ratio:.3f}  "
          f"FLOP ratio {flop_ratio:.3f} ({plain_flops / 1e12:.3f} -> {video_flops / 1e12:.3f} TFLOP)  "
          f"time/FLOP {time_ratio / flop_ratio:.3f} (target <= 1.1)")
    return {"what": name, "plain_ms": plain_s * 1e3, "video_ms": video_s * 1e3, "plain_tflop": plain_flops / 1e12,
            "video_tflop": video_flops / 1e12, "time_ratio": time_ratio, "flop_ratio": flop_ratio,
            "ratio_of_ratios": time_ratio / flop_ratio}


def diffusers_full_step(frames: int, size: int, dtype, device, warmup: int, iters: int) -> dict | None:
    """diffusers' UNetMotionModel + per-frame ControlNetModel step (random weights), or None without diffusers."""
    try:
        from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    except ImportError:
        print("diffusers is not importable: skipping its AnimateDiff + ControlNet step")
        return None
    unet2d = UNet2DConditionModel(cross_attention_dim=768, sample_size=size // 8)
    controlnet = ControlNetModel.from_unet(unet2d).to(device, dtype).eval()
    unet = UNetMotionModel.from_unet2d(unet2d, MotionAdapter(motion_max_seq_length=32)).to(device, dtype).eval()
    batch = 2 * frames
    hint = torch.rand(batch, 3, size, size, device=device, dtype=dtype)
    text = torch.zeros(batch, 77, 768, device=device, dtype=dtype)

    def step(x):
        down, mid = controlnet(x, 500, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        videos = x.view(2, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        return unet(videos, 500, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid)

    x = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    seconds = interleaved_min_times([step], x, device, warmup, iters)[0]
    print(f"{'diffusers full step':28s} {seconds * 1e3:9.1f} ms (AnimateDiff U-Net + per-frame ControlNet)")
    return {"what": "diffusers full step", "ms": seconds * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full-size", action="store_true", help="SD1.5 widths (320), 512², 16 frames, full step")
    parser.add_argument("--full-step", action="store_true", help="also time U-Net + motion + ControlNet steps")
    parser.add_argument("--channels", type=int, default=64, help="base width (SD1.5: 320)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent is size/8)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' AnimateDiff + ControlNet")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.full_size:
        args.channels, args.size, args.frames = 320, 512, 16 if args.frames == 8 else args.frames
        args.full_step = True
    dtype = torch.float16 if args.device == "cuda" else torch.float32

    glue = setup_comfy(args.device) if args.full_step else None
    plain, video = controlnets(args.channels, dtype, args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    motion_params = sum(p.numel() for n, p in video.named_parameters() if n.startswith("motion_")) / 1e6
    print(f"{device_name}; ControlNet width {args.channels}, {args.size}x{args.size}, {args.frames} frames, {dtype}, "
          f"CFG batch of 2; ControlNet {sum(p.numel() for p in plain.parameters()) / 1e6:.1f} M parameters, motion "
          f"blocks {motion_params:.1f} M")
    x = torch.randn(2 * args.frames, 4, args.size // 8, args.size // 8, device=args.device, dtype=dtype)
    plain_step = ControlStep(plain, args.frames, args.size, dtype, args.device)
    video_step = ControlStep(video, args.frames, args.size, dtype, args.device)
    rows = [compare("ControlNet alone", plain_step, video_step, x, args)]
    if args.full_step:
        unet = Bench(glue, args.channels, dtype, args.device)
        unet.set_motion(True)
        rows.append(compare("U-Net + motion + ControlNet", FullStep(unet, plain_step), FullStep(unet, video_step),
                            x, args))
        if args.diffusers:
            row = diffusers_full_step(args.frames, args.size, dtype, args.device, args.warmup, args.iters)
            rows += [row] if row else []
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "channels": args.channels, "size": args.size,
                                         "frames": args.frames, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
