"""Content Guider core (pure torch, no server): Eq. 1, every file layout, encoders, face ID on tiny ONNX models."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from einops import rearrange

from devtools.tiny import content_guider as tiny
from dreamoving_core.guider.clip_image import ClipImageEncoder, preprocess, vision_state_dict
from dreamoving_core.guider.model import (AttentionTerm, ContentKV, ImageFeatures, decoupled_cross_attention,
                                            load_content_guider, sdpa_attention)
from dreamoving_core.guider.format import guider_state_dict, parse_guider_state_dict
from dreamoving_core.errors import InputMismatchError, ModelFormatError
from dreamoving_core.guider.face_id import FaceAnalyzer, find_pack, similarity_transform
from dreamoving_core.io import load_state_dict, save_state_dict


def direct_attention(q, k, v, heads):
    """softmax(Q Kᵀ/√d) V per head, written out."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return rearrange(weights @ v, "b h n d -> b n (h d)")


def test_eq1_matches_the_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 64, 320, generator=g)
    k_t, v_t = torch.randn(6, 77, 320, generator=g), torch.randn(6, 77, 320, generator=g)
    k_f, v_f = torch.randn(6, 4, 320, generator=g), torch.randn(6, 4, 320, generator=g)
    k_c, v_c = torch.randn(6, 16, 320, generator=g), torch.randn(6, 16, 320, generator=g)
    out = decoupled_cross_attention(q, k_t, v_t, 8, [AttentionTerm(0.7, k_f, v_f), AttentionTerm(1.3, k_c, v_c)])
    expected = (direct_attention(q, k_t, v_t, 8) + 0.7 * direct_attention(q, k_f, v_f, 8)
                + 1.3 * direct_attention(q, k_c, v_c, 8))
    assert (out - expected).abs().max().item() <= 1e-5


def test_zero_alphas_return_the_text_attention_bit_identically():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 16, 64, generator=g) for _ in range(3))
    calls = []

    def counting(*args):
        calls.append(args)
        return sdpa_attention(*args)

    terms = [AttentionTerm(0.0, torch.randn(4, 4, 64), torch.randn(4, 4, 64)),
             AttentionTerm(0.0, torch.randn(4, 16, 64), torch.randn(4, 16, 64))]
    out = decoupled_cross_attention(q, k, v, 4, terms, attention=counting)
    assert torch.equal(out, sdpa_attention(q, k, v, 4))
    assert len(calls) == 1, "alpha = 0 must skip the extra attention entirely"


def test_content_kv_gives_cond_rows_to_cond_chunks_and_blank_rows_to_uncond_chunks():
    keys = torch.stack([torch.full((3, 8), 1.0), torch.full((3, 8), -1.0)])
    kv = ContentKV([keys], [keys * 2])
    k, v = kv.for_batch(0, [1, 0], 10, torch.device("cpu"), torch.float32)  # uncond (5 frames), then cond
    assert k.shape == (2, 3, 8) and torch.equal(v, 2 * k), "one K/V row per video, not per frame"
    assert (k[0] == -1).all() and (k[1] == 1).all()
    k, _ = kv.for_batch(0, [0], 3, torch.device("cpu"), torch.float16)  # e.g. a context window of 3 frames
    assert k.shape == (1, 3, 8) and k.dtype == torch.float16 and (k == 1).all()


def test_image_terms_fold_each_videos_frames_onto_its_own_keys_like_the_per_frame_formula():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(10, 16, 64, generator=g)  # 2 videos x 5 frames
    k_t, v_t = torch.randn(10, 7, 64, generator=g), torch.randn(10, 7, 64, generator=g)
    k_f, v_f = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    out = decoupled_cross_attention(q, k_t, v_t, 4, [AttentionTerm(0.6, k_f, v_f)])
    per_frame_k, per_frame_v = k_f.repeat_interleave(5, 0), v_f.repeat_interleave(5, 0)
    expected = direct_attention(q, k_t, v_t, 4) + 0.6 * direct_attention(q, per_frame_k, per_frame_v, 4)
    assert (out - expected).abs().max().item() <= 1e-5
    with pytest.raises(InputMismatchError, match="10 query rows do not split into the 3 groups"):
        decoupled_cross_attention(q, k_t, v_t, 4, [AttentionTerm(0.6, torch.randn(3, 4, 64), torch.randn(3, 4, 64))])


def test_a_tensor_alpha_is_the_same_term_and_a_zero_tensor_alpha_adds_nothing():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, 16, 64, generator=g) for _ in range(3))
    k_f, v_f = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    as_float = decoupled_cross_attention(q, k, v, 4, [AttentionTerm(0.75, k_f, v_f)])
    as_tensor = decoupled_cross_attention(q, k, v, 4, [AttentionTerm(torch.tensor(0.75), k_f, v_f)])
    assert (as_float - as_tensor).abs().max().item() <= 1e-6
    gated_off = decoupled_cross_attention(q, k, v, 4, [AttentionTerm(torch.tensor(0.0), k_f, v_f)])
    assert torch.equal(gated_off, sdpa_attention(q, k, v, 4))


