"""Safe loading and saving of weight files.

Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are read with ``torch.load(weights_only=True)``, which
refuses any object that is not a tensor or a plain container, so a malicious pickle is rejected without running.
Every failure ends in a ``ModelFormatError`` naming the file, with different words for a file that is damaged
("corrupt": download it again) and one that carries code ("unsafe": use a .safetensors version).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import DreaMovingError, ModelFormatError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
# Where training checkpoints keep the weights, beside optimizer state, step counters, ... (Lightning, DeepSpeed,
# plain torch loops); the first of these holding tensors is the model.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "module", "model")
DOWNLOAD_AGAIN = "the file may be truncated or corrupt (an interrupted download?): download it again"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for wrapping it in our own words: no class name, and without the
    ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :`` prefix onnxruntime puts before its own text."""
    text = re.sub(r"^\[\w+\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", str(err).strip())
    return text.splitlines()[0] if text else "no details"


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
    return flat


def _holds_tensors(tree) -> bool:
    return isinstance(tree, Mapping) and any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in tree.values())


def unwrap_checkpoint(tree: Mapping) -> Mapping:
    """The weights of a loaded checkpoint, found by content as ``comfy.utils.load_torch_file`` does: the first of
    ``WRAPPER_KEYS`` whose value holds tensors (a training checkpoint: weights + optimizer + step + ...), else the
    value of a single top-level key, else the whole dict (flat weights, or nested ones like IP-Adapter's)."""
    for key in WRAPPER_KEYS:
        if _holds_tensors(tree.get(key)):
            return tree[key]
    if len(tree) == 1 and _holds_tensors(next(iter(tree.values()))):
        return next(iter(tree.values()))
    return tree


def _pickle_stream(path: Path) -> io.BufferedIOBase:
    """The pickle inside a torch file: ``*/data.pkl`` of the zip format, else the file itself (legacy format)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            return io.BytesIO(archive.read(member))
    return open(path, "rb")


def _is_complete_pickle(path: Path) -> bool:
    """Whether the file holds a whole, well-formed pickle (opcodes up to STOP): then weights_only refused what the
    pickle *says* (Python objects), not damage."""
    try:
        with _pickle_stream(path) as stream:
            for _ in pickletools.genops(stream):
                pass
        return True
    except Exception:  # unknown opcodes, an early end, a broken zip: the bytes are not a pickle
        return False


def _pickle_error(path: Path, err: Exception) -> ModelFormatError:
    name = path.name
    refused = "WeightsUnpickler error" in str(err) or "Unsupported global" in str(err)
    if refused and _is_complete_pickle(path):
        return ModelFormatError(f"'{name}' contains Python objects beyond plain weights and was refused without "
                                "running them (unsafe pickle); use a .safetensors version of this model")
    return ModelFormatError(f"'{name}' is not a readable torch checkpoint (its bytes are not a pickle of tensors); "
                            f"{DOWNLOAD_AGAIN}")


def _safetensors_error(path: Path, err: Exception) -> ModelFormatError:
    return ModelFormatError(f"'{path.name}' is not a readable safetensors file ({first_line(err)}); "
                            f"{DOWNLOAD_AGAIN}")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelFormatError(f"'{path.name}' does not exist (looked at {path})")
    if path.stat().st_size == 0:
        raise ModelFormatError(f"'{path.name}' is empty (0 bytes); download it again")


def load_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a flat ``{key: tensor}`` dict from a ``.safetensors`` or pickle-based weights file, safely.

    Nested dicts (e.g. IP-Adapter's ``{"image_proj": {...}, "ip_adapter": {...}}``) are flattened with ``.``-joined
    keys; a training checkpoint's weights are taken from it (``unwrap_checkpoint``). Raises ``ModelFormatError`` for
    a missing, empty, truncated, corrupt or unsafe file, naming the file.
    """
    path = Path(path)
    name = path.name
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise _safetensors_error(path, err) from err
    if suffix not in PICKLE_SUFFIXES:
        raise ModelFormatError(f"'{name}' has an unsupported extension '{suffix}'; expected .safetensors, "
                               f"{', '.join(sorted(PICKLE_SUFFIXES))}")
    try:
        tree = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... depending on damage
        raise _pickle_error(path, err) from err
    if not isinstance(tree, Mapping):
        raise ModelFormatError(f"'{name}' holds a {type(tree).__name__}, not a dict of weights")
    weights = _flatten(unwrap_checkpoint(tree))
    if not weights:
        raise ModelFormatError(f"'{name}' contains no tensors")
    return weights


def verify_weights_file(path: str | os.PathLike) -> None:
    """Raise ``ModelFormatError`` (our words, as ``load_state_dict``) unless ``path`` is a readable, safe weights
    file; a safetensors file is checked from its header alone, without reading the tensors. For files another
    library (transformers) will read after us."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        load_state_dict(path)
        return
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise _safetensors_error(path, err) from err


@contextlib.contextmanager
def reading(name: str, kind: str) -> Iterator[None]:
    """Around the code that interprets a loaded file's tensors: a ``KeyError``, ``IndexError``, ``ValueError`` or
    ``RuntimeError`` raised there (a missing key, a tensor of the wrong rank or shape) becomes a ``ModelFormatError``
    saying that ``name`` is not a usable ``kind``."""
    try:
        yield
    except DreaMovingError:
        raise
    except (KeyError, IndexError, ValueError, RuntimeError) as err:
        raise ModelFormatError(f"'{name}' is not a usable {kind}: its weights have unexpected names or shapes "
                               f"({first_line(err)}); it may be damaged or another kind of model") from err


def save_state_dict(weights: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Save ``weights`` as safetensors (contiguous copies), with optional string ``metadata``."""
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path),
              metadata=dict(metadata) if metadata else None)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other formats or none)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise _safetensors_error(path, err) from err
