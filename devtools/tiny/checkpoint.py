"""A tiny SD1.5-shaped checkpoint that ComfyUI detects as SD15 (random weights, real key layout).

U-Net: 2 levels of width 320 with one res block each and cross-attention to 768-d text; VAE: a random TAESD whose
decoder is scaled so latents decode to visible, varied pixels (mid grey +- ~0.2, not black); text encoder: full-size
CLIP-L with random weights (ComfyUI needs all its keys). About 345 MB in fp16.
"""
from __future__ import annotations

from pathlib import Path

from devtools.tiny import cached, comfy_importable

TINY_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 1], num_heads=8,
    use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
)


def _randomise(state: dict, generator) -> dict:
    import torch

    return {k: (torch.randn(v.shape, generator=generator) * 0.02).half() for k, v in state.items()}


def _visible_taesd(vae, generator) -> dict:
    """TAESD weights (ComfyUI builds it without initialising them): He-normal convolutions, zero biases, and a last
    decoder layer rescaled so that random latents decode to pixels around 0.5 with a spread of about 0.2."""
    import torch

    state = {}
    for key, value in vae.state_dict().items():
        if key.endswith("weight") and value.ndim == 4:
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith("bias"):
            state[key] = torch.zeros(value.shape)
        else:
            state[key] = value
    vae.load_state_dict(state)
    last = [k for k in state if k.startswith("taesd_decoder.") and k.endswith(".weight")][-1]
    with torch.no_grad():
        out = vae.taesd_decoder(torch.randn(4, 4, 8, 8, generator=generator))
    mean, std = out.mean(dim=(0, 2, 3)), out.std()
    state[last] = state[last] * (0.2 / std)
    state[last.replace("weight", "bias")] = 0.5 - mean * (0.2 / std)
    return state


def _build(path: Path) -> None:
    comfy_dir = comfy_importable()
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    from comfy.taesd.taesd import TAESD

    gen = torch.Generator().manual_seed(0)
    weights = {}
    unet = openaimodel.UNetModel(**TINY_UNET_CONFIG, dtype=torch.float32, device="cpu")
    weights.update({f"model.diffusion_model.{k}": v for k, v in _randomise(unet.state_dict(), gen).items()})
    weights.update({f"first_stage_model.{k}": v.half() for k, v in _visible_taesd(TAESD(), gen).items()})
    config = CLIPTextConfig.from_json_file(str(comfy_dir / "comfy" / "sd1_clip_config.json"))
    text = CLIPTextModel(config)
    weights.update({f"cond_stage_model.transformer.{k}": v
                    for k, v in _randomise(text.state_dict(), gen).items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))


def sd15_checkpoint() -> Path:
    """Path of the cached tiny SD1.5 checkpoint (built on first use, a few seconds)."""
    return cached("checkpoints/dreamoving_tiny_sd15_v2.safetensors", _build)
