"""DreaMoving for ComfyUI: motion blocks, Video ControlNet and Content Guider for SD1.5 dance videos.

ComfyUI imports this file; it registers the nodes through the V3 entry point and serves ``web/js``.
Importing it loads no model and touches no network: heavy libraries are imported when a node first runs.
On a ComfyUI older than ``[tool.comfy] requires-comfyui`` in ``pyproject.toml`` it registers nothing and logs one
message saying why, so ComfyUI starts as if the pack were not there.
"""
import importlib.util
import logging
import os
import re
import sys

PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def requires_comfyui() -> str:
    """The ComfyUI versions the pack supports, as ``pyproject.toml`` declares them for the Comfy registry (e.g.
    ``>=0.3.75,<=0.8.0``)."""
    with open(os.path.join(PACK_DIR, "pyproject.toml"), encoding="utf-8") as f:
        m = re.search(r'^requires-comfyui\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    return m.group(1) if m else ""


def host_refusal() -> str | None:
    """Why this ComfyUI is too old for the pack (one message for the log), or None."""
    spec = requires_comfyui()
    minimum = next((part.strip()[2:] for part in spec.split(",") if part.strip().startswith(">=")), None)
    if minimum is None:
        return None
    try:
        from comfyui_version import __version__ as version
    except ImportError:  # every supported ComfyUI has it
        version = "of unknown version (it has no comfyui_version.py)"
    if _version(version) >= _version(minimum):
        return None
    return (f"DreaMoving is not loaded: it needs ComfyUI {minimum} or newer (supported: {spec}) and this is "
            f"ComfyUI {version}. Update ComfyUI (git pull in its folder, or ComfyUI-Manager > Update ComfyUI) and "
            "restart it.")


def _register_core() -> None:
    """Make the ComfyUI-free core importable as the top-level package ``dreamoving_core`` (as in tests and scripts)
    without putting the whole pack folder on ``sys.path``."""
    if "dreamoving_core" in sys.modules:
        return
    core_dir = os.path.join(PACK_DIR, "dreamoving_core")
    spec = importlib.util.spec_from_file_location("dreamoving_core", os.path.join(core_dir, "__init__.py"),
                                                  submodule_search_locations=[core_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dreamoving_core"] = module
    spec.loader.exec_module(module)


REFUSAL = host_refusal()
if REFUSAL:
    logging.error(REFUSAL)
    NODE_CLASS_MAPPINGS: dict = {}  # an empty node list: ComfyUI counts the pack as loaded and starts normally
    __all__ = ["NODE_CLASS_MAPPINGS"]
else:
    _register_core()

    from .nodes import comfy_entrypoint  # noqa: E402  (needs dreamoving_core registered)

    WEB_DIRECTORY = "./web/js"

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
