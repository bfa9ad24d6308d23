"""Hostile input over HTTP: names leading out of the model folders, NaN and infinite floats, inverted ranges, raw
values in custom-typed inputs, bad model files in every loader, unusable images. Each is refused with one message
naming the node (no Python exception class in it), and the next plain prompt's output is bit-identical to before."""
from __future__ import annotations

import ctypes
import itertools
import math
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from devtools.client import ExecutionFailed, PromptRejected
from devtools.graph import Graph, NodeRef
from devtools.tiny import content_guider as tiny_guider
from devtools.tiny import controlnet as tiny_controlnet
from devtools.tiny import motion as tiny_motion
from devtools.tiny import preprocess as tiny_preprocess
from devtools.tiny.hostile import bad_model, training_checkpoint, unsafe_marker
from tests.graphs import base_graph, run_latent

NAN, INF = float("nan"), float("inf")
RED = 0xFF0000
PYTHON_CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b|Traceback")
# where each bad model goes: kind -> models sub-folder
BAD_FOLDERS = {"random_ckpt": "animatediff_models", "empty_safetensors": "animatediff_models",
               "wrong_rank_motion": "dreamoving/motion", "truncated_controlnet": "controlnet",
               "wrong_rank_controlnet": "controlnet", "unsafe_guider": "ipadapter", "random_clip": "clip_vision",
               "rank3_insightface": "insightface/models", "rank3_detector": "dreamoving/preprocess",
               "random_onnx": "dreamoving/preprocess", "truncated_zoedepth": "dreamoving/preprocess",
               "unsafe_zoedepth": "dreamoving/preprocess", "broken_config_zoedepth": "dreamoving/preprocess"}


@pytest.fixture(scope="module")
def outside(comfy_base) -> Path:
    """A folder beside the models folder holding real, loadable models that no name may reach."""
    out = comfy_base.parent / "outside"
    out.mkdir(exist_ok=True)
    from devtools.server import link

    link(tiny_motion.motion_module("v2", "ckpt"), out / "evil.ckpt")
    link(tiny_controlnet.sd15_controlnet("pth"), out / "evil_controlnet.pth")
    link(tiny_guider.guider_file(), out / "evil_guider.safetensors")
    link(tiny_guider.clip_vision_file(), out / "evil_clip.safetensors")
    link(tiny_guider.insightface_root() / "models" / "buffalo_l", out / "pack")
    link(tiny_preprocess.yolox_onnx(), out / "yolox_l.onnx")
    link(tiny_preprocess.dwpose_onnx(), out / "dw-ll_ucoco_384.onnx")
    link(tiny_preprocess.zoedepth_dir(), out / "zoe")
    return out


@pytest.fixture(scope="module")
def files(comfy, comfy_base, install_model, tiny_checkpoint, outside) -> dict:
    names = {
        "checkpoint": tiny_checkpoint,
        "motion": install_model(tiny_motion.motion_module("v2", "ckpt"), "animatediff_models", "hostile_mm.ckpt"),
        "controlnet": install_model(tiny_controlnet.sd15_controlnet("pth"), "controlnet", "hostile_cn.pth"),
        "guider": install_model(tiny_guider.guider_file(), "dreamoving/content_guider", "hostile_guider.safetensors"),
        "faceid": install_model(tiny_guider.ip_adapter_file("faceid-plusv2", "bin"), "ipadapter",
                                "hostile_faceid.bin"),
        "clip": install_model(tiny_guider.clip_vision_file(), "clip_vision", "hostile_clip.safetensors"),
        "pack": install_model(tiny_guider.insightface_root() / "models" / "buffalo_l", "insightface/models",
                              "hostile_pack"),
        "detector": install_model(tiny_preprocess.yolox_onnx(), "dreamoving/preprocess/hostile", "yolox_l.onnx"),
        "estimator": install_model(tiny_preprocess.dwpose_onnx(), "dreamoving/preprocess/hostile",
                                   "dw-ll_ucoco_384.onnx"),
        "zoedepth": install_model(tiny_preprocess.zoedepth_dir(), "dreamoving/preprocess", "hostile_zoe"),
        "training": install_model(training_checkpoint(), "animatediff_models", "hostile_training.ckpt"),
    }
    names["detector"], names["estimator"] = "hostile/yolox_l.onnx", "hostile/dw-ll_ucoco_384.onnx"
    for kind, folder in BAD_FOLDERS.items():
        names[kind] = install_model(bad_model(kind), folder)
    # a link inside the models folder that points out of it
    escape = comfy_base / "models" / "dreamoving" / "preprocess" / "hostile_escape"
    if escape.is_symlink():
        escape.unlink()
    escape.symlink_to(outside / "zoe", target_is_directory=True)
    names["escape"] = escape.name
    names["display"] = {k: v["display_name"] for k, v in comfy.object_info().items() if k.startswith("DreaMoving")}
    return names


