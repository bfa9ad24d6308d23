"""Tiny ControlNet-family files in the real key layouts, at the tiny SD1.5 U-Net's widths (320/320, 2 levels).

- ``sd15_controlnet("pth")`` / ``("safetensors")``: original ``control_model.*`` layout, as
  ``control_v11p_sd15_openpose.pth`` (torch.save of a flat dict) / its ``.safetensors`` conversion;
- ``sd15_controlnet("diffusers")``: a diffusers ``ControlNetModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), key names from ComfyUI's diffusers map, not from ours;
- ``video_controlnet()``: our single-file Video ControlNet (tiny ControlNet + tiny motion down/mid blocks);
- ``sdxl_controlnet()``, ``t2i_adapter()``, ``control_lora()``: files the loader must refuse, keyed like the real ones.

Seeds make every file deterministic; ``seed`` picks different weights (pose vs depth).
"""
from __future__ import annotations

import json
from pathlib import Path

from devtools.tiny import cached, comfy_importable

TINY_CONTROLNET_CONFIG = dict(model_channels=320, channel_mult=(1, 1), num_res_blocks=(1, 1), transformer_depth=(1, 1),
                              transformer_depth_middle=1, num_heads=8, context_dim=768)
VERSION = "v2"
MOTION_VERSION = "v4"  # of the tiny motion blocks


def tiny_controlnet_model(seed: int = 0):
    """The tiny SD1.5 ControlNet (no motion) with random, non-silent weights: zero convs and the hint encoder's last
    conv are random too, so residuals are not all zero and depend clearly on the hint."""
    import torch

    from dreamoving_core.control.model import ControlNetConfig, VideoControlNet

    with torch.random.fork_rng(), torch.no_grad():  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        model = VideoControlNet(ControlNetConfig(**TINY_CONTROLNET_CONFIG))
        for name, param in model.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                param.normal_(0.0, 0.05)
            elif name.startswith("input_hint_block.") and param.ndim == 4:  # He init: the hint must not fade out
                param.normal_(0.0, (2.0 / param[0].numel()) ** 0.5)
    return model


def _original_weights(seed: int) -> dict:
    return {f"control_model.{k}": v for k, v in tiny_controlnet_model(seed).state_dict().items()}


def _diffusers_weights(seed: int) -> dict:
    comfy_importable()
    import comfy.utils

    ldm = tiny_controlnet_model(seed).state_dict()
    unet_config = dict(num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1],
                       transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1)
    to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    to_ldm["controlnet_mid_block.weight"] = "middle_block_out.0.weight"
    to_ldm["controlnet_mid_block.bias"] = "middle_block_out.0.bias"
    for s in ("weight", "bias"):
        for n in range(4):
            to_ldm[f"controlnet_down_blocks.{n}.{s}"] = f"zero_convs.{n}.0.{s}"
        to_ldm[f"controlnet_cond_embedding.conv_in.{s}"] = f"input_hint_block.0.{s}"
        for k in range(6):
            to_ldm[f"controlnet_cond_embedding.blocks.{k}.{s}"] = f"input_hint_block.{2 * (k + 1)}.{s}"
        to_ldm[f"controlnet_cond_embedding.conv_out.{s}"] = f"input_hint_block.14.{s}"
    out = {d: ldm[o] for d, o in to_ldm.items() if o in ldm}
    assert len(out) == len(ldm), sorted(set(ldm) - set(to_ldm.values()))
    return out


DIFFUSERS_CONFIG = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.27.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 320], "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
    "upcast_attention": False, "use_linear_projection": False,
}


def sd15_controlnet(layout: str = "pth", seed: int = 0) -> Path:
    """A tiny SD1.5 ControlNet file: ``layout`` "pth", "safetensors" (original layout) or "diffusers" (returns the
    ``diffusion_pytorch_model.safetensors`` inside its folder)."""
    import torch
    from safetensors.torch import save_file

    def build(path: Path) -> None:
        if layout == "pth":
            torch.save(_original_weights(seed), str(path))
        elif layout == "safetensors":
            save_file({k: v.half().contiguous() for k, v in _original_weights(seed).items()}, str(path))
        else:
            path.mkdir()
            save_file({k: v.contiguous() for k, v in _diffusers_weights(seed).items()},
                      str(path / "diffusion_pytorch_model.safetensors"))
            (path / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG, indent=2))

    stem = f"controlnet/tiny_control_sd15_s{seed}_{VERSION}"
    if layout == "diffusers":
        return cached(f"{stem}_diffusers", build) / "diffusion_pytorch_model.safetensors"
    return cached(f"{stem}.{layout}", build)


