"""Tiny Content Guider companions in the real file formats (random weights), built for the tiny SD1.5 U-Net.

* IP-Adapter files (``.bin`` = nested ``{"image_proj", "ip_adapter"}`` pickle, ``.safetensors`` = flat) with the
  real key names and the real image-encoder widths (ViT-H/14: 1024 embeds, 1280 hidden), one resampler block
  instead of four, and one K/V pair per cross-attention layer of the tiny U-Net (7 layers of width 320).
* A DreaMoving guider (face: FaceID-Plus projection, cloth: plus resampler).
* A 2-layer ViT-H/14 image tower in the transformers layout of ComfyUI's ``CLIP-ViT-H-14-laion2B-s32B-b79K``.
* An InsightFace pack: a SCRFD-signature detector that "sees" a face in red regions, and a 112×112 → 512 ArcFace.
"""
from __future__ import annotations

from pathlib import Path

import torch

from devtools.tiny import cached

TINY_LAYER_DIMS = [320] * 7  # input 1, 3; output 0-3; middle (tiny U-Net)
SD15_LAYER_DIMS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
IP_ADAPTER_VARIANTS = ("plain", "plus", "plus-face", "full-face", "faceid-plusv2", "sdxl", "vit-g")
FILE_NAMES = {"plain": "ip-adapter_sd15", "plus": "ip-adapter-plus_sd15", "plus-face": "ip-adapter-plus-face_sd15",
              "full-face": "ip-adapter-full-face_sd15", "faceid-plusv2": "ip-adapter-faceid-plusv2_sd15",
              "sdxl": "ip-adapter-plus_sdxl_vit-h", "vit-g": "ip-adapter_sd15_vit-G"}


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * scale


def _norm(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.ones(dim), f"{prefix}.bias": torch.zeros(dim)}


def _perceiver_blocks(gen, prefix: str, dim: int, depth: int = 1, mult: int = 4) -> dict[str, torch.Tensor]:
    sd = {}
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        sd |= _norm(f"{p}0.norm1", dim) | _norm(f"{p}0.norm2", dim) | _norm(f"{p}1.0", dim)
        sd |= {f"{p}0.to_q.weight": _rand(gen, dim, dim), f"{p}0.to_kv.weight": _rand(gen, 2 * dim, dim),
               f"{p}0.to_out.weight": _rand(gen, dim, dim), f"{p}1.1.weight": _rand(gen, dim * mult, dim),
               f"{p}1.3.weight": _rand(gen, dim, dim * mult)}
    return sd


def image_proj_weights(variant: str, gen: torch.Generator, context: int = 768) -> dict[str, torch.Tensor]:
    """``image_proj`` keys of an IP-Adapter variant (real names and encoder widths, one perceiver block)."""
    if variant in ("plain", "vit-g", "sdxl"):
        width = 1024 if variant == "plain" else 1280
        return ({"proj.weight": _rand(gen, 4 * context, width), "proj.bias": torch.zeros(4 * context)}
                | _norm("norm", context))
    if variant in ("plus", "plus-face"):
        return ({"latents": _rand(gen, 1, 16, 768, scale=768 ** -0.5), "proj_in.weight": _rand(gen, 768, 1280),
                 "proj_in.bias": torch.zeros(768), "proj_out.weight": _rand(gen, context, 768),
                 "proj_out.bias": torch.zeros(context)} | _norm("norm_out", context) | _perceiver_blocks(gen, "", 768))
    if variant == "full-face":
        return ({"proj.0.weight": _rand(gen, 1280, 1280), "proj.0.bias": torch.zeros(1280),
                 "proj.2.weight": _rand(gen, context, 1280), "proj.2.bias": torch.zeros(context)}
                | _norm("proj.3", context))
    if variant == "faceid-plusv2":
        p = "perceiver_resampler."
        return ({"proj.0.weight": _rand(gen, 1024, 512, scale=0.05), "proj.0.bias": torch.zeros(1024),
                 "proj.2.weight": _rand(gen, 4 * context, 1024), "proj.2.bias": torch.zeros(4 * context),
                 f"{p}proj_in.weight": _rand(gen, context, 1280), f"{p}proj_in.bias": torch.zeros(context),
                 f"{p}proj_out.weight": _rand(gen, context, context), f"{p}proj_out.bias": torch.zeros(context)}
                | _norm("norm", context) | _norm(f"{p}norm_out", context) | _perceiver_blocks(gen, p, context))
    raise ValueError(variant)


