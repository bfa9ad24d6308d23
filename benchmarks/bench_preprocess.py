"""Frames per second of the preprocessors at full size, random weights.

    python benchmarks/bench_preprocess.py                  # CPU (onnxruntime CPU provider, torch fp32)
    python benchmarks/bench_preprocess.py --device cuda    # CUDA provider if onnxruntime has it, ZoeDepth fp16

DWPose: the real YOLOX-L and DWPose-L ONNX files cannot be downloaded here, so both stages are APPROXIMATED by
same-IO ONNX graphs (input ``images`` 1x3x640x640 -> ``output`` 1x8400x85; ``input`` 1x3x384x288 -> ``simcc_x``
1x133x576, ``simcc_y`` 1x133x768) made of plain 3x3 convolution stacks with the multiply-accumulate count of the
real models (YOLOX-L: 155.6 GFLOPs = 77.8 GMAC at 640x640, YOLOX paper; DWPose-l 384x288: 10.07 G, mmpose's DWPose
table). Operator mix differs (no CSP/depthwise/attention), so treat the numbers as estimates of the same order.
The pipeline code is ours end to end (letterbox, decoding, NMS, affine crop, SimCC); one person per frame.
ZoeDepth: transformers' ZoeDepthForDepthEstimation with the exact Intel/zoedepth-nyu-kitti config (BEiT-L/384),
random weights, through our processor path at the model's 384x512 working size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.tiny import cached  # noqa: E402
from devtools.tiny.preprocess import DETECTOR_SIZE, ESTIMATOR_SIZE, NUM_KEYPOINTS, _export, zoedepth_config  # noqa: E402
from dreamoving_core.preprocess.dwpose import DWPose  # noqa: E402
from dreamoving_core.preprocess.zoedepth import ZoeDepth, depth_to_hint  # noqa: E402

YOLOX_L_GMAC, DWPOSE_L_GMAC = 77.8, 10.07


def conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.SiLU())


def stage(cin: int, cout: int, blocks: int) -> nn.Module:
    return nn.Sequential(conv(cin, cout, 2), *(conv(cout, cout) for _ in range(blocks)))


class YoloxLike(nn.Module):
    """Strides 8/16/32 feature pyramid with 1x1 heads: ``(1, 3, 640, 640)`` -> ``(1, 8400, 85)``."""

    def __init__(self, blocks=(2, 5, 4, 4, 4)):
        super().__init__()
        self.stem = stage(3, 64, blocks[0])  # /2
        self.s4, self.s8 = stage(64, 128, blocks[1]), stage(128, 256, blocks[2])
        self.s16, self.s32 = stage(256, 512, blocks[3]), stage(512, 1024, blocks[4])
        self.heads = nn.ModuleList(nn.Conv2d(c, 85, 1) for c in (256, 512, 1024))

    def forward(self, images):
        p8 = self.s8(self.s4(self.stem(images / 255.0)))
        p16 = self.s16(p8)
        p32 = self.s32(p16)
        raw = torch.cat([h(p).flatten(2).transpose(1, 2) for h, p in zip(self.heads, (p8, p16, p32))], dim=1)
        return torch.cat([raw[..., :4], torch.sigmoid(raw[..., 4:])], dim=-1)


class RTMPoseLike(nn.Module):
    """Stride-32 backbone + SimCC head: ``(1, 3, 384, 288)`` -> ``simcc_x (1, 133, 576)``, ``simcc_y (1, 133, 768)``."""

    def __init__(self, blocks=(4, 8, 8, 9, 9)):
        super().__init__()
        widths = (32, 64, 128, 256, 512)
        self.backbone = nn.Sequential(*(stage(cin, cout, n) for cin, cout, n in zip((3,) + widths[:-1], widths, blocks)))
        h, w = ESTIMATOR_SIZE[0] // 32, ESTIMATOR_SIZE[1] // 32
        self.to_keypoints = nn.Conv2d(512, NUM_KEYPOINTS, 1)
        self.token = nn.Linear(h * w, 256)
        self.x, self.y = nn.Linear(256, 2 * ESTIMATOR_SIZE[1]), nn.Linear(256, 2 * ESTIMATOR_SIZE[0])

    def forward(self, input):
        tokens = self.token(self.to_keypoints(self.backbone(input)).flatten(2))
        return self.x(tokens), self.y(tokens)


def gmac(module: nn.Module, shape) -> float:
    """Multiply-accumulates of the convolutions and linears of one forward pass, in billions."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(torch.zeros(*shape))
    for h in handles:
        h.remove()
    return total / 1e9


