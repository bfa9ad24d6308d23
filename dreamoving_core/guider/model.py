"""Content Guider (DreaMoving Eq. 1): decoupled cross-attention with one key/value pair per image source.

At every U-Net cross-attention layer, with the layer's own query ``Q`` and text keys/values ``K_t, V_t``::

    Z' = softmax(Q K_tᵀ/√d) V_t + α_f · softmax(Q K_fᵀ/√d) V_f + α_c · softmax(Q K_cᵀ/√d) V_c

``K_f = W_k^f · c_f`` and ``V_f = W_v^f · c_f`` come from the face tokens ``c_f`` (an image projection of CLIP and
ArcFace features), ``K_c, V_c`` likewise from the cloth tokens. The tokens are per video: they are broadcast over the
frames folded into the batch. Under classifier-free guidance the unconditional half of the batch sees the tokens of
a blank image (zero CLIP ``image_embeds``, a black image's CLIP hidden states, a zero ArcFace embedding), as
IP-Adapter does, so the guidance scale also amplifies the image condition.

Everything image-dependent is computed once per image (:meth:`ContentSource.keys_values`); sampling only runs the
attention itself (:func:`decoupled_cross_attention`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import nn

from ..errors import InputMismatchError, ModelFormatError
from ..io import load_state_dict, read_metadata, reading
from .format import EMBED_NAMES, ENCODER_NAMES, ProjectionConfig, SourceWeights, parse_guider_state_dict

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention on ``(B, L, heads·d)`` tensors, returning ``(B, L, heads·d)``."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


@dataclass
class AttentionTerm:
    """One image term of Eq. 1: ``alpha · softmax(Q Kᵀ/√d) V`` with ``k, v``: ``(B, N, C)``."""

    alpha: float
    k: torch.Tensor
    v: torch.Tensor


def decoupled_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              terms: Sequence[AttentionTerm] = (), attention: Attention = sdpa_attention,
                              text_out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1 on projected tensors: ``q``: ``(B, L, C)``; ``k, v``: ``(B, T, C)`` text keys/values.

    The text term is computed once by ``attention`` (or taken from ``text_out``); each term with ``alpha != 0``
    adds one attention call of its own (separate softmax), so with no active term the result is exactly
    ``attention(q, k, v, heads)``.
    """
    out = attention(q, k, v, heads) if text_out is None else text_out
    for term in terms:
        if term.alpha != 0:
            out = torch.add(out, attention(q, term.k.to(q.dtype), term.v.to(q.dtype), heads), alpha=term.alpha)
    return out


# ---------------------------------------------------------------------------------------------------------- projections


