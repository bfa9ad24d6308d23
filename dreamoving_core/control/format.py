"""Video ControlNet files: layout detection, key maps, config inference, loading and saving.

Accepted files (all SD1.5):

- **original** ControlNet layout, keys ``control_model.*`` (``control_v11p_sd15_openpose.pth``, ``.safetensors``);
- **plain** original layout without the prefix (``input_blocks.*``, ``zero_convs.*``, ``middle_block_out.*``);
- **diffusers** layout (``controlnet_cond_embedding.*``, ``down_blocks.*``, ``controlnet_down_blocks.*``,
  ``controlnet_mid_block.*``);
- **video**: our single-file Video ControlNet (safetensors). Keys: ``control_model.<original ControlNet key>`` for
  the ControlNet (so ComfyUI's own loader reads the file as a plain ControlNet) and
  ``motion_modules.down_blocks.<level>.<j>.<MotionBlock key>`` / ``motion_modules.mid_block.<MotionBlock key>`` for the
  motion blocks (``motion.format``'s native motion-module keys, without up blocks); metadata
  ``format = "dreamoving_video_controlnet"``, ``version = "1"``, ``motion_config = <JSON of MotionModuleConfig>``.

Any of the first three can be combined with a motion module file (its down and mid blocks) into a Video ControlNet;
without one it is a plain per-frame ControlNet. SDXL/SD2 ControlNets, T2I-Adapters, control LoRAs and motion modules
whose levels or widths do not fit are refused with a ``ModelFormatError`` naming the file.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ModelFormatError
from ..io import load_state_dict, read_metadata, reading, save_state_dict
from ..motion.model import MotionBlock, MotionModuleConfig
from ..motion.format import load_motion_module, motion_module_from_state_dict
from .model import ControlNetConfig, VideoControlNet

FORMAT_NAME = "dreamoving_video_controlnet"
FORMAT_VERSION = "1"
CONTROL_PREFIX = "control_model."
MOTION_PREFIX = "motion_modules."
LAYOUTS = ("original", "plain", "diffusers", "video")


def detect_layout(sd: Mapping[str, torch.Tensor], name: str) -> str:
    """One of ``LAYOUTS`` for a ControlNet state dict; ``ModelFormatError`` for anything that is not an SD-style
    ControlNet (control LoRA, T2I-Adapter, diff ControlNet, unknown)."""
    if "lora_controlnet" in sd:
        raise ModelFormatError(f"'{name}' is a control LoRA (Stability's SDXL control-lora); it needs the SDXL base "
                               "model and is not supported here: load an SD1.5 ControlNet such as "
                               "control_v11p_sd15_openpose.pth")
    if "difference" in sd:
        raise ModelFormatError(f"'{name}' is a 'difference' ControlNet that must be added to its base model; use the "
                               "full ControlNet file instead")
    if any(k.startswith(MOTION_PREFIX) for k in sd) and f"{CONTROL_PREFIX}zero_convs.0.0.weight" in sd:
        return "video"
    if f"{CONTROL_PREFIX}zero_convs.0.0.weight" in sd:
        return "original"
    if "zero_convs.0.0.weight" in sd:
        return "plain"
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return "diffusers"
    if _is_t2i_adapter(sd):
        raise ModelFormatError(f"'{name}' is a T2I-Adapter, not a ControlNet; use ComfyUI's core 'Load ControlNet "
                               "Model' and 'Apply ControlNet' nodes for it, or load an SD1.5 ControlNet here")
    if any("temporal_transformer." in k for k in sd):
        raise ModelFormatError(f"'{name}' is a motion module, not a ControlNet; choose it as the motion module input "
                               "and a ControlNet file (e.g. control_v11p_sd15_openpose.pth) as the ControlNet")
    sample = ", ".join(list(sd)[:3])
    raise ModelFormatError(f"'{name}' is not a ControlNet: none of the ControlNet keys (control_model.zero_convs.*, "
                           f"zero_convs.*, controlnet_down_blocks.*) were found (first keys: {sample})")


def _is_t2i_adapter(sd: Mapping[str, torch.Tensor]) -> bool:
    return ("adapter" in sd or any(k.startswith(("adapter.body.", "body.0.")) for k in sd)
            or ("conv_in.weight" in sd and any(k.startswith("body.") for k in sd)))


def diffusers_key_map(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{diffusers key: original key}`` for every key of a diffusers-layout ControlNet state dict."""
    levels = _count(sd, r"down_blocks\.(\d+)\.")
    per_level = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    prefixes = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "controlnet_mid_block.": "middle_block_out.0.",
                "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
                "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (len(_HINT_BLOCKS) + 1)}.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for k in _HINT_BLOCKS:
        prefixes[f"controlnet_cond_embedding.blocks.{k}."] = f"input_hint_block.{2 * (k + 1)}."
    n_blocks = 1 + levels * per_level + (levels - 1)
    for n in range(n_blocks):
        prefixes[f"controlnet_down_blocks.{n}."] = f"zero_convs.{n}.0."
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        for j in range(per_level):
            prefixes[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{first + j}.0."
            prefixes[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{first + j}.1."
        prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{first + per_level}.0.op."
    resnet = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
              "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}

    key_map = {}
    for key in sd:
        prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        if prefix is None:
            continue
        rest = key[len(prefix):]
        if ".resnets." in prefix:
            rest = next((resnet[r] + rest[len(r):] for r in resnet if rest.startswith(r)), rest)
        key_map[key] = prefixes[prefix] + rest
    return key_map


_HINT_BLOCKS = range(6)  # diffusers' controlnet_cond_embedding.blocks.0..5 between conv_in and conv_out


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def controlnet_weights(sd: Mapping[str, torch.Tensor], layout: str, name: str) -> dict[str, torch.Tensor]:
    """The ControlNet part of ``sd`` in the original key layout without prefix (``input_blocks.0.0.weight``...)."""
    if layout in ("original", "video"):
        return {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
    if layout == "plain":
        return dict(sd)
    key_map = diffusers_key_map(sd)
    if "add_embedding.linear_1.weight" in sd:
        _refuse_sdxl(name, "it has SDXL's pooled-text/size embedding (add_embedding)")
    leftover = [k for k in sd if k not in key_map]
    if leftover:
        raise ModelFormatError(f"'{name}' has diffusers ControlNet keys this loader does not know: "
                               f"{', '.join(leftover[:5])}; is it an SD1.5 ControlNet?")
    return {key_map[k]: v for k, v in sd.items()}


def _refuse_sdxl(name: str, why: str) -> None:
    raise ModelFormatError(f"'{name}' is an SDXL ControlNet ({why}); this pack needs an SD1.5 ControlNet such as "
                           "control_v11p_sd15_openpose.pth or control_v11f1p_sd15_depth.pth")


def infer_config(weights: Mapping[str, torch.Tensor], name: str) -> ControlNetConfig:
    """Read the ControlNet's shape from its original-layout weights; refuses non-SD1.5 ControlNets."""
    if any(k.startswith("label_emb.") for k in weights):
        _refuse_sdxl(name, "it has SDXL's pooled-text/size embedding (label_emb)")
    context_dims = {v.shape[1] for k, v in weights.items() if k.endswith("attn2.to_k.weight")}
    if 2048 in context_dims:
        _refuse_sdxl(name, "its cross-attention takes 2048-wide text embeddings")
    if context_dims and context_dims != {768}:
        raise ModelFormatError(f"'{name}' is a ControlNet for {sorted(context_dims)}-wide text embeddings (SD2.x); "
                               "this pack needs an SD1.5 ControlNet (768-wide CLIP-L text embeddings)")
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in weights.items()):
        raise ModelFormatError(f"'{name}' uses linear transformer projections (SD2.x/SDXL); this pack needs an SD1.5 "
                               "ControlNet")
    try:
        conv_in = weights["input_blocks.0.0.weight"]
        hint_in = weights["input_hint_block.0.weight"]
    except KeyError as err:
        raise ModelFormatError(f"'{name}' is missing the ControlNet weight {err}; the file is incomplete") from err
    for key, weight in (("input_blocks.0.0.weight", conv_in), ("input_hint_block.0.weight", hint_in)):
        if weight.ndim != 4:
            raise ModelFormatError(f"'{name}': weight {key} has shape {tuple(weight.shape)}, not that of a "
                                   "convolution; the file is damaged, download it again")

    levels: list[list[int]] = [[]]  # transformer depth of each layer, per level
    widths: list[int] = []
    n = 1
    while f"input_blocks.{n}.0.op.weight" in weights or f"input_blocks.{n}.0.in_layers.0.weight" in weights:
        if f"input_blocks.{n}.0.op.weight" in weights:
            levels.append([])
        else:
            if len(widths) < len(levels):
                widths.append(weights[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
            levels[-1].append(_count(weights, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
        n += 1
    res_blocks = [len(level) for level in levels]
    if len(widths) != len(levels) or 0 in res_blocks or any(len(set(d)) > 1 for d in levels):
        raise ModelFormatError(f"'{name}' has an encoder layout this loader does not understand "
                               f"(layers per level {res_blocks})")
    model_channels = conv_in.shape[0]
    if any(w % model_channels for w in widths):
        raise ModelFormatError(f"'{name}' has level widths {widths} that are not multiples of {model_channels}")
    return ControlNetConfig(
        model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=tuple(res_blocks), transformer_depth=tuple(level[0] for level in levels),
        transformer_depth_middle=_count(weights, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=768, in_channels=conv_in.shape[1], hint_channels=hint_in.shape[1])


def check_motion_fit(config: ControlNetConfig, motion_down: list[list[MotionBlock]], motion_mid: MotionBlock | None,
                     controlnet_name: str, motion_name: str) -> None:
    """Raise ``ModelFormatError`` unless a motion module's down/mid blocks fit the ControlNet's levels and widths."""
    want_layers = list(config.num_res_blocks)
    have_layers = [len(level) for level in motion_down]
    want_widths = list(config.level_widths)
    have_widths = [level[0].channels if level else None for level in motion_down]
    mid_width = motion_mid.channels if motion_mid is not None else config.level_widths[-1]
    if have_layers != want_layers or have_widths != want_widths or mid_width != config.level_widths[-1]:
        raise ModelFormatError(
            f"motion module '{motion_name}' does not fit ControlNet '{controlnet_name}': the ControlNet has "
            f"{len(want_layers)} levels with {want_layers} layers of widths {want_widths}, the motion module has "
            f"{len(have_layers)} levels with {have_layers} motion blocks of widths {have_widths}; use an SD1.5 "
            "motion module made for the same U-Net (e.g. mm_sd_v15_v2.ckpt for a real SD1.5 ControlNet)")


def build_video_controlnet(weights: Mapping[str, torch.Tensor], name: str,
                           motion_down: list[list[MotionBlock]] | None = None, motion_mid: MotionBlock | None = None,
                           motion_name: str = "", motion_config: MotionModuleConfig | None = None
                           ) -> VideoControlNet:
    """A ``VideoControlNet`` from original-layout ControlNet weights plus optional motion blocks (already loaded)."""
    config = infer_config(weights, name)
    if motion_down is not None:
        check_motion_fit(config, motion_down, motion_mid, name, motion_name)
    with torch.device("meta"):  # weights come from the file; skip the random initialisation
        model = VideoControlNet(config, motion_down, motion_mid, motion_config)
    control_part = {k: v for k, v in model.state_dict().items() if not k.startswith(("motion_down.", "motion_mid."))}
    missing = sorted(set(control_part) - set(weights))
    unexpected = sorted(set(weights) - set(control_part))
    if missing or unexpected:
        raise ModelFormatError(f"'{name}' does not match an SD1.5 ControlNet of its own shape: missing "
                               f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                               f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, value in weights.items():
        if value.shape != control_part[key].shape:
            raise ModelFormatError(f"'{name}': weight {key} has shape {tuple(value.shape)}, expected "
                                   f"{tuple(control_part[key].shape)}")
    model.load_state_dict(dict(weights), strict=False, assign=True)
    return model


def load_video_controlnet(path: str | os.PathLike, motion_path: str | os.PathLike | None = None, *,
                          positional_length: int | None = None, pe_extension: str = "sinusoid",
                          dtype: torch.dtype | None = None) -> VideoControlNet:
    """Load a Video ControlNet from any accepted ControlNet file (see module docstring), optionally combined with a
    motion module file whose down/mid blocks become the ControlNet's motion blocks (they replace those of a Video
    ControlNet file). Without motion blocks the result is a plain per-frame ControlNet. The model is on the CPU in
    ``dtype`` (default: the ControlNet weights' dtype), in eval mode. ``positional_length`` / ``pe_extension`` go to
    the motion module loader (see ``motion.format.motion_module_from_state_dict``).
    """
    path = Path(path)
    sd = load_state_dict(path)
    with reading(path.name, "ControlNet"):  # a motion module's own errors name the motion module
        layout = detect_layout(sd, path.name)
        weights = controlnet_weights(sd, layout, path.name)
        motion_down = motion_mid = motion = None
        motion_name = ""
        if motion_path is not None:
            motion_name = Path(motion_path).name
            motion = load_motion_module(motion_path, positional_length=positional_length, pe_extension=pe_extension)
        elif layout == "video":
            motion_name = path.name
            motion = motion_module_from_state_dict(
                {k[len(MOTION_PREFIX):]: v for k, v in sd.items() if k.startswith(MOTION_PREFIX)}, path.name,
                positional_length=positional_length, pe_extension=pe_extension, metadata=read_metadata(path))
        if motion is not None:
            motion_down, motion_mid = [list(level) for level in motion.down_blocks], motion.mid_block
        model = build_video_controlnet(weights, path.name, motion_down, motion_mid, motion_name,
                                       motion.config if motion is not None else None)
    return model.to(dtype or next(iter(weights.values())).dtype).eval().requires_grad_(False)


def save_video_controlnet(model: VideoControlNet, path: str | os.PathLike,
                          motion_config: MotionModuleConfig | None = None, metadata: Mapping[str, str] | None = None
                          ) -> None:
    """Write ``model`` in our single-file Video ControlNet format (safetensors; keys in the module docstring).
    ``motion_config``: the config its motion blocks were built with (default: ``model.motion_config``, set by the
    loaders)."""
    motion_config = motion_config or model.motion_config
    weights = {f"{CONTROL_PREFIX}{k}": v for k, v in model.state_dict().items()
               if not k.startswith(("motion_down.", "motion_mid."))}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **(metadata or {})}
    if model.has_motion:
        if motion_config is None:
            raise ValueError("save_video_controlnet needs the motion_config of a model with motion blocks (the "
                             "MotionModuleConfig its blocks were built with)")
        if model.motion_down is not None:
            weights.update({f"{MOTION_PREFIX}down_blocks.{k}": v for k, v in model.motion_down.state_dict().items()})
        if model.motion_mid is not None:
            weights.update({f"{MOTION_PREFIX}mid_block.{k}": v for k, v in model.motion_mid.state_dict().items()})
        meta["motion_config"] = json.dumps(asdict(motion_config))
    save_state_dict(weights, path, meta)
