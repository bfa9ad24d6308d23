"""Content Guider (DreaMoving Eq. 1): decoupled cross-attention with one key/value pair per image source.

At every U-Net cross-attention layer, with the layer's own query ``Q`` and text keys/values ``K_t, V_t``::

    Z' = softmax(Q K_tᵀ/√d) V_t + α_f · softmax(Q K_fᵀ/√d) V_f + α_c · softmax(Q K_cᵀ/√d) V_c

``K_f = W_k^f · c_f`` and ``V_f = W_v^f · c_f`` come from the face tokens ``c_f`` (an image projection of CLIP and
ArcFace features), ``K_c, V_c`` likewise from the cloth tokens. The tokens are per video: they are broadcast over the
frames folded into the batch. Under classifier-free guidance the unconditional half of the batch sees the tokens of
a blank image (zero CLIP ``image_embeds``, a black image's CLIP hidden states, a zero ArcFace embedding), as
IP-Adapter does, so the guidance scale also amplifies the image condition.

Everything image-dependent is computed once per image (:meth:`ContentSource.keys_values`); sampling only runs the
attention itself (:func:`decoupled_cross_attention`). Every attention call goes through the backend passed in
(``dreamoving_core.attention``); layers come from ``ops`` (``dreamoving_core.ops``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from ..attention import AttentionFn, sdpa_attention
from ..errors import InputMismatchError, ModelFormatError
from ..io import load_state_dict, read_metadata, reading
from ..ops import TORCH_OPS
from .format import EMBED_NAMES, ENCODER_NAMES, ProjectionConfig, SourceWeights, parse_guider_state_dict



@dataclass
class AttentionTerm:
    """One image term of Eq. 1: ``alpha · softmax(Q Kᵀ/√d) V`` with ``k, v``: ``(G, N, C)``.

    The ``B`` query rows form ``G`` equal groups (``G`` divides ``B``), group ``g`` attending to ``k[g], v[g]``: under
    classifier-free guidance ``G`` is the number of videos (cond, uncond) and each group is one video's frames, so the
    image keys/values are read once per video, never copied per frame. ``alpha`` is a number, or a 0-dim tensor
    (e.g. a sampling-range gate that must not leave a compiled graph).
    """

    alpha: float | torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def active(self) -> bool:
        """False only for a numeric ``alpha == 0`` (the term is skipped); a tensor ``alpha`` is always computed."""
        return isinstance(self.alpha, torch.Tensor) or self.alpha != 0


def gated_alpha(alpha: float, sigmas: torch.Tensor | None, sigma_start: float,
                sigma_end: float) -> float | torch.Tensor:
    """``alpha`` inside the sampling range ``sigma_end <= sigma <= sigma_start`` (``sigma``: the first of
    ``sigmas``), 0 outside it. Eager code gets a number (a 0 skips the term); under ``torch.compile`` the gate is a
    0-dim tensor, so reading the step's sigma neither breaks the graph nor recompiles it at the range's edges."""
    if sigmas is None or alpha == 0:
        return alpha
    sigma = sigmas.detach().reshape(-1)[0]
    if torch.compiler.is_compiling():
        return alpha * ((sigma >= sigma_end) & (sigma <= sigma_start)).to(torch.float32)
    return alpha if sigma_end <= float(sigma) <= sigma_start else 0.0


def term_attention(q: torch.Tensor, term: AttentionTerm, heads: int,
                   attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """``softmax(Q K_termᵀ/√d) V_term`` for ``q``: ``(B, L, C)``: each group of ``B / G`` rows is folded into one
    sequence of queries (a free view), so one attention call covers every frame of a video against its ``N`` keys."""
    batch, length, channels = q.shape
    groups = term.k.shape[0]
    if batch % groups:
        raise InputMismatchError(f"{batch} query rows do not split into the {groups} groups of the image keys")
    folded = q.reshape(groups, batch // groups * length, channels)
    out = attention(folded, term.k.to(q.dtype), term.v.to(q.dtype), heads)
    return out.reshape(batch, length, channels)


def decoupled_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              terms: Sequence[AttentionTerm] = (), attention: AttentionFn = sdpa_attention,
                              text_out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1 on projected tensors: ``q``: ``(B, L, C)``; ``k, v``: ``(B, T, C)`` text keys/values.

    The text term is computed once by ``attention`` (or taken from ``text_out``); each active term (see
    :class:`AttentionTerm`) adds one attention call of its own (separate softmax), so with no active term the
    result is exactly ``attention(q, k, v, heads)``.
    """
    out = attention(q, k, v, heads) if text_out is None else text_out
    for term in terms:
        if not term.active:
            continue
        image = term_attention(q, term, heads, attention)
        out = out + term.alpha.to(out.dtype) * image if isinstance(term.alpha, torch.Tensor) else \
            torch.add(out, image, alpha=term.alpha)
    return out


