"""``python -m dreamoving_core.train STAGE [--config FILE] [--resume latest|DIR] [key.sub=value ...]``.

Run it under ``accelerate launch`` for several GPUs or machines (DDP by default; a DeepSpeed ZeRO-2 accelerate
config is shipped as ``configs/accelerate_deepspeed_zero2.yaml``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import DreaMovingError
from .config import STAGES, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dreamoving_core.train",
        description="Train one DreaMoving stage. Settings come from the stage's shipped config "
                    "(dreamoving_core/train/configs/STAGE.yaml: the paper's recipe), then --config, then key=value "
                    "overrides (e.g. data.root=/data/prepared optimizer.lr=5e-5 steps=2000).")
    parser.add_argument("stage", choices=STAGES, help="the stage to train")
    parser.add_argument("--config", help="YAML file with the settings to change (models.*, data.root, ...)")
    parser.add_argument("--resume", metavar="latest|DIR",
                        help="continue from a training checkpoint: 'latest' (the newest in output_dir/checkpoints) "
                             "or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings overriding the config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .stages import SPECS
        from .trainer import train

        result = train(load_config(args.stage, args.config, args.overrides), resume=args.resume)
    except DreaMovingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.output is not None:
        spec = SPECS[args.stage]
        print(f"{args.stage}: {result.steps} steps, wrote {result.output}; put it in ComfyUI's {spec.folder} and "
              f"load it with {spec.loader}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