def out_of(comfy_base: Path, folder: str, target: str) -> str:
    """A ``..`` name from models/<folder> to ``<base>/../outside/<target>``."""
    return os.path.relpath(comfy_base.parent / "outside" / target, comfy_base / "models" / folder)


# -- graphs: the cheapest graph that runs each node ----------------------------------------------------------------

def sampled(files: dict, model=None, positive=None) -> tuple[Graph, dict]:
    """2 frames, 1 step, 64²: the plain graph, or with the model / conditioning replaced by ``g``-building hooks."""
    g, refs = base_graph(files["checkpoint"], frames=2, steps=1, prefix="hostile")
    wire = {}
    if model is not None:
        wire["model"] = model(g, refs)
    if positive is not None:
        wire["positive"], wire["negative"] = positive(g, refs)
    g.set(refs["sampler"], **wire)
    return g, refs


def motion_graph(files, load: dict | None = None, apply: dict | None = None):
    def model(g, refs):
        loader = g.node("DreaMovingLoadMotionModule", **{"model_name": files["motion"], "positional_length": 64,
                                                         "pe_extension": "sinusoid", **(load or {})})
        node = g.node("DreaMovingApplyMotionModule", **{"model": refs["model"], "motion_module": loader[0],
                                                        "motion_scale": 1.0, **(apply or {})})
        model.nodes = {"DreaMovingLoadMotionModule": loader, "DreaMovingApplyMotionModule": node}
        return node[0]

    g, _ = sampled(files, model=model)
    return g, model.nodes


def controlnet_graph(files, load: dict | None = None, apply: dict | None = None, hint_size: int = 64):
    def positive(g, refs):
        loader = g.node("DreaMovingLoadVideoControlNet", **{"controlnet_name": files["controlnet"],
                                                            "motion_module": "none", **(load or {})})
        hints = g.node("EmptyImage", width=hint_size, height=hint_size, batch_size=2, color=RED)
        node = g.node("DreaMovingApplyVideoControlNet", **{
            "positive": refs["positive"], "negative": refs["negative"], "video_controlnet": loader[0],
            "images": hints[0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, **(apply or {})})
        positive.nodes = {"DreaMovingLoadVideoControlNet": loader, "DreaMovingApplyVideoControlNet": node}
        return node[0], node[1]

    g, _ = sampled(files, positive=positive)
    return g, positive.nodes


def guider_graph(files, load: dict | None = None, clip: dict | None = None, face: dict | None = None,
                 cloth: dict | None = None, insightface: dict | None = None, face_image=None):
    def model(g, refs):
        loader = g.node("DreaMovingLoadContentGuider", **{"guider_name": files["guider"], **(load or {})})
        encoder = g.node("DreaMovingLoadOpenClipVision", **{"clip_name": files["clip"], **(clip or {})})
        image = face_image(g) if face_image else g.node("EmptyImage", width=64, height=64, batch_size=1,
                                                         color=RED)[0]
        extra = {}
        nodes = {"DreaMovingLoadContentGuider": loader, "DreaMovingLoadOpenClipVision": encoder}
        if insightface is not None:
            pack = g.node("DreaMovingLoadInsightFace", **{"pack": files["pack"], "provider": "CPU", **insightface})
            extra["insightface"] = pack[0]
            nodes["DreaMovingLoadInsightFace"] = pack
        node = g.node("DreaMovingContentGuiderFace", **{
            "model": refs["model"], "guider": loader[0], "face_image": image, "clip_vision": encoder[0],
            "alpha_face": 1.0, "start_percent": 0.0, "end_percent": 1.0, **extra, **(face or {})})
        nodes["DreaMovingContentGuiderFace"] = node
        out = node[0]
        if cloth is not None:
            garment = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0x3366CC)
            out_node = g.node("DreaMovingContentGuiderCloth", **{
                "model": out, "guider": loader[0], "cloth_image": garment[0], "clip_vision": encoder[0],
                "alpha_cloth": 1.0, "start_percent": 0.0, "end_percent": 1.0, **cloth})
            nodes["DreaMovingContentGuiderCloth"] = out_node
            out = out_node[0]
        model.nodes = nodes
        return out

    g, _ = sampled(files, model=model)
    return g, model.nodes


