"""ComfyUI frees the pack's models: over HTTP, after a prompt that runs every model kind, ``/free`` unloads and then
releases each of them, measured through ``GET /dreamoving/models`` (what is alive in the server, what ComfyUI has
loaded, which onnxruntime sessions are open), and the server serves the same prompt again."""
from __future__ import annotations

import time

import pytest
import torch

from devtools.tiny import content_guider as tiny_guider
from devtools.tiny import preprocess as tiny_pre
from devtools.tiny.controlnet import sd15_controlnet, video_controlnet
from devtools.tiny.motion import motion_module
from tests.graphs import base_graph, run_latent

FRAMES = 4
VIDEO = "dreamoving_memory_dance_64.mp4"
HELD = ["ClipImageEncoder", "ContentGuider", "FaceAnalyzer", "MotionModule", "VideoControlNet", "VideoControlNet"]


@pytest.fixture(scope="module")
def files(comfy_base, install_model, tiny_checkpoint) -> dict:
    install_model(tiny_guider.insightface_root() / "models" / "buffalo_l", "insightface/models", "buffalo_l")
    tiny_pre.synthetic_dance_video(comfy_base / "input" / VIDEO, frames=FRAMES, size=64)
    return {
        "checkpoint": tiny_checkpoint,
        "motion": install_model(motion_module("v1", "ckpt"), "animatediff_models", "memory_v1.ckpt"),
        "pose": install_model(video_controlnet(), "dreamoving/video_controlnet", "memory_pose.safetensors"),
        "depth": install_model(sd15_controlnet("pth", seed=5), "controlnet", "memory_depth.pth"),
        "guider": install_model(tiny_guider.guider_file(), "dreamoving/content_guider", "memory_guider.safetensors"),
        "clip": install_model(tiny_guider.clip_vision_file(), "clip_vision", "memory_clip.safetensors"),
        "detector": "memory/" + install_model(tiny_pre.yolox_onnx(), "dreamoving/preprocess/memory", "yolox_l.onnx"),
        "estimator": "memory/" + install_model(tiny_pre.dwpose_onnx(), "dreamoving/preprocess/memory",
                                               "dw-ll_ucoco_384.onnx"),
        "zoedepth": install_model(tiny_pre.zoedepth_dir(), "dreamoving/preprocess", "zoedepth-memory"),
    }


def every_kind_graph(files: dict):
    """A dance video -> DWPose and ZoeDepth hints -> two Video ControlNets; motion module; face + cloth guider."""
    g, refs = base_graph(files["checkpoint"], frames=FRAMES, steps=1, prefix="memory")
    frames = g.node("GetVideoComponents", video=g.node("LoadVideo", file=VIDEO)[0])
    pose = g.node("DreaMovingDWPose", images=frames[0], detector=files["detector"], estimator=files["estimator"],
                  draw_body=True, draw_hands=True, draw_face=True, detect_resolution=64, temporal_smoothing=True,
                  fps=frames[2])
    depth = g.node("DreaMovingZoeDepth", images=frames[0], model=files["zoedepth"], per_frame_normalization=False,
                   batch_size=2)
    positive, negative = refs["positive"], refs["negative"]
    for name, motion, hint in (("pose", "none", pose[0]), ("depth", files["motion"], depth[0])):
        controlnet = g.node("DreaMovingLoadVideoControlNet", controlnet_name=files[name], motion_module=motion)
        apply = g.node("DreaMovingApplyVideoControlNet", positive=positive, negative=negative,
                       video_controlnet=controlnet[0], images=hint, strength=1.0, start_percent=0.0, end_percent=1.0)
        positive, negative = apply[0], apply[1]
    motion = g.node("DreaMovingLoadMotionModule", model_name=files["motion"], positional_length=64,
                    pe_extension="sinusoid")
    model = g.node("DreaMovingApplyMotionModule", model=refs["model"], motion_module=motion[0], motion_scale=1.0)[0]
    guider = g.node("DreaMovingLoadContentGuider", guider_name=files["guider"])[0]
    clip = g.node("DreaMovingLoadOpenClipVision", clip_name=files["clip"])[0]
    face = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0xFF0000)[0]
    faces = g.node("DreaMovingLoadInsightFace", pack="buffalo_l", provider="auto")[0]
    model = g.node("DreaMovingContentGuiderFace", model=model, guider=guider, face_image=face, clip_vision=clip,
                   insightface=faces, alpha_face=1.0, start_percent=0.0, end_percent=1.0)[0]
    cloth = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0x3366CC)[0]
    model = g.node("DreaMovingContentGuiderCloth", model=model, guider=guider, cloth_image=cloth, clip_vision=clip,
                   alpha_cloth=1.0, start_percent=0.0, end_percent=1.0)[0]
    g.set(refs["sampler"], model=model, positive=positive, negative=negative)
    return g, refs


def report(comfy) -> dict:
    status, body = comfy._request("GET", "/dreamoving/models")
    assert status == 200, body
    return body


def wait_for(comfy, done, timeout: float = 60) -> dict:
    """The model report once ``done(report)`` holds (``/free`` runs when the prompt worker wakes up)."""
    deadline = time.monotonic() + timeout
    while True:
        current = report(comfy)
        if done(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.5)


def kinds(current: dict) -> list[str]:
    return sorted(m["kind"] for m in current["models"])


def test_free_unloads_then_releases_every_model_and_the_next_prompt_runs_the_same(comfy, files):
    g, refs = every_kind_graph(files)
    first = run_latent(comfy, g, refs["save"], timeout=600)
    ran = report(comfy)
    # loaders' outputs stay in ComfyUI's cache; the preprocessors' models live only while their node runs
    assert kinds(ran) == HELD, ran
    assert all(m["loaded"] for m in ran["models"]), ran
    assert ran["loaded_by_comfyui"] >= len(HELD) and ran["open_sessions"] == 2  # the InsightFace pack's two

    assert comfy._request("POST", "/free", {"unload_models": True})[0] == 200
    unloaded = wait_for(comfy, lambda r: r["loaded_by_comfyui"] == 0 and r["open_sessions"] == 0)
    assert (unloaded["loaded_by_comfyui"], unloaded["open_sessions"]) == (0, 0), unloaded
    assert kinds(unloaded) == HELD and not any(m["loaded"] for m in unloaded["models"])  # still cached, not loaded

    assert comfy._request("POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
    freed = wait_for(comfy, lambda r: not r["models"])
    assert freed == {"models": [], "open_sessions": 0, "loaded_by_comfyui": 0}, freed

    again = run_latent(comfy, g, refs["save"], timeout=600)
    assert torch.equal(again, first)
    assert kinds(report(comfy)) == HELD
