"""Glue shared by every topic: the model folders the pack registers with ``folder_paths``, and error wrapping."""
from __future__ import annotations

import functools
import os
from typing import Callable

import folder_paths

from dreamoving_core.errors import DreaMovingError

# name -> sub-folder of ComfyUI's models dir. Folders other packs already registered (AnimateDiff-Evolved,
# IPAdapter_plus) are extended rather than replaced, so users' existing files show up in our loaders.
MODEL_FOLDERS = {
    "animatediff_models": "animatediff_models",
    "dreamoving_motion": os.path.join("dreamoving", "motion"),
    "dreamoving_video_controlnet": os.path.join("dreamoving", "video_controlnet"),
    "dreamoving_content_guider": os.path.join("dreamoving", "content_guider"),
    "dreamoving_preprocess": os.path.join("dreamoving", "preprocess"),
    "dreamoving_eval": os.path.join("dreamoving", "eval"),
    "ipadapter": "ipadapter",
    "insightface": "insightface",
}
WEIGHT_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx"}


def register_model_folders() -> None:
    for name, sub in MODEL_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, sub)
        if name in folder_paths.folder_names_and_paths:
            paths = folder_paths.folder_names_and_paths[name][0]
            if path not in paths:
                paths.append(path)
        else:
            folder_paths.folder_names_and_paths[name] = ([path], set(WEIGHT_EXTENSIONS))


class NodeError(DreaMovingError):
    """A DreaMovingError prefixed with the node's display name, as users see it in the UI."""


def node_error(node: str, err: Exception | str) -> NodeError:
    """``NodeError("Load Motion Module: <message>")``; keeps the original as the cause."""
    return NodeError(f"{node}: {err}")


def reports_errors(node: str) -> Callable[[Callable], Callable]:
    """Decorator for a node's ``execute``: a DreaMovingError raised inside reaches the user as one message prefixed
    with the node's display name ``node`` (messages already prefixed pass through unchanged)."""

    def decorate(execute: Callable) -> Callable:
        @functools.wraps(execute)
        def wrapper(*args, **kwargs):
            try:
                return execute(*args, **kwargs)
            except NodeError:
                raise
            except DreaMovingError as err:
                raise node_error(node, err) from err

        return wrapper

    return decorate


register_model_folders()
