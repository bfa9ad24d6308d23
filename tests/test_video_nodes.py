"""Driving Video Frames over HTTP: the kept frames of a video of any length and rate, with the count and the frame
rate the rest of a workflow follows."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devtools.client import ExecutionFailed
from devtools.graph import Graph
from devtools.server import PACK_DIR
from tests.graphs import read_video, run_latent

VIDEO = "dreamoving_dance.mp4"  # a shipped sample input: 160 frames at 16 fps
SOURCE, SOURCE_FPS = read_video(PACK_DIR / "inputs" / VIDEO)


def frames_graph(video_from: str = "file", **settings) -> tuple[Graph, dict]:
    """Load Video → [components → images / → Create Video] → Driving Video Frames; its frames saved as PNGs, its fps
    making a video and its count sizing a latent batch."""
    g = Graph()
    video = g.node("LoadVideo", file=VIDEO)
    source = video[0]
    if video_from != "file":
        parts = g.node("GetVideoComponents", video=video[0])
        source = parts[0] if video_from == "images" else g.node("CreateVideo", images=parts[0], fps=parts[2])[0]
    values = dict(frame_cap=0, skip_first=0, every_nth=1, images_fps=8.0) | settings
    frames = g.node("DreaMovingVideoFrames", video=source, **values)
    refs = {"frames": frames,
            "images": g.node("SaveImage", images=frames[0], filename_prefix="frames/kept"),
            "video": g.node("SaveVideo", video=g.node("CreateVideo", images=frames[0], fps=frames[1])[0],
                            filename_prefix="video/frames_rate", format="mp4", codec="h264"),
            "latent": g.node("SaveLatent", samples=g.node("EmptyLatentImage", width=64, height=64,
                                                          batch_size=frames[2])[0], filename_prefix="latents/count")}
    return g, refs


@pytest.mark.parametrize("settings,kept", [
    (dict(frame_cap=10, skip_first=5, every_nth=3), list(range(5, 35, 3))),
    (dict(frame_cap=0, skip_first=0, every_nth=2), list(range(0, 160, 2))),
    (dict(frame_cap=16), list(range(16))),
], ids=["cap+skip+nth", "every 2nd of all", "first 16"])
def test_frames_count_and_rate_follow_the_video(comfy, settings, kept):
    g, refs = frames_graph(**settings)
    result = comfy.run(g.to_api(), timeout=300)
    saved = [np.asarray(Image.open(p).convert("RGB")) for p in result.files(refs["images"].id)]
    assert len(saved) == len(kept)
    np.testing.assert_array_equal(np.stack(saved), np.stack([SOURCE[i] for i in kept]))
    _, fps = read_video(result.files(refs["video"].id)[0])
    assert abs(fps - SOURCE_FPS / settings.get("every_nth", 1)) < 1e-3
    assert run_latent(comfy, g, refs["latent"]).shape[0] == len(kept), "frame_count sizes the latent batch"


@pytest.mark.parametrize("video_from", ["images", "components"])
def test_frames_already_decoded_or_built_in_memory_work_too(comfy, video_from):
    g, refs = frames_graph(video_from, frame_cap=6, skip_first=2, every_nth=2, images_fps=12.0)
    result = comfy.run(g.to_api(), timeout=300)
    saved = [np.asarray(Image.open(p).convert("RGB")) for p in result.files(refs["images"].id)]
    np.testing.assert_array_equal(np.stack(saved), np.stack([SOURCE[i] for i in range(2, 14, 2)]))
    _, fps = read_video(result.files(refs["video"].id)[0])
    rate = 12.0 if video_from == "images" else SOURCE_FPS  # an image batch has no rate of its own
    assert abs(fps - rate / 2) < 1e-3


def test_skipping_past_the_end_names_the_node_and_the_input(comfy):
    g, _ = frames_graph(skip_first=500)
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(g.to_api(), timeout=300)
    assert failed.value.message.startswith("Driving Video Frames: video: skip_first=500 leaves no frame")
    assert "the video has 160 frames" in failed.value.message
    g, refs = frames_graph(frame_cap=2)
    assert len(comfy.run(g.to_api()).files(refs["images"].id)) == 2, "the server keeps serving"


def test_preprocess_nodes_preview_every_frame_on_the_node(comfy, comfy_base):
    from devtools.demo import install_tiny_models, substitute

    g = Graph()
    frames = g.node("DreaMovingVideoFrames", video=g.node("LoadVideo", file=VIDEO)[0], frame_cap=5, skip_first=0,
                    every_nth=1, images_fps=8.0)
    pose = g.node("DreaMovingDWPose", images=frames[0], detector="yolox_l.onnx", estimator="dw-ll_ucoco_384.onnx",
                  draw_body=True, draw_hands=True, draw_face=True, detect_resolution=64, temporal_smoothing=True,
                  fps=frames[1])
    depth = g.node("DreaMovingZoeDepth", images=frames[0], model="zoedepth-nyu-kitti", per_frame_normalization=False,
                   batch_size=4)
    save_pose = g.node("SaveImage", images=pose[0], filename_prefix="preview/pose")
    save_depth = g.node("SaveImage", images=depth[0], filename_prefix="preview/depth")
    api = substitute(install_tiny_models(g.to_api(), comfy_base), {("DreaMovingVideoFrames", "frame_cap"): 5})
    result = comfy.run(api, timeout=300)
    for node, saved in ((pose, save_pose), (depth, save_depth)):
        previews = result.outputs[node.id]["images"]
        assert len(previews) == 5 and {p["type"] for p in previews} == {"temp"}
        shown = [np.asarray(Image.open(comfy_base / "temp" / p["subfolder"] / p["filename"]).convert("RGB"))
                 for p in previews]
        outputs = [np.asarray(Image.open(p).convert("RGB")) for p in result.files(saved.id)]
        np.testing.assert_array_equal(np.stack(shown), np.stack(outputs), "the preview is the node's output")
    assert "openpose_json" in result.outputs[pose.id], "the pose JSON still reaches the history"
