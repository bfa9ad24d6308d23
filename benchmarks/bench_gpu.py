"""The speed of a whole DreaMoving step, block by block, against diffusers in the same run (issue 14's targets).

    python benchmarks/bench_gpu.py                 # the lent GPU: SD1.5 sizes, 512², 16 and 64 frames, fp16, CFG
    python benchmarks/bench_gpu.py --tiny          # any CPU: the tiny SD1.5 layout, 64², 2 frames (a smoke run)
    python benchmarks/bench_gpu.py --json out.json --skip diffusers --skip compiled

Every model is built from random weights with the pack's own node functions inside ComfyUI (``devtools.harness``):
bare U-Net, + motion blocks, + Video ControlNet, + Content Guider (face), (face + cloth). A step is one step of
ComfyUI's own sampler (CFG: cond and uncond videos in one U-Net call, the ControlNet's residuals included), timed
between the sampler's step callbacks. All variants of a table (and diffusers' AnimateDiff + ControlNet + two
IP-Adapters, when diffusers is importable) are timed alternately in the same rounds, medians compared, so a busy
machine slows all alike. FLOPs: ``torch.utils.flop_counter`` over one step; time ÷ FLOP ratio per added block =
(time ratio to the previous variant) / (FLOP ratio to it); the targets are ≤ 1.1. ``compiled``: the same variants
under ComfyUI's ``set_torch_compile_wrapper`` (what its TorchCompileModel node runs; inductor on CUDA, the
``eager`` dynamo backend on the CPU, where inductor's code generation takes minutes).

Also: peak memory of one sampling step at 16, 64 and 256 frames in context windows of 16 (``--tiny``: 4, 8, 16 in
windows of 4); seconds for a whole 16-frame, 20-step video (sampling + ComfyUI's VAE decode, and the decode's own
peak, plain and tiled); the temporal attention kernels on the motion blocks' shape; DWPose frames per second per
backend (onnxruntime, torch; same-IO approximations of the real graphs at full size, see ``bench_preprocess.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))
sys.path.insert(0, str(PACK_DIR / "benchmarks"))

from bench_motion import peak_mib  # noqa: E402
from devtools import harness  # noqa: E402

VARIANTS = {  # name: (motion, control, guider slots)
    "bare U-Net": (False, False, ()),
    "+ motion": (True, False, ()),
    "+ Video ControlNet": (True, True, ()),
    "+ guider (face)": (True, True, ("face",)),
    "+ guider (face + cloth)": (True, True, ("face", "cloth")),
}
SECTIONS = ("steps", "compiled", "diffusers", "memory", "video", "temporal", "dwpose")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer:
    """Seconds between the sampler's step callbacks (one CFG step each), CUDA-synchronised."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def __call__(self, *args):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def sampled_step_times(model: harness.DreaMovingModel, steps: int, device: str, patcher=None) -> list[float]:
    import comfy.sample

    latent = model.latent()
    timer = StepTimer(device)
    noise = comfy.sample.prepare_noise(torch.zeros_like(latent), 0)
    comfy.sample.sample(patcher or model.patcher, noise, steps + 1, 4.0, "euler", "normal", model.positive,
                        model.negative, torch.zeros_like(latent), callback=timer, disable_pbar=True, seed=0)
    return timer.steps()


def step_flops(model: harness.DreaMovingModel, device: str) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math_only = sdpa_kernel(SDPBackend.MATH) if device == "cpu" else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, math_only:
        model.sample(steps=1)
    return counter.get_total_flops()


def compiled(model: harness.DreaMovingModel, device: str):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    patcher = model.patcher.clone()
    set_torch_compile_wrapper(patcher, backend="inductor" if device == "cuda" else "eager")
    return patcher


