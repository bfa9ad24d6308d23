"""``python -m dreamoving_core.eval``: score videos and compare runs from the command line.

    python -m dreamoving_core.eval score take.mp4 --driving dance.mp4 --face face.png --models ComfyUI/models \\
        --json take.json --plot take.png
    python -m dreamoving_core.eval compare runs/ckpt_10k runs/ckpt_20k --plot compare.png

``--driving`` is a video (DWPose runs on it) or a ``POSE_KEYPOINT`` JSON file; ``--face`` an image or a safetensors
file holding an ArcFace ``embedding`` (a face record of data preparation); ``--truth`` the ground-truth video.
``compare`` takes two report files or two folders of them (averaged).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..errors import DreaMovingError, InputMismatchError
from .models import EvalModels
from .plot import plot_reports
from .report import HIGHER, SCORES, ScoreReport
from .score import score_video


def read_video(path: str | Path, what: str) -> np.ndarray:
    """All frames of a video file as ``(F, H, W, 3)`` uint8 RGB (data preparation's reader: PyAV, upright)."""
    from ..data.video import read_frames

    path = Path(path)
    if not path.is_file():
        raise InputMismatchError(f"{what}: '{path}' does not exist")
    try:
        frames = [image for _, image in read_frames(path)]
    except InputMismatchError as err:
        raise InputMismatchError(f"{what}: {err}") from err
    if not frames:
        raise InputMismatchError(f"{what}: '{path.name}' has no frames")
    return np.stack(frames)


def read_image(path: str | Path, what: str) -> np.ndarray:
    """An image file as ``(H, W, 3)`` float32 RGB in 0 … 1."""
    from ..data.video import read_image as read_uint8

    try:
        return read_uint8(path).astype(np.float32) / 255.0
    except InputMismatchError as err:
        raise InputMismatchError(f"{what}: {err}") from err


def read_face(path: str):
    """A face image, or the ``embedding`` of a safetensors face record."""
    if Path(path).suffix == ".safetensors":
        from ..io import load_state_dict

        weights = load_state_dict(path)
        if "embedding" not in weights:
            raise InputMismatchError(f"--face: '{path}' holds no 'embedding' (an ArcFace face record)")
        return weights["embedding"]
    return read_image(path, "--face")


def read_driving(path: str, models: EvalModels):
    """``POSE_KEYPOINT`` from a JSON file, or DWPose's poses of a driving video."""
    if Path(path).suffix == ".json":
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputMismatchError(f"--driving: '{path}' is not a readable POSE_KEYPOINT JSON file ({err})") from err
    if models.dwpose is None:
        raise InputMismatchError(f"--driving: a driving video needs {models.needs['dwpose']} (or give its "
                                 "POSE_KEYPOINT JSON)")
    return models.dwpose.video(read_video(path, "--driving"), models.detect_resolution)


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def _format(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "∞" if math.isinf(value) else f"{value:.4f}"


def summary(report: ScoreReport) -> str:
    lines = [f"{s.name:<32} {_format(report.scores[s.name]):>10}  ({s.better or '—'} is better)"
             for s in SCORES if s.name in report.scores]
    lines += [f"{name:<32} {'unavailable':>10}  {why}" for name, why in report.unavailable.items()]
    return "\n".join(lines)


def compare_table(a: ScoreReport, b: ScoreReport, labels: tuple[str, str]) -> str:
    """A side-by-side table of two reports: each score, both values, B − A and which run is better."""
    width = max(10, *(len(x) for x in labels))
    rows = [f"{'score':<32} {labels[0]:>{width}} {labels[1]:>{width}} {'B − A':>10}  better",
            "-" * (32 + 2 * width + 22)]
    for info in SCORES:
        va, vb = a.scores.get(info.name), b.scores.get(info.name)
        if va is None and vb is None:
            continue
        delta = vb - va if va is not None and vb is not None else None
        better = "—"
        if delta is not None and math.isfinite(delta) and info.better is not None:
            better = "=" if delta == 0 else labels[1] if (delta > 0) == (info.better == HIGHER) else labels[0]
        rows.append(f"{info.name:<32} {_format(va):>{width}} {_format(vb):>{width}} {_format(delta):>10}  {better}")
    return "\n".join(rows)


def load_run(path: str | Path) -> ScoreReport:
    """A report file, or the mean of the report files (``*.json``) in a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise InputMismatchError(f"'{path}' holds no report (.json) files")
        return ScoreReport.mean([ScoreReport.load(f) for f in files])
    if not path.is_file():
        raise InputMismatchError(f"'{path}' is neither a report file nor a folder of them")
    try:
        return ScoreReport.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise InputMismatchError(f"'{path}' is not a score report ({err})") from err


def save_plot(picture: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamoving_core.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score one video; writes a JSON report")
    score.add_argument("video", help="the generated video")
    score.add_argument("--driving", help="driving video or POSE_KEYPOINT JSON: pose fidelity")
    score.add_argument("--face", help="reference face image (or ArcFace embedding .safetensors): identity")
    score.add_argument("--truth", help="ground-truth video (same frames and size): L1, PSNR, SSIM, LPIPS, FID, ...")
    score.add_argument("--json", required=True, help="where to write the report")
    score.add_argument("--plot", help="also write the per-frame curves as this PNG")
    score.add_argument("--models", help="a folder laid out like ComfyUI's models folder")
    score.add_argument("--insightface", help="an InsightFace pack folder (instead of the one in --models)")
    score.add_argument("--clip", help="a CLIP ViT-H/14 image tower file (instead of the one in --models)")
    score.add_argument("--dwpose", nargs=2, metavar=("DETECTOR", "ESTIMATOR"),
                       help="yolox_l.onnx and dw-ll_ucoco_384.onnx (instead of those in --models)")
    score.add_argument("--eval-dir", help="the folder of LPIPS / FID / FVD weights (default MODELS/dreamoving/eval)")
    score.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    score.add_argument("--detect-resolution", type=int, default=512, help="DWPose's detection size (shorter side)")
    compare = sub.add_parser("compare", help="compare two runs side by side; writes one plot")
    compare.add_argument("run_a", help="a report JSON or a folder of them")
    compare.add_argument("run_b", help="a report JSON or a folder of them")
    compare.add_argument("--plot", default="compare.png", help="where to write the plot (default compare.png)")
    args = parser.parse_args(argv)
    try:
        return _score(args) if args.command == "score" else _compare(args)
    except DreaMovingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _score(args) -> int:
    models = EvalModels.from_models_dir(args.models, insightface=args.insightface, clip=args.clip,
                                        dwpose=args.dwpose, eval_dir=args.eval_dir, device=args.device,
                                        detect_resolution=args.detect_resolution)
    frames = read_video(args.video, "VIDEO")
    driving = read_driving(args.driving, models) if args.driving else None
    face = read_face(args.face) if args.face else None
    truth = read_video(args.truth, "--truth") if args.truth else None
    bar, update = _progress_bar(Path(args.video).name)
    try:
        report = score_video(frames, driving=driving, face=face, truth=truth, models=models, progress=update)
    finally:
        bar.close()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
    if args.plot:
        save_plot(plot_reports([(Path(args.video).stem, report)]), args.plot)
    print(summary(report))
    return 0


def _compare(args) -> int:
    a, b = load_run(args.run_a), load_run(args.run_b)
    labels = (Path(args.run_a).stem or "A", Path(args.run_b).stem or "B")
    if labels[0] == labels[1]:
        labels = (f"A:{labels[0]}", f"B:{labels[1]}")
    print(compare_table(a, b, labels))
    save_plot(plot_reports([(labels[0], a), (labels[1], b)]), args.plot)
    print(f"plot: {args.plot}")
    return 0