LAYOUTS = [("plain", "linear", 4, "image_embeds"), ("plus", "resampler", 16, "penultimate"),
           ("plus-face", "resampler", 16, "penultimate"), ("full-face", "mlp", 257, "penultimate"),
           ("faceid-plusv2", "faceid", 4, "penultimate")]


def features(seed: int = 0, arcface: bool = True) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    return ImageFeatures(torch.randn(1, 1024, generator=g), torch.randn(1, 257, 1280, generator=g),
                         emb if arcface else None)


@pytest.mark.parametrize("suffix", ["bin", "safetensors"])
@pytest.mark.parametrize("variant,kind,tokens,clip_input", LAYOUTS)
def test_every_sd15_ip_adapter_layout_loads_and_makes_tokens(variant, kind, tokens, clip_input, suffix):
    guider = load_content_guider(tiny.ip_adapter_file(variant, suffix))
    assert guider.format == "ip_adapter"
    source = guider.source("face")
    assert guider.source("cloth") is source, "an IP-Adapter file serves either slot"
    assert (source.config.kind, source.config.clip_input) == (kind, clip_input)
    assert source.layer_dims == tiny.TINY_LAYER_DIMS
    blank = ImageFeatures(torch.zeros(1, 1024), torch.zeros(1, 257, 1280), torch.zeros(1, 512))
    kv = source.keys_values(features(0), blank)
    assert len(kv.keys) == 7 and kv.keys[0].shape == (2, tokens, 320)
    assert not torch.equal(kv.keys[0][0], kv.keys[0][1]), "cond and blank tokens must differ"


def test_bin_and_safetensors_files_load_the_same_weights():
    a = load_content_guider(tiny.ip_adapter_file("faceid-plusv2", "bin")).state_dict()
    b = load_content_guider(tiny.ip_adapter_file("faceid-plusv2", "safetensors")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_projection_is_layernorm_of_the_linear_map():
    path = tiny.ip_adapter_file("plain")
    sd = load_state_dict(path)
    source = load_content_guider(path).source("face")
    x = torch.randn(1, 1024)
    expected = torch.nn.functional.layer_norm((x @ sd["image_proj.proj.weight"].float().T
                                               + sd["image_proj.proj.bias"].float()).reshape(1, 4, 768), (768,),
                                              sd["image_proj.norm.weight"].float(), sd["image_proj.norm.bias"].float())
    tokens = source.tokens(ImageFeatures(image_embeds=x))
    assert torch.allclose(tokens, expected, atol=1e-5)
    k = source.keys_values(ImageFeatures(image_embeds=x), ImageFeatures(image_embeds=torch.zeros(1, 1024))).keys[3][0]
    assert torch.allclose(k, expected[0] @ sd["ip_adapter.7.to_k_ip.weight"].float().T, atol=1e-4), \
        "layer 3 must read ip_adapter.7 (IP-Adapter numbers cross-attention layers 1, 3, 5, ...)"


def test_dreamoving_guider_has_face_and_cloth_sources_and_round_trips(tmp_path):
    guider = load_content_guider(tiny.guider_file())
    assert guider.format == "dreamoving_content_guider"
    assert guider.source("face").config.kind == "faceid" and guider.source("cloth").config.kind == "resampler"
    parsed = parse_guider_state_dict(load_state_dict(tiny.guider_file()), "x")
    weights, metadata = guider_state_dict(parsed.sources)
    save_state_dict(weights, tmp_path / "again.safetensors", metadata)
    again = load_content_guider(tmp_path / "again.safetensors").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in guider.state_dict().items())


def test_face_only_guider_has_no_cloth(tmp_path):
    parsed = parse_guider_state_dict(load_state_dict(tiny.guider_file()), "x")
    weights, metadata = guider_state_dict({"face": parsed.sources["face"]})
    save_state_dict(weights, tmp_path / "face_only.safetensors", metadata)
    with pytest.raises(InputMismatchError, match="'face_only.safetensors' has no cloth weights"):
        load_content_guider(tmp_path / "face_only.safetensors").source("cloth")


def test_sdxl_ip_adapter_is_refused_naming_the_file():
    with pytest.raises(ModelFormatError, match=r"ip-adapter-plus_sdxl_vit-h.safetensors' is an SDXL IP-Adapter .*2048"):
        load_content_guider(tiny.ip_adapter_file("sdxl"))


