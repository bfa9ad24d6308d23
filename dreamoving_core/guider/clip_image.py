"""OpenCLIP ViT-H/14 image features for the Content Guider, through ``open_clip_torch`` from a local weights file.

Reads both layouts users have: OpenCLIP's own (``visual.*``, e.g. ``open_clip_pytorch_model.bin`` of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) and the transformers layout ComfyUI keeps in ``models/clip_vision``
(``vision_model.*`` + ``visual_projection.weight``, e.g. ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``), which is
mapped onto OpenCLIP's module names. Features match ComfyUI's ``CLIPVisionEncode`` (``crop=True``):
``image_embeds`` (projected pooled token) for plain IP-Adapters and ``penultimate_hidden_states`` (all tokens after
all but the last transformer layer) for plus / full-face / FaceID-Plus adapters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelFormatError
from ..io import load_state_dict, reading
from .model import ImageFeatures

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Hidden width -> (name, attention heads); both towers use 16 heads and GELU.
VIT_TOWERS = {1280: ("ViT-H/14", 16), 1664: ("ViT-bigG/14", 16)}


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP ViT image tower, read from its weights."""

    name: str
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    mlp_ratio: float
    embed_dim: int


def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """``images``: ``(B, H, W, C)`` in [0, 1] → normalised ``(B, 3, size, size)``: shortest side resized to ``size``
    (bicubic, antialiased), centre crop, 8-bit quantised, CLIP mean/std — as ComfyUI's ``clip_preprocess``."""
    x = images[..., :3].movedim(-1, 1).float()
    if x.shape[-2:] != (size, size):
        scale = size / min(x.shape[-2:])
        x = nn.functional.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)),
                                      mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = (x * 255).clamp(0, 255).round() / 255
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModelWithProjection`` keys → OpenCLIP ``VisionTransformer`` keys."""
    out = {
        "class_embedding": sd["vision_model.embeddings.class_embedding"],
        "conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "proj": sd["visual_projection.weight"].t(),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"vision_model.{theirs}.{p}"]
    layer = 0
    while f"vision_model.encoder.layers.{layer}.layer_norm1.weight" in sd:
        src, dst = f"vision_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                 ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{ours}.{p}"] = sd[f"{src}{theirs}.{p}"]
        layer += 1
    return out


def vision_state_dict(sd: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], VisionConfig]:
    """Extract the image tower of a CLIP weights file in OpenCLIP key names, with its shape."""
    try:
        if "vision_model.embeddings.class_embedding" in sd:
            if "visual_projection.weight" not in sd:
                raise ModelFormatError(f"'{name}' is a CLIP vision model without its projection "
                                       "(visual_projection.weight); use the CLIPVisionModelWithProjection file")
            visual = _from_transformers(sd)
        elif "visual.class_embedding" in sd:
            visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        else:
            raise ModelFormatError(f"'{name}' is not a CLIP vision model (no vision_model.* or visual.* weights)")
        width = visual["class_embedding"].shape[0]
        layers = sum(1 for k in visual if k.endswith(".ln_1.weight"))
        patch = visual["conv1.weight"].shape[-1]
        grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
        mlp = visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = visual["proj"].shape[1]
    except KeyError as err:
        raise ModelFormatError(f"'{name}': CLIP vision weights are incomplete (missing {err})") from err
    if width not in VIT_TOWERS:
        raise ModelFormatError(f"'{name}' is a CLIP image tower of width {width}; the Content Guider needs OpenCLIP "
                               "ViT-H/14 (width 1280), e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    tower, heads = VIT_TOWERS[width]
    return visual, VisionConfig(tower, width, layers, heads, patch, grid * patch, mlp / width, embed_dim)


class ClipImageEncoder(nn.Module):
    """An OpenCLIP ViT image tower. ``encode(images)`` gives :class:`ImageFeatures` with ``image_embeds``
    ``(B, embed_dim)`` and ``penultimate_hidden_states`` ``(B, 1 + grid², width)``."""

    def __init__(self, visual: nn.Module, config: VisionConfig):
        super().__init__()
        self.visual, self.config = visual, config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ClipImageEncoder":
        """Load the image tower of a local CLIP weights file (OpenCLIP or transformers layout)."""
        from open_clip.transformer import VisionTransformer  # heavy import, only when a model is loaded

        name = os.path.basename(os.fspath(path))
        sd = load_state_dict(path)
        with reading(name, "CLIP vision model"):
            weights, cfg = vision_state_dict(sd, name)
        visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                   layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                   output_dim=cfg.embed_dim)
        try:
            visual.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        except RuntimeError as err:
            raise ModelFormatError(f"'{name}': CLIP vision weights do not fit OpenCLIP {cfg.name} "
                                   f"({str(err).splitlines()[0]})") from err
        return cls(visual.eval().requires_grad_(False), cfg)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """``images``: ``(B, H, W, C)`` in [0, 1] (ComfyUI IMAGE layout)."""
        param = next(self.visual.parameters())
        pixels = preprocess(images.to(param.device), self.config.image_size).to(param.dtype)
        captured = {}
        hook = self.visual.transformer.resblocks[-1].register_forward_pre_hook(
            lambda _module, args: captured.setdefault("penultimate", args[0]))
        try:
            embeds = self.visual(pixels)
        finally:
            hook.remove()
        return ImageFeatures(image_embeds=embeds.float(), penultimate_hidden_states=captured["penultimate"].float())
