"""DreaMoving for ComfyUI: motion blocks, Video ControlNet and Content Guider for SD1.5 dance videos.

ComfyUI imports this file; it registers the nodes through the V3 entry point and serves ``web/js``.
Importing it loads no model and touches no network: heavy libraries are imported when a node first runs.
"""
import importlib.util
import os
import sys


def _register_core() -> None:
    """Make the ComfyUI-free core importable as the top-level package ``dreamoving_core`` (as in tests and scripts)
    without putting the whole pack folder on ``sys.path``."""
    if "dreamoving_core" in sys.modules:
        return
    core_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dreamoving_core")
    spec = importlib.util.spec_from_file_location("dreamoving_core", os.path.join(core_dir, "__init__.py"),
                                                  submodule_search_locations=[core_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dreamoving_core"] = module
    spec.loader.exec_module(module)


_register_core()

from .nodes import comfy_entrypoint  # noqa: E402  (needs dreamoving_core registered)

WEB_DIRECTORY = "./web/js"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
