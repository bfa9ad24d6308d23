"""The pack's sample inputs (``inputs/``: a face, a cloth and a stylised image, a pose, a depth and a dance video)
copied into ComfyUI's input folder when the pack loads, so every shipped workflow queues as it opens.

A file the user already has under the same name is never touched.
"""
from __future__ import annotations

import logging
import os
import shutil

import folder_paths

log = logging.getLogger("dreamoving")
PACK_INPUTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inputs")


def install_sample_inputs(target: str | None = None) -> list[str]:
    """Copy every file of ``inputs/`` that ``target`` (default: ComfyUI's input folder) lacks; returns their names.

    A failure (e.g. a read-only folder) is logged, never raised: the pack still loads."""
    target = target or folder_paths.get_input_directory()
    copied = []
    try:
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(PACK_INPUTS)):
            dest = os.path.join(target, name)
            if os.path.lexists(dest):
                continue
            partial = dest + ".dreamoving-partial"
            shutil.copyfile(os.path.join(PACK_INPUTS, name), partial)
            os.replace(partial, dest)
            copied.append(name)
    except OSError as err:
        log.warning("DreaMoving: could not copy the sample inputs into %s: %s", target, err)
    if copied:
        log.info("DreaMoving: sample inputs copied into %s: %s", target, ", ".join(copied))
    return copied
