"""Content Guider nodes (DreaMoving Eq. 1): load a guider / IP-Adapter, OpenCLIP and InsightFace; apply face and cloth.

Face and Cloth compose into ONE ``attn2`` replace patch per cross-attention layer (:class:`GuiderAttention`): the
second node finds the first's patch in the cloned model's options and returns an extended copy, so the text
attention is computed once. ControlNets keep text-only context: ComfyUI runs them without ``transformer_options``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention
from comfy_api.latest import io

from dreamoving_core.guider.clip_image import ClipImageEncoder
from dreamoving_core.guider.model import (AttentionTerm, ContentGuider, ContentKV, ImageFeatures,
                                            decoupled_cross_attention, load_content_guider)
from dreamoving_core.guider.kernel import fused_decoupled_cross_attention
from dreamoving_core.errors import InputMismatchError
from dreamoving_core.guider.face_id import PACK_SUBFOLDER, FaceAnalyzer

from ._common import ModelCombo, ModelFolder, custom_type

CATEGORY = "DreaMoving/Content"
GUIDER_FOLDER = ModelFolder(("dreamoving_content_guider", "ipadapter"), "Content Guider / IP-Adapter",
                            "put a DreaMoving guider or an SD1.5 IP-Adapter (e.g. ip-adapter-plus-face_sd15."
                            "safetensors from huggingface.co/h94/IP-Adapter) there")
CLIP_FOLDER = ModelFolder(("clip_vision",), "CLIP vision model",
                          "put CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (OpenCLIP ViT-H/14) there")
INSIGHTFACE_FOLDER = ModelFolder(("insightface",), "InsightFace pack",
                                 "put the pack's folder of .onnx files (antelopev2 or buffalo_l) there",
                                 holds="*.onnx", subfolder=PACK_SUBFOLDER)
ContentGuiderType = custom_type("DREAMOVING_CONTENT_GUIDER", ContentGuider)
OpenClipVisionType = custom_type("DREAMOVING_OPEN_CLIP_VISION", ClipImageEncoder)
FaceAnalysisType = custom_type("DREAMOVING_INSIGHTFACE", FaceAnalyzer)


# ------------------------------------------------------------------------------------------------- the attn2 patch


@dataclass(frozen=True)
class SlotTerm:
    """One image source at one strength: ``alpha`` inside ``sigma_end <= sigma <= sigma_start``."""

    slot: str
    alpha: float
    sigma_start: float
    sigma_end: float
    kv: ContentKV


class GuiderAttention:
    """ComfyUI ``attn2`` replace patch of one cross-attention layer: Eq. 1 with the face and/or cloth terms.

    Immutable: :meth:`with_term` returns a new patch, so model clones never share mutable state (deep copies
    return the object itself for the same reason). ``inner`` is a replace patch another pack set before ours; it
    then computes the text term.
    """

    def __init__(self, layer: int, terms: tuple[SlotTerm, ...] = (), inner=None):
        self.layer, self.terms, self.inner = layer, terms, inner

    def with_term(self, term: SlotTerm) -> "GuiderAttention":
        return GuiderAttention(self.layer, tuple(t for t in self.terms if t.slot != term.slot) + (term,), self.inner)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.detach().flatten()[0]) if sigmas is not None else None
        active = [t for t in self.terms if t.alpha != 0 and (sigma is None or t.sigma_end <= sigma <= t.sigma_start)]
        heads = extra_options["n_heads"]
        cond_or_uncond = extra_options.get("cond_or_uncond") or []
        terms = [AttentionTerm(t.alpha, *t.kv.for_batch(self.layer, cond_or_uncond, q.shape[0], q.device, q.dtype))
                 for t in active]
        if self.inner is None and terms:  # one pass over Q on CUDA (None elsewhere)
            fused = fused_decoupled_cross_attention(q, k, v, heads, terms)
            if fused is not None:
                return fused
        attention = partial(optimized_attention, attn_precision=extra_options.get("attn_precision"),
                            transformer_options=extra_options)
        text_out = self.inner(q, k, v, extra_options) if self.inner is not None else None
        return decoupled_cross_attention(q, k, v, heads, terms, attention=attention, text_out=text_out)


@dataclass(frozen=True)
class CrossAttentionSite:
    """Where a cross-attention layer sits: ComfyUI's patch key and its widths."""

    block: tuple[str, int]
    transformer_index: int
    inner_dim: int
    context_dim: int


def cross_attention_sites(model) -> list[CrossAttentionSite]:
    """Every text cross-attention layer of ``model``'s U-Net in IP-Adapter order: input, output, middle blocks."""
    unet = model.get_model_object("diffusion_model")
    blocks = ([("input", i, b) for i, b in enumerate(unet.input_blocks)]
              + [("output", i, b) for i, b in enumerate(unet.output_blocks)] + [("middle", 0, unet.middle_block)])
    sites = []
    for name, number, block in blocks:
        for module in block:
            if isinstance(module, SpatialTransformer):
                for index, tb in enumerate(module.transformer_blocks):
                    if tb.attn2 is not None:
                        sites.append(CrossAttentionSite((name, number), index, tb.attn2.to_k.out_features,
                                                        tb.attn2.to_k.in_features))
    return sites


