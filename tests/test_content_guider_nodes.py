"""Content Guider nodes over HTTP on a real ComfyUI server, with tiny models in the real file formats."""
from __future__ import annotations

import pytest
import torch

from devtools.client import ExecutionFailed
from devtools.tiny import content_guider as tiny
from devtools.tiny import pack_nodes
from tests.graphs import base_graph, run_latent

RED, GREY, BLUE = 0xFF0000, 0x808080, 0x3366CC
NODE_IDS = ["DreaMovingLoadContentGuider", "DreaMovingLoadOpenClipVision", "DreaMovingLoadInsightFace",
            "DreaMovingContentGuiderFace", "DreaMovingContentGuiderCloth"]


def test_fused_kernel_steps_aside_for_an_attention_override_which_then_computes_eq1(monkeypatch):
    from dreamoving_core.guider.model import ContentKV

    glue = pack_nodes("content_guider")
    fused_calls, override_calls = [], []

    def fused(q, k, v, heads, terms):  # stands in for the CUDA kernel: answers when asked
        fused_calls.append(len(terms))
        return torch.full_like(q, 7.0)

    def override(func, *args, **kwargs):
        override_calls.append(func)
        return func(*args, **kwargs)

    monkeypatch.setattr(glue, "fused_decoupled_cross_attention", fused)
    g = torch.Generator().manual_seed(0)
    kv = ContentKV([torch.randn(2, 4, 64, generator=g)], [torch.randn(2, 4, 64, generator=g)])
    patch = glue.GuiderAttention(0).with_term(glue.SlotTerm("face", 0.8, 100.0, 0.0, kv))
    q, k, v = (torch.randn(2, 16, 64, generator=g) for _ in range(3))
    options = {"n_heads": 4, "cond_or_uncond": [0, 1]}
    assert (patch(q, k, v, options) == 7.0).all() and fused_calls == [1]
    out = patch(q, k, v, dict(options, optimized_attention_override=override))
    assert fused_calls == [1], "the fused kernel must not run when the model has an attention override"
    assert len(override_calls) == 2  # text term and face term
    face_k, face_v = kv.for_batch(0, [0, 1], 2, q.device, q.dtype)
    torch.testing.assert_close(out, glue.decoupled_cross_attention(
        q, k, v, 4, [glue.AttentionTerm(0.8, face_k, face_v)]), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def files(install_model, tiny_checkpoint) -> dict:
    names = {"checkpoint": tiny_checkpoint,
             "guider": install_model(tiny.guider_file(), "dreamoving/content_guider"),
             "clip": install_model(tiny.clip_vision_file(), "clip_vision")}
    install_model(tiny.insightface_root() / "models" / "buffalo_l", "insightface/models", "buffalo_l")
    for variant in ("plain", "plus", "plus-face", "full-face", "faceid-plusv2", "sdxl", "vit-g"):
        for suffix in ("bin", "safetensors"):
            path = tiny.ip_adapter_file(variant, suffix)
            names[f"{variant}.{suffix}"] = install_model(path, "ipadapter")
    return names


def graph(files: dict, *, guider: str | None = None, alpha_face: float = 1.0, alpha_cloth: float | None = 1.0,
          face_color: int = RED, insightface: bool = True, frames: int = 4, steps: int = 2, motion: bool = False,
          context_length: int = 0):
    """Plain chain: model → [motion (+ context windows)] → Face → [Cloth] → KSampler; returns (graph, refs)."""
    g, refs = base_graph(files["checkpoint"], frames=frames, steps=steps)
    model = refs["model"]
    if motion:
        mm = g.node("DreaMovingLoadMotionModule", model_name=files["motion"], positional_length=64,
                    pe_extension="sinusoid")
        extra = {}
        if context_length:
            extra["context_options"] = g.node(
                "DreaMovingContextOptions", context_length=context_length, context_overlap=context_length // 2,
                context_schedule="standard_static", context_stride=1, closed_loop=False, fuse_method="pyramid")[0]
        model = g.node("DreaMovingApplyMotionModule", model=model, motion_module=mm[0], motion_scale=1.0, **extra)[0]
    if alpha_face is not None:
        loader = g.node("DreaMovingLoadContentGuider", guider_name=guider or files["guider"])
        clip = g.node("DreaMovingLoadOpenClipVision", clip_name=files["clip"])
        face = g.node("EmptyImage", width=64, height=64, batch_size=1, color=face_color)
        extra = {}
        if insightface:
            extra["insightface"] = g.node("DreaMovingLoadInsightFace", pack="buffalo_l", provider="auto")[0]
        model = g.node("DreaMovingContentGuiderFace", model=model, guider=loader[0], face_image=face[0],
                       clip_vision=clip[0], alpha_face=alpha_face, start_percent=0.0, end_percent=1.0, **extra)[0]
        if alpha_cloth is not None:
            cloth = g.node("EmptyImage", width=64, height=64, batch_size=1, color=BLUE)
            model = g.node("DreaMovingContentGuiderCloth", model=model, guider=loader[0], cloth_image=cloth[0],
                           clip_vision=clip[0], alpha_cloth=alpha_cloth, start_percent=0.0, end_percent=1.0)[0]
    g.set(refs["sampler"], model=model)
    return g, refs


@pytest.fixture(scope="module")
def plain_latent(comfy, files) -> torch.Tensor:
    g, refs = graph(files, alpha_face=None)
    return run_latent(comfy, g, refs["save"])


def test_nodes_are_registered_in_dreamoving_content_with_tooltips(comfy):
    info = comfy.object_info()
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing"
        assert info[node_id]["category"] == "DreaMoving/Content"
        for section in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["DreaMovingContentGuiderFace"]["output"] == ["MODEL"]


def test_zero_alphas_are_bit_identical_to_the_plain_model_and_nonzero_alphas_are_not(comfy, files, plain_latent):
    g, refs = graph(files, alpha_face=0.0, alpha_cloth=0.0)
    assert torch.equal(run_latent(comfy, g, refs["save"]), plain_latent)
    g, refs = graph(files, alpha_face=1.0, alpha_cloth=1.0)
    guided = run_latent(comfy, g, refs["save"])
    assert guided.shape == plain_latent.shape and not torch.equal(guided, plain_latent)
    g, refs = graph(files, alpha_face=1.0, alpha_cloth=None)
    face_only = run_latent(comfy, g, refs["save"])
    assert not torch.equal(face_only, guided), "the cloth term must contribute"


def test_no_patch_leaks_into_the_next_prompt(comfy, files, plain_latent):
    g, refs = graph(files, alpha_face=1.5, alpha_cloth=0.5)
    run_latent(comfy, g, refs["save"])
    # Same sampling through KSamplerAdvanced, so it re-runs on the cached checkpoint's model instead of reusing
    # the cached KSampler output.
    g, refs = base_graph(files["checkpoint"], frames=4, steps=2)
    sampler = g.nodes[refs["sampler"].id]["inputs"]
    g.nodes[refs["sampler"].id] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": sampler["model"], "positive": sampler["positive"], "negative": sampler["negative"],
        "latent_image": sampler["latent_image"], "noise_seed": sampler["seed"], "steps": sampler["steps"],
        "cfg": sampler["cfg"], "sampler_name": sampler["sampler_name"], "scheduler": sampler["scheduler"],
        "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    assert torch.equal(run_latent(comfy, g, refs["save"]), plain_latent)


@pytest.mark.parametrize("name", ["plain.bin", "plus.safetensors", "plus-face.bin", "full-face.safetensors",
                                  "faceid-plusv2.bin"])
def test_every_sd15_ip_adapter_layout_guides_the_face(comfy, files, name):
    g, refs = graph(files, guider=files[name], alpha_cloth=None, frames=2, steps=1)
    assert run_latent(comfy, g, refs["save"]).shape == (2, 4, 8, 8)


WRONG = {
    "sdxl": (dict(guider="sdxl.safetensors"),
             "Load Content Guider: 'ip-adapter-plus_sdxl_vit-h.safetensors' is an SDXL IP-Adapter"),
    "vit-bigG": (dict(guider="vit-g.bin"),
                 "Content Guider (Face): 'ip-adapter_sd15_vit-G.bin' expects image features of width 1280 "
                 "(ViT-bigG/14); the CLIP vision model gives 1024 (ViT-H/14)"),
    "no face": (dict(face_color=GREY), "Content Guider (Face): no face found in the face_image input (image 1 of 1)"),
    "faceid without insightface": (dict(guider="faceid-plusv2.safetensors", insightface=False),
                                   "connect Load InsightFace to the insightface input"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_inputs_fail_with_one_clear_message_and_the_server_keeps_serving(comfy, files, case):
    overrides, message = WRONG[case]
    if "guider" in overrides:
        overrides = dict(overrides, guider=files[overrides["guider"]])
    g, _ = graph(files, alpha_cloth=None, frames=2, steps=1, **overrides)
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(g.to_api())
    assert message in failed.value.message
    assert "DreaMovingContentGuiderFace" in comfy.object_info()


@pytest.mark.parametrize("context_length", [0, 4], ids=["whole video", "context windows"])
def test_face_and_cloth_guide_a_video_with_a_motion_module(comfy, files, install_model, context_length):
    from devtools.tiny.motion import motion_module

    files = dict(files, motion=install_model(motion_module("v2"), "animatediff_models"))
    kw = dict(motion=True, frames=8, context_length=context_length)
    g, refs = graph(files, alpha_face=None, **kw)
    motion_only = run_latent(comfy, g, refs["save"])
    g, refs = graph(files, alpha_face=0.0, alpha_cloth=0.0, **kw)
    assert torch.equal(run_latent(comfy, g, refs["save"]), motion_only)
    g, refs = graph(files, alpha_face=1.0, alpha_cloth=1.0, **kw)
    guided = run_latent(comfy, g, refs["save"])
    assert guided.shape == (8, 4, 8, 8) and not torch.equal(guided, motion_only)
