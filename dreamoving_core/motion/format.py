"""Motion module files: format detection from the keys, key maps, loading and saving.

Accepted (SD1.5 motion modules, ``.ckpt``/``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``):

- **AnimateDiff v1** (``mm_sd_v15.ckpt``, ``mm_sd_v14.ckpt``): ``down_blocks.<level>.motion_modules.<j>.<block key>``
  and ``up_blocks.<level>.motion_modules.<j>.<block key>``, no middle block, 24 positions;
- **AnimateDiff v2** (``mm_sd_v15_v2.ckpt``): as v1 plus ``mid_block.motion_modules.0.<block key>``, 32 positions;
- **AnimateDiff v3** (``v3_sd15_mm.ckpt``): as v1 with 32 positions;
- **DreaMoving** (ours, safetensors only): ``down_blocks.<level>.<j>.<block key>``, ``mid_block.<block key>``,
  ``up_blocks.<level>.<j>.<block key>`` (exactly ``MotionModule.state_dict()``), 64 positions by default, metadata
  ``format = "dreamoving_motion_module"``, ``version = "1"``, ``motion_config = <JSON of MotionModuleConfig>``.

``<block key>`` is a ``MotionBlock`` key: ``temporal_transformer.{norm,proj_in,proj_out}.{weight,bias}``,
``temporal_transformer.transformer_blocks.<k>.attention_blocks.<a>.{to_q,to_k,to_v}.weight``,
``....attention_blocks.<a>.to_out.0.{weight,bias}``, ``....attention_blocks.<a>.pos_encoder.pe`` ``(1, L, C)``,
``....norms.<a>.{weight,bias}``, ``....ff.net.0.proj.{weight,bias}``, ``....ff.net.2.{weight,bias}``,
``....ff_norm.{weight,bias}``. A wrapping ``state_dict`` dict and a ``module.`` key prefix (training checkpoints) are
removed. SDXL and HotshotXL motion modules, motion LoRAs, ControlNets, SD checkpoints and truncated or corrupt files are
refused with a ``ModelFormatError`` that names the file and says what to load instead.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..errors import ModelFormatError
from ..io import load_state_dict, read_metadata, reading, save_state_dict
from .model import (DEFAULT_POSITIONAL_LENGTH, PE_EXTENSIONS, TORCH_OPS, MotionModule, MotionModuleConfig,
                     PeExtension, extend_positional_encoding)

FORMAT_NAME = "dreamoving_motion_module"
FORMAT_VERSION = "1"
FORMATS = ("v1", "v2", "v3", "dreamoving")
ANIMATEDIFF_POSITIONS = {"v1": 24, "v2": 32, "v3": 32}

_ANIMATEDIFF_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.(\d+)\.(temporal_transformer\..+)$")
_ANIMATEDIFF_MID_KEY = re.compile(r"^mid_block\.motion_modules\.0\.(temporal_transformer\..+)$")
_NATIVE_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(temporal_transformer\..+)$")
_NATIVE_MID_KEY = re.compile(r"^mid_block\.(temporal_transformer\..+)$")
_SUGGESTION = "load an SD1.5 motion module such as mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt or a DreaMoving motion module"


def from_animatediff_key(key: str) -> str | None:
    """``down_blocks.1.motion_modules.0.temporal_transformer.x`` -> ``down_blocks.1.0.temporal_transformer.x``
    (and ``mid_block.motion_modules.0.`` -> ``mid_block.``); ``None`` for keys that are not motion-block weights."""
    if m := _ANIMATEDIFF_KEY.match(key):
        return f"{m[1]}.{m[2]}.{m[3]}.{m[4]}"
    if m := _ANIMATEDIFF_MID_KEY.match(key):
        return f"mid_block.{m[1]}"
    return None


def to_animatediff_key(key: str) -> str:
    """Inverse of ``from_animatediff_key`` for ``MotionModule.state_dict()`` keys."""
    if m := _NATIVE_KEY.match(key):
        return f"{m[1]}.{m[2]}.motion_modules.{m[3]}.{m[4]}"
    if m := _NATIVE_MID_KEY.match(key):
        return f"mid_block.motion_modules.0.{m[1]}"
    raise ValueError(f"'{key}' is not a motion module key")


def animatediff_state_dict(module: MotionModule) -> dict[str, torch.Tensor]:
    """``module``'s weights under AnimateDiff's key names (the layout of ``mm_sd_v15_v2.ckpt``)."""
    return {to_animatediff_key(k): v for k, v in module.state_dict().items()}


def _strip_training_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _refuse_other_models(keys: Iterable[str], name: str) -> None:
    """Raise a ``ModelFormatError`` saying what the file is when its keys show it is not an SD1.5 motion module.

    Needs only the keys, so a large checkpoint picked by mistake is refused before its tensors are read."""
    keys = list(keys)

    def has(*parts: str) -> bool:
        return any(part in key for key in keys for part in parts)

    def starts(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if has("_lora.", ".lora.", "lora_down", "lora_up", "lora_A", "lora_B") or starts("lora_"):
        if has("motion_modules", "temporal"):
            raise ModelFormatError(f"'{name}' is a motion LoRA (an add-on that steers camera motion), not a motion "
                                   f"module; {_SUGGESTION}")
        raise ModelFormatError(f"'{name}' is a LoRA for the image model, not a motion module; apply it with "
                               f"ComfyUI's LoRA loader and {_SUGGESTION}")
    if has("temporal_attentions.", "pos_encoder.positional_encoding"):
        raise ModelFormatError(f"'{name}' is a HotshotXL motion module, made for SDXL; this pack needs an SD1.5 "
                               f"one: {_SUGGESTION}")
    if has("controlnet_cond_embedding.") and has("motion_modules."):
        raise ModelFormatError(f"'{name}' is a SparseCtrl ControlNet, not a motion module; {_SUGGESTION}")
    if has("zero_convs.", "input_hint_block.", "controlnet_cond_embedding.", "controlnet_down_blocks."):
        raise ModelFormatError(f"'{name}' is a ControlNet, not a motion module; put it in models/controlnet and "
                               f"load it with a ControlNet loader, and {_SUGGESTION}")
    if starts("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders."):
        raise ModelFormatError(f"'{name}' is a Stable Diffusion checkpoint, not a motion module; load it with "
                               f"'Load Checkpoint' and {_SUGGESTION}")
    if starts("image_proj.", "ip_adapter."):
        raise ModelFormatError(f"'{name}' is an IP-Adapter, not a motion module; {_SUGGESTION}")
    if not has(".motion_modules.") and not any(_NATIVE_KEY.match(k) or _NATIVE_MID_KEY.match(k) for k in keys):
        if starts("input_blocks.", "conv_in.", "down_blocks.", "encoder.", "decoder."):
            raise ModelFormatError(f"'{name}' holds image-model weights (U-Net or VAE), not a motion module; "
                                   f"{_SUGGESTION}")
        sample = ", ".join(keys[:3])
        raise ModelFormatError(f"'{name}' is not a motion module: none of its keys are motion-block weights "
                               f"(down_blocks.<n>.motion_modules.<m>.temporal_transformer.*), first keys: {sample}; "
                               f"{_SUGGESTION}")


def _native_weights(sd: Mapping[str, torch.Tensor], name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``(format, weights under MotionModule.state_dict() names)``; non-motion keys are dropped."""
    _refuse_other_models(sd, name)
    native = {k: v for k, v in sd.items() if _NATIVE_KEY.match(k) or _NATIVE_MID_KEY.match(k)}
    if native:
        return "dreamoving", native
    converted = {}
    for key, value in sd.items():
        new_key = from_animatediff_key(key)
        if new_key is not None:
            converted[new_key] = value
    if not any(".pos_encoder.pe" in k for k in converted):
        raise ModelFormatError(f"'{name}' is a motion module without positional encoding (AnimateLCM-style), "
                               f"which this pack does not support; {_SUGGESTION}")
    levels = {int(k.split(".")[1]) for k in converted if k.startswith("down_blocks.")}
    if len(levels) == 3:
        raise ModelFormatError(f"'{name}' is an SDXL motion module (3 U-Net levels, like mm_sdxl_v10_beta.ckpt); "
                               f"this pack needs an SD1.5 one: {_SUGGESTION}")
    if any(k.startswith("mid_block.") for k in converted):
        return "v2", converted
    pe_length = next(v.shape[1] for k, v in converted.items() if k.endswith(".pos_encoder.pe"))
    return ("v1" if pe_length == ANIMATEDIFF_POSITIONS["v1"] else "v3"), converted


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def infer_config(weights: Mapping[str, torch.Tensor], name: str, version: str,
                 metadata: Mapping[str, str] | None = None) -> MotionModuleConfig:
    """The ``MotionModuleConfig`` of native-named ``weights`` (see ``_native_weights``)."""
    keys = list(weights)
    levels = _indices(keys, r"^down_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ModelFormatError(f"'{name}' has no complete set of down-block motion modules (levels found: "
                               f"{levels}); the file may be truncated, download it again")
    try:
        channels = tuple(weights[f"down_blocks.{i}.0.temporal_transformer.norm.weight"].shape[0] for i in levels)
        first = "down_blocks.0.0.temporal_transformer."
        positions = weights[f"{first}transformer_blocks.0.attention_blocks.0.pos_encoder.pe"].shape[1]
        ff_mult = weights[f"{first}transformer_blocks.0.ff.net.2.weight"].shape[1] // channels[0]
    except KeyError as err:
        raise ModelFormatError(f"'{name}' is missing the weight {err.args[0]}; the file may be truncated, download "
                               "it again") from err
    stored = json.loads(metadata.get("motion_config", "{}")) if metadata else {}
    return MotionModuleConfig(
        channels=channels,
        down_layers=len(_indices(keys, r"^down_blocks\.0\.(\d+)\.")),
        up_layers=len(_indices(keys, r"^up_blocks\.0\.(\d+)\.")),
        mid_block=any(k.startswith("mid_block.") for k in keys),
        positional_length=positions,
        num_heads=int(stored.get("num_heads", 8)),
        attention_blocks=len(_indices(keys, rf"^{re.escape(first)}transformer_blocks\.0\.attention_blocks\.(\d+)\.")),
        transformer_layers=len(_indices(keys, rf"^{re.escape(first)}transformer_blocks\.(\d+)\.")),
        ff_mult=ff_mult,
        norm_groups=int(stored.get("norm_groups", 32)),
        version=version,
    )


def _check_weights(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ModelFormatError(f"'{name}' is an incomplete or inconsistent motion module: {', '.join(detail)} "
                               "motion-block weights; the file may be truncated or damaged, download it again")
    for key, value in weights.items():
        got, want = tuple(value.shape), tuple(expected[key].shape)
        compared = slice(None, None, 2) if key.endswith(".pe") else slice(None)  # tables may have any length
        if got[compared] != want[compared]:
            raise ModelFormatError(f"'{name}': weight {key} has shape {got}, expected {want} for this motion "
                                   "module's widths")


def motion_module_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "<state dict>", *,
                                  positional_length: int | None = None, pe_extension: PeExtension = "sinusoid",
                                  metadata: Mapping[str, str] | None = None, ops=TORCH_OPS,
                                  dtype: torch.dtype | None = None) -> MotionModule:
    """Build a ``MotionModule`` from a state dict in any supported layout (see the module docstring).

    ``positional_length``: rows of the positional table after loading; ``None`` means the stored length, but at
    least ``DEFAULT_POSITIONAL_LENGTH`` (64). Longer tables are filled by ``pe_extension`` (``"sinusoid"`` or
    ``"interpolate"``, see ``extend_positional_encoding``). ``ops``: layer classes (default ``torch.nn``).
    ``dtype``: cast the weights (default: as stored).
    """
    if pe_extension not in PE_EXTENSIONS:
        raise ValueError(f"pe_extension must be one of {PE_EXTENSIONS}, got '{pe_extension}'")
    with reading(name, "motion module"):
        version, weights = _native_weights(_strip_training_prefix(sd), name)
        config = infer_config(weights, name, version, metadata)
        length = positional_length or max(config.positional_length, DEFAULT_POSITIONAL_LENGTH)
        config = replace(config, positional_length=length)
        with torch.device("meta"):
            module = MotionModule(config, ops)
        expected = module.state_dict()
        _check_weights(weights, expected, name)
        weights = {k: extend_positional_encoding(v, length, pe_extension) if k.endswith(".pe") else v
                   for k, v in weights.items()}
        module.load_state_dict(weights, assign=True)
    if dtype is not None:
        module.to(dtype)
    return module.eval().requires_grad_(False)


def _safetensors_keys(path: Path) -> list[str] | None:
    """The keys of a readable safetensors file without reading its tensors; ``None`` for other or damaged files."""
    if path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError):
        return None