def apply_guidance(model, slot: str, guider: ContentGuider, kv: ContentKV, alpha: float, start: float, end: float):
    """A clone of ``model`` whose cross-attention layers add ``alpha ·`` the ``slot`` term of Eq. 1."""
    sites = cross_attention_sites(model)
    guider.check_layers([s.inner_dim for s in sites])
    context = guider.source(slot).config.context_dim
    if any(s.context_dim != context for s in sites):
        raise InputMismatchError(f"'{guider.name}' makes {context}-wide tokens but the model's cross-attention reads "
                                 f"{sites[0].context_dim}-wide context; use an SD1.5 model")
    sampling = model.get_model_object("model_sampling")
    term = SlotTerm(slot, float(alpha), sampling.percent_to_sigma(start), sampling.percent_to_sigma(end), kv)
    patched = model.clone()
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for layer, site in enumerate(sites):
        key = (*site.block, site.transformer_index)
        current = existing.get(key, existing.get(site.block))
        patch = current if isinstance(current, GuiderAttention) else GuiderAttention(layer, inner=current)
        patched.set_model_attn2_replace(patch.with_term(term), site.block[0], site.block[1], site.transformer_index)
    return patched


# ------------------------------------------------------------------------------------------------------- features


def image_features(clip_vision, images: torch.Tensor) -> ImageFeatures:
    """CLIP features of ``images`` ``(B, H, W, 3)`` from our OpenCLIP encoder or ComfyUI's core CLIP_VISION."""
    if isinstance(clip_vision, ClipImageEncoder):
        return clip_vision.encode(images)
    out = clip_vision.encode_image(images, crop=True)
    return ImageFeatures(out["image_embeds"].float().cpu(), out["penultimate_hidden_states"].float().cpu())


def guidance_kv(guider: ContentGuider, slot: str, images: torch.Tensor, clip_vision, analyzer: FaceAnalyzer | None,
                input_name: str) -> ContentKV:
    """Keys/values of the ``slot`` source for the reference ``images`` and for a blank image (the uncond half)."""
    source = guider.source(slot)
    cfg = source.config
    if cfg.needs_arcface and slot != "face":
        raise InputMismatchError(f"'{guider.name}' is a FaceID adapter (needs an ArcFace identity); use it in "
                                 "Content Guider (Face)")
    if cfg.needs_arcface and analyzer is None:
        raise InputMismatchError(f"'{guider.name}' is a FaceID adapter and needs the face's ArcFace identity; "
                                 "connect Load InsightFace to the insightface input")
    arcface = None
    if cfg.needs_arcface:
        count = images.shape[0]
        faces = [analyzer.identity(images[i].cpu().numpy(), f"the {input_name} input (image {i + 1} of {count})")
                 for i in range(count)]
        arcface = torch.from_numpy(np.stack([f.embedding for f in faces]))
        images = torch.from_numpy(np.stack([f.crop for f in faces]))  # FaceID-Plus shows CLIP the aligned face
    features = image_features(clip_vision, images) if cfg.clip_input else ImageFeatures()
    features.arcface = arcface
    blank = image_features(clip_vision, torch.zeros(1, 224, 224, 3)) if cfg.clip_input else ImageFeatures()
    blank = ImageFeatures(None if blank.image_embeds is None else torch.zeros_like(blank.image_embeds),
                          blank.penultimate_hidden_states, None if arcface is None else torch.zeros_like(arcface[:1]))
    return source.keys_values(features, blank, f"the {input_name} input")


# ---------------------------------------------------------------------------------------------------------- nodes


class LoadContentGuider(io.ComfyNode):
    DISPLAY = "Load Content Guider"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreaMovingLoadContentGuider", display_name=cls.DISPLAY, category=CATEGORY,
            description="Loads DreaMoving Content Guider weights (face + cloth) or an SD1.5 IP-Adapter file "
                        "(plain, plus, plus-face, full-face, faceid-plusv2; .safetensors or .bin).",
            inputs=[ModelCombo("guider_name", GUIDER_FOLDER,
                               tooltip="File in models/dreamoving/content_guider or models/ipadapter.")],
            outputs=[ContentGuiderType.Output(display_name="guider")],
        )

    @classmethod
    def execute(cls, guider_name) -> io.NodeOutput:
        return io.NodeOutput(load_content_guider(GUIDER_FOLDER.path(guider_name, "guider_name")))


