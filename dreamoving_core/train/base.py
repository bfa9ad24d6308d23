"""The frozen SD1.5 base (U-Net, VAE, text encoder, tokenizer) from the single checkpoint file users keep in
``models/checkpoints``, through diffusers' single-file loading with local component configs: no hub access.

``SD15_COMPONENTS`` (shipped beside this module) holds the diffusers configs of SD1.5's U-Net, VAE and CLIP-L text
encoder and OpenAI's CLIP tokenizer files (MIT licence in ``sd15/tokenizer/LICENSE``). A checkpoint is checked from
its keys and shapes (without reading its tensors, for safetensors) before anything is built.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelFormatError
from ..io import load_state_dict

SD15_COMPONENTS = Path(__file__).resolve().parent / "sd15"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
_SUGGESTION = "use an SD1.5 checkpoint such as v1-5-pruned-emaonly.safetensors"


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """``{key: shape}`` of a safetensors checkpoint read from its header only; ``None`` for other formats."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ModelFormatError(f"'{path.name}' is not a readable safetensors file ({err}); it may be truncated, "
                               "download it again") from err


def check_sd15(shapes: Mapping[str, tuple[int, ...]], name: str) -> None:
    """Raise ``ModelFormatError`` naming what ``name`` is unless its keys are an SD1.5 checkpoint: an LDM U-Net
    with 4 input channels and 768-wide cross-attention (CLIP-L), the CLIP-L text encoder and a KL VAE."""
    keys = list(shapes)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if starts("conditioner.embedders."):
        raise ModelFormatError(f"'{name}' is an SDXL checkpoint; DreaMoving trains on SD1.5: {_SUGGESTION}")
    if not starts(UNET_PREFIX):
        what = ("a motion module" if any("motion_modules." in k or "temporal_transformer." in k for k in keys) else
                "a ControlNet" if starts("control_model.", "zero_convs.", "controlnet_") else
                "not a Stable Diffusion checkpoint")
        raise ModelFormatError(f"'{name}' is {what} (no {UNET_PREFIX}* U-Net weights); models.checkpoint needs the "
                               f"base model: {_SUGGESTION}")
    context = {shapes[k][1] for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    if context != {768}:
        family = {1024: "SD2.x", 2048: "SDXL"}.get(max(context, default=0), "not SD1.5")
        raise ModelFormatError(f"'{name}' is an {family} checkpoint (cross-attention reads {sorted(context)}-wide "
                               f"text embeddings, SD1.5 reads 768); {_SUGGESTION}")
    if any(k.endswith("proj_in.weight") and len(shapes[k]) == 2 for k in keys if k.startswith(UNET_PREFIX)):
        raise ModelFormatError(f"'{name}' has linear transformer projections (SD2.x); {_SUGGESTION}")
    conv_in = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is None or conv_in[1] != 4:
        kind = "an inpainting checkpoint (9 input channels)" if conv_in and conv_in[1] == 9 else \
            "a U-Net without the usual 4-channel input"
        raise ModelFormatError(f"'{name}' is {kind}; {_SUGGESTION}")
    if not starts(TEXT_PREFIX):
        raise ModelFormatError(f"'{name}' has no CLIP-L text encoder ({TEXT_PREFIX}*); {_SUGGESTION}")
    if not starts(f"{VAE_PREFIX}encoder.", f"{VAE_PREFIX}decoder."):
        other = " (it has a TAESD, which cannot encode training images)" if starts(f"{VAE_PREFIX}taesd") else ""
        raise ModelFormatError(f"'{name}' has no KL autoencoder ({VAE_PREFIX}encoder.*){other}; {_SUGGESTION}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file (the base checkpoint's identity in the exported files' metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class BaseModel:
    """The frozen SD1.5 components, eval mode, ``requires_grad`` off."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def unet_config(components: str | os.PathLike = SD15_COMPONENTS) -> dict:
    """The diffusers U-Net config of ``components`` (``unet/config.json``)."""
    path = Path(components) / "unet" / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"'{components}' has no unet/config.json; models.components must be a folder of "
                               f"diffusers component configs like {SD15_COMPONENTS}")
    return json.loads(path.read_text(encoding="utf-8"))


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (safely, see :func:`dreamoving_core.io.load_state_dict`), checked as SD1.5."""
    sd = load_state_dict(path)
    check_sd15({k: tuple(v.shape) for k, v in sd.items()}, Path(path).name)
    return sd


def _converted(load, what: str, name: str):
    try:
        return load()
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelFormatError(f"'{name}': the {what} does not fit the component config ({str(err).splitlines()[0]}"
                               "); models.components must describe this checkpoint's shapes") from err


def load_unet(sd: Mapping[str, torch.Tensor], name: str, components: str | os.PathLike = SD15_COMPONENTS,
              dtype: torch.dtype = torch.float32):
    """diffusers' ``UNet2DConditionModel`` of an SD1.5 checkpoint state dict (frozen, eval)."""
    from diffusers import UNet2DConditionModel

    unet = _converted(lambda: UNet2DConditionModel.from_single_file(
        dict(sd), config=str(components), subfolder="unet", local_files_only=True, torch_dtype=dtype), "U-Net", name)
    return unet.eval().requires_grad_(False)


def load_base(sd: Mapping[str, torch.Tensor], name: str, components: str | os.PathLike = SD15_COMPONENTS,
              dtype: torch.dtype = torch.float32) -> BaseModel:
    """U-Net, KL VAE, CLIP-L text encoder and tokenizer of an SD1.5 checkpoint state dict (see ``read_checkpoint``),
    with the component configs and tokenizer in ``components``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = dict(sd)
    unet = load_unet(sd, name, components, dtype)
    vae = _converted(lambda: AutoencoderKL.from_single_file(
        sd, config=str(components), subfolder="vae", local_files_only=True, torch_dtype=dtype), "VAE", name)
    text = _converted(lambda: create_diffusers_clip_model_from_ldm(
        CLIPTextModel, sd, subfolder="text_encoder", config=str(components), torch_dtype=dtype,
        local_files_only=True), "text encoder", name)
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(components) / "tokenizer"), local_files_only=True)
    return BaseModel(unet, vae.eval().requires_grad_(False), text.eval().requires_grad_(False), tokenizer)