# ---------------------------------------------------------------------------------------------------------- projections


class _FeedForward(nn.Sequential):
    """LayerNorm → Linear → GELU → Linear (keys ``0``, ``1``, ``3``)."""

    def __init__(self, dim: int, mult: int, ops=TORCH_OPS):
        super().__init__(ops.LayerNorm(dim), ops.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         ops.Linear(dim * mult, dim, bias=False))


class _PerceiverAttention(nn.Module):
    """Latents attend to ``[features; latents]`` (keys ``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64, ops=TORCH_OPS):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = ops.LayerNorm(dim), ops.LayerNorm(dim)
        self.to_q = ops.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = ops.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = ops.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class _Perceiver(nn.Module):
    """Perceiver resampler: ``proj_in`` features, ``depth`` (attention, feed-forward) blocks on the latents,
    ``proj_out`` + ``norm_out``. With ``tokens`` it owns learned ``latents`` (IP-Adapter plus)."""

    def __init__(self, cfg: ProjectionConfig, learned_latents: bool, ops=TORCH_OPS):
        super().__init__()
        if learned_latents:
            self.latents = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dim))
        self.proj_in = ops.Linear(cfg.clip_width, cfg.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([_PerceiverAttention(cfg.dim, cfg.heads, ops=ops), _FeedForward(cfg.dim, cfg.ff_mult, ops)])
            for _ in range(cfg.depth))
        self.proj_out = ops.Linear(cfg.dim, cfg.context_dim)
        self.norm_out = ops.LayerNorm(cfg.context_dim)

    def forward(self, hidden: torch.Tensor, latents: torch.Tensor | None = None,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        x = self.proj_in(hidden)
        if latents is None:  # no layer casts a bare parameter: follow the input (a host may keep it offloaded)
            latents = self.latents.to(device=x.device, dtype=x.dtype).expand(hidden.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents, attention) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageProjection(nn.Module):
    """Image features → context tokens ``(B, N, context_dim)``, one class for every layout in
    :mod:`dreamoving_core.guider.format` (parameter names match the files)."""

    def __init__(self, cfg: ProjectionConfig, ops=TORCH_OPS):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "linear":
            self.proj = ops.Linear(cfg.clip_width, cfg.tokens * cfg.context_dim)
            self.norm = ops.LayerNorm(cfg.context_dim)
        elif cfg.kind == "mlp":
            self.proj = nn.Sequential(ops.Linear(cfg.clip_width, cfg.clip_width), nn.GELU(),
                                      ops.Linear(cfg.clip_width, cfg.context_dim), ops.LayerNorm(cfg.context_dim))
        elif cfg.kind == "resampler":
            self.resampler = _Perceiver(cfg, learned_latents=True, ops=ops)
        elif cfg.kind == "faceid":
            self.proj = nn.Sequential(ops.Linear(cfg.arcface_width, 2 * cfg.arcface_width), nn.GELU(),
                                      ops.Linear(2 * cfg.arcface_width, cfg.tokens * cfg.context_dim))
            self.norm = ops.LayerNorm(cfg.context_dim)
            if cfg.depth:
                self.perceiver_resampler = _Perceiver(cfg, learned_latents=False, ops=ops)
        else:
            raise ValueError(f"unknown projection kind {cfg.kind!r}")

    def load_weights(self, weights: dict[str, torch.Tensor], name: str) -> None:
        """Take the file's projection weights (as float32; the module may have been built on the meta device)."""
        # The resampler's keys sit at the top level of the file; ours nest it one level down.
        if self.cfg.kind == "resampler":
            weights = {f"resampler.{k}": v for k, v in weights.items()}
        try:
            self.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
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
                shortcut_scale: float = 1.0, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        """``clip``: ``(B, E)`` image_embeds or ``(B, T, W)`` hidden states; ``arcface``: ``(B, 512)``."""
        cfg = self.cfg
        if cfg.kind == "linear":
            return self.norm(rearrange(self.proj(clip), "b (n c) -> b n c", c=cfg.context_dim))
        if cfg.kind == "mlp":
            return self.proj(clip)
        if cfg.kind == "resampler":
            return self.resampler(clip, attention=attention)
        identity = self.norm(rearrange(self.proj(arcface), "b (n c) -> b n c", c=cfg.context_dim))
        if not cfg.depth:
            return identity
        # FaceID-Plus v2: identity tokens refined by CLIP features of the aligned face, with a shortcut.
        return identity + shortcut_scale * self.perceiver_resampler(clip, identity, attention)


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

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move every layer's keys/values to ``device`` in ``dtype`` now (a host calls it before sampling, so a
        compiled U-Net finds them there and never traces the move)."""
        for layer in range(len(self.keys)):
            self._on(layer, device, dtype)

    def _on(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, device, dtype)
        if key not in self._cache:  # moved once per device and dtype, not per step
            self._cache[key] = (self.keys[layer].to(device, dtype), self.values[layer].to(device, dtype))
        return self._cache[key]

    def for_batch(self, layer: int, cond_or_uncond: Sequence[int], batch: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` of shape ``(G, N, C)`` for :class:`AttentionTerm`: the batch is ``G = len(cond_or_uncond)``
        equal groups (0 = cond, 1 = uncond, as ComfyUI batches CFG), each any number of frames or context-window
        frames; ``G = 1`` (the cond row for every query) when the batch does not split so."""
        k, v = self._on(layer, device, dtype)
        if not cond_or_uncond or batch % len(cond_or_uncond):
            return k[:1], v[:1]
        rows = [min(int(c), 1) for c in cond_or_uncond]
        return (k, v) if rows == [0, 1] else (k[rows], v[rows])


