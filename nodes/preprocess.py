"""Preprocess nodes: a driving video's frames to DWPose pose hints (+ ``POSE_KEYPOINT``) and ZoeDepth depth hints.

Model files live in ``models/dreamoving/preprocess`` (folder name ``dreamoving_preprocess``): ``yolox_l.onnx`` and
``dw-ll_ucoco_384.onnx`` from huggingface.co/yzd-v/DWPose, and a ZoeDepth folder in the Intel/zoedepth-nyu-kitti
layout. DWPose files comfyui_controlnet_aux already downloaded (``custom_nodes/comfyui_controlnet_aux/ckpts/yzd-v/
DWPose``) are found too. ``POSE_KEYPOINT`` is comfyui_controlnet_aux's type, so its pose nodes connect.
"""
from __future__ import annotations

import json
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from dreamoving_core.preprocess.dwpose import DETECTOR_FILE, ESTIMATOR_FILE, DWPose, to_uint8, work_size
from dreamoving_core.errors import DreaMovingError, InputMismatchError
from dreamoving_core.preprocess.pose import from_pose_keypoint, to_pose_keypoint
from dreamoving_core.preprocess.render import draw_poses
from dreamoving_core.preprocess.retarget import retarget_poses
from dreamoving_core.preprocess.smoothing import smooth_poses
from dreamoving_core.preprocess.zoedepth import depth_to_hint, load_zoedepth

from ._common import reports_errors

CATEGORY = "DreaMoving/Preprocess"
DWPOSE_NAME = "DWPose Estimator"
RENDER_NAME = "Render Pose Keypoints"
ZOE_NAME = "ZoeDepth Estimator"
FOLDER = "dreamoving_preprocess"
ZOEDEPTH_DIR = "zoedepth-nyu-kitti"
CONTROLNET_AUX_DWPOSE = os.path.join("comfyui_controlnet_aux", "ckpts", "yzd-v", "DWPose")

PoseKeypoint = io.Custom("POSE_KEYPOINT")


def _aux_dirs() -> list[str]:
    """comfyui_controlnet_aux's DWPose download folders that exist."""
    dirs = [os.path.join(d, CONTROLNET_AUX_DWPOSE) for d in folder_paths.get_folder_paths("custom_nodes")]
    return [d for d in dirs if os.path.isdir(d)]


def _expected_dirs() -> str:
    return " or ".join(f"'{d}'" for d in folder_paths.get_folder_paths(FOLDER))


def onnx_options(default: str) -> list[str]:
    """The ``.onnx`` files of the DWPose folders; ``default`` always listed so a missing file fails with our
    message, not a validation error."""
    ours = folder_paths.get_filename_list(FOLDER)
    aux = [f for d in _aux_dirs() for f in os.listdir(d)]
    return sorted({default, *(f for f in ours + aux if f.endswith(".onnx"))})


def find_onnx(name: str) -> str:
    """Full path of ``name`` in the DWPose folders; a DreaMovingError listing what belongs where if absent."""
    candidates = [folder_paths.get_full_path(FOLDER, name)] + [os.path.join(d, name) for d in _aux_dirs()]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise DreaMovingError(
        f"model file '{name}' not found. DWPose needs '{DETECTOR_FILE}' and '{ESTIMATOR_FILE}' "
        f"(huggingface.co/yzd-v/DWPose) in {_expected_dirs()}")


def zoedepth_options() -> list[str]:
    names = {ZOEDEPTH_DIR}
    for d in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(d):
            names.update(f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f, "config.json")))
    return sorted(names)


def find_zoedepth(name: str) -> str:
    for d in folder_paths.get_folder_paths(FOLDER):
        if os.path.isfile(os.path.join(d, name, "config.json")):
            return os.path.join(d, name)
    raise DreaMovingError(
        f"ZoeDepth model folder '{name}' not found. Put the files of huggingface.co/Intel/zoedepth-nyu-kitti "
        f"(config.json, model.safetensors, preprocessor_config.json) in a folder '{name}' inside {_expected_dirs()}")