def preprocess_graph(files, dwpose: dict | None = None, render: dict | None = None, zoe: dict | None = None,
                     width: int = 64, height: int = 64):
    """Frames → the preprocess nodes given (all three when none is): DWPose (→ Render Pose), ZoeDepth."""
    wanted = {k for k, v in (("dwpose", dwpose), ("render", render), ("zoe", zoe)) if v is not None}
    wanted = wanted or {"dwpose", "render", "zoe"}
    g = Graph()
    frames = g.node("EmptyImage", width=width, height=height, batch_size=2, color=0x808080)
    nodes = {}
    if "dwpose" in wanted or "pose_keypoint" not in (render or {}) and "render" in wanted:
        nodes["DreaMovingDWPose"] = g.node("DreaMovingDWPose", **{
            "images": frames[0], "detector": files["detector"], "estimator": files["estimator"], "draw_body": True,
            "draw_hands": True, "draw_face": True, "detect_resolution": 64, "temporal_smoothing": True,
            "fps": 8.0, **(dwpose or {})})
    if "render" in wanted:
        pose = nodes.get("DreaMovingDWPose")
        nodes["DreaMovingRenderPose"] = g.node("DreaMovingRenderPose", **{
            "pose_keypoint": pose[1] if pose else None, "draw_body": True, "draw_hands": True, "draw_face": True,
            "resolution": 0, **(render or {})})
    if "zoe" in wanted:
        nodes["DreaMovingZoeDepth"] = g.node("DreaMovingZoeDepth", **{
            "images": frames[0], "model": files["zoedepth"], "per_frame_normalization": False, "batch_size": 2,
            **(zoe or {})})
    for node in nodes.values():
        g.node("PreviewImage", images=node[0])
    return g, nodes


GRAPHS = {"motion": motion_graph, "controlnet": controlnet_graph, "guider": guider_graph,
          "preprocess": preprocess_graph}


@dataclass(frozen=True)
class Case:
    """One hostile input: ``node``'s inputs as ``graph`` builds them with ``inputs`` (a callable of the test's
    ``files`` and the base dir, or a dict) changed; refused when ``when`` ("queue": HTTP 400, "run": execution
    error) with a message naming ``node`` that contains ``expect``."""

    id: str
    graph: str
    node: str
    when: str
    expect: str
    inputs: Callable[[dict, Path], dict]
    extra: dict | None = None


def _case(id, graph, node, when, expect, inputs, **extra):
    return Case(id, graph, node, when, expect, inputs if callable(inputs) else (lambda f, b, v=inputs: v), extra)


# The graph-builder keyword that carries a node's inputs.
SLOT = {"DreaMovingLoadMotionModule": "load", "DreaMovingApplyMotionModule": "apply",
        "DreaMovingLoadVideoControlNet": "load", "DreaMovingApplyVideoControlNet": "apply",
        "DreaMovingLoadContentGuider": "load", "DreaMovingLoadOpenClipVision": "clip",
        "DreaMovingLoadInsightFace": "insightface", "DreaMovingContentGuiderFace": "face",
        "DreaMovingContentGuiderCloth": "cloth", "DreaMovingDWPose": "dwpose", "DreaMovingRenderPose": "render",
        "DreaMovingZoeDepth": "zoe"}

LEAVES = "leads outside the model folders"
NOT_A_NAME = "is not a model name"

