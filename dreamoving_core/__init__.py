"""DreaMoving core: the models and math in pure torch + einops, usable without ComfyUI.

Grouped by paper concept: ``motion`` (motion blocks), ``control`` (Video ControlNet), ``guider`` (Content Guider and
its image encoders), ``preprocess`` (DWPose, ZoeDepth, pose tools), ``unet`` (the SD1.5 blocks and U-Net topology
rules they share); ``io`` and ``errors`` at the top. See the README section "Python API" for the public entry points.
"""
from . import _compat
from .errors import DreaMovingError

_compat.install(__name__)

__all__ = ["DreaMovingError"]
