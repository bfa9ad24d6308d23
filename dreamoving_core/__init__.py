"""DreaMoving core: the models and math in pure torch + einops, usable without ComfyUI.

See the README section "Python API" for the public entry points.
"""
from .errors import DreaMovingError

__all__ = ["DreaMovingError"]
