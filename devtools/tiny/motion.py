"""Tiny motion modules for the tiny SD1.5 U-Net (2 levels of width 320, one res layer per level), in the real layouts.

``motion_module(layout, ext)`` writes AnimateDiff v1 (24 positions, ``.ckpt`` wrapped in ``state_dict`` like training
checkpoints), v2 (mid block, 32 positions), v3 (32 positions) or DreaMoving (ours, 64 positions) files; with ext
``"diffusers"`` the same v1/v2/v3 weights as a diffusers ``MotionAdapter`` folder (the hub layout). The
``bad_file(kind)`` family holds what users pick by mistake: SDXL and HotshotXL motion modules, a motion LoRA, a
ControlNet, a truncated and a corrupt file, and a ``.ckpt`` whose pickle would create ``MALICIOUS_MARKER`` if it ran.
"""
from __future__ import annotations

import re
from pathlib import Path

from devtools.tiny import cached, tiny_dir

VERSION = "v1"
LAYOUTS = ("v1", "v2", "v3", "dreamoving")
POSITIONS = {"v1": 24, "v2": 32, "v3": 32, "dreamoving": 64}
BAD_KINDS = ("sdxl", "hotshotxl", "motion_lora", "controlnet", "truncated", "corrupt", "malicious")


def malicious_marker() -> Path:
    """The file the malicious pickle would create; it must never exist."""
    return tiny_dir() / "motion" / "MALICIOUS_PICKLE_RAN"


def tiny_module(layout: str = "v2", *, zero_out: bool = False, seed: int = 0, channels=(320, 320),
                down_layers: int = 1, up_layers: int = 2):
    """A random ``MotionModule`` shaped like ``layout`` (mid block only for v2 and ours); ``zero_out`` zeroes every
    output projection (each block is then the identity, as AnimateDiff initialises them)."""
    import torch

    from dreamoving_core.motion.model import MotionModule, MotionModuleConfig, sinusoidal_positions

    config = MotionModuleConfig(channels=tuple(channels), down_layers=down_layers, up_layers=up_layers,
                                mid_block=layout in ("v2", "dreamoving"), positional_length=POSITIONS[layout],
                                version=layout)
    module = MotionModule(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith(".pe"):
                tensor.copy_(sinusoidal_positions(tensor.shape[1], tensor.shape[2]))
            elif "norm" in name:
                centre = 1.0 if name.endswith("weight") else 0.0
                tensor.copy_(centre + 0.02 * torch.randn(tensor.shape, generator=gen))
            elif ".proj_out." in name and zero_out:
                tensor.zero_()
            else:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
    return module


def _write(weights: dict, path: Path, wrap: bool = False) -> None:
    import torch
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        torch.save({"state_dict": weights, "global_step": 1} if wrap else weights, str(path))


def motion_module(layout: str = "v2", ext: str = "safetensors", *, zero_out: bool = False) -> Path:
    """A tiny motion module file in ``layout`` (``LAYOUTS``) as ``ext`` (``ckpt``, ``safetensors`` or, for
    v1/v2/v3, ``diffusers``: the ``diffusion_pytorch_model.safetensors`` of a ``MotionAdapter`` folder; ours is
    safetensors only). AnimateDiff v1/v2 files are fp32 like the originals, v3 and ours fp16, diffusers fp32."""
    import torch

    from dreamoving_core.motion.format import animatediff_state_dict, save_motion_adapter, save_motion_module

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")

    def build(path: Path) -> None:
        module = tiny_module(layout, zero_out=zero_out)
        if ext == "diffusers":
            save_motion_adapter(module, path)
            return
        if layout == "dreamoving":
            save_motion_module(module.half(), path, metadata={"note": "tiny random test module"})
            return
        weights = animatediff_state_dict(module)
        dtype = torch.float16 if layout == "v3" else torch.float32
        _write({k: v.to(dtype) for k, v in weights.items()}, path, wrap=layout == "v1")

    suffix = "_zero" if zero_out else ""
    if ext == "diffusers":
        return cached(f"motion/tiny_adapter_{layout}{suffix}_{VERSION}", build) / "diffusion_pytorch_model.safetensors"
    return cached(f"motion/tiny_mm_{layout}{suffix}_{VERSION}.{ext}", build)


def _hotshot_key(key: str) -> str:
    # HotshotXL names AnimateDiff's "motion_modules.N.temporal_transformer." as "temporal_attentions.N."
    for level_kind in ("down_blocks", "up_blocks"):
        if key.startswith(level_kind):
            parts = key.split(".")
            rest = ".".join(parts[5:]).replace("pos_encoder.pe", "pos_encoder.positional_encoding")
            return f"{parts[0]}.{parts[1]}.temporal_attentions.{parts[3]}.{rest}"
    return key


def _build_bad(kind: str, path: Path) -> None:
    import torch

    from dreamoving_core.motion.format import animatediff_state_dict

    if kind in ("sdxl", "hotshotxl"):
        # SDXL's three levels at narrow widths: the level count is what marks an SDXL motion module
        module = tiny_module("v3" if kind == "sdxl" else "v1", channels=(32, 64, 128), down_layers=2, up_layers=3)
        weights = animatediff_state_dict(module.half())
        if kind == "hotshotxl":
            weights = {_hotshot_key(k): v for k, v in weights.items()}
        _write(weights, path)
    elif kind == "motion_lora":
        # AnimateDiff motion LoRAs (v2_lora_ZoomIn.ckpt): "<attention block>.processor.<proj>_lora.{down,up}.weight"
        weights = {}
        for key, value in animatediff_state_dict(tiny_module("v2")).items():
            if m := re.match(r"(.+\.attention_blocks\.\d+)\.(to_q|to_k|to_v|to_out)(\.0)?\.weight$", key):
                weights[f"{m[1]}.processor.{m[2]}_lora.down.weight"] = 0.01 * torch.randn(4, value.shape[1])
                weights[f"{m[1]}.processor.{m[2]}_lora.up.weight"] = torch.zeros(value.shape[0], 4)
        _write(weights, path)
    elif kind == "controlnet":
        # the first tensors of an original-layout SD1.5 ControlNet (control_v11p_sd15_openpose.pth)
        _write({"control_model.time_embed.0.weight": torch.randn(1280, 320) * 0.02,
                "control_model.input_hint_block.0.weight": torch.randn(16, 3, 3, 3) * 0.02,
                "control_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3) * 0.02,
                "control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1),
                "control_model.middle_block_out.0.weight": torch.zeros(320, 320, 1, 1)}, path)
    elif kind in ("truncated", "corrupt"):
        # an interrupted download: the first half of a real file (safetensors header / .ckpt zip without directory)
        data = motion_module("v2", path.suffix[1:]).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "malicious":
        torch.save({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.ones(320),
                    "payload": _Payload(str(malicious_marker()))}, str(path))
    else:
        raise ValueError(f"kind must be one of {BAD_KINDS}")


class _Payload:
    """Unpickling this object would create ``marker`` (what a malicious checkpoint could do with any code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_file(kind: str) -> Path:
    """A file that is not a usable SD1.5 motion module (``BAD_KINDS``), in the format users meet it in."""
    ext = {"sdxl": "safetensors", "hotshotxl": "safetensors", "truncated": "safetensors"}.get(kind, "ckpt")
    return cached(f"motion/bad_{kind}_{VERSION}.{ext}", lambda path: _build_bad(kind, path))