CASES = [
    # -- traversal and names not in their folder, in every name-taking input: refused when queued ----------------
    _case("traversal-motion", "motion", "DreaMovingLoadMotionModule", "queue", NOT_A_NAME,
          lambda f, b: {"model_name": out_of(b, "animatediff_models", "evil.ckpt")}),
    _case("absolute-controlnet", "controlnet", "DreaMovingLoadVideoControlNet", "queue", NOT_A_NAME,
          lambda f, b: {"controlnet_name": str(b.parent / "outside" / "evil_controlnet.pth")}),
    _case("backslash-traversal-controlnet-motion", "controlnet", "DreaMovingLoadVideoControlNet", "queue",
          NOT_A_NAME, lambda f, b: {"motion_module": out_of(b, "animatediff_models", "evil.ckpt").replace("/", "\\")}),
    _case("traversal-guider", "guider", "DreaMovingLoadContentGuider", "queue", NOT_A_NAME,
          lambda f, b: {"guider_name": out_of(b, "ipadapter", "evil_guider.safetensors")}),
    _case("traversal-clip", "guider", "DreaMovingLoadOpenClipVision", "queue", NOT_A_NAME,
          lambda f, b: {"clip_name": out_of(b, "clip_vision", "evil_clip.safetensors")}),
    _case("traversal-insightface", "guider", "DreaMovingLoadInsightFace", "queue", NOT_A_NAME,
          lambda f, b: {"pack": out_of(b, "insightface/models", "pack")}, insightface={}),
    _case("traversal-dwpose-detector", "preprocess", "DreaMovingDWPose", "queue", NOT_A_NAME,
          lambda f, b: {"detector": out_of(b, "dreamoving/preprocess", "yolox_l.onnx")}),
    _case("absolute-dwpose-estimator", "preprocess", "DreaMovingDWPose", "queue", NOT_A_NAME,
          lambda f, b: {"estimator": str(b.parent / "outside" / "dw-ll_ucoco_384.onnx")}),
    _case("traversal-zoedepth", "preprocess", "DreaMovingZoeDepth", "queue", NOT_A_NAME,
          lambda f, b: {"model": out_of(b, "dreamoving/preprocess", "zoe")}),
    _case("symlink-out-zoedepth", "preprocess", "DreaMovingZoeDepth", "queue", LEAVES,
          lambda f, b: {"model": f["escape"]}),
    _case("missing-motion-file", "motion", "DreaMovingLoadMotionModule", "queue", "is not in",
          {"model_name": "not_downloaded_yet.ckpt"}),
    _case("missing-insightface-default", "guider", "DreaMovingLoadInsightFace", "queue", "is not in",
          {"pack": "antelopev2"}, insightface={}),
    # -- NaN and infinities in every float, inverted ranges: refused when queued -------------------------------
    _case("nan-motion-scale", "motion", "DreaMovingApplyMotionModule", "queue", "motion_scale is nan",
          {"motion_scale": NAN}),
    _case("inf-controlnet-strength", "controlnet", "DreaMovingApplyVideoControlNet", "queue", "strength is inf",
          {"strength": INF}),
    _case("minus-inf-controlnet-start", "controlnet", "DreaMovingApplyVideoControlNet", "queue",
          "start_percent is -inf", {"start_percent": -INF}),
    _case("nan-controlnet-end", "controlnet", "DreaMovingApplyVideoControlNet", "queue", "end_percent is nan",
          {"end_percent": NAN}),
    _case("nan-alpha-face", "guider", "DreaMovingContentGuiderFace", "queue", "alpha_face is nan",
          {"alpha_face": NAN}),
    _case("inf-face-start", "guider", "DreaMovingContentGuiderFace", "queue", "start_percent is inf",
          {"start_percent": INF}),
    _case("inf-face-end", "guider", "DreaMovingContentGuiderFace", "queue", "end_percent is inf",
          {"end_percent": INF}),
    _case("nan-cloth-start", "guider", "DreaMovingContentGuiderCloth", "queue", "start_percent is nan",
          {"start_percent": NAN}),
    _case("minus-inf-alpha-cloth", "guider", "DreaMovingContentGuiderCloth", "queue", "alpha_cloth is -inf",
          {"alpha_cloth": -INF}),
    _case("nan-cloth-end", "guider", "DreaMovingContentGuiderCloth", "queue", "end_percent is nan",
          {"end_percent": NAN}),
    _case("nan-dwpose-fps", "preprocess", "DreaMovingDWPose", "queue", "fps is nan", {"fps": NAN}),
    _case("inverted-controlnet-range", "controlnet", "DreaMovingApplyVideoControlNet", "queue",
          "start_percent (0.9) is after end_percent (0.1)", {"start_percent": 0.9, "end_percent": 0.1}),
    _case("inverted-face-range", "guider", "DreaMovingContentGuiderFace", "queue",
          "start_percent (0.9) is after end_percent (0.1)", {"start_percent": 0.9, "end_percent": 0.1}),
    _case("inverted-cloth-range", "guider", "DreaMovingContentGuiderCloth", "queue",
          "start_percent (0.8) is after end_percent (0.2)", {"start_percent": 0.8, "end_percent": 0.2}),
    _case("unknown-option", "motion", "DreaMovingLoadMotionModule", "queue", "not one of its options",
          {"pe_extension": "cubic"}),
    # -- raw values in custom-typed inputs: refused before the node runs -----------------------------------------
    _case("raw-motion-module", "motion", "DreaMovingApplyMotionModule", "run", "must be connected to the "
          "MOTION_MODULE output", {"motion_module": "mm_sd_v15_v2.ckpt"}),
    _case("raw-context-options", "motion", "DreaMovingApplyMotionModule", "run", "DREAMOVING_CONTEXT_OPTIONS",
          {"context_options": 16}),
    _case("raw-video-controlnet", "controlnet", "DreaMovingApplyVideoControlNet", "run", "VIDEO_CONTROLNET",
          {"video_controlnet": 5}),
    _case("raw-guider", "guider", "DreaMovingContentGuiderFace", "run", "DREAMOVING_CONTENT_GUIDER",
          {"guider": {"image_proj": 1}}),
    _case("raw-insightface", "guider", "DreaMovingContentGuiderFace", "run", "DREAMOVING_INSIGHTFACE",
          {"insightface": "buffalo_l"}),
    _case("raw-pose-keypoint", "preprocess", "DreaMovingRenderPose", "run", "POSE_KEYPOINT",
          {"pose_keypoint": "[{\"people\": []}]"}),
    _case("raw-image", "controlnet", "DreaMovingApplyVideoControlNet", "run", "IMAGE", {"images": "pose.png"}),
    # -- bad files in every loader and format ---------------------------------------------------------------------
    _case("random-bytes-ckpt", "motion", "DreaMovingLoadMotionModule", "run", "truncated or corrupt",
          lambda f, b: {"model_name": f["random_ckpt"]}),
    _case("empty-safetensors", "motion", "DreaMovingLoadMotionModule", "run", "is empty (0 bytes)",
          lambda f, b: {"model_name": f["empty_safetensors"]}),
    _case("wrong-rank-motion", "motion", "DreaMovingLoadMotionModule", "run", "not a usable motion module",
          lambda f, b: {"model_name": f["wrong_rank_motion"]}),
    _case("truncated-controlnet", "controlnet", "DreaMovingLoadVideoControlNet", "run", "truncated or corrupt",
          lambda f, b: {"controlnet_name": f["truncated_controlnet"]}),
    _case("wrong-rank-controlnet", "controlnet", "DreaMovingLoadVideoControlNet", "run", "not that of a convolution",
          lambda f, b: {"controlnet_name": f["wrong_rank_controlnet"]}),
    _case("unsafe-pickle-guider", "guider", "DreaMovingLoadContentGuider", "run", "unsafe pickle",
          lambda f, b: {"guider_name": f["unsafe_guider"]}),
    _case("corrupt-clip", "guider", "DreaMovingLoadOpenClipVision", "run", "truncated or corrupt",
          lambda f, b: {"clip_name": f["random_clip"]}),
    _case("rank3-insightface", "guider", "DreaMovingLoadInsightFace", "run", "lacks a recognition model",
          lambda f, b: {"pack": f["rank3_insightface"]}, insightface={}),
    _case("rank3-dwpose-detector", "preprocess", "DreaMovingDWPose", "run", "expected one image input",
          lambda f, b: {"detector": f["rank3_detector"]}),
    _case("corrupt-onnx-estimator", "preprocess", "DreaMovingDWPose", "run", "not a loadable ONNX model",
          lambda f, b: {"estimator": f["random_onnx"]}),
    _case("truncated-zoedepth", "preprocess", "DreaMovingZoeDepth", "run", "truncated or corrupt",
          lambda f, b: {"model": f["truncated_zoedepth"]}),
    _case("unsafe-pickle-zoedepth", "preprocess", "DreaMovingZoeDepth", "run", "unsafe pickle",
          lambda f, b: {"model": f["unsafe_zoedepth"]}),
    _case("broken-config-zoedepth", "preprocess", "DreaMovingZoeDepth", "run", "config.json is not readable JSON",
          lambda f, b: {"model": f["broken_config_zoedepth"]}),
    # -- unusable images ---------------------------------------------------------------------------------------
    _case("one-pixel-frames", "preprocess", "DreaMovingZoeDepth", "run", "images is 1×1 pixels", {},
          width=1, height=1),
    _case("sliver-frames", "preprocess", "DreaMovingDWPose", "run", "images is 300×4 pixels", {},
          width=300, height=4),
    _case("one-pixel-hints", "controlnet", "DreaMovingApplyVideoControlNet", "run", "images is 1×1 pixels", {},
          hint_size=1),
]


