"""Model names resolved only inside their model folders.

A name (what a loader's dropdown offers, and what any client can send to ComfyUI's ``/prompt``) is a path relative
to one of the folders registered for that kind of model: ``mm_sd_v15_v2.ckpt``, ``sub/dir/file.onnx`` or a folder
name (an InsightFace pack, a ZoeDepth folder). ``find`` refuses, before touching the file system, every name that is
not such a relative path (``..``, an absolute path, a drive, an empty or ``.`` part, a NUL byte), and refuses a name
whose file or folder, symbolic links followed, lies outside every one of its roots. Model folders that live
elsewhere are registered as roots (ComfyUI's ``extra_model_paths.yaml``) instead of linked in.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import InputMismatchError

Root = str | os.PathLike
_SEPARATORS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def name_parts(name: str) -> list[str]:
    """The parts of a relative model name; ``InputMismatchError`` for anything that could leave its folder."""
    if not isinstance(name, str) or not name:
        raise InputMismatchError(f"{name!r} is not a model name (expected a file or folder name from the list)")
    parts = _SEPARATORS.split(name)
    if "\x00" in name or name[0] in "/\\" or _DRIVE.match(name) or any(p in ("", ".", "..") for p in parts):
        raise InputMismatchError(f"'{name}' is not a model name: names are relative to their model folder and "
                                 "may not start with '/' or a drive, nor contain '..' or empty parts")
    return parts


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def find(name: str, roots: Sequence[Root], *, folder: bool = False) -> Path | None:
    """The real path of the file (``folder``: the folder) ``name`` in the first of ``roots`` holding it; ``None``
    when none does. Raises ``InputMismatchError`` for a name that is not a plain relative name, or whose file or
    folder is a symbolic link to a place outside every root."""
    parts = name_parts(name)
    real_roots = [os.path.realpath(r) for r in roots]
    for root in roots:
        candidate = os.path.join(root, *parts)
        if not os.path.lexists(candidate):
            continue
        real = os.path.realpath(candidate)
        if not _inside(real, real_roots):
            raise InputMismatchError(f"'{name}' leads outside the model folders (it is a link to '{real}'); move "
                                     "the file into the folder, or add its folder to ComfyUI's "
                                     "extra_model_paths.yaml")
        if (os.path.isdir if folder else os.path.isfile)(real):
            return Path(real)
    return None


def list_folders(roots: Sequence[Root], usable: Callable[[Path], bool]) -> list[str]:
    """Names of the sub-folders of ``roots`` that ``usable`` accepts (e.g. holds a ``config.json``) and that
    ``find`` resolves inside the roots, sorted."""
    names = set()
    for root in roots:
        if os.path.isdir(root):
            names.update(entry.name for entry in os.scandir(root) if entry.is_dir())
    return sorted(n for n in names if _resolves(n, roots, usable))


def _resolves(name: str, roots: Sequence[Root], usable: Callable[[Path], bool]) -> bool:
    try:
        path = find(name, roots, folder=True)
    except InputMismatchError:
        return False
    return path is not None and usable(path)


def resolvable(names: Sequence[str], roots: Sequence[Root]) -> list[str]:
    """The file ``names`` (e.g. ComfyUI's listing of a folder) that ``find`` resolves inside ``roots``."""
    out = []
    for name in names:
        try:
            if find(name, roots) is not None:
                out.append(name)
        except InputMismatchError:
            pass
    return out