def diffusers_step(args, frames: int):
    """diffusers' AnimateDiff U-Net + per-frame ControlNet + two IP-Adapters (face: 4 tokens, cloth: 16) on the same
    sizes, random weights: ``fn()`` runs one CFG step; None without diffusers."""
    try:
        from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    except ImportError:
        return None

    device, dtype = args.device, args.dtype
    tiny = dict(block_out_channels=(320, 320), down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1)
    size = args.size
    unet2d = UNet2DConditionModel(cross_attention_dim=768, sample_size=size // 8, **(tiny if args.tiny else {}))
    controlnet = ControlNetModel.from_unet(unet2d).to(device, dtype).eval()
    adapter = MotionAdapter(block_out_channels=unet2d.config.block_out_channels,
                            motion_layers_per_block=unet2d.config.layers_per_block, motion_max_seq_length=64)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    if args.ip_adapters:
        add_ip_adapters(unet)
    unet = unet.to(device, dtype).eval()
    batch = 2 * frames
    gen = torch.Generator().manual_seed(0)
    hint = torch.rand(batch, 3, size, size, generator=gen).to(device, dtype)
    text = torch.randn(batch, 77, 768, generator=gen).to(device, dtype)
    images = [torch.randn(2, 1, n, 768, generator=gen).to(device, dtype) for n in (4, 16)]  # per video, projected
    x = torch.randn(batch, 4, size // 8, size // 8, generator=gen).to(device, dtype)
    t = torch.tensor(500.0, device=device)
    added = {"added_cond_kwargs": {"image_embeds": images}} if args.ip_adapters else {}

    @torch.inference_mode()
    def step():
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        videos = x.view(2, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        return unet(videos, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, **added).sample

    try:
        step()
    except RuntimeError as err:  # reported, not hidden: the table then says the reference has no IP-Adapters
        if not args.ip_adapters:
            raise
        print(f"diffusers' step with two IP-Adapters failed ({str(err).splitlines()[0]}); timing it without them")
        args.ip_adapters = False
        return diffusers_step(args, frames)
    return step


def add_ip_adapters(unet) -> None:
    """Two IP-Adapters (4 and 16 tokens) on every cross-attention layer outside the motion modules, fed
    already-projected image tokens."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    processors = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        ip = name.endswith("attn2.processor") and "motion_modules" not in name
        processors[name] = (IPAdapterAttnProcessor2_0(attn.to_k.out_features, 768, num_tokens=(4, 16),
                                                      scale=[1.0, 1.0]) if ip else AttnProcessor2_0())
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([torch.nn.Identity(), torch.nn.Identity()])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")


def step_rows(parts: harness.Parts, args, frames: int, compile_too: bool) -> list[dict]:
    models = {name: parts.model(motion=m, control=c, guider=g, frames=frames) for name, (m, c, g) in VARIANTS.items()}
    flops = {name: step_flops(model, args.device) for name, model in models.items()}
    runs = {(name, False): (model, None) for name, model in models.items()}
    if compile_too:
        runs |= {(name, True): (model, compiled(model, args.device)) for name, model in models.items()}
        for model, patcher in runs.values():  # compile outside the timed rounds
            if patcher is not None:
                model.sample(steps=1, patcher=patcher)
    reference = diffusers_step(args, frames) if "diffusers" not in args.skip else None
    times: dict = {key: [] for key in runs}
    times["diffusers"] = []
    for _ in range(args.rounds):
        for key, (model, patcher) in runs.items():
            times[key] += sampled_step_times(model, args.steps, args.device, patcher)
        if reference is not None:
            for _ in range(args.steps):
                sync(args.device)
                start = time.perf_counter()
                reference()
                sync(args.device)
                times["diffusers"].append(time.perf_counter() - start)
    rows = []
    ref_ms = statistics.median(times["diffusers"]) * 1e3 if times["diffusers"] else None
    for is_compiled in (False, True) if compile_too else (False,):
        previous = None
        for name in VARIANTS:
            ms = statistics.median(times[(name, is_compiled)]) * 1e3
            row = {"frames": frames, "variant": name, "compiled": is_compiled, "ms": ms, "tflop": flops[name] / 1e12}
            if previous is not None:
                time_ratio, flop_ratio = ms / previous["ms"], flops[name] / (previous["tflop"] * 1e12)
                row |= {"time_ratio": time_ratio, "flop_ratio": flop_ratio, "time_per_flop": time_ratio / flop_ratio}
            if ref_ms and name == "+ guider (face + cloth)":
                row["vs_diffusers"] = ms / ref_ms
            rows.append(row)
            previous = row
            extra = "" if "time_per_flop" not in row else (f"  time {row['time_ratio']:.3f}x  FLOP "
                                                           f"{row['flop_ratio']:.3f}x  time/FLOP "
                                                           f"{row['time_per_flop']:.3f}")
            print(f"{frames:3d} frames {'compiled' if is_compiled else 'eager   '} {name:26s} {ms:9.1f} ms  "
                  f"{row['tflop']:8.3f} TFLOP{extra}" + (f"  vs diffusers {row['vs_diffusers']:.3f}x"
                                                         if "vs_diffusers" in row else ""))
    if ref_ms:
        label = "diffusers AnimateDiff + ControlNet" + (" + 2 IP-Adapters" if args.ip_adapters else "")
        rows.append({"frames": frames, "variant": label, "ms": ref_ms})
        print(f"{frames:3d} frames {label} {ref_ms:9.1f} ms")
    return rows


def memory_rows(parts: harness.Parts, args) -> list[dict]:
    window = 4 if args.tiny else 16
    context = parts.nodes.motion.ContextOptions(length=window, overlap=window // 4)
    rows = []
    for frames in ((4, 8, 16) if args.tiny else (16, 64, 256)):
        model = parts.model(frames=frames, context=context)
        model.sample(steps=1)  # loads everything before the measured step
        mib = peak_mib(lambda: model.sample(steps=1), args.device)
        rows.append({"frames": frames, "window": window, "step_peak_mib": mib})
        print(f"memory {frames:4d} frames, windows of {window}: one step peaks at {mib:9.1f} MiB")
    base = rows[0]["step_peak_mib"]
    for row in rows:
        row["vs_shortest"] = row["step_peak_mib"] / base
    print(f"memory: longest / shortest = {rows[-1]['vs_shortest']:.3f} (target <= 1.1)")
    return rows


def random_vae(args):
    """ComfyUI's SD1.5 VAE with random weights (``--tiny``: 32 channels wide)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                    ch=32 if args.tiny else 128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                    dropout=0.0)
    sd = harness.randomise(AutoencoderKL(ddconfig=ddconfig, embed_dim=4)).state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})  # ComfyUI guesses SD1.5's width


def video_row(parts: harness.Parts, args) -> dict:
    frames, steps = (2, 3) if args.tiny else (16, 20)
    model = parts.model(frames=frames)
    vae = random_vae(args)
    sync(args.device)
    start = time.perf_counter()
    latents = model.sample(steps=steps)
    sync(args.device)
    sampled = time.perf_counter() - start
    start = time.perf_counter()
    vae.decode(latents)
    sync(args.device)
    decoded = time.perf_counter() - start
    long = torch.randn(32 if args.tiny else 256, 4, args.size // 8, args.size // 8)
    plain_peak = peak_mib(lambda: vae.decode(long), args.device)
    tiled_peak = peak_mib(lambda: vae.decode_tiled(long, tile_x=32, tile_y=32, overlap=8), args.device)
    row = {"frames": frames, "steps": steps, "sampling_s": sampled, "vae_decode_s": decoded,
           "total_s": sampled + decoded, "decode_peak_mib": {"frames": len(long), "batched": plain_peak,
                                                             "tiled": tiled_peak}}
    print(f"whole video ({frames} frames, {steps} steps, {args.size}²): sampling {sampled:.2f} s + VAE decode "
          f"{decoded:.2f} s = {sampled + decoded:.2f} s; decoding {len(long)} frames peaks at {plain_peak:.0f} MiB "
          f"(ComfyUI's batched decode) / {tiled_peak:.0f} MiB (tiled)")
    return row


def temporal_rows(args) -> list[dict]:
    """The motion blocks' attention: many sequences of 16-64 frames; every available SDPA kernel, alternately."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if args.device == "cuda":
        backends.append(SDPBackend.CUDNN_ATTENTION)
    rows = []
    pixels = (args.size // 8) ** 2
    for frames in ((4, 8) if args.tiny else (16, 32, 64)):
        q, k, v = (torch.randn(2 * pixels, 8, frames, 40, device=args.device, dtype=args.dtype) for _ in range(3))
        best: dict = {}
        for _ in range(3):
            for backend in backends:
                try:
                    with sdpa_kernel(backend):
                        sync(args.device)
                        start = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v)
                        sync(args.device)
                    best[backend.name] = min(best.get(backend.name, 1e9), time.perf_counter() - start)
                except RuntimeError:  # kernel not available for this device / dtype / shape
                    continue
        rows.append({"frames": frames, "sequences": 2 * pixels, "ms": {n: s * 1e3 for n, s in best.items()}})
        print(f"temporal attention, {2 * pixels} sequences of {frames}: " +
              "  ".join(f"{n} {s * 1e3:.2f} ms" for n, s in sorted(best.items(), key=lambda kv: kv[1])))
    return rows


def dwpose_rows(args) -> list[dict]:
    from bench_preprocess import onnx_model
    from devtools.tiny.preprocess import dwpose_onnx, synthetic_dance_frames, yolox_onnx
    from dreamoving_core.preprocess.dwpose import DWPose

    detector, estimator = (yolox_onnx(), dwpose_onnx()) if args.tiny else (onnx_model("yolox")[0],
                                                                           onnx_model("dwpose")[0])
    frames = synthetic_dance_frames(8 if args.tiny else 32, 64 if args.tiny else 512)
    rows = []
    for backend in ("onnxruntime", "torch"):
        model = DWPose(detector, estimator, device=args.device, backend=backend)
        model.video(frames[:2])  # sessions / conversion and warm-up outside the timing
        sync(args.device)
        start = time.perf_counter()
        model.video(frames)
        sync(args.device)
        fps = len(frames) / (time.perf_counter() - start)
        rows.append({"backend": backend, "runs_on": model.providers, "fps": fps})
        print(f"DWPose {backend:12s} on {', '.join(model.providers)}: {fps:.2f} frames/s (target >= 30 on the GPU)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64², for a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="step tables (default 16 64; tiny: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per table")
    parser.add_argument("--steps", type=int, default=3, help="timed sampler steps per variant and round")
    parser.add_argument("--skip", choices=SECTIONS, action="append", default=[])
    parser.add_argument("--no-ip-adapters", dest="ip_adapters", action="store_false",
                        help="diffusers' reference without its two IP-Adapters")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.size = 64 if args.tiny else 512
    args.dtype = torch.float16 if args.device == "cuda" else torch.float32
    frames = args.frames or ([2] if args.tiny else [16, 64])
    torch.manual_seed(0)
    nodes = harness.setup(args.device)
    parts = harness.parts(frames[0], args.size, full_size=not args.tiny, device=args.device, dtype=args.dtype,
                          nodes=nodes)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; {'tiny' if args.tiny else 'SD1.5'} models, {args.size}², {args.dtype}, CFG; "
          f"{time.strftime('%Y-%m-%d')}")
    results: dict = {"device": where, "date": time.strftime("%Y-%m-%d"), "size": args.size, "tiny": args.tiny}
    if "steps" not in args.skip:
        results["steps"] = [row for n in frames for row in step_rows(parts, args, n, "compiled" not in args.skip)]
    sections = {"memory": memory_rows, "video": video_row}
    for name, run in sections.items():
        if name not in args.skip:
            results[name] = run(parts, args)
    if "temporal" not in args.skip:
        results["temporal"] = temporal_rows(args)
    if "dwpose" not in args.skip:
        results["dwpose"] = dwpose_rows(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
