"""DreaMoving Score Video over HTTP on a real ComfyUI: the report, the numbers and the plot of a tiny dance video,
and bad input named by its input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from devtools.client import ExecutionFailed
from devtools.demo import install_tiny_models, load_graph, substitute
from devtools.graph import Graph
from devtools.server import PACK_DIR
from devtools.tiny import content_guider as tiny_face
from devtools.tiny import eval as tiny
from devtools.tiny import preprocess as tiny_pose

VIDEO = "dreamoving_score_dance.mp4"
FRAMES = 8
NUMBERS = ("identity", "pose_error", "pose_pck", "consistency", "flicker", "psnr", "ssim", "lpips")


@pytest.fixture(scope="module")
def files(comfy, comfy_base, install_model) -> dict:
    # under a sub-folder, so that the default DWPose names stay missing for the missing-file test
    install_model(tiny.following_yolox_onnx(), "dreamoving/preprocess/scores", "yolox_l.onnx")
    install_model(tiny_pose.dwpose_onnx(), "dreamoving/preprocess/scores", "dw-ll_ucoco_384.onnx")
    install_model(tiny_face.insightface_root() / "models" / "buffalo_l", "insightface/models", "buffalo_l")
    clip = install_model(tiny_face.clip_vision_file(init_factor=4.0), "clip_vision")
    install_model(tiny.alexnet_file(), "dreamoving/eval")  # LPIPS only: the other networks stay "unavailable"
    tiny_pose.synthetic_dance_video(comfy_base / "input" / VIDEO, frames=FRAMES, size=64)
    return {"detector": "scores/yolox_l.onnx", "estimator": "scores/dw-ll_ucoco_384.onnx", "clip": clip}


def score_graph(files: dict, detector: str | None = None, truth_frames: int = FRAMES) -> tuple[Graph, dict]:
    """Dance video → DWPose → Score Video (driving = its own keypoints, truth = its own frames)."""
    g = Graph()
    video = g.node("LoadVideo", file=VIDEO)
    parts = g.node("GetVideoComponents", video=video[0])
    pose = g.node("DreaMovingDWPose", images=parts[0], detector=files["detector"], estimator=files["estimator"],
                  draw_body=True, draw_hands=True, draw_face=True, detect_resolution=64, temporal_smoothing=False,
                  fps=parts[2])
    truth = g.node("ImageFromBatch", image=parts[0], batch_index=0, length=truth_frames)
    face = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0xFF0000)
    insightface = g.node("DreaMovingLoadInsightFace", pack="buffalo_l", provider="CPU")
    clip = g.node("DreaMovingLoadOpenClipVision", clip_name=files["clip"])
    score = g.node("DreaMovingScoreVideo", frames=parts[0], driving=pose[1], face=face[0], truth=truth[0],
                   insightface=insightface[0], clip_vision=clip[0], detector=detector or files["detector"],
                   estimator=files["estimator"], detect_resolution=64)
    refs = {"score": score, "report": g.node("PreviewAny", source=score[0]),
            "plot": g.node("SaveImage", images=score[1], filename_prefix="scores/plot"),
            **{name: g.node("PreviewAny", source=score[2 + i]) for i, name in enumerate(NUMBERS)}}
    return g, refs


def test_the_score_node_is_listed_with_its_category_outputs_and_tooltips(comfy):
    node = comfy.object_info()["DreaMovingScoreVideo"]
    assert node["category"] == "DreaMoving/Eval" and node["display_name"] == "DreaMoving Score Video"
    assert node["output"] == ["STRING", "IMAGE"] + ["FLOAT"] * len(NUMBERS)
    assert node["output_name"][2:] == list(NUMBERS) and node["output_node"] is True
    for section in ("required", "optional"):
        for name, spec in node["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"DreaMovingScoreVideo.{name} has no tooltip"
    assert node["input"]["optional"]["driving"][0] == "POSE_KEYPOINT"


def test_the_node_returns_the_report_and_the_numbers_and_shows_its_plot(comfy, comfy_base, files):
    g, refs = score_graph(files)
    result = comfy.run(g.to_api(), timeout=600)
    ui = result.outputs[refs["score"].id]
    report = json.loads(ui["score_report"][0])
    assert json.loads(result.outputs[refs["report"].id]["text"][0]) == report  # the STRING output is the same JSON
    scores = report["scores"]
    assert report["frames"] == FRAMES
    # the driving keypoints are the video's own: no error; the truth is the video itself
    assert scores["pose/body/error"] == 0 and scores["pose/body/pck_0.1"] == 1 and scores["pose/lost_frames"] == 0
    assert scores["paired/ssim"] == pytest.approx(1) and scores["paired/psnr"] is None  # ∞
    assert scores["paired/lpips"] == pytest.approx(0, abs=1e-6)
    assert 0.5 < scores["temporal/clip_consistency"] < 1 and scores["temporal/flicker"] > 0
    # the tiny face pack sees faces in warm regions: the reference's red square, the dancer's head in every frame
    assert scores["identity/no_face_share"] == 0 and -1 <= scores["identity/cosine_mean"] <= 1
    assert "pt_inception-2015-12-05-6726825d.pth" in report["unavailable"]["distribution/fid"]
    assert "identity/cosine_mean" not in report["unavailable"]

    numbers = {name: float(result.outputs[refs[name].id]["text"][0]) for name in NUMBERS}
    assert numbers["pose_pck"] == 1 and numbers["pose_error"] == 0
    assert numbers["identity"] == pytest.approx(scores["identity/cosine_mean"])
    assert numbers["consistency"] == pytest.approx(scores["temporal/clip_consistency"])

    preview = ui["images"]
    assert len(preview) == 1 and preview[0]["type"] == "temp"
    shown = np.asarray(Image.open(comfy_base / "temp" / preview[0]["subfolder"] / preview[0]["filename"]))
    saved = np.asarray(Image.open(result.files(refs["plot"].id)[0]).convert("RGB"))
    np.testing.assert_array_equal(shown[..., :3], saved)
    assert saved.shape[1] == 960 and saved.shape[0] > 400  # three panels
    assert len(np.unique(saved.reshape(-1, 3), axis=0)) > 20  # curves, grid and text, not a blank picture
    progress = [p for p in result.progress() if p.get("node") == refs["score"].id]
    assert progress and progress[-1]["value"] == progress[-1]["max"]


@pytest.mark.parametrize("case, message", [
    ("truth frames", "DreaMoving Score Video: truth: the ground-truth video has 4 frames, the video has 8"),
    ("missing detector", "DreaMoving Score Video: detector: DWPose model 'yolox_l.onnx' is not in"),
])
def test_bad_input_names_the_input_and_the_server_keeps_serving(comfy, comfy_base, files, case, message):
    if case == "truth frames":
        g, _ = score_graph(files, truth_frames=4)
    else:
        g, _ = score_graph(files, detector="yolox_l.onnx")
    # the server is shared: a test of another module may have put the default detector in place
    default = comfy_base / "models" / "dreamoving" / "preprocess" / "yolox_l.onnx"
    aside = default.with_name("yolox_l.onnx.aside")
    moved = case == "missing detector" and os.path.lexists(default)
    if moved:
        os.replace(default, aside)
    try:
        with pytest.raises(ExecutionFailed) as failed:
            comfy.run(g.to_api(), timeout=300)
    finally:
        if moved:
            os.replace(aside, default)
    assert failed.value.node_type == "DreaMovingScoreVideo"
    assert failed.value.message.startswith(message)
    g, refs = score_graph(files)
    result = comfy.run(g.to_api(), timeout=600)
    assert json.loads(result.outputs[refs["score"].id]["score_report"][0])["frames"] == FRAMES


def test_the_shipped_score_workflow_runs(comfy, comfy_base):
    graph = install_tiny_models(load_graph(PACK_DIR / "workflows" / "api" / "dreamoving_score.json"), comfy_base)
    graph = substitute(graph, {("DreaMovingDWPose", "detect_resolution"): 64,
                               ("DreaMovingScoreVideo", "detect_resolution"): 64})
    result = comfy.run(graph, timeout=600)
    score_id = next(k for k, v in graph.items() if v["class_type"] == "DreaMovingScoreVideo")
    report = json.loads(result.outputs[score_id]["score_report"][0])
    # the shipped graph scores the dance against itself until a take is picked: its own poses, and the dancer's
    # head (a face to the tiny face pack) against the sample face photo
    assert report["scores"]["pose/body/pck_0.1"] == 1 and report["scores"]["identity/no_face_share"] == 0
    assert -1 <= report["scores"]["identity/cosine_mean"] <= 1
    assert result.outputs[score_id]["images"]