def build(case: Case, files: dict, base: Path) -> tuple[Graph, dict]:
    """The case's graph: its builder with the case's extra arguments and the hostile inputs on its node."""
    extra = dict(case.extra or {})
    slot = SLOT[case.node]
    extra[slot] = {**extra.get(slot, {}), **case.inputs(files, base)}
    return GRAPHS[case.graph](files, **extra)


def _text_of_rejection(rejected: PromptRejected, node_id: str) -> str:
    errors = rejected.node_errors.get(node_id, {}).get("errors", [])
    assert errors, f"no node_errors on node {node_id}: {rejected.body}"
    return " ".join(f"{e['message']}: {e['details']}" for e in errors)


@pytest.fixture(scope="module")
def plain(comfy, files):
    """``check()``: the plain 2-frame prompt runs again and its latent is bit-identical to the first run's. Every
    other run sends the empty latent through Repeat Latent Batch ×1 (the same tensor under another cache key), so
    ComfyUI samples again instead of answering from its cache, while the loaders and text encodings stay cached."""
    runs = itertools.count()

    def run() -> torch.Tensor:
        g, refs = sampled(files)
        if next(runs) % 2:
            g.set(refs["sampler"], latent_image=g.node("RepeatLatentBatch", samples=refs["latent"], amount=1)[0])
        return run_latent(comfy, g, refs["save"])

    reference = run()

    def check() -> None:
        assert torch.equal(run(), reference), "the plain prompt after a refused one differs from before"

    check.reference = reference
    return check


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_naming_the_node_and_the_server_keeps_serving(comfy, comfy_base, files, plain,
                                                                              hide_models, case):
    unsafe_marker().unlink(missing_ok=True)
    g, nodes = build(case, files, comfy_base)
    node_id = nodes[case.node].id
    display = files["display"][case.node]
    with hide_models(("insightface/models", "antelopev2")):
        if case.when == "queue":
            with pytest.raises(PromptRejected) as refused:
                comfy.queue(g.to_api())
            text = _text_of_rejection(refused.value, node_id)
            assert refused.value.node_errors[node_id]["class_type"] == case.node
        else:
            with pytest.raises(ExecutionFailed) as failed:
                comfy.run(g.to_api(), timeout=300)
            text = failed.value.message
            assert failed.value.node_type == case.node, text
            assert text.startswith(f"{display}: "), text
    assert f"{display}: " in text and case.expect in text, text
    assert not PYTHON_CLASS_NAME.search(text), text
    assert not unsafe_marker().exists(), "an unsafe pickle ran"
    plain()