def video_controlnet(seed: int = 0, zero_motion: bool = False) -> Path:
    """Our single-file Video ControlNet: the tiny ControlNet of ``seed`` + the down/mid blocks of a tiny AnimateDiff
    v2-shaped motion module (identity blocks when ``zero_motion``)."""
    from devtools.tiny.motion import tiny_module
    from dreamoving_core.control.format import save_video_controlnet
    from dreamoving_core.control.model import VideoControlNet

    def build(path: Path) -> None:
        control = tiny_controlnet_model(seed)
        motion = tiny_module("v2", zero_out=zero_motion, seed=seed + 1)
        model = VideoControlNet(control.config, [list(level) for level in motion.down_blocks], motion.mid_block,
                                motion.config)
        model.load_state_dict(control.state_dict(), strict=False)
        save_video_controlnet(model, path)

    return cached(f"video_controlnet/tiny_video_control_sd15_s{seed}{'_zm' if zero_motion else ''}_{MOTION_VERSION}"
                  ".safetensors", build)


def sdxl_controlnet() -> Path:
    """An SDXL-shaped ControlNet (original layout, narrow): 2048-wide context, label_emb, linear projections."""
    def build(path: Path) -> None:
        comfy_importable()
        import comfy.cldm.cldm
        import comfy.ops
        import torch
        from safetensors.torch import save_file

        model = comfy.cldm.cldm.ControlNet(
            image_size=32, in_channels=4, model_channels=32, hint_channels=3, num_res_blocks=[1, 1],
            channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True, transformer_depth=[0, 1],
            transformer_depth_middle=1, context_dim=2048, use_linear_in_transformer=True, num_classes="sequential",
            adm_in_channels=2816, dtype=torch.float32, operations=comfy.ops.manual_cast)
        save_file({f"control_model.{k}": torch.zeros(v.shape, dtype=torch.float16)
                   for k, v in model.state_dict().items()}, str(path))

    return cached(f"controlnet/tiny_controlnet_sdxl_{VERSION}.safetensors", build)


def t2i_adapter() -> Path:
    """A T2I-Adapter (``t2iadapter_openpose_sd14v1.pth`` layout: conv_in, body.N.block1/2, ...), narrow."""
    def build(path: Path) -> None:
        comfy_importable()
        import torch
        from comfy.t2i_adapter.adapter import Adapter

        model = Adapter(cin=192, channels=[32, 64, 128, 128], nums_rb=2, ksize=1, sk=True, use_conv=False)
        torch.save(model.state_dict(), str(path))

    return cached(f"controlnet/tiny_t2iadapter_openpose_{VERSION}.pth", build)


def control_lora() -> Path:
    """A control LoRA (Stability ``control-lora-openposeXL2-rank256`` keys: ``lora_controlnet``, ``*.up``/``*.down``,
    full hint block and zero convs), narrow."""
    def build(path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        weights = {"lora_controlnet": torch.zeros(1),
                   "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "input_hint_block.0.bias": torch.zeros(16),
                   "zero_convs.0.0.weight": torch.zeros(32, 32, 1, 1), "zero_convs.0.0.bias": torch.zeros(32),
                   "input_blocks.1.0.in_layers.2.up": torch.zeros(32 * 9, 4),
                   "input_blocks.1.0.in_layers.2.down": torch.zeros(4, 32),
                   "label_emb.0.0.up": torch.zeros(128, 4), "label_emb.0.0.down": torch.zeros(4, 2816)}
        save_file(weights, str(path))

    return cached(f"controlnet/tiny_control_lora_{VERSION}.safetensors", build)