def load_motion_module(path: str | os.PathLike, *, positional_length: int | None = None,
                       pe_extension: PeExtension = "sinusoid", ops=TORCH_OPS,
                       dtype: torch.dtype | None = None) -> MotionModule:
    """Load an AnimateDiff v1/v2/v3 or DreaMoving motion module file (format detected from its keys).

    Pickle files are read with ``weights_only=True``; a file carrying code is refused. Raises ``ModelFormatError``
    naming the file for anything that is not a complete SD1.5 motion module. See ``motion_module_from_state_dict``
    for the other arguments.
    """
    path = Path(path)
    keys = _safetensors_keys(path)
    if keys is not None:
        _refuse_other_models(_strip_training_prefix(dict.fromkeys(keys)), path.name)
    sd = load_state_dict(path)
    metadata = read_metadata(path)
    return motion_module_from_state_dict(sd, path.name, positional_length=positional_length,
                                         pe_extension=pe_extension, metadata=metadata, ops=ops, dtype=dtype)


def save_motion_module(module: MotionModule, path: str | os.PathLike,
                       metadata: Mapping[str, str] | None = None) -> None:
    """Save ``module`` in the DreaMoving format (safetensors, ``MotionModule.state_dict()`` keys, config metadata).

    ``metadata`` (string pairs) is stored alongside ``format``, ``version`` and ``motion_config``."""
    if Path(path).suffix.lower() != ".safetensors":
        raise ValueError(f"DreaMoving motion modules are saved as .safetensors, got '{Path(path).name}'")
    info = dict(metadata or {})
    info.update(format=FORMAT_NAME, version=FORMAT_VERSION, motion_config=json.dumps(asdict(module.config)))
    save_state_dict(module.state_dict(), path, metadata=info)