NODES_IN_TABLE = ("DreaMovingLoadMotionModule", "DreaMovingApplyMotionModule", "DreaMovingContextOptions",
                  "DreaMovingLoadVideoControlNet", "DreaMovingApplyVideoControlNet", "DreaMovingLoadContentGuider",
                  "DreaMovingLoadOpenClipVision", "DreaMovingLoadInsightFace", "DreaMovingContentGuiderFace",
                  "DreaMovingContentGuiderCloth", "DreaMovingDWPose", "DreaMovingRenderPose", "DreaMovingZoeDepth")


def test_the_table_has_nan_or_inf_for_every_float_and_a_traversal_for_every_model_name(comfy, files):
    """Over the pack's nodes as the server lists them (newer nodes are covered in-process by
    test_guard.py, from their schemas)."""
    info = comfy.object_info()
    rows = [(c, name) for c in CASES for name in c.inputs(files, Path("/x/y/z/w"))]
    non_finite = {(c.node, n) for c, n in rows if re.search(r" is -?(nan|inf)\b", c.expect)}
    traversal = {(c.node, n) for c, n in rows if c.expect in (NOT_A_NAME, LEAVES)}
    for node_id in NODES_IN_TABLE:
        spec = info[node_id]["input"]
        for name, (kind, *rest) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if kind == "FLOAT":
                assert (node_id, name) in non_finite, f"no NaN/inf row for {node_id}.{name}"
            options = rest[0].get("options", []) if kind == "COMBO" and rest else []
            if any(o in files.values() for o in options):
                assert (node_id, name) in traversal, f"no traversal row for {node_id}.{name}"