class _FeedForward(nn.Sequential):
    """LayerNorm → Linear → GELU → Linear (keys ``0``, ``1``, ``3``)."""

    def __init__(self, dim: int, mult: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class _PerceiverAttention(nn.Module):
    """Latents attend to ``[features; latents]`` (keys ``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(sdpa_attention(self.to_q(latents), k, v, self.heads))


class _Perceiver(nn.Module):
    """Perceiver resampler: ``proj_in`` features, ``depth`` (attention, feed-forward) blocks on the latents,
    ``proj_out`` + ``norm_out``. With ``tokens`` it owns learned ``latents`` (IP-Adapter plus)."""

    def __init__(self, cfg: ProjectionConfig, learned_latents: bool):
        super().__init__()
        if learned_latents:
            self.latents = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dim))
        self.proj_in = nn.Linear(cfg.clip_width, cfg.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([_PerceiverAttention(cfg.dim, cfg.heads), _FeedForward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth))
        self.proj_out = nn.Linear(cfg.dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)

    def forward(self, hidden: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj_in(hidden)
        if latents is None:
            latents = self.latents.expand(hidden.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageProjection(nn.Module):
    """Image features → context tokens ``(B, N, context_dim)``, one class for every layout in
    :mod:`dreamoving_core.guider.format` (parameter names match the files)."""

    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "linear":
            self.proj = nn.Linear(cfg.clip_width, cfg.tokens * cfg.context_dim)
            self.norm = nn.LayerNorm(cfg.context_dim)
        elif cfg.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(cfg.clip_width, cfg.clip_width), nn.GELU(),
                                      nn.Linear(cfg.clip_width, cfg.context_dim), nn.LayerNorm(cfg.context_dim))
        elif cfg.kind == "resampler":
            self.resampler = _Perceiver(cfg, learned_latents=True)
        elif cfg.kind == "faceid":
            self.proj = nn.Sequential(nn.Linear(cfg.arcface_width, 2 * cfg.arcface_width), nn.GELU(),
                                      nn.Linear(2 * cfg.arcface_width, cfg.tokens * cfg.context_dim))
            self.norm = nn.LayerNorm(cfg.context_dim)
            if cfg.depth:
                self.perceiver_resampler = _Perceiver(cfg, learned_latents=False)
        else:
            raise ValueError(f"unknown projection kind {cfg.kind!r}")

    def load_weights(self, weights: dict[str, torch.Tensor], name: str) -> None:
        # The resampler's keys sit at the top level of the file; ours nest it one level down.
        if self.cfg.kind == "resampler":
            weights = {f"resampler.{k}": v for k, v in weights.items()}
        try:
            self.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        except RuntimeError as err:
            raise ModelFormatError(f"'{name}': image projection weights do not fit a {self.cfg.kind} projection "
                                   f"({str(err).splitlines()[0]})") from err

    def file_weights(self) -> dict[str, torch.Tensor]:
        """The weights under the file's key names (the inverse of :meth:`load_weights`)."""
        weights = self.state_dict()
        if self.cfg.kind == "resampler":
            weights = {k.removeprefix("resampler."): v for k, v in weights.items()}
        return weights

    def forward(self, clip: torch.Tensor | None, arcface: torch.Tensor | None = None,
                shortcut_scale: float = 1.0) -> torch.Tensor:
        """``clip``: ``(B, E)`` image_embeds or ``(B, T, W)`` hidden states; ``arcface``: ``(B, 512)``."""
        cfg = self.cfg
        if cfg.kind == "linear":
            return self.norm(rearrange(self.proj(clip), "b (n c) -> b n c", c=cfg.context_dim))
        if cfg.kind == "mlp":
            return self.proj(clip)
        if cfg.kind == "resampler":
            return self.resampler(clip)
        identity = self.norm(rearrange(self.proj(arcface), "b (n c) -> b n c", c=cfg.context_dim))
        if not cfg.depth:
            return identity
        # FaceID-Plus v2: identity tokens refined by CLIP features of the aligned face, with a shortcut.
        return identity + shortcut_scale * self.perceiver_resampler(clip, identity)


# ------------------------------------------------------------------------------------------------------------ sources


@dataclass
class ImageFeatures:
    """Encoder outputs for a batch of reference images (any may be ``None`` if the projection does not use it).

    ``image_embeds``: ``(B, E)``; ``penultimate_hidden_states``: ``(B, T, W)``; ``arcface``: ``(B, 512)``
    L2-normalised identity embeddings.
    """

    image_embeds: torch.Tensor | None = None
    penultimate_hidden_states: torch.Tensor | None = None
    arcface: torch.Tensor | None = None


@dataclass
class ContentKV:
    """Face or cloth keys/values of every cross-attention layer, for the conditional and unconditional halves.

    ``keys[i]``, ``values[i]``: ``(2, N, C_i)`` — row 0 from the reference image(s), row 1 from the blank image.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __post_init__(self):
        self._cache: dict = {}

    def for_batch(self, layer: int, cond_or_uncond: Sequence[int], batch: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` of shape ``(batch, N, C)``: the batch is ``len(cond_or_uncond)`` equal chunks (0 = cond,
        1 = uncond, as ComfyUI batches CFG), each chunk any number of frames or context-window frames."""
        key = (layer, device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.keys[layer].to(device, dtype), self.values[layer].to(device, dtype))
        k, v = self._cache[key]
        chunks = len(cond_or_uncond) if cond_or_uncond and batch % len(cond_or_uncond) == 0 else 0
        if not chunks:
            return k[:1].expand(batch, -1, -1), v[:1].expand(batch, -1, -1)
        layout = (tuple(min(int(c), 1) for c in cond_or_uncond), batch, device)
        if layout not in self._cache:  # built once per layout, not per layer call
            self._cache[layout] = torch.tensor(layout[0], device=device).repeat_interleave(batch // chunks)
        rows = self._cache[layout]
        return k[rows], v[rows]


class ContentSource(nn.Module):
    """One image source of Eq. 1 (face or cloth): image projection and per-layer ``to_k`` / ``to_v``."""

    def __init__(self, weights: SourceWeights, name: str):
        super().__init__()
        self.name = name
        self.projection = ImageProjection(weights.projection)
        self.projection.load_weights(weights.projection_weights, name)
        self.to_k = nn.ModuleList(_linear(w) for w in weights.to_k)
        self.to_v = nn.ModuleList(_linear(w) for w in weights.to_v)

    def source_weights(self) -> SourceWeights:
        """This source's current weights in the file layout (what :func:`~.format.guider_state_dict` saves)."""
        return SourceWeights(self.config, self.projection.file_weights(), [layer.weight for layer in self.to_k],
                             [layer.weight for layer in self.to_v])

    @property
    def config(self) -> ProjectionConfig:
        return self.projection.cfg

    @property
    def layer_dims(self) -> list[int]:
        """Inner width of each cross-attention layer, in U-Net order (input, output, middle blocks)."""
        return [layer.out_features for layer in self.to_k]

    def check_features(self, features: ImageFeatures, what: str) -> None:
        """Raise ``InputMismatchError`` if ``features`` do not fit this source's projection."""
        cfg = self.config
        if cfg.needs_arcface and features.arcface is None:
            raise InputMismatchError(f"'{self.name}' is a FaceID adapter and needs an ArcFace identity embedding of "
                                     f"the {what}; connect an InsightFace model")
        if cfg.needs_arcface and features.arcface.shape[-1] != cfg.arcface_width:
            raise InputMismatchError(f"'{self.name}' expects {cfg.arcface_width}-d ArcFace embeddings, got "
                                     f"{features.arcface.shape[-1]}-d")
        if cfg.clip_input is None:
            return
        clip = features.image_embeds if cfg.clip_input == "image_embeds" else features.penultimate_hidden_states
        if clip is None:
            raise InputMismatchError(f"'{self.name}' needs CLIP {cfg.clip_input} of the {what}; connect a CLIP "
                                     "vision model")
        if clip.shape[-1] != cfg.clip_width:
            names = EMBED_NAMES if cfg.clip_input == "image_embeds" else ENCODER_NAMES
            found = names.get(clip.shape[-1], "an unknown encoder")
            raise InputMismatchError(f"'{self.name}' expects image features of width {cfg.clip_width} "
                                     f"({cfg.encoder_name}); the CLIP vision model gives {clip.shape[-1]} ({found}). "
                                     f"Load the {cfg.encoder_name} image encoder this adapter was trained with")

    def project(self, features: ImageFeatures, shortcut_scale: float = 1.0) -> torch.Tensor:
        """Context tokens ``(n, N, C)``, one row per image of ``features`` (differentiable: training calls it)."""
        clip = features.image_embeds if self.config.clip_input == "image_embeds" else features.penultimate_hidden_states
        arcface = features.arcface
        return self.projection(None if clip is None else clip.float(), None if arcface is None else arcface.float(),
                               shortcut_scale)

    @torch.no_grad()
    def tokens(self, features: ImageFeatures, shortcut_scale: float = 1.0) -> torch.Tensor:
        """Context tokens ``(1, n·N, C)`` of ``n`` reference images (their tokens side by side)."""
        return rearrange(self.project(features, shortcut_scale), "n t c -> 1 (n t) c")

    @torch.no_grad()
    def keys_values(self, features: ImageFeatures, blank: ImageFeatures, what: str = "image",
                    shortcut_scale: float = 1.0) -> ContentKV:
        """Per-layer keys/values of the reference ``features`` (cond) and of ``blank`` (uncond)."""
        self.check_features(features, what)
        cond = self.tokens(features, shortcut_scale)
        uncond = self.tokens(blank, shortcut_scale)
        both = torch.cat([cond, uncond.repeat(1, cond.shape[1] // uncond.shape[1], 1)])
        return ContentKV([layer(both) for layer in self.to_k], [layer(both) for layer in self.to_v])


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight.float())
    return layer


class ContentGuider(nn.Module):
    """A loaded guider file: ``sources["face"]`` / ``sources["cloth"]``, or one IP-Adapter under ``"any"``."""

    def __init__(self, name: str, format: str, sources: dict[str, ContentSource]):
        super().__init__()
        self.name, self.format = name, format
        self.sources = nn.ModuleDict(sources)

    def source(self, slot: str) -> ContentSource:
        """The source for ``slot`` (``"face"`` or ``"cloth"``); an IP-Adapter file serves either."""
        if slot in self.sources:
            return self.sources[slot]
        if "any" in self.sources:
            return self.sources["any"]
        raise InputMismatchError(f"'{self.name}' has no {slot} weights (it holds: {', '.join(self.sources)}); use a "
                                 f"guider file with {slot}_proj.* weights or an SD1.5 IP-Adapter")

    def check_layers(self, layer_dims: Sequence[int]) -> None:
        """Raise ``InputMismatchError`` unless every source has one K/V pair per cross-attention layer of the
        U-Net whose inner widths (input, output, middle blocks) are ``layer_dims``."""
        for source in self.sources.values():
            if list(source.layer_dims) != list(layer_dims):
                raise InputMismatchError(
                    f"'{self.name}' has {len(source.layer_dims)} cross-attention layers of widths "
                    f"{_summary(source.layer_dims)} but the model has {len(layer_dims)} of widths "
                    f"{_summary(layer_dims)}; use a guider made for this model (SD1.5: 16 layers)")


def _summary(dims: Sequence[int]) -> str:
    return "/".join(str(d) for d in dict.fromkeys(dims))


def load_content_guider(path: str | os.PathLike) -> ContentGuider:
    """Load a DreaMoving Content Guider or SD1.5 IP-Adapter file (``.safetensors`` or weights-only ``.bin``)."""
    name = os.path.basename(os.fspath(path))
    sd = load_state_dict(path)
    with reading(name, "Content Guider or IP-Adapter"):
        parsed = parse_guider_state_dict(sd, name, read_metadata(path))
        return ContentGuider(name, parsed.format,
                             {slot: ContentSource(w, name) for slot, w in parsed.sources.items()})