def test_vit_bigg_adapter_with_vit_h_features_is_a_width_mismatch():
    source = load_content_guider(tiny.ip_adapter_file("vit-g")).source("face")
    with pytest.raises(InputMismatchError, match=r"width 1280 \(ViT-bigG/14\); the CLIP vision model gives 1024 "
                                                 r"\(ViT-H/14\)"):
        source.keys_values(features(), features())


def test_faceid_adapter_without_arcface_asks_for_insightface():
    source = load_content_guider(tiny.ip_adapter_file("faceid-plusv2")).source("face")
    with pytest.raises(InputMismatchError, match="needs an ArcFace identity embedding"):
        source.keys_values(features(arcface=False), features(arcface=False))


@pytest.mark.parametrize("which", ["checkpoint", "clip_vision", "truncated"])
def test_files_that_are_not_guiders_get_a_clear_error(which, tmp_path):
    if which == "truncated":
        data = tiny.ip_adapter_file("plain").read_bytes()
        path = tmp_path / "ip-adapter_sd15.safetensors"
        path.write_bytes(data[: len(data) // 2])
        match = "ip-adapter_sd15.safetensors' is not a readable safetensors file"
    elif which == "checkpoint":
        path = tmp_path / "model.safetensors"
        save_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, path)
        match = "is a Stable Diffusion checkpoint, not a Content Guider"
    else:
        path = tiny.clip_vision_file()
        match = "is a CLIP vision model"
    with pytest.raises(ModelFormatError, match=match):
        load_content_guider(path)


@pytest.fixture(scope="module")
def encoder() -> ClipImageEncoder:
    return ClipImageEncoder.from_file(tiny.clip_vision_file())


def test_openclip_encoder_gives_vit_h_features(encoder):
    out = encoder.encode(torch.rand(2, 64, 80, 3))
    assert encoder.config.name == "ViT-H/14"
    assert out.image_embeds.shape == (2, 1024) and out.penultimate_hidden_states.shape == (2, 257, 1280)


def test_openclip_encoder_matches_comfyui_clip_vision_on_the_same_file(encoder, tmp_path):
    from devtools.tiny import comfy_importable

    comfy_dir = comfy_importable()
    import json

    from comfy.clip_vision import ClipVisionModel

    config = json.loads((comfy_dir / "comfy" / "clip_vision_config_h.json").read_text())
    config["num_hidden_layers"] = encoder.config.layers
    (tmp_path / "h.json").write_text(json.dumps(config))
    comfy_model = ClipVisionModel(str(tmp_path / "h.json"))
    comfy_model.load_sd(load_state_dict(tiny.clip_vision_file()))
    images = torch.rand(1, 96, 64, 3, generator=torch.Generator().manual_seed(0))
    theirs = comfy_model.encode_image(images, crop=True)
    ours = encoder.encode(images)
    assert torch.allclose(ours.image_embeds, theirs["image_embeds"].float(), atol=2e-3, rtol=1e-3)
    assert torch.allclose(ours.penultimate_hidden_states, theirs["penultimate_hidden_states"].float(), atol=2e-3,
                          rtol=1e-3)


def test_our_tower_equals_openclips_vision_transformer_on_the_same_weights(encoder):
    open_clip = pytest.importorskip("open_clip")
    cfg = encoder.config
    visual = open_clip.transformer.VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers, heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio, output_dim=cfg.embed_dim).eval()
    weights, _ = vision_state_dict(load_state_dict(tiny.clip_vision_file()), "x")
    visual.load_state_dict({k: v.float() for k, v in weights.items()})
    images = torch.rand(2, 96, 64, 3, generator=torch.Generator().manual_seed(1))
    captured = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        embeds = visual(preprocess(images, cfg.image_size))
    hook.remove()
    ours = encoder.encode(images)
    torch.testing.assert_close(ours.image_embeds, embeds, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.penultimate_hidden_states, captured["x"], atol=2e-5, rtol=1e-5)


def test_openclip_layout_and_transformers_layout_are_the_same_tower():
    sd = load_state_dict(tiny.clip_vision_file())
    visual, cfg = vision_state_dict(sd, "x")
    again, cfg2 = vision_state_dict({f"visual.{k}": v for k, v in visual.items()}, "y")
    assert cfg == cfg2 and all(torch.equal(visual[k], again[k]) for k in visual)


def test_preprocess_resizes_the_short_side_and_centre_crops():
    image = torch.zeros(1, 100, 200, 3)
    image[:, :, 75:125] = 1.0  # white centre stripe; the crop keeps columns 50-150
    pixels = preprocess(image, 224)
    assert pixels.shape == (1, 3, 224, 224)
    assert pixels[0, 0, 112, 112] > 1.5 and pixels[0, 0, 112, 2] < -1.5


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer(find_pack([tiny.insightface_root()], "buffalo_l"), provider="auto")