class ContentSource(nn.Module):
    """One image source of Eq. 1 (face or cloth): image projection and per-layer ``to_k`` / ``to_v``."""

    def __init__(self, weights: SourceWeights, name: str, ops=TORCH_OPS):
        super().__init__()
        self.name = name
        with torch.device("meta"):  # the weights come from the file
            self.projection = ImageProjection(weights.projection, ops)
            self.to_k = nn.ModuleList(ops.Linear(w.shape[1], w.shape[0], bias=False) for w in weights.to_k)
            self.to_v = nn.ModuleList(ops.Linear(w.shape[1], w.shape[0], bias=False) for w in weights.to_v)
        self.projection.load_weights(weights.projection_weights, name)
        for layer, weight in (*zip(self.to_k, weights.to_k), *zip(self.to_v, weights.to_v)):
            layer.load_state_dict({"weight": weight.float()}, assign=True)

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

    def project(self, features: ImageFeatures, shortcut_scale: float = 1.0,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        """Context tokens ``(n, N, C)``, one row per image of ``features``, computed in the weights' dtype on the
        features' device (differentiable: training calls it)."""
        clip = features.image_embeds if self.config.clip_input == "image_embeds" else features.penultimate_hidden_states
        dtype = self.to_k[0].weight.dtype
        return self.projection(*(None if x is None else x.to(dtype) for x in (clip, features.arcface)),
                               shortcut_scale, attention)

    @torch.no_grad()
    def tokens(self, features: ImageFeatures, shortcut_scale: float = 1.0,
               attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        """Context tokens ``(1, n·N, C)`` of ``n`` reference images (their tokens side by side)."""
        return rearrange(self.project(features, shortcut_scale, attention), "n t c -> 1 (n t) c")

    @torch.no_grad()
    def keys_values(self, features: ImageFeatures, blank: ImageFeatures, what: str = "image",
                    shortcut_scale: float = 1.0, attention: AttentionFn = sdpa_attention) -> ContentKV:
        """Per-layer keys/values of the reference ``features`` (cond) and of ``blank`` (uncond), on the features'
        device."""
        self.check_features(features, what)
        cond = self.tokens(features, shortcut_scale, attention)
        uncond = self.tokens(blank, shortcut_scale, attention)
        both = torch.cat([cond, uncond.repeat(1, cond.shape[1] // uncond.shape[1], 1)])
        return ContentKV([layer(both) for layer in self.to_k], [layer(both) for layer in self.to_v])


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


def load_content_guider(path: str | os.PathLike, ops=TORCH_OPS) -> ContentGuider:
    """Load a DreaMoving Content Guider or SD1.5 IP-Adapter file (``.safetensors`` or weights-only ``.bin``) in
    float32 on the CPU, built from ``ops`` (``dreamoving_core.ops``)."""
    name = os.path.basename(os.fspath(path))
    sd = load_state_dict(path)
    with reading(name, "Content Guider or IP-Adapter"):
        parsed = parse_guider_state_dict(sd, name, read_metadata(path))
        return ContentGuider(name, parsed.format,
                             {slot: ContentSource(w, name, ops) for slot, w in parsed.sources.items()})

