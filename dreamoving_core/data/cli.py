"""``python -m dreamoving_core.data``: prepare DreaMoving training data from dance videos (no ComfyUI needed)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import DreaMovingError
from ..preprocess.dwpose import DETECTOR_FILE, ESTIMATOR_FILE
from .captions import DEFAULT_PROMPT
from .models import CAPTIONER_DIR, INSIGHTFACE_NAME, PREPROCESS_DIR, STEPS, ZOEDEPTH_NAME, resolve_models
from .prepare import PrepareConfig, prepare, setup_logging
from .scenes import ClipBounds, SceneConfig
from .store import Store

DESCRIPTION = """\
Cut dance videos into transition-free clips, caption each clip's centre keyframe, extract per-frame DWPose and
ZoeDepth hints, build the Content Guider's face set, and write the manifests clips.jsonl / faces.jsonl into OUT.
Re-running does only what is missing; a video that cannot be read is reported and skipped."""

EPILOG = f"""\
models: each model option takes a path, or a name looked up under --models MODELS (laid out like ComfyUI's models
folder): DWPose and ZoeDepth in MODELS/{PREPROCESS_DIR.as_posix()}/, the InsightFace pack in
MODELS/insightface/models/, the captioner in MODELS/{CAPTIONER_DIR.as_posix()}/.

examples:
  python -m dreamoving_core.data prepare videos/ photos/ data/ --models ComfyUI/models --captioner llava-1.5-7b-hf
  python -m dreamoving_core.data prepare videos/ data/ --models ComfyUI/models --skip captions --skip faces
  # a SLURM array of 16 machines, then one merge (each shard also rebuilds the manifests when it ends)
  python -m dreamoving_core.data prepare videos/ data/ --models M --captioner C --shard $SLURM_ARRAY_TASK_ID/16
  python -m dreamoving_core.data merge data/