def _progress(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(done: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


def _toggles() -> list:
    return [
        io.Boolean.Input("draw_body", default=True, tooltip="Draw the 18-keypoint body skeleton."),
        io.Boolean.Input("draw_hands", default=True, tooltip="Draw the 21-keypoint hands."),
        io.Boolean.Input("draw_face", default=True, tooltip="Draw the 70 face points."),
    ]


class DWPoseEstimator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingDWPose",
            display_name=DWPOSE_NAME,
            category=CATEGORY,
            description="Whole-body poses of every person in every frame (YOLOX + DWPose through onnxruntime), "
                        "rendered as OpenPose hints for the Video ControlNet, with temporal smoothing and optional "
                        "retargeting to the reference person's proportions; the frames are previewed on the node.",
            inputs=[
                io.Image.Input("images", tooltip="The driving video's frames (or one image)."),
                io.Combo.Input("detector", options=onnx_options(DETECTOR_FILE), default=DETECTOR_FILE,
                               tooltip="YOLOX person detector in models/dreamoving/preprocess."),
                io.Combo.Input("estimator", options=onnx_options(ESTIMATOR_FILE), default=ESTIMATOR_FILE,
                               tooltip="DWPose whole-body estimator in models/dreamoving/preprocess."),
                *_toggles(),
                io.Int.Input("detect_resolution", default=512, min=0, max=4096, step=64,
                             tooltip="Frames are scaled so their shorter side has this many pixels before "
                                     "detection; the pose picture has that size too. 0 keeps the frame size."),
                io.Boolean.Input("temporal_smoothing", default=True,
                                 tooltip="One-Euro filter the keypoints across frames to remove jitter."),
                io.Float.Input("fps", default=30.0, min=1.0, max=240.0, step=0.1,
                               tooltip="Frame rate of the video, for the smoothing (connect Driving Video "
                                       "Frames' fps)."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="Optional: the person to animate. The dancer's limb lengths are "
                                       "rescaled to this person's proportions (joint angles kept)."),
            ],
            outputs=[
                io.Image.Output(display_name="pose_images"),
                PoseKeypoint.Output(display_name="pose_keypoint"),
            ],
        )

    @classmethod
    @reports_errors(DWPOSE_NAME)
    def execute(cls, images: torch.Tensor, detector: str, estimator: str, draw_body: bool, draw_hands: bool,
                draw_face: bool, detect_resolution: int, temporal_smoothing: bool, fps: float,
                reference_image: torch.Tensor | None = None) -> io.NodeOutput:
        model = DWPose(find_onnx(detector), find_onnx(estimator))
        poses = model.video(images, detect_resolution, progress=_progress(len(images)))
        if temporal_smoothing and len(poses) > 1:
            poses = smooth_poses(poses, fps)
        if reference_image is not None:
            ref = model(to_uint8(reference_image[:1])[0], detect_resolution)
            if not ref.people:
                raise InputMismatchError("reference_image: no person found to retarget the poses to")
            biggest = max(ref.people, key=lambda p: float(p.body[:, 2].sum()))
            poses = retarget_poses(poses, biggest)
        height, width = work_size(images.shape[1], images.shape[2], detect_resolution)
        pictures = draw_poses(poses, height, width, draw_body, draw_hands, draw_face)
        keypoints = to_pose_keypoint(poses)
        # the frames are previewed on the node; the JSON also goes to the UI/history under comfyui_controlnet_aux's
        # key, for editors and API clients
        preview = ui.PreviewImage(pictures, cls=cls).as_dict()
        return io.NodeOutput(pictures, keypoints, ui={**preview, "openpose_json": [json.dumps(keypoints)]})


class RenderPose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingRenderPose",
            display_name=RENDER_NAME,
            category=CATEGORY,
            description="Draw POSE_KEYPOINT (OpenPose JSON, e.g. edited or from comfyui_controlnet_aux) as "
                        "OpenPose pose hints.",
            inputs=[
                PoseKeypoint.Input("pose_keypoint", tooltip="OpenPose JSON per frame (POSE_KEYPOINT)."),
                *_toggles(),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64,
                             tooltip="Shorter side of the picture in pixels; 0 uses the JSON's canvas size."),
            ],
            outputs=[io.Image.Output(display_name="pose_images")],
        )

    @classmethod
    @reports_errors(RENDER_NAME)
    def execute(cls, pose_keypoint, draw_body: bool, draw_hands: bool, draw_face: bool,
                resolution: int) -> io.NodeOutput:
        frames = from_pose_keypoint(pose_keypoint)
        if not frames:
            raise InputMismatchError("pose_keypoint holds no frame")
        height, width = work_size(frames[0].height, frames[0].width, resolution)
        return io.NodeOutput(draw_poses(frames, height, width, draw_body, draw_hands, draw_face))


class ZoeDepthEstimator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingZoeDepth",
            display_name=ZOE_NAME,
            category=CATEGORY,
            description="ZoeDepth depth of every frame as a ControlNet depth hint (near is bright).",
            inputs=[
                io.Image.Input("images", tooltip="The driving video's frames (or one image)."),
                io.Combo.Input("model", options=zoedepth_options(), default=ZOEDEPTH_DIR,
                               tooltip="A ZoeDepth folder (Intel/zoedepth-nyu-kitti layout) in "
                                       "models/dreamoving/preprocess."),
                io.Boolean.Input("per_frame_normalization", default=False,
                                 tooltip="Scale each frame's depth on its own; off shares one scale over the "
                                         "video so brightness does not flicker."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Frames per model call (more is faster on a GPU, uses more memory)."),
            ],
            outputs=[io.Image.Output(display_name="depth_images")],
        )

    @classmethod
    @reports_errors(ZOE_NAME)
    def execute(cls, images: torch.Tensor, model: str, per_frame_normalization: bool,
                batch_size: int) -> io.NodeOutput:
        device = comfy.model_management.get_torch_device()
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        zoe = load_zoedepth(find_zoedepth(model), device, dtype)
        depth = zoe.depth(images, batch_size, progress=_progress(len(images)))
        hints = depth_to_hint(depth, per_frame_normalization)
        return io.NodeOutput(hints, ui=ui.PreviewImage(hints, cls=cls))


NODES: list[type[io.ComfyNode]] = [DWPoseEstimator, RenderPose, ZoeDepthEstimator]