def test_face_identity_is_a_unit_arcface_embedding_and_an_aligned_crop(analyzer):
    identity = analyzer.identity(tiny.face_image()[0].numpy(), "the face image")
    assert identity.embedding.shape == (512,) and abs(np.linalg.norm(identity.embedding) - 1) < 1e-5
    assert identity.crop.shape == (224, 224, 3)
    x1, y1, x2, y2 = identity.face.bbox
    assert 16 <= x1 < x2 <= 48 and 16 <= y1 < y2 <= 48, "the face is the red square"


def test_no_face_is_a_clear_error_naming_the_image(analyzer):
    with pytest.raises(InputMismatchError, match=r"no face found in the face_image input \(image 2 of 2\)"):
        analyzer.identity(tiny.face_image(face=False)[0].numpy(), "the face_image input (image 2 of 2)")


def test_analyzer_logs_its_providers_once_and_release_closes_the_sessions(monkeypatch, caplog):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="dreamoving_core.onnx_sessions"):
        analyzer = FaceAnalyzer(find_pack([tiny.insightface_root()], "buffalo_l"), provider="CUDA")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["DreaMoving face ID ('buffalo_l'): onnxruntime runs det_10g.onnx on CPUExecutionProvider, "
                     "w600k_r50.onnx on CPUExecutionProvider"]
    assert any("CUDA was requested" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(m.is_open for m in analyzer.models)
    analyzer.release()
    assert not any(m.is_open for m in analyzer.models)
    identity = analyzer.identity(tiny.face_image()[0].numpy(), "the face image")  # reopens on use
    assert identity.embedding.shape == (512,) and all(m.is_open for m in analyzer.models)


def test_pack_without_a_detector_is_refused(tmp_path):
    pack = tmp_path / "models" / "half"
    pack.mkdir(parents=True)
    (pack / "w600k_r50.onnx").write_bytes((tiny.insightface_root() / "models" / "buffalo_l" / "w600k_r50.onnx").read_bytes())
    with pytest.raises(ModelFormatError, match="lacks a face detector"):
        FaceAnalyzer(find_pack([tmp_path], "half"))


def test_similarity_transform_recovers_rotation_scale_and_shift():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -2.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = np.random.default_rng(0).normal(size=(5, 2)) * 20
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-4) and np.allclose(m[:, 2], shift, atol=1e-3)


def fused_case(device: str, dtype: torch.dtype, dim: int, text_tokens: int, image_tokens: tuple[int, ...]):
    from dreamoving_core.guider.kernel import fused_decoupled_cross_attention

    g = torch.Generator().manual_seed(dim + text_tokens)
    heads, batch, length = 8, 4, 96

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q, k, v = rand(batch, length, dim), rand(batch, text_tokens, dim), rand(batch, text_tokens, dim)
    # two videos of two frames: one image K/V row per video, the second term's alpha a tensor (a sampling gate)
    terms = [AttentionTerm(0.5 + i if i == 0 else torch.tensor(0.5 + i, device=device), rand(2, n, dim),
                           rand(2, n, dim)) for i, n in enumerate(image_tokens)]
    fused = fused_decoupled_cross_attention(q, k, v, heads, terms)
    assert fused is not None, "the fused kernel must run here"
    expected = (direct_attention(q.float(), k.float(), v.float(), heads)
                + sum(float(t.alpha) * direct_attention(q.float(), t.k.float().repeat_interleave(2, 0),
                                                        t.v.float().repeat_interleave(2, 0), heads) for t in terms))
    return (fused.float() - expected).abs().max().item()


def test_fused_eq1_kernel_matches_the_formula_in_the_triton_interpreter():
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    code = ("import torch; from tests.test_content_guider_core import fused_case; "
            "print(fused_case('cpu', torch.float32, 320, 77, (4, 16)))")
    # The interpreter mode is read when triton is imported, hence a fresh process.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dim,text_tokens,image_tokens", [(320, 77, (4, 16)), (640, 77, (16,)), (320, 154, (4, 16)),
                                                          (320, 77, (4,))])
def test_fused_eq1_kernel_matches_the_formula_on_cuda(dim, text_tokens, image_tokens):
    assert fused_case("cuda", torch.float16, dim, text_tokens, image_tokens) <= 1e-2
    assert fused_case("cuda", torch.float32, dim, text_tokens, image_tokens) <= 1e-2  # tf32 dots


@pytest.mark.gpu
def test_fused_eq1_kernel_declines_keys_that_do_not_fit_one_block():
    from dreamoving_core.guider.kernel import fused_decoupled_cross_attention

    q, k = torch.zeros(1, 16, 1280, device="cuda"), torch.zeros(1, 77, 1280, device="cuda")
    assert fused_decoupled_cross_attention(q, k, k, 8, [AttentionTerm(1.0, k[:, :16], k[:, :16])]) is None
