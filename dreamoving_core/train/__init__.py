"""DreaMoving's four training stages (paper Section 2.4), producing the files the nodes load.

``accelerate launch -m dreamoving_core.train STAGE --config CONFIG.yaml [key.sub=value ...]`` with STAGE one of
``content_guider``, ``long_frame``, ``video_controlnet``, ``expression`` (see ``stages`` for what each trains and
``configs/`` for the paper's recipe). From Python::

    from dreamoving_core.train import load_config, train
    result = train(load_config("long_frame", "my.yaml", ["steps=100"]))

The trained modules are the ``dreamoving_core`` modules the nodes run (``unet`` puts them into diffusers' SD1.5
U-Net); the frozen base comes from the user's SD1.5 single-file checkpoint (``base``). Needs the training extra
(``requirements-train.txt``): diffusers, accelerate, tensorboard.
"""
from .config import STAGES, ConfigError, TrainConfig, load_config
from .trainer import TrainResult, Trainer, train
from .validate import Scorer

__all__ = ["STAGES", "ConfigError", "Scorer", "TrainConfig", "TrainResult", "Trainer", "load_config", "train"]