"""


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got '{text}'") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard I/N needs 0 <= I < N, got '{text}'")
    return index, count


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value

    return parse


def _steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    return steps


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m dreamoving_core.data", description=DESCRIPTION)
    commands = root.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="prepare (or finish preparing) a data folder", description=DESCRIPTION,
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                   help="folders (searched recursively) or files: dance videos, and images for the face set")
    p.add_argument("out", type=Path, metavar="OUT", help="the prepared data folder (created if needed)")
    defaults, scenes, bounds = PrepareConfig(Path()), SceneConfig(), ClipBounds()

    g = p.add_argument_group("models")
    g.add_argument("--models", type=Path, metavar="MODELS", help="a folder laid out like ComfyUI's models folder")
    g.add_argument("--captioner", metavar="PATH|NAME",
                   help="a local transformers image-text-to-text model folder (e.g. LLaVA, Qwen2-VL, BLIP)")
    g.add_argument("--dwpose-detector", default=DETECTOR_FILE, metavar="PATH|NAME",
                   help="DWPose's YOLOX person detector (%(default)s)")
    g.add_argument("--dwpose-estimator", default=ESTIMATOR_FILE, metavar="PATH|NAME",
                   help="DWPose's whole-body estimator (%(default)s)")
    g.add_argument("--zoedepth", default=ZOEDEPTH_NAME, metavar="PATH|NAME", help="ZoeDepth folder (%(default)s)")
    g.add_argument("--insightface", default=INSIGHTFACE_NAME, metavar="PATH|NAME",
                   help="InsightFace pack folder or name (%(default)s; buffalo_l works too)")

    g = p.add_argument_group("clips")
    g.add_argument("--min-seconds", metavar="S", type=float, default=bounds.min_seconds,
                   help="shorter scenes are dropped (%(default)s)")
    g.add_argument("--max-seconds", metavar="S", type=float, default=bounds.max_seconds,
                   help="longer scenes are split into clips of at most this length (%(default)s)")
    g.add_argument("--cut-threshold", metavar="T", type=float, default=scenes.cut_threshold,
                   help="PySceneDetect content threshold for hard cuts; lower finds more (%(default)s)")
    g.add_argument("--fade-threshold", metavar="T", type=float, default=scenes.fade_threshold,
                   help="mean RGB level (0-255) below which a frame counts as faded to black (%(default)s)")
    g.add_argument("--fade-trim", metavar="F", type=float, default=scenes.fade_trim,
                   help="scene ends darker than this fraction of the scene's median brightness are cut off, "
                        "removing fade ramps; 0 keeps them (%(default)s)")
    g.add_argument("--short-side", metavar="PX", type=_count(0), default=defaults.short_side,
                   help="clips and images are scaled down to this shorter side in pixels; 0 keeps the source "
                        "size (%(default)s)")
    g.add_argument("--crf", metavar="Q", type=_count(0), default=defaults.crf,
                   help="x264 quality of the clips, lower is better (%(default)s)")

    g = p.add_argument_group("captions, hints and faces")
    g.add_argument("--caption-prompt", metavar="TEXT", default=DEFAULT_PROMPT,
                   help="instruction given with each keyframe ('%(default)s', the paper's MiniGPT-v2 prompt); "
                        "'' for plain captioning models")
    g.add_argument("--caption-max-tokens", metavar="N", type=_count(1), default=defaults.max_new_tokens,
                   help="longest caption in tokens (%(default)s)")
    g.add_argument("--caption-batch", metavar="N", type=_count(1), default=defaults.caption_batch,
                   help="keyframes captioned at once (%(default)s)")
    g.add_argument("--depth-batch", metavar="N", type=_count(1), default=defaults.depth_batch,
                   help="frames ZoeDepth sees at once (%(default)s)")
    g.add_argument("--min-face-size", metavar="PX", type=_count(0), default=defaults.min_face_size,
                   help="smaller faces (box side in pixels) are left out of the face set (%(default)s)")
    g.add_argument("--skip", type=_steps, action="append", default=[], metavar="STEP[,STEP]",
                   help=f"leave out steps: {', '.join(STEPS)} (repeatable)")

    g = p.add_argument_group("running")
    g.add_argument("--workers", metavar="N", type=_count(1), default=1,
                   help="processes on this machine; with several GPUs, one GPU each in turn (%(default)s)")
    g.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="take only shard I of N (0-based) of the sources; every machine of a job array runs the "
                        "same command with its own I")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the models run (auto: the GPU when torch sees one)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="captioner precision (auto: bfloat16 on CUDA, float32 on the CPU)")
    g.add_argument("-v", "--verbose", action="store_true", help="log every step")

    m = commands.add_parser("merge", help="rebuild OUT/clips.jsonl and OUT/faces.jsonl from every source's rows "
                                          "(after all shards have finished)")
    m.add_argument("out", type=Path, metavar="OUT")
    return root


def config_from(args: argparse.Namespace) -> PrepareConfig:
    skip = frozenset(s for group in args.skip for s in group)
    config = PrepareConfig(
        Path(args.out), scenes=SceneConfig(args.cut_threshold, args.fade_threshold, args.fade_trim),
        bounds=ClipBounds(args.min_seconds, args.max_seconds), short_side=args.short_side, crf=args.crf,
        prompt=args.caption_prompt, max_new_tokens=args.caption_max_tokens, caption_batch=args.caption_batch,
        depth_batch=args.depth_batch, min_face_size=args.min_face_size, skip=skip, device=args.device,
        dtype=args.dtype, workers=args.workers, shard=args.shard)
    models = resolve_models(args.models, dwpose_detector=args.dwpose_detector,
                            dwpose_estimator=args.dwpose_estimator, zoedepth=args.zoedepth,
                            insightface=args.insightface, captioner=args.captioner, needed_for=config.steps)
    return PrepareConfig(**{**config.__dict__, "models": models})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        if args.command == "merge":
            clips, faces, failed = Store(args.out).rebuild_manifests()
            print(f"{args.out / 'clips.jsonl'}: {clips} clips, {args.out / 'faces.jsonl'}: {faces} faces"
                  + (f"; {len(failed)} sources failed (see sources/<id>/failed.txt)" if failed else ""))
            return 0
        summary = prepare(args.sources, config_from(args))
    except DreaMovingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.text(args.out))
    return 0
