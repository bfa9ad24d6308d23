"""Preprocess nodes over HTTP on a real ComfyUI: a synthetic 16-frame dance video to pose and depth hints."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from devtools.client import PromptRejected
from devtools.graph import Graph
from devtools.tiny import preprocess as tiny

NODE_IDS = ("DreaMovingDWPose", "DreaMovingRenderPose", "DreaMovingZoeDepth")
VIDEO = "dreamoving_dance_64.mp4"
FRAMES = 16


@pytest.fixture(scope="module")
def files(comfy, comfy_base, install_model) -> dict:
    # installed under sub-folder names so the default names stay missing for the missing-model test
    names = {
        "detector": install_model(tiny.yolox_onnx(), "dreamoving/preprocess/tiny", "yolox_l.onnx"),
        "estimator": install_model(tiny.dwpose_onnx(), "dreamoving/preprocess/tiny", "dw-ll_ucoco_384.onnx"),
        "zoedepth": install_model(tiny.zoedepth_dir(), "dreamoving/preprocess", "zoedepth-tiny"),
    }
    names["detector"], names["estimator"] = "tiny/yolox_l.onnx", "tiny/dw-ll_ucoco_384.onnx"
    tiny.synthetic_dance_video(comfy_base / "input" / VIDEO, frames=FRAMES, size=64)
    return names


def video_graph(files: dict, detector: str | None = None, zoedepth: str | None = None) -> tuple[Graph, dict]:
    g = Graph()
    video = g.node("LoadVideo", file=VIDEO)
    parts = g.node("GetVideoComponents", video=video[0])
    pose = g.node("DreaMovingDWPose", images=parts[0], detector=detector or files["detector"],
                  estimator=files["estimator"], draw_body=True, draw_hands=True, draw_face=True,
                  detect_resolution=64, temporal_smoothing=True, fps=parts[2])
    render = g.node("DreaMovingRenderPose", pose_keypoint=pose[1], draw_body=True, draw_hands=True, draw_face=True,
                    resolution=0)
    depth = g.node("DreaMovingZoeDepth", images=parts[0], model=zoedepth or files["zoedepth"],
                   per_frame_normalization=False, batch_size=8)
    refs = {"pose": pose, "render": render, "depth": depth,
            "save_pose": g.node("SaveImage", images=pose[0], filename_prefix="preprocess/pose"),
            "save_render": g.node("SaveImage", images=render[0], filename_prefix="preprocess/render"),
            "save_depth": g.node("SaveImage", images=depth[0], filename_prefix="preprocess/depth")}
    return g, refs


def images(result, ref) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in result.files(ref.id)]


def test_nodes_are_listed_with_category_tooltips_and_pose_keypoint_type(comfy):
    info = comfy.object_info()
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] == "DreaMoving/Preprocess"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["DreaMovingDWPose"]["output"] == ["IMAGE", "POSE_KEYPOINT"]
    assert info["DreaMovingRenderPose"]["input"]["required"]["pose_keypoint"][0] == "POSE_KEYPOINT"


def test_video_to_pose_and_depth_over_http(comfy, files):
    g, refs = video_graph(files)
    result = comfy.run(g.to_api(), timeout=300)

    poses, rendered, depths = (images(result, refs[k]) for k in ("save_pose", "save_render", "save_depth"))
    assert len(poses) == len(rendered) == len(depths) == FRAMES
    assert poses[0].shape == depths[0].shape == (64, 64, 3)

    expected = tiny.expected_keypoints()
    knee = expected[14]  # COCO right knee = OpenPose joint 9, drawn in (0, 255, 255)
    assert tuple(poses[0][int(knee[1]), int(knee[0])]) == (0, 255, 255)
    for a, b in zip(poses, rendered):  # POSE_KEYPOINT drawn again gives the same picture
        np.testing.assert_array_equal(a, b)

    data = json.loads(result.outputs[refs["pose"].id]["openpose_json"][0])
    assert len(data) == FRAMES and (data[0]["canvas_height"], data[0]["canvas_width"]) == (64, 64)
    body = np.array(data[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    np.testing.assert_allclose(body[[0, 9], :2], expected[[0, 14]], atol=0.2)

    depth = np.stack(depths).astype(int)
    assert (depth[..., 0] == depth[..., 1]).all() and (depth[..., 1] == depth[..., 2]).all()  # grey hint
    assert depth.max() == 255 and depth.std() > 5

    progress = [p for p in result.progress() if p.get("node") == refs["pose"].id]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == FRAMES


def test_missing_models_are_refused_when_queued_and_the_server_keeps_serving(comfy, files, hide_models):
    with hide_models(("dreamoving/preprocess", "yolox_l.onnx"), ("dreamoving/preprocess", "zoedepth-nyu-kitti")):
        g, refs = video_graph(files, detector="yolox_l.onnx")
        del g.nodes[refs["save_depth"].id]  # an output that does not need the missing file would still be run
        with pytest.raises(PromptRejected) as refused:
            comfy.queue(g.to_api())
        errors = refused.value.node_errors[refs["pose"].id]
        message = " ".join(e["details"] for e in errors["errors"])
        assert errors["class_type"] == "DreaMovingDWPose"
        assert "DWPose Estimator: detector: DWPose model 'yolox_l.onnx' is not in" in message
        assert "dw-ll_ucoco_384.onnx" in message and "dreamoving" in message and "preprocess" in message

        g, refs = video_graph(files, zoedepth="zoedepth-nyu-kitti")
        for save in ("save_pose", "save_render"):
            del g.nodes[refs[save].id]
        with pytest.raises(PromptRejected) as refused:
            comfy.queue(g.to_api())
        errors = refused.value.node_errors[refs["depth"].id]
        message = " ".join(e["details"] for e in errors["errors"])
        assert errors["class_type"] == "DreaMovingZoeDepth"
        assert "ZoeDepth Estimator: model: ZoeDepth model folder 'zoedepth-nyu-kitti' is not in" in message
        assert "config.json, model.safetensors, preprocessor_config.json" in message

    g, refs = video_graph(files)
    result = comfy.run(g.to_api(), timeout=300)  # still serving: the same graph with the right models runs
    assert len(result.files(refs["save_depth"].id)) == FRAMES


def test_retargeting_to_a_reference_image_over_http(comfy, files):
    g = Graph()
    video = g.node("LoadVideo", file=VIDEO)
    parts = g.node("GetVideoComponents", video=video[0])
    reference = g.node("ImageFromBatch", image=parts[0], batch_index=0, length=1)
    pose = g.node("DreaMovingDWPose", images=parts[0], detector=files["detector"], estimator=files["estimator"],
                  draw_body=True, draw_hands=False, draw_face=False, detect_resolution=64,
                  temporal_smoothing=False, fps=8.0, reference_image=reference[0])
    save = g.node("SaveImage", images=pose[0], filename_prefix="preprocess/retarget")
    result = comfy.run(g.to_api(), timeout=300)
    data = json.loads(result.outputs[pose.id]["openpose_json"][0])
    # the tiny estimator sees the same person in the reference: retargeting must leave the pose where it is
    body = np.array(data[3]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    expected = tiny.expected_keypoints()
    np.testing.assert_allclose(body[[0, 2, 5, 10, 13], :2], expected[[0, 6, 5, 16, 15]], atol=0.2)
    assert len(result.files(save.id)) == FRAMES
