"""DreaMoving for ComfyUI: motion blocks, Video ControlNet and Content Guider for SD1.5 dance videos.

ComfyUI imports this file; it registers the nodes through the V3 entry point and serves ``web/``.
Importing it loads no model and touches no network: heavy libraries are imported when a node first runs.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web/js"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
