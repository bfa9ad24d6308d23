"""DreaMoving core: the models and math in pure torch + einops, usable without ComfyUI.

Grouped by paper concept: ``motion`` (motion blocks), ``control`` (Video ControlNet), ``guider`` (Content Guider and
its image encoders), ``preprocess`` (DWPose, ZoeDepth, pose tools), ``unet`` (the SD1.5 blocks and U-Net topology
rules they share); at the top ``io`` and ``errors``, and what every model shares: ``attention`` (the one attention
function), ``ops`` (the injectable layer classes), ``onnx_sessions`` (the onnxruntime policy) and ``detection``
(NMS). See the README section "Python API" for the public entry points.
"""
from . import _compat
from .errors import DreaMovingError

_compat.install(__name__)

__all__ = ["DreaMovingError"]
