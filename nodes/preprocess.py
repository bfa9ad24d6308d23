"""Preprocess nodes: a driving video's frames to DWPose pose hints (+ ``POSE_KEYPOINT``) and ZoeDepth depth hints.

Model files live in ``models/dreamoving/preprocess`` (folder name ``dreamoving_preprocess``): ``yolox_l.onnx`` and
``dw-ll_ucoco_384.onnx`` from huggingface.co/yzd-v/DWPose, and a ZoeDepth folder in the Intel/zoedepth-nyu-kitti
layout. DWPose files comfyui_controlnet_aux already downloaded (``custom_nodes/comfyui_controlnet_aux/ckpts/yzd-v/
DWPose``) are found too. ``POSE_KEYPOINT`` is comfyui_controlnet_aux's type, so its pose nodes connect.

Both models load when their node runs and are gone when it returns (as comfyui_controlnet_aux does), held by
ComfyUI's memory management meanwhile (``_models``): ZoeDepth with ComfyUI's casting layers and dtype, the DWPose
sessions through a patcher whose release closes them.
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
from dreamoving_core.errors import InputMismatchError
from dreamoving_core.preprocess.pose import from_pose_keypoint, to_pose_keypoint
from dreamoving_core.preprocess.render import draw_poses
from dreamoving_core.preprocess.retarget import retarget_poses
from dreamoving_core.preprocess.smoothing import smooth_poses
from dreamoving_core.preprocess.zoedepth import depth_to_hint, load_zoedepth

from ._common import ModelCombo, ModelFolder, custom_type, progress
from ._models import OPS, LibraryModel, load, managed, parameter_count, session_patcher

CATEGORY = "DreaMoving/Preprocess"
DWPOSE_NAME = "DWPose Estimator"
RENDER_NAME = "Render Pose Keypoints"
ZOE_NAME = "ZoeDepth Estimator"
FOLDER = "dreamoving_preprocess"
ZOEDEPTH_DIR = "zoedepth-nyu-kitti"
CONTROLNET_AUX_DWPOSE = os.path.join("comfyui_controlnet_aux", "ckpts", "yzd-v", "DWPose")

PoseKeypoint = custom_type("POSE_KEYPOINT", list)


def _aux_dirs() -> list[str]:
    """comfyui_controlnet_aux's DWPose download folders that exist."""
    dirs = [os.path.join(d, CONTROLNET_AUX_DWPOSE) for d in folder_paths.get_folder_paths("custom_nodes")]
    return [d for d in dirs if os.path.isdir(d)]


DWPOSE_FOLDER = ModelFolder((FOLDER,), "DWPose model",
                            f"DWPose needs '{DETECTOR_FILE}' and '{ESTIMATOR_FILE}' (huggingface.co/yzd-v/DWPose)",
                            suffixes=(".onnx",), extra_roots=_aux_dirs)
ZOEDEPTH_FOLDER = ModelFolder((FOLDER,), "ZoeDepth model folder",
                              "put the files of huggingface.co/Intel/zoedepth-nyu-kitti (config.json, "
                              "model.safetensors, preprocessor_config.json) in a folder there", holds="config.json")


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
            description="Whole-body poses of every person in every frame (YOLOX + DWPose; on a GPU the ONNX files run "
                        "converted to torch, batched over frames, without onnxruntime-gpu; else onnxruntime), "
                        "rendered as OpenPose hints for the Video ControlNet, with temporal smoothing and optional "
                        "retargeting to the reference person's proportions; the frames are previewed on the node.",
            inputs=[
                io.Image.Input("images", tooltip="The driving video's frames (or one image)."),
                ModelCombo("detector", DWPOSE_FOLDER, default=DETECTOR_FILE,
                           tooltip="YOLOX person detector in models/dreamoving/preprocess."),
                ModelCombo("estimator", DWPOSE_FOLDER, default=ESTIMATOR_FILE,
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
    def execute(cls, images: torch.Tensor, detector: str, estimator: str, draw_body: bool, draw_hands: bool,
                draw_face: bool, detect_resolution: int, temporal_smoothing: bool, fps: float,
                reference_image: torch.Tensor | None = None) -> io.NodeOutput:
        model = DWPose(DWPOSE_FOLDER.path(detector, "detector"), DWPOSE_FOLDER.path(estimator, "estimator"))
        sessions = session_patcher(model)  # held while the node runs: ComfyUI only keeps a weak reference
        load(sessions)
        poses = model.video(images, detect_resolution, progress=progress(len(images)))
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
                ModelCombo("model", ZOEDEPTH_FOLDER, default=ZOEDEPTH_DIR,
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
    def execute(cls, images: torch.Tensor, model: str, per_frame_normalization: bool,
                batch_size: int) -> io.NodeOutput:
        hints = depth_to_hint(run_zoedepth(ZOEDEPTH_FOLDER.path(model, "model"), images, batch_size),
                              per_frame_normalization)
        return io.NodeOutput(hints, ui=ui.PreviewImage(hints, cls=cls))


def run_zoedepth(folder: str, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """ZoeDepth depth ``(F, H, W)`` of ``images``, the model loaded by ComfyUI's memory management: fp16 where
    ComfyUI would use it on this device (not with ``--force-fp32``), else fp32."""
    device = comfy.model_management.get_torch_device()
    zoe = load_zoedepth(folder, comfy.model_management.unet_offload_device(), ops=OPS)
    dtype = torch.float16 if comfy.model_management.should_use_fp16(device, parameter_count(zoe.model)) else torch.float32
    zoe.model.to(dtype)
    patcher = managed(LibraryModel(zoe.model), device)  # held while it runs: ComfyUI keeps a weak reference
    load(patcher)
    zoe.device, zoe.dtype = device, dtype
    return zoe.depth(images, batch_size, progress=progress(len(images)))


NODES: list[type[io.ComfyNode]] = [DWPoseEstimator, RenderPose, ZoeDepthEstimator]
