"""OpenCLIP ViT-H/14 image features for the Content Guider, from a local weights file.

Reads both layouts users have: OpenCLIP's own (``visual.*``, e.g. ``open_clip_pytorch_model.bin`` of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) and the transformers layout ComfyUI keeps in ``models/clip_vision``
(``vision_model.*`` + ``visual_projection.weight``, e.g. ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``), which is
mapped onto OpenCLIP's names. The tower is OpenCLIP's ``VisionTransformer`` (class-token pooling, pre-norm blocks
with exact GELU) rebuilt from ``ops`` layers and the pack's attention function, so a host can cast and offload it
like its own models; its outputs equal OpenCLIP's on the same weights. Features match ComfyUI's
``CLIPVisionEncode`` (``crop=True``): ``image_embeds`` (projected pooled token) for plain IP-Adapters and
``penultimate_hidden_states`` (all tokens after all but the last transformer layer) for plus / full-face /
FaceID-Plus adapters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..attention import AttentionFn, sdpa_attention
from ..errors import ModelFormatError
from ..io import load_state_dict, reading
from ..ops import TORCH_OPS
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


class _Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with a GELU MLP: ``(B, L, W)``."""

    def __init__(self, width: int, heads: int, mlp_width: int, ops=TORCH_OPS):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = ops.LayerNorm(width), ops.LayerNorm(width)
        self.in_proj = ops.Linear(width, 3 * width)  # OpenCLIP's attn.in_proj_weight / in_proj_bias (q, k, v)
        self.out_proj = ops.Linear(width, width)
        self.mlp = nn.Sequential(ops.Linear(width, mlp_width), nn.GELU(), ops.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        q, k, v = self.in_proj(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.out_proj(attention(q, k, v, self.heads))
        return x + self.mlp(self.ln_2(x))


class VisionTower(nn.Module):
    """A CLIP ViT image tower: ``forward(pixels (B, 3, S, S)) -> (image_embeds (B, E), penultimate (B, 1 + g², W))``.

    ``class_embedding``, ``positional_embedding`` and ``proj`` are bare parameters (no layer casts them), so they
    follow the input's device and dtype where they are used."""

    def __init__(self, config: VisionConfig, ops=TORCH_OPS):
        super().__init__()
        width, grid = config.width, config.image_size // config.patch_size
        self.conv1 = ops.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre, self.ln_post = ops.LayerNorm(width), ops.LayerNorm(width)
        self.blocks = nn.ModuleList(_Block(width, config.heads, round(width * config.mlp_ratio), ops)
                                    for _ in range(config.layers))
        self.proj = nn.Parameter(torch.zeros(width, config.embed_dim))

    def forward(self, pixels: torch.Tensor,
                attention: AttentionFn = sdpa_attention) -> tuple[torch.Tensor, torch.Tensor]:
        x = rearrange(self.conv1(pixels), "b w h v -> b (h v) w")

        def cast(param: nn.Parameter) -> torch.Tensor:
            return param.to(device=x.device, dtype=x.dtype)

        x = torch.cat([cast(self.class_embedding).expand(x.shape[0], 1, -1), x], dim=1) + cast(self.positional_embedding)
        x = self.ln_pre(x)
        for block in self.blocks[:-1]:
            x = block(x, attention)
        penultimate = x
        pooled = self.ln_post(self.blocks[-1](x, attention)[:, 0])
        return pooled @ cast(self.proj), penultimate


def _tower_state_dict(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ``VisionTransformer`` keys -> ``VisionTower`` keys."""
    out = {}
    for key, value in visual.items():
        key = key.replace("transformer.resblocks.", "blocks.").replace(".attn.in_proj_", ".in_proj.")
        key = key.replace(".attn.out_proj.", ".out_proj.").replace(".mlp.c_fc.", ".mlp.0.")
        out[key.replace(".mlp.c_proj.", ".mlp.2.")] = value
    return out


class ClipImageEncoder(nn.Module):
    """A CLIP ViT image tower. ``encode(images)`` gives :class:`ImageFeatures` with ``image_embeds``
    ``(B, embed_dim)`` and ``penultimate_hidden_states`` ``(B, 1 + grid², width)``."""

    def __init__(self, tower: VisionTower, config: VisionConfig):
        super().__init__()
        self.tower, self.config = tower, config

    @classmethod
    def from_file(cls, path: str | os.PathLike, ops=TORCH_OPS) -> "ClipImageEncoder":
        """Load the image tower of a local CLIP weights file (OpenCLIP or transformers layout), float32 on the CPU,
        built from ``ops`` (``dreamoving_core.ops``)."""
        name = os.path.basename(os.fspath(path))
        sd = load_state_dict(path)
        with reading(name, "CLIP vision model"):
            weights, cfg = vision_state_dict(sd, name)
        with torch.device("meta"):
            tower = VisionTower(cfg, ops)
        try:
            tower.load_state_dict({k: v.float() for k, v in _tower_state_dict(weights).items()}, strict=True,
                                  assign=True)
        except RuntimeError as err:
            raise ModelFormatError(f"'{name}': CLIP vision weights do not fit OpenCLIP {cfg.name} "
                                   f"({str(err).splitlines()[0]})") from err
        return cls(tower.eval().requires_grad_(False), cfg)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, device: torch.device | str | None = None,
               attention: AttentionFn = sdpa_attention) -> ImageFeatures:
        """``images``: ``(B, H, W, C)`` in [0, 1] (ComfyUI IMAGE layout), run on ``device`` (default: where the
        tower's first weight is) in float32, as ComfyUI's CLIP vision does; features come back float32."""
        device = device if device is not None else self.tower.conv1.weight.device
        pixels = preprocess(images.to(device), self.config.image_size)
        embeds, penultimate = self.tower(pixels, attention)
        return ImageFeatures(image_embeds=embeds.float(), penultimate_hidden_states=penultimate.float())
