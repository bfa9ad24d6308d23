"""What a training step costs, per DreaMoving stage: step time and peak memory at the paper's resolution and frame
count, with and without gradient checkpointing; diffusers' own AnimateDiff motion training step (``UNetMotionModel``,
motion parameters only) timed in the same loop, alternately, as the reference for ``long_frame``.

    python benchmarks/bench_train.py                            # CPU: SD1.5 topology at widths 32/64, 64² frames,
                                                                # 4 frames (a few minutes on 2 cores)
    python benchmarks/bench_train.py --device cuda --full-size  # SD1.5 widths at the paper's sizes, bf16 autocast

A step is what ``dreamoving_core.train`` runs per batch after the frozen VAE and text encoder: the stage's
:class:`~dreamoving_core.train.stages.Denoiser` forward on noisy latents, the ε-MSE, backward, AdamW. Weights are
random (no files needed); frozen modules are stored in the autocast dtype, trained ones in float32, as in training.

=================  ==================  =======  =====  =======================================================
stage              size (paper)        frames   batch  trained / frozen
=================  ==================  =======  =====  =======================================================
content_guider     512²                1        8      guider projections + K/V / U-Net
long_frame         256²                64       1      U-Net motion blocks / U-Net
video_controlnet   352²                64       1      Video ControlNet (+ its motion) / U-Net + motion
expression         512²                64       1      U-Net motion blocks / U-Net, Video ControlNet
=================  ==================  =======  =====  =======================================================

Peak memory of a step beyond what is resident before it: the CUDA allocator's peak, or on CPU the peak of live
tensor storage created during the step (``bench_motion.peak_mib``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_motion import peak_mib  # noqa: E402

PAPER = {"content_guider": (512, 1, 8), "long_frame": (256, 64, 1), "video_controlnet": (352, 64, 1),
         "expression": (512, 64, 1)}
TINY = {"content_guider": (64, 1, 2), "long_frame": (64, 4, 1), "video_controlnet": (64, 4, 1),
        "expression": (64, 4, 1)}
CLIP_TOKENS, CLIP_WIDTH = 257, 1280


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sd15_unet(widths: tuple[int, ...]):
    """diffusers' U-Net in SD1.5's topology at level ``widths`` (random weights)."""
    from diffusers import UNet2DConditionModel

    config = json.loads((PACK_DIR / "dreamoving_core/train/sd15/unet/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**{**config, "block_out_channels": list(widths)}).eval().requires_grad_(False)


class Setup:
    """One stage's models on ``device`` and a step on random inputs of the stage's size."""

    def __init__(self, stage: str, widths: tuple[int, ...], size: int, frames: int, batch: int, device: str,
                 dtype: torch.dtype, checkpointing: bool):
        from dreamoving_core.control.model import ControlNetConfig, VideoControlNet
        from dreamoving_core.guider.model import ContentGuider, ImageFeatures
        from dreamoving_core.motion.model import MotionModule, MotionModuleConfig
        from dreamoving_core.train.config import GuiderConfig
        from dreamoving_core.train.stages import Denoiser, enable_gradient_checkpointing, new_source
        from dreamoving_core.train.unet import DreaMovingUNet

        torch.manual_seed(0)
        self.device, self.dtype, self.frames, self.batch = device, dtype, frames, batch
        motion_config = MotionModuleConfig(channels=widths, positional_length=64)
        unet = DreaMovingUNet(sd15_unet(widths), None if stage == "content_guider" else MotionModule(motion_config),
                              guided=stage == "content_guider")
        controlnet = guider = None
        if stage in ("video_controlnet", "expression"):
            motion = MotionModule(motion_config)
            controlnet = VideoControlNet(ControlNetConfig(model_channels=widths[0],
                                                          channel_mult=tuple(w // widths[0] for w in widths)),
                                         [list(level) for level in motion.down_blocks], motion.mid_block,
                                         motion_config)
        if stage == "content_guider":
            layers = unet.cross_attention_layers()
            shape = GuiderConfig() if widths[0] == 320 else GuiderConfig(perceiver_depth=1, perceiver_dim=64)
            sources = {slot: new_source(slot, shape, CLIP_WIDTH, [a.to_k.weight for a in layers],
                                        [a.to_v.weight for a in layers], "bench") for slot in ("face", "cloth")}
            guider = ContentGuider("bench", "dreamoving_content_guider", sources)
        trainable = {"content_guider": guider, "long_frame": unet.motion, "video_controlnet": controlnet,
                     "expression": unet.motion}[stage]
        frozen = [unet.unet] + ([unet.motion] if stage == "video_controlnet" else []) + \
            ([controlnet] if stage == "expression" else [])
        for module in frozen:
            module.to(device, dtype).requires_grad_(False)
        trainable.to(device, torch.float32).train().requires_grad_(True)
        if checkpointing:
            enable_gradient_checkpointing(unet, controlnet if trainable is controlnet else None)
        self.denoiser = Denoiser(unet, trainable, controlnet, guider)
        self.optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-4, weight_decay=1e-2)
        self.trainable_params = sum(p.numel() for p in trainable.parameters())
        n, latent = batch * frames, size // 8
        g = torch.Generator().manual_seed(1)
        self.inputs = dict(sample=torch.randn(n, 4, latent, latent, generator=g), timesteps=torch.randint(
            0, 1000, (n,), generator=g), text=torch.randn(n, 77, 768, generator=g), num_frames=frames)
        self.inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        self.inputs["timesteps"] = self.inputs["timesteps"].view(batch, frames)[:, :1].expand(batch, frames).flatten()
        if controlnet is not None:
            self.inputs["hint"] = torch.rand(n, 3, size, size, generator=g).to(device)
        if guider is not None:
            self.inputs["features"] = {
                "face": ImageFeatures(None, torch.randn(batch, CLIP_TOKENS, CLIP_WIDTH, generator=g).to(device),
                                      torch.randn(batch, 512, generator=g).to(device)),
                "cloth": ImageFeatures(None, torch.randn(batch, CLIP_TOKENS, CLIP_WIDTH, generator=g).to(device))}
        self.noise = torch.randn(n, 4, latent, latent, generator=g).to(device)

    def step(self) -> float:
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.denoiser(**{k: (v.to(self.dtype) if k in ("sample", "text") else v)
                                    for k, v in self.inputs.items()})
        loss = F.mse_loss(pred.float(), self.noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


class DiffusersMotionStep:
    """diffusers' AnimateDiff training step: ``UNetMotionModel`` (same U-Net widths, a MotionAdapter of 64
    positions), U-Net frozen, motion parameters trained, the same loss and optimizer."""

    def __init__(self, widths: tuple[int, ...], size: int, frames: int, device: str, dtype: torch.dtype,
                 checkpointing: bool):
        from diffusers import MotionAdapter, UNetMotionModel

        torch.manual_seed(0)
        self.device, self.dtype = device, dtype
        model = UNetMotionModel.from_unet2d(sd15_unet(widths), MotionAdapter(block_out_channels=widths,
                                                                             motion_max_seq_length=64))
        model.freeze_unet2d_params()
        for name, p in model.named_parameters():  # frozen in the autocast dtype, motion in float32, as ours
            p.data = p.data.to(device, torch.float32 if p.requires_grad else dtype)
        for name, b in model.named_buffers():
            b.data = b.data.to(device)
        if checkpointing:
            model.enable_gradient_checkpointing()
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        g = torch.Generator().manual_seed(1)
        latent = size // 8
        self.sample = torch.randn(1, 4, frames, latent, latent, generator=g).to(device)
        self.timestep = torch.randint(0, 1000, (1,), generator=g).to(device)
        self.text = torch.randn(frames, 77, 768, generator=g).to(device)
        self.noise = torch.randn(1, 4, frames, latent, latent, generator=g).to(device)

    def step(self) -> float:
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.model(self.sample.to(self.dtype), self.timestep, self.text.to(self.dtype)).sample
        loss = F.mse_loss(pred.float(), self.noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def measure(steps: dict, device: str, warmup: int, iters: int) -> dict[str, dict]:
    """Median seconds per step of each named step function, taken alternately in one loop, and its peak memory."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: {"step_ms": statistics.median(times[name]) * 1e3,
                   "peak_mib": peak_mib(step, device, training=True)}
            for name, step in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full-size", action="store_true", help="SD1.5 widths at the paper's sizes")
    parser.add_argument("--stages", nargs="+", default=list(PAPER), choices=list(PAPER))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    widths = (320, 640, 1280, 1280) if args.full_size else (32, 64, 64, 64)
    sizes = PAPER if args.full_size else TINY
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device_name}; U-Net widths {widths}; {dtype}")
    rows = []
    for stage in args.stages:
        size, frames, batch = sizes[stage]
        for checkpointing in (False, True):
            steps = {"ours": Setup(stage, widths, size, frames, batch, args.device, dtype, checkpointing)}
            if stage == "long_frame":
                steps["diffusers"] = DiffusersMotionStep(widths, size, frames, args.device, dtype, checkpointing)
            try:
                results = measure({k: v.step for k, v in steps.items()}, args.device, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                results = {k: {"step_ms": float("inf"), "peak_mib": float("inf")} for k in steps}
            for impl, result in results.items():
                row = {"stage": stage, "impl": impl, "size": size, "frames": frames, "batch": batch,
                       "gradient_checkpointing": checkpointing, "trainable_params": steps[impl].trainable_params,
                       **result}
                rows.append(row)
                print(f"{stage:17s} {impl:9s} {size}² {frames:3d} frames x{batch}  checkpointing "
                      f"{'on ' if checkpointing else 'off'}  {result['step_ms']:9.1f} ms/step  peak "
                      f"{result['peak_mib']:9.0f} MiB  ({row['trainable_params'] / 1e6:.1f} M trained)")
            del steps
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "widths": widths, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