def onnx_model(kind: str) -> tuple[Path, float]:
    cls, shape, names = {
        "yolox": (YoloxLike, (1, 3, *DETECTOR_SIZE), ("images", ["output"])),
        "dwpose": (RTMPoseLike, (1, 3, *ESTIMATOR_SIZE), ("input", ["simcc_x", "simcc_y"])),
    }[kind]
    torch.manual_seed(0)
    module = cls().eval()
    file = {"yolox": "yolox_l.onnx", "dwpose": "dw-ll_ucoco_384.onnx"}[kind]
    path = cached(f"preprocess/bench/v1/{kind}/{file}", lambda p: _export(module, shape, *names, p))
    return path, gmac(module, shape)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (session start, CUDA kernels)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_dwpose(device: str, repeats: int, size: int) -> dict:
    (det, det_gmac), (est, est_gmac) = onnx_model("yolox"), onnx_model("dwpose")
    model = DWPose(det, est, device=device)
    frame = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    box = np.array([[size * 0.3, size * 0.1, size * 0.7, size * 0.95]])
    t_det = timed(lambda: model.detect(frame), repeats)
    t_est = timed(lambda: model.estimate(frame, box), repeats)
    return {"providers": model.providers, "detector_gmac": round(det_gmac, 1), "estimator_gmac": round(est_gmac, 2),
            "detector_ms": round(t_det * 1e3, 1), "estimator_ms_per_person": round(t_est * 1e3, 1),
            "fps_one_person": round(1 / (t_det + t_est), 2)}


def bench_zoedepth(device: str, repeats: int, size: int, batch: int) -> dict:
    from transformers import ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = ZoeDepthForDepthEstimation(zoedepth_config(tiny=False)).to(dev, dtype).eval()
    zoe = ZoeDepth(model, ZoeDepthImageProcessor(ensure_multiple_of=32), dev, dtype)
    frames = torch.rand(batch, size, size, 3)

    def run():
        depth_to_hint(zoe.depth(frames, batch_size=batch))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t = timed(run, repeats)
    return {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "dtype": str(dtype),
            "batch": batch, "ms_per_frame": round(t / batch * 1e3, 1), "fps": round(batch / t, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zoe-batch", type=int, default=None, help="frames per ZoeDepth call (1 on CPU, 8 on CUDA)")
    parser.add_argument("--skip", choices=["dwpose", "zoedepth"], action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = {"device": args.device, "torch_threads": torch.get_num_threads(), "frame": f"{args.size}x{args.size}"}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    notes = {"dwpose": f"approximation: same-IO conv stacks sized to YOLOX-L {YOLOX_L_GMAC} GMAC and DWPose-l "
                       f"{DWPOSE_L_GMAC} G, random weights",
             "zoedepth": "exact Intel/zoedepth-nyu-kitti architecture, random weights, 384x512 working size"}
    batch = args.zoe_batch or (8 if args.device == "cuda" else 1)
    runs = {"dwpose": lambda: bench_dwpose(args.device, args.repeats, args.size),
            "zoedepth": lambda: bench_zoedepth(args.device, args.repeats, args.size, batch)}
    for name, run in runs.items():
        if name in args.skip:
            continue
        try:  # one failing part (e.g. no ONNX exporter on a bare machine) must not lose the other's numbers
            results[name] = {**run(), "note": notes[name]}
        except Exception as err:  # noqa: BLE001
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
