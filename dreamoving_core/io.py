"""Safe loading and saving of weight files.

Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are read with ``torch.load(weights_only=True)``, which
refuses any object that is not a tensor or a plain container, so a malicious pickle is rejected without running.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFormatError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# Training checkpoints often wrap the weights one level down.
WRAPPER_KEYS = ("state_dict", "module", "model")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
    return flat


def load_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a flat ``{key: tensor}`` dict from a ``.safetensors`` or pickle-based weights file, safely.

    Nested dicts (e.g. IP-Adapter's ``{"image_proj": {...}, "ip_adapter": {...}}``) are flattened with ``.``-joined
    keys; a single ``state_dict``/``module``/``model`` wrapper is removed. Raises ``ModelFormatError`` for a missing,
    truncated, corrupt or unsafe file, naming the file.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ModelFormatError(f"'{name}' does not exist (looked at {path})")
    if path.stat().st_size == 0:
        raise ModelFormatError(f"'{name}' is empty (0 bytes); download it again")
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelFormatError(f"'{name}' is not a readable safetensors file ({err}); it may be truncated or "
                                   "corrupt, download it again") from err
    if suffix not in PICKLE_SUFFIXES:
        raise ModelFormatError(f"'{name}' has an unsupported extension '{suffix}'; expected .safetensors, "
                               f"{', '.join(sorted(PICKLE_SUFFIXES))}")
    try:
        tree = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text:
            raise ModelFormatError(f"'{name}' contains Python objects beyond plain weights and was refused "
                                   "without running them (unsafe pickle); use a .safetensors version of this "
                                   "model") from err
        raise ModelFormatError(f"'{name}' could not be read ({type(err).__name__}: {text.splitlines()[0] if text else ''});"
                               " it may be truncated or corrupt, download it again") from err
    if not isinstance(tree, Mapping):
        raise ModelFormatError(f"'{name}' holds a {type(tree).__name__}, not a dict of weights")
    for wrapper in WRAPPER_KEYS:
        if wrapper in tree and isinstance(tree[wrapper], Mapping) and len(tree) <= 4:
            tree = tree[wrapper]
            break
    weights = _flatten(tree)
    if not weights:
        raise ModelFormatError(f"'{name}' contains no tensors")
    return weights


def save_state_dict(weights: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Save ``weights`` as safetensors (contiguous copies), with optional string ``metadata``."""
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path),
              metadata=dict(metadata) if metadata else None)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other formats or none)."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ModelFormatError(f"'{path.name}' is not a readable safetensors file ({err})") from err
