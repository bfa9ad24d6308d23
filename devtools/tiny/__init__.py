"""Tiny models with random weights in the real file formats, generated on demand and cached on disk.

Used by the tests and the demo. Files live in ``$DREAMOVING_CACHE/tiny`` and are never committed.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from devtools.host import cache_dir


def tiny_dir() -> Path:
    return cache_dir() / "tiny"


def cached(relpath: str, build: Callable[[Path], None]) -> Path:
    """``tiny_dir()/relpath``, built once by ``build(tmp_path)`` and moved into place atomically.

    Change ``relpath`` (e.g. a version suffix) whenever a builder changes, so stale caches are not reused.
    ``build`` may create a file or a folder at the path it is given.
    """
    target = tiny_dir() / relpath
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / target.name
        build(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.exists():  # a concurrent builder may have won the race
                raise
    return target


def comfy_importable(cpu: bool = True) -> Path:
    """Put ComfyUI (``COMFYUI_DIR`` or the cached pinned copy) on ``sys.path`` for in-process ``comfy.*`` imports;
    ``cpu`` forces the CPU so ``comfy.model_management`` does not look for CUDA. Returns the ComfyUI folder."""
    from devtools.host import current_comfy_dir

    comfy_dir = current_comfy_dir()
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args

    args.cpu = cpu
    return comfy_dir


PACK_NODES = "dm_nodes"


def pack_nodes(topic: str, cpu: bool = True):
    """The pack's ``nodes/<topic>.py`` imported in this process as ``dm_nodes.<topic>`` (ComfyUI's own ``nodes``
    module owns the name ``nodes``). Every caller gets the same module objects."""
    import importlib
    import types

    comfy_importable(cpu)
    if PACK_NODES not in sys.modules:
        package = types.ModuleType(PACK_NODES)
        package.__path__ = [str(Path(__file__).resolve().parents[2] / "nodes")]
        sys.modules[PACK_NODES] = package
    return importlib.import_module(f"{PACK_NODES}.{topic}")
