"""Content Guider weight files: format detection and key maps, in one place.

Two families are read, both flattened to ``{key: tensor}`` by :func:`dreamoving_core.io.load_state_dict`:

* **SD1.5 IP-Adapter** files (``.bin`` holds ``{"image_proj": {...}, "ip_adapter": {...}}``; ``.safetensors`` holds
  the same keys flat, ``image_proj.*`` / ``ip_adapter.*``). One image source: an image projection and, for every
  U-Net cross-attention layer ``i`` (input blocks, then output blocks, then the middle block), ``ip_adapter.{2i+1}.
  to_k_ip.weight`` / ``to_v_ip.weight`` — the odd numbers because IP-Adapter counts self- and cross-attention layers
  together. The projection tells the variants apart:

  ============================== ======================================= ==========================================
  file                           ``image_proj`` keys                      input
  ============================== ======================================= ==========================================
  ip-adapter_sd15                ``proj``, ``norm``                       CLIP ``image_embeds`` (1024, ViT-H/14)
  ip-adapter-plus(-face)_sd15    ``latents``, ``proj_in``, ``layers.*``   CLIP penultimate hidden states (257×1280)
  ip-adapter-full-face_sd15      ``proj.0``, ``proj.2``, ``proj.3``       CLIP penultimate hidden states
  ip-adapter-faceid-plusv2_sd15  ``proj.0``, ``proj.2``, ``norm``,        ArcFace embedding (512) + CLIP
                                 ``perceiver_resampler.*``                penultimate hidden states of the face crop
  ============================== ======================================= ==========================================

  ``plus`` and ``plus-face`` share one layout (they differ in training only). FaceID files also carry LoRA weights
  (``*.to_q_lora.*`` ...); they are not applied here — load the matching ``*_lora.safetensors`` with ComfyUI's
  LoraLoader, as with other IP-Adapter nodes.

* **DreaMoving Content Guider** files (safetensors, ``__metadata__`` ``{"format": "dreamoving_content_guider"}``),
  one or both image sources of Eq. 1:

  - ``face_proj.*``: face projection, any layout above (the paper's: ``faceid-plus``, CLIP + ArcFace → tokens);
  - ``cloth_proj.*``: cloth projection, any CLIP-only layout above (typically ``plus``);
  - ``attn.{i}.to_k_face.weight``, ``attn.{i}.to_v_face.weight``, ``attn.{i}.to_k_cloth.weight``,
    ``attn.{i}.to_v_cloth.weight``: per cross-attention layer ``i`` (same order as above), shape
    ``(inner_dim, context_dim)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import ModelFormatError

FORMAT_NAME = "dreamoving_content_guider"
SLOTS = ("face", "cloth")
SD15_CONTEXT_DIM = 768
SDXL_CONTEXT_DIM = 2048

# Known CLIP image towers by (hidden width, projection width).
ENCODER_NAMES = {1280: "ViT-H/14", 1664: "ViT-bigG/14", 1024: "ViT-L/14"}
EMBED_NAMES = {1024: "ViT-H/14", 1280: "ViT-bigG/14", 768: "ViT-L/14"}


@dataclass(frozen=True)
class ProjectionConfig:
    """Shape of one image projection (image features → ``tokens`` context tokens of width ``context_dim``).

    ``kind``: ``"linear"`` (plain IP-Adapter), ``"resampler"`` (plus / plus-face), ``"mlp"`` (full-face),
    ``"faceid"`` (ArcFace MLP, with a perceiver over CLIP hidden states when ``depth > 0``: faceid-plus).
    ``clip_input``: ``"image_embeds"``, ``"penultimate"`` or ``None`` (ArcFace only); ``clip_width`` its width.
    ``tokens`` is ``None`` for ``"mlp"`` (one token per CLIP hidden state).
    """

    kind: str
    context_dim: int
    clip_input: str | None
    clip_width: int | None
    tokens: int | None
    arcface_width: int | None = None
    depth: int = 0
    dim: int = 0
    heads: int = 0
    ff_mult: int = 4

    @property
    def needs_arcface(self) -> bool:
        return self.arcface_width is not None

    @property
    def encoder_name(self) -> str:
        """The CLIP image tower this projection was trained with, e.g. ``"ViT-H/14"``."""
        if self.clip_width is None:
            return "none"
        table = EMBED_NAMES if self.clip_input == "image_embeds" else ENCODER_NAMES
        return table.get(self.clip_width, f"an unknown encoder of width {self.clip_width}")


@dataclass
class SourceWeights:
    """Weights of one image source of Eq. 1: its projection and per-layer ``(to_k, to_v)`` weights."""

    projection: ProjectionConfig
    projection_weights: dict[str, torch.Tensor]
    to_k: list[torch.Tensor]
    to_v: list[torch.Tensor]


@dataclass
class GuiderWeights:
    """A parsed guider file. ``sources`` maps ``"face"``/``"cloth"`` to weights; an IP-Adapter file has one source
    under ``"any"`` that serves either slot."""

    name: str
    format: str
    sources: dict[str, SourceWeights] = field(default_factory=dict)


def _perceiver_depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def detect_projection(sd: dict[str, torch.Tensor], name: str) -> ProjectionConfig:
    """Tell the image projection layout from its keys (``sd`` holds only the projection, no prefix)."""
    try:
        if "latents" in sd:
            _, tokens, dim = sd["latents"].shape
            return ProjectionConfig("resampler", context_dim=sd["proj_out.weight"].shape[0], clip_input="penultimate",
                                    clip_width=sd["proj_in.weight"].shape[1], tokens=tokens,
                                    depth=_perceiver_depth(sd, ""), dim=dim, heads=dim // 64,
                                    ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim)
        if "proj.3.weight" in sd:
            return ProjectionConfig("mlp", context_dim=sd["proj.3.weight"].shape[0], clip_input="penultimate",
                                    clip_width=sd["proj.0.weight"].shape[1], tokens=None)
        if "proj.0.weight" in sd and "norm.weight" in sd:
            context = sd["norm.weight"].shape[0]
            depth = _perceiver_depth(sd, "perceiver_resampler.")
            clip_width = sd["perceiver_resampler.proj_in.weight"].shape[1] if depth else None
            dim = sd["perceiver_resampler.proj_in.weight"].shape[0] if depth else 0
            ff = sd["perceiver_resampler.layers.0.1.1.weight"].shape[0] // dim if depth else 4
            return ProjectionConfig("faceid", context_dim=context, clip_input="penultimate" if depth else None,
                                    clip_width=clip_width, tokens=sd["proj.2.weight"].shape[0] // context,
                                    arcface_width=sd["proj.0.weight"].shape[1], depth=depth, dim=dim,
                                    heads=dim // 64, ff_mult=ff)
        if "proj.weight" in sd and "norm.weight" in sd:
            context = sd["norm.weight"].shape[0]
            return ProjectionConfig("linear", context_dim=context, clip_input="image_embeds",
                                    clip_width=sd["proj.weight"].shape[1], tokens=sd["proj.weight"].shape[0] // context)
    except (KeyError, ValueError, IndexError) as err:
        raise ModelFormatError(f"'{name}': image projection is incomplete or malformed ({err})") from err
    raise ModelFormatError(f"'{name}': unknown image projection layout (keys: {', '.join(sorted(sd)[:6])}, ...)")


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _check_context(name: str, projection: ProjectionConfig, to_k: list[torch.Tensor]) -> None:
    widths = {w.shape[1] for w in to_k}
    if SDXL_CONTEXT_DIM in widths or projection.context_dim == SDXL_CONTEXT_DIM:
        raise ModelFormatError(f"'{name}' is an SDXL IP-Adapter (cross-attention width {SDXL_CONTEXT_DIM}); "
                               f"this pack needs an SD1.5 one (width {SD15_CONTEXT_DIM}), e.g. ip-adapter_sd15 or "
                               "ip-adapter-plus-face_sd15")
    if widths != {projection.context_dim}:
        raise ModelFormatError(f"'{name}': key/value weights read {sorted(widths)}-wide context but the image "
                               f"projection makes {projection.context_dim}-wide tokens")
    if projection.context_dim != SD15_CONTEXT_DIM:
        raise ModelFormatError(f"'{name}' makes {projection.context_dim}-wide tokens; this pack needs an SD1.5 "
                               f"adapter ({SD15_CONTEXT_DIM})")


def _ordered_layers(sd: dict[str, torch.Tensor], pattern: str) -> list[torch.Tensor]:
    found = {int(m.group(1)): v for k, v in sd.items() if (m := re.fullmatch(pattern, k))}
    return [found[i] for i in sorted(found)]


def _source(sd: dict[str, torch.Tensor], proj_prefix: str, k_pattern: str, v_pattern: str,
            name: str) -> SourceWeights:
    weights = _sub(sd, proj_prefix)
    projection = detect_projection(weights, name)
    to_k = _ordered_layers(sd, k_pattern)
    to_v = _ordered_layers(sd, v_pattern)
    if not to_k or len(to_k) != len(to_v):
        raise ModelFormatError(f"'{name}': found {len(to_k)} key and {len(to_v)} value weights for the "
                               "cross-attention layers; the file is incomplete")
    _check_context(name, projection, to_k)
    return SourceWeights(projection, weights, to_k, to_v)


def parse_guider_state_dict(sd: dict[str, torch.Tensor], name: str,
                            metadata: dict[str, str] | None = None) -> GuiderWeights:
    """Detect the file family and split it into image sources. Raises ``ModelFormatError`` naming ``name``."""
    if any(k.startswith("image_proj.") for k in sd) and any(k.startswith("ip_adapter.") for k in sd):
        numbers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"ip_adapter\.(\d+)\.to_k_ip\.weight$", k))})
        if numbers != list(range(1, 2 * len(numbers), 2)):
            raise ModelFormatError(f"'{name}': IP-Adapter layers are numbered {numbers[:5]}...; expected 1, 3, 5, ...")
        source = _source(sd, "image_proj.", r"ip_adapter\.(\d+)\.to_k_ip\.weight", r"ip_adapter\.(\d+)\.to_v_ip\.weight",
                         name)
        return GuiderWeights(name, "ip_adapter", {"any": source})
    if (metadata or {}).get("format") == FORMAT_NAME or any(k.startswith(("face_proj.", "cloth_proj.")) for k in sd):
        sources = {slot: _source(sd, f"{slot}_proj.", rf"attn\.(\d+)\.to_k_{slot}\.weight",
                                 rf"attn\.(\d+)\.to_v_{slot}\.weight", name)
                   for slot in SLOTS if any(k.startswith(f"{slot}_proj.") for k in sd)}
        if not sources:
            raise ModelFormatError(f"'{name}' is marked as a DreaMoving Content Guider but has no face_proj.* or "
                                   "cloth_proj.* weights")
        return GuiderWeights(name, FORMAT_NAME, sources)
    if any(".to_k_ip." in k for k in sd) or any(k.startswith("ip_adapter.") for k in sd):
        raise ModelFormatError(f"'{name}' has IP-Adapter layers but no image_proj weights; the file is incomplete")
    if any("diffusion_model." in k for k in sd):
        raise ModelFormatError(f"'{name}' is a Stable Diffusion checkpoint, not a Content Guider or IP-Adapter; load "
                               "it with Load Checkpoint")
    if any("vision_model." in k or k.startswith("visual.") for k in sd):
        raise ModelFormatError(f"'{name}' is a CLIP vision model; load it with a CLIP Vision loader and connect it to "
                               "the Content Guider node's clip_vision input")
    raise ModelFormatError(f"'{name}' is neither a DreaMoving Content Guider nor an SD1.5 IP-Adapter (expected "
                           "image_proj.* + ip_adapter.* or face_proj.*/cloth_proj.* + attn.* keys)")


def guider_state_dict(sources: dict[str, SourceWeights]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The DreaMoving format of ``sources`` (``{"face": ..., "cloth": ...}``): ``(weights, metadata)`` to save."""
    weights: dict[str, torch.Tensor] = {}
    for slot, source in sources.items():
        weights.update({f"{slot}_proj.{k}": v for k, v in source.projection_weights.items()})
        for i, (k, v) in enumerate(zip(source.to_k, source.to_v)):
            weights[f"attn.{i}.to_k_{slot}.weight"] = k
            weights[f"attn.{i}.to_v_{slot}.weight"] = v
    return weights, {"format": FORMAT_NAME, "version": "1"}