class LoadOpenClipVision(io.ComfyNode):
    DISPLAY = "Load CLIP Vision (OpenCLIP)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreaMovingLoadOpenClipVision", display_name=cls.DISPLAY, category=CATEGORY,
            description="Loads the OpenCLIP ViT-H/14 image tower with open_clip_torch (OpenCLIP or transformers "
                        "layout). ComfyUI's Load CLIP Vision works as well.",
            inputs=[ModelCombo("clip_name", CLIP_FOLDER,
                               tooltip="CLIP-ViT-H-14-laion2B-s32B-b79K weights in models/clip_vision.")],
            outputs=[OpenClipVisionType.Output(display_name="clip_vision")],
        )

    @classmethod
    def execute(cls, clip_name) -> io.NodeOutput:
        return io.NodeOutput(ClipImageEncoder.from_file(CLIP_FOLDER.path(clip_name, "clip_name")))


class LoadInsightFace(io.ComfyNode):
    DISPLAY = "Load InsightFace"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreaMovingLoadInsightFace", display_name=cls.DISPLAY, category=CATEGORY,
            description="Loads an InsightFace pack (face detector + ArcFace) for FaceID adapters, on onnxruntime.",
            inputs=[ModelCombo("pack", INSIGHTFACE_FOLDER, default="antelopev2",
                               tooltip="Pack folder in models/insightface/models (antelopev2 or buffalo_l)."),
                    io.Combo.Input("provider", options=["auto", "CPU", "CUDA"], default="auto",
                                   tooltip="auto: CUDA when onnxruntime offers it, else CPU.")],
            outputs=[FaceAnalysisType.Output(display_name="insightface")],
        )

    @classmethod
    def execute(cls, pack, provider) -> io.NodeOutput:
        return io.NodeOutput(FaceAnalyzer(INSIGHTFACE_FOLDER.path(pack, "pack"), provider))


def _guide_inputs(slot: str, image_tip: str) -> list:
    return [
        io.Model.Input("model", tooltip="SD1.5 model (with or without motion module)."),
        ContentGuiderType.Input("guider", tooltip=f"From Load Content Guider: its {slot} weights, or an IP-Adapter."),
        io.Image.Input(f"{slot}_image", tooltip=image_tip),
        io.MultiType.Input("clip_vision", types=[io.ClipVision, OpenClipVisionType],
                           tooltip="OpenCLIP ViT-H/14 image encoder (Load CLIP Vision or Load CLIP Vision (OpenCLIP))."),
        io.Float.Input(f"alpha_{slot}", default=1.0, min=0.0, max=3.0, step=0.01,
                       tooltip=f"α of Eq. 1: weight of the {slot} attention; 0 leaves the content to the text prompt."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress at which the guidance starts."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress at which the guidance ends."),
    ]


def _guide(slot: str, model, guider, images, clip_vision, analyzer, alpha, start, end) -> io.NodeOutput:
    kv = guidance_kv(guider, slot, images, clip_vision, analyzer, f"{slot}_image")
    return io.NodeOutput(apply_guidance(model, slot, guider, kv, alpha, start, end))


class ContentGuiderFace(io.ComfyNode):
    DISPLAY = "Content Guider (Face)"

    @classmethod
    def define_schema(cls):
        inputs = _guide_inputs("face", "Photo of the person's face (several images: their tokens are combined).")
        inputs.insert(4, FaceAnalysisType.Input("insightface", optional=True,
                                                tooltip="Load InsightFace: ArcFace identity for FaceID adapters."))
        return io.Schema(node_id="DreaMovingContentGuiderFace", display_name=cls.DISPLAY, category=CATEGORY,
                         description="Keeps the person's face: adds α_face·attn(Q, K_face, V_face) to every "
                                     "cross-attention layer (DreaMoving Eq. 1).",
                         inputs=inputs, outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, guider, face_image, clip_vision, alpha_face, start_percent, end_percent,
                insightface=None) -> io.NodeOutput:
        return _guide("face", model, guider, face_image, clip_vision, insightface, alpha_face,
                      start_percent, end_percent)


class ContentGuiderCloth(io.ComfyNode):
    DISPLAY = "Content Guider (Cloth)"

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="DreaMovingContentGuiderCloth", display_name=cls.DISPLAY, category=CATEGORY,
                         description="Keeps the clothes: adds α_cloth·attn(Q, K_cloth, V_cloth) in the same attention "
                                     "call as the face term (DreaMoving Eq. 1).",
                         inputs=_guide_inputs("cloth", "Image of the clothes / body."), outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, guider, cloth_image, clip_vision, alpha_cloth, start_percent,
                end_percent) -> io.NodeOutput:
        return _guide("cloth", model, guider, cloth_image, clip_vision, None, alpha_cloth,
                      start_percent, end_percent)


NODES: list[type[io.ComfyNode]] = [LoadContentGuider, LoadOpenClipVision, LoadInsightFace, ContentGuiderFace,
                                   ContentGuiderCloth]
