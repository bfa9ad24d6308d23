"""Frames per second of each score, through ``score_video`` with only that score's model, random weights.

    python benchmarks/bench_scores.py                        # CPU, 16 frames of 512x512
    python benchmarks/bench_scores.py --device cuda --frames 64

Full-size architectures (random weights, built once and cached): LPIPS on VGG-16 and AlexNet, the FID
Inception-v3, I3D (FVD), 3D ResNet-50 (FID-VID), the CLIP ViT-H/14 image tower (consistency). DWPose uses the
same-IO approximations of ``bench_preprocess.py`` (conv stacks with YOLOX-L's and DWPose-l's multiply-accumulates);
identity uses the tiny InsightFace pack, so it times the pipeline (detection, alignment, batched ArcFace), not the
real SCRFD-10G / ResNet-50 pair. Flicker and L1 / PSNR / SSIM need no model.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_preprocess import onnx_model  # noqa: E402
from devtools.tiny import cached  # noqa: E402
from devtools.tiny import content_guider as tiny_face  # noqa: E402
from devtools.tiny import eval as tiny  # noqa: E402
from dreamoving_core.eval import EvalModels, score_video  # noqa: E402
from dreamoving_core.guider.clip_image import ClipImageEncoder  # noqa: E402
from dreamoving_core.guider.face_id import FaceAnalyzer  # noqa: E402
from dreamoving_core.preprocess.dwpose import DWPose  # noqa: E402


def full_size_files() -> dict[str, Path]:
    """Random full-size feature networks under their real names, in one models/dreamoving/eval-like folder each."""
    import torchvision

    vgg = cached("eval/bench/v1/vgg16-397923af.pth", lambda p: torch.save(
        {k: v for k, v in tiny._he_init(torchvision.models.vgg16(weights=None), 5).items()
         if k.startswith("features.")}, str(p)))
    i3d = cached("eval/bench/v1/i3d_pretrained_400.pt", lambda p: torch.save(tiny.i3d_weights(divisor=1), str(p)))
    resnet = cached("eval/bench/v1/resnet-50-kinetics.pth", lambda p: torch.save(
        {"state_dict": tiny.resnet3d_weights(planes=(64, 128, 256, 512), blocks=(3, 4, 6, 3), stem=64)}, str(p)))
    return {"paired/lpips (VGG)": vgg, "paired/lpips (AlexNet)": tiny.alexnet_file(),
            "distribution/fid": tiny.inception_file(), "distribution/fvd": i3d, "distribution/fid_vid": resnet}


def folder_with(file: Path, tmp: Path) -> Path:
    folder = tmp / file.stem
    folder.mkdir(exist_ok=True)
    link = folder / file.name
    if not link.exists():
        link.symlink_to(file)
    return folder


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: sessions, lazy loads, CUDA kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip", action="append", default=[], help="a score group to leave out (e.g. clip)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    provider = "cuda" if device.type == "cuda" else "cpu"
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(args.frames, args.size, args.size, 3, generator=g)
    truth = (frames + 0.05 * torch.randn(frames.shape, generator=g)).clamp(0, 1)
    clip_frames = max(args.frames, 17)  # FVD and FID-VID need two 16-frame clips
    long_frames, long_truth = frames.repeat(2, 1, 1, 1)[:clip_frames], truth.repeat(2, 1, 1, 1)[:clip_frames]
    results: dict = {"device": str(device), "torch_threads": torch.get_num_threads(),
                     "frames": f"{args.frames} x {args.size}x{args.size}"}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    pose = (onnx_model("yolox")[0], onnx_model("dwpose")[0])
    faces = torch.nn.functional.interpolate(tiny_face.face_image(64).movedim(-1, 1), size=(args.size, args.size))
    faces = faces.movedim(1, -1).expand(args.frames, -1, -1, -1)  # the tiny pack's "face" in every frame
    runs = {
        "temporal/flicker": lambda: (EvalModels(device=device), frames, {}),
        "paired/l1, psnr, ssim": lambda: (EvalModels(device=device), frames, {"truth": truth}),
        "identity (tiny pack)": lambda: (EvalModels(faces=FaceAnalyzer(tiny_face.insightface_root() / "models" /
                                                                       "buffalo_l", provider), device=device),
                                         faces, {"face": faces[0]}),
        "pose (DWPose approximation)": lambda: (EvalModels(dwpose=DWPose(*pose, device=provider), device=device),
                                                frames, {"driving": [{"people": [], "canvas_height": args.size,
                                                                      "canvas_width": args.size}] * len(frames)}),
        "temporal/clip_consistency (ViT-H/14)": lambda: (EvalModels(clip=EvalModels.from_clip_encoder(
            ClipImageEncoder.from_file(tiny_face.clip_vision_file(layers=32)).to(device)), device=device), frames, {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in full_size_files().items():
            video = name in ("distribution/fvd", "distribution/fid_vid")
            runs[name] = (lambda f=file, v=video: (
                EvalModels(feature_dirs=(folder_with(f, Path(tmp)),), device=device),
                long_frames if v else frames, {"truth": long_truth if v else truth}))
        for name, make in runs.items():
            if any(s in name for s in args.skip):
                continue
            try:  # one failing score must not lose the others' numbers
                models, video, inputs = make()
                seconds = timed(partial(score_video, video, models=models, **inputs), args.repeats, device)
                results[name] = {"fps": round(len(video) / seconds, 2), "ms_per_frame": round(seconds / len(video)
                                                                                              * 1e3, 1)}
            except Exception as err:  # noqa: BLE001
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