def ip_adapter_weights(variant: str, layer_dims=TINY_LAYER_DIMS, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` of an IP-Adapter variant for a U-Net with ``layer_dims``."""
    gen = torch.Generator().manual_seed(seed)
    context = 2048 if variant == "sdxl" else 768
    dims = [640, 640, 1280, 1280] if variant == "sdxl" else layer_dims
    ip = {}
    for i, dim in enumerate(dims):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = _rand(gen, dim, context, scale=0.05)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = _rand(gen, dim, context, scale=0.05)
    if variant == "faceid-plusv2":  # FaceID files also carry LoRA weights for every attention layer
        for j in range(2 * len(dims)):
            for name in ("to_q", "to_k", "to_v", "to_out"):
                ip[f"{j}.{name}_lora.down.weight"] = _rand(gen, 4, dims[j // 2])
                ip[f"{j}.{name}_lora.up.weight"] = torch.zeros(dims[j // 2], 4)
    return {"image_proj": image_proj_weights(variant, gen, context), "ip_adapter": ip}


def _save_ip_adapter(variant: str, suffix: str, path: Path) -> None:
    tree = ip_adapter_weights(variant)
    if suffix == "bin":
        torch.save({k: {n: t.half() for n, t in v.items()} for k, v in tree.items()}, str(path))
    else:
        from safetensors.torch import save_file

        save_file({f"{k}.{n}": t.half().contiguous() for k, v in tree.items() for n, t in v.items()}, str(path))


def ip_adapter_file(variant: str, suffix: str = "safetensors") -> Path:
    """A tiny IP-Adapter file, e.g. ``ip_adapter_file("plus-face", "bin")`` → ``ip-adapter-plus-face_sd15.bin``."""
    return cached(f"ipadapter/v1/{FILE_NAMES[variant]}.{suffix}", lambda p: _save_ip_adapter(variant, suffix, p))


GUIDER_METADATA = {"format": "dreamoving_content_guider", "version": "1"}


def guider_weights(layer_dims=TINY_LAYER_DIMS) -> dict[str, torch.Tensor]:
    """A DreaMoving Content Guider state dict (FaceID-Plus v2 face, plus cloth) for a U-Net with ``layer_dims``."""
    face = ip_adapter_weights("faceid-plusv2", layer_dims, seed=1)
    cloth = ip_adapter_weights("plus", layer_dims, seed=2)
    sd = {f"face_proj.{k}": v for k, v in face["image_proj"].items()}
    sd |= {f"cloth_proj.{k}": v for k, v in cloth["image_proj"].items()}
    for i in range(len(layer_dims)):
        for slot, tree in (("face", face), ("cloth", cloth)):
            for kv in ("k", "v"):
                sd[f"attn.{i}.to_{kv}_{slot}.weight"] = tree["ip_adapter"][f"{2 * i + 1}.to_{kv}_ip.weight"]
    return sd


def _save_guider(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in guider_weights().items()}, str(path), metadata=GUIDER_METADATA)


def guider_file() -> Path:
    """A tiny DreaMoving Content Guider (face + cloth) for the tiny U-Net."""
    return cached("dreamoving_content_guider/v1/dreamoving_content_guider_tiny.safetensors", _save_guider)


def _save_clip_vision(path: Path, layers: int, init_factor: float) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                              num_hidden_layers=layers, image_size=224, patch_size=14, projection_dim=1024,
                              hidden_act="gelu", layer_norm_eps=1e-5, initializer_factor=init_factor)
    model = CLIPVisionModelWithProjection(config)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))


def clip_vision_file(layers: int = 2, init_factor: float = 1.0) -> Path:
    """A ViT-H/14 image tower with ``layers`` layers in ComfyUI's clip_vision (transformers) layout, fp16.

    ``init_factor`` scales transformers' initialisation: at 1 the tiny tower embeds every image almost alike (the
    class token averages random patches away); at 4 different images get clearly different embeddings (noise
    frames ~0.5 cosine apart), which the consistency score tests need."""
    tag = "" if init_factor == 1.0 else f"-f{init_factor:g}"
    return cached(f"clip_vision/v1/CLIP-ViT-H-14-tiny-{layers}l{tag}.safetensors",
                  lambda p: _save_clip_vision(p, layers, init_factor))


class _TinySCRFD(torch.nn.Module):
    """SCRFD output signature: scores (N·2, 1), box distances (N·2, 4), landmarks (N·2, 10) per stride 8/16/32.
    A cell scores high where the image is warm, red or skin-toned (r − b of the normalised input above 0.3,
    about 40 levels of 255): the red square of ``face_image`` and a photographed face, not grey or blue."""

    KPS = torch.tensor([-0.6, -0.5, 0.6, -0.5, 0.0, 0.0, -0.5, 0.6, 0.5, 0.6])

    def forward(self, x):
        scores, boxes, points = [], [], []
        for stride in (8, 16, 32):
            pooled = torch.nn.functional.avg_pool2d(x, stride)
            logit = 8.0 * (pooled[:, 0:1] - pooled[:, 2:3] - 0.3)
            cell = torch.sigmoid(logit).permute(0, 2, 3, 1)  # (1, h, w, 1)
            score = torch.cat([cell, cell], dim=-1).reshape(-1, 1)
            scores.append(score)
            boxes.append(score * 0 + torch.full((4,), 2.0))
            points.append(score * 0 + self.KPS)
        return (*scores, *boxes, *points)


class _TinyArcFace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 512)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _save_insightface_pack(path: Path) -> None:
    path.mkdir(parents=True)
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(_TinySCRFD(), (torch.zeros(1, 3, 640, 640),), str(path / "det_10g.onnx"), input_names=["input.1"],
                      output_names=names, dynamic_axes={"input.1": {2: "height", 3: "width"}}, opset_version=17,
                      dynamo=False)
    torch.onnx.export(_TinyArcFace().eval(), (torch.zeros(1, 3, 112, 112),), str(path / "w600k_r50.onnx"),
                      input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}},
                      opset_version=17, dynamo=False)


def insightface_root() -> Path:
    """A ``models/insightface`` folder holding the tiny pack ``models/buffalo_l`` (detector + ArcFace)."""
    return cached("insightface/v3", lambda p: _save_insightface_pack(p / "models" / "buffalo_l"))


def face_image(size: int = 64, face: bool = True) -> torch.Tensor:
    """A ComfyUI IMAGE ``(1, size, size, 3)``: a red square ("face") on blue, or plain grey without one."""
    image = torch.full((1, size, size, 3), 0.5)
    if face:
        image[..., :] = torch.tensor([0.1, 0.2, 0.9])
        q = size // 4
        image[:, q:size - q, q:size - q] = torch.tensor([1.0, 0.0, 0.0])
    return image
