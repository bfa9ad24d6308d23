"""The flat module paths of the first releases (``dreamoving_core.motion_format``, ``dreamoving_core.dwpose``, ...),
kept importable after the core was grouped into subpackages by paper concept.

An old name resolves to the very module object of its new home, so attributes, ``isinstance`` checks and
monkeypatching behave the same through either path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "unet_blocks": "unet.blocks",
    "motion_format": "motion.format",
    "video_controlnet": "control.model",
    "controlnet_format": "control.format",
    "content_guider": "guider.model",
    "content_guider_format": "guider.format",
    "content_guider_kernel": "guider.kernel",
    "clip_image": "guider.clip_image",
    "face_id": "guider.face_id",
    "dwpose": "preprocess.dwpose",
    "pose": "preprocess.pose",
    "pose_render": "preprocess.render",
    "pose_smoothing": "preprocess.smoothing",
    "pose_retarget": "preprocess.retarget",
    "zoedepth": "preprocess.zoedepth",
}
"""Old module name (under ``dreamoving_core``) -> its module now. ``dreamoving_core.motion`` needs no entry: the
package re-exports what the old module published."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != self.package or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(f"{self.package}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        """The module was executed under its new name already."""


def install(package: str) -> None:
    """Make ``<package>.<old name>`` import the moved modules (once per process)."""
    if not any(isinstance(f, _MovedModules) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_MovedModules(package))