# -- what must never be opened -------------------------------------------------------------------------------------

IN_OPEN, IN_ACCESS = 0x20, 0x01


class OpenWatch:
    """inotify: every open or read of a file in ``folders`` (Linux)."""

    def __init__(self, folders: list[Path]):
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        self.names = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN | IN_ACCESS)
            assert wd >= 0, f"cannot watch {folder}"
            self.names[wd] = folder

    def events(self) -> list[str]:
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + size].rstrip(b"\0").decode()
                found.append(f"{self.names[wd]}/{name}")
                offset += 16 + size

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_traversal_names_open_nothing_outside_the_model_folders(comfy, comfy_base, files, outside, plain):
    real = [Path(os.path.realpath(p)) for p in (outside / "zoe", outside / "pack")]
    watch = OpenWatch([outside, outside / "zoe", outside / "pack", *real])
    try:
        for case in CASES:
            if case.expect in (NOT_A_NAME, LEAVES):
                g, _ = build(case, files, comfy_base)
                with pytest.raises(PromptRejected):
                    comfy.queue(g.to_api())
        comfy.object_info()  # lists every dropdown: the escaping link must not be followed into
        plain()
        opened = watch.events()
    finally:
        watch.close()
    assert not opened, f"files outside the model folders were opened: {opened}"
    # the watch sees opens: loading one of the same files from inside the models folder is seen
    watch = OpenWatch([outside])
    try:
        (outside / "probe.txt").write_text("x")
        (outside / "probe.txt").read_text()
        assert watch.events(), "inotify saw nothing; the check above would prove nothing"
    finally:
        watch.close()


# -- inputs that look odd but are usable -----------------------------------------------------------------------


def test_training_checkpoint_with_optimizer_state_loads_like_the_plain_file(comfy, files):
    """state_dict + optimizer (with tensors) + step + epoch + lr: the weights are found by content."""
    runs = []
    for name in (files["motion"], files["training"]):
        g, nodes = motion_graph(files, load={"model_name": name})
        save = [n for n, v in g.nodes.items() if v["class_type"] == "SaveLatent"][0]
        runs.append(run_latent(comfy, g, NodeRef(save)))
    assert torch.equal(runs[0], runs[1])


def test_rgba_face_image_is_used_as_rgb_with_a_faceid_adapter(comfy, files):
    """An RGBA face (Join Image with Alpha) guides exactly like the same picture without its alpha."""
    def rgba(g):
        image = g.node("EmptyImage", width=64, height=64, batch_size=1, color=RED)
        alpha = g.node("SolidMask", value=0.5, width=64, height=64)
        return g.node("JoinImageWithAlpha", image=image[0], alpha=alpha[0])[0]

    latents = []
    for face_image in (None, rgba):
        g, _ = guider_graph(files, load={"guider_name": files["faceid"]}, insightface={}, face_image=face_image)
        save = [n for n, v in g.nodes.items() if v["class_type"] == "SaveLatent"][0]
        latents.append(run_latent(comfy, g, NodeRef(save)))
    assert torch.equal(latents[0], latents[1])
    assert not math.isnan(float(latents[0].abs().sum()))
