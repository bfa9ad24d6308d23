"""Eval node: the scores of a generated video (``dreamoving_core.eval``), its JSON report, its numbers and a plot of
the per-frame curves previewed on the node.

The models come from the pack's loaders (Load InsightFace, Load CLIP Vision / Load CLIP Vision (OpenCLIP)) and the
DWPose files of ``models/dreamoving/preprocess``; the feature networks of the reference-based scores (LPIPS, FID,
FID-VID, FVD) are picked up from ``models/dreamoving/eval`` (folder name ``dreamoving_eval``) when they are there.
"""
from __future__ import annotations

import math
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from dreamoving_core.eval import EvalModels, plot_reports, score_video
from dreamoving_core.preprocess.dwpose import DETECTOR_FILE, ESTIMATOR_FILE, DWPose

from ._common import progress
from ._models import load, session_patcher
from .content_guider import FaceAnalysisType, OpenClipVisionType, image_features
from .preprocess import DWPOSE_FOLDER, PoseKeypoint

CATEGORY = "DreaMoving/Eval"
SCORE_NAME = "DreaMoving Score Video"
EVAL_FOLDER = "dreamoving_eval"
# output name -> score of the report (NaN when it is unavailable)
NUMBERS = {
    "identity": "identity/cosine_mean",
    "pose_error": "pose/body/error",
    "pose_pck": "pose/body/pck_0.1",
    "consistency": "temporal/clip_consistency",
    "flicker": "temporal/flicker",
    "psnr": "paired/psnr",
    "ssim": "paired/ssim",
    "lpips": "paired/lpips",
}
NUMBER_TIPS = {
    "identity": "Mean ArcFace cosine to the reference face (higher is better; NaN when not computed).",
    "pose_error": "Mean body keypoint error in person sizes (lower is better).",
    "pose_pck": "Share of driving body joints found within 0.1 person sizes, PCK@0.1 (higher is better).",
    "consistency": "Mean CLIP cosine of consecutive frames (higher is better).",
    "flicker": "Mean frame-to-frame change of low-pass luminance (lower is better).",
    "psnr": "Mean PSNR to the ground truth in dB (higher is better).",
    "ssim": "Mean SSIM to the ground truth (higher is better).",
    "lpips": "Mean LPIPS to the ground truth (lower is better).",
}


def _models(insightface, clip_vision, detector: str, estimator: str, need_pose: bool,
            detect_resolution: int) -> tuple[EvalModels, list]:
    """The EvalModels of one run and the patchers that hold their onnxruntime sessions in ComfyUI's memory
    management while it runs; the only place this node looks up model files."""
    dwpose, patchers = None, []
    if need_pose:
        dwpose = DWPose(DWPOSE_FOLDER.path(detector, "detector"), DWPOSE_FOLDER.path(estimator, "estimator"))
        patchers.append(session_patcher(dwpose))
    if insightface is not None:
        patchers.append(insightface.patcher)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return image_features(clip_vision, images).image_embeds

    models = EvalModels(faces=None if insightface is None else insightface.analyzer,
                        clip=embed if clip_vision is not None else None, dwpose=dwpose,
                        device=comfy.model_management.get_torch_device(), detect_resolution=detect_resolution,
                        feature_dirs=tuple(Path(p) for p in folder_paths.get_folder_paths(EVAL_FOLDER)))
    models.needs.update(faces="an InsightFace pack: connect Load InsightFace to the insightface input",
                        clip="a CLIP vision model: connect Load CLIP Vision or Load CLIP Vision (OpenCLIP) to the "
                             "clip_vision input")
    return models, patchers


def _dwpose_options(default: str) -> list[str]:
    """The DWPose files, ``default`` listed even when absent: these inputs are used only with ``driving``, so a
    missing file is reported when it is needed, not when the prompt is queued (a plain dropdown, not a
    ``ModelCombo``, for that reason)."""
    return sorted({default, *DWPOSE_FOLDER.names()})


class ScoreVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingScoreVideo",
            display_name=SCORE_NAME,
            category=CATEGORY,
            is_output_node=True,  # runs and shows its plot with nothing connected to its outputs
            description="Scores a generated video: identity (ArcFace cosine to the reference face), pose fidelity "
                        "(DWPose on the frames against the driving keypoints), temporal consistency (CLIP, "
                        "flicker) and, with a ground-truth video, L1 / PSNR / SSIM / LPIPS / FID / FID-VID / FVD. "
                        "Scores whose inputs or models are missing are listed as unavailable in the report.",
            inputs=[
                io.Image.Input("frames", tooltip="The generated video's frames."),
                PoseKeypoint.Input("driving", optional=True,
                                   tooltip="The driving video's keypoints (DWPose Estimator's pose_keypoint), one "
                                           "pose per frame: pose fidelity."),
                io.Image.Input("face", optional=True,
                               tooltip="The reference face photo (its largest face): identity. Needs insightface."),
                io.Image.Input("truth", optional=True,
                               tooltip="The ground-truth video (same frame count and size): L1, PSNR, SSIM, LPIPS, "
                                       "FID, FID-VID, FVD."),
                FaceAnalysisType.Input("insightface", optional=True,
                                       tooltip="Load InsightFace: the face detector and ArcFace of the identity "
                                               "score."),
                io.MultiType.Input("clip_vision", types=[io.ClipVision, OpenClipVisionType], optional=True,
                                   tooltip="A CLIP ViT-H/14 image encoder (Load CLIP Vision or Load CLIP Vision "
                                           "(OpenCLIP)): the consistency score."),
                io.Combo.Input("detector", options=_dwpose_options(DETECTOR_FILE), default=DETECTOR_FILE,
                               tooltip="DWPose's YOLOX person detector (models/dreamoving/preprocess); used when "
                                       "driving is connected."),
                io.Combo.Input("estimator", options=_dwpose_options(ESTIMATOR_FILE), default=ESTIMATOR_FILE,
                               tooltip="DWPose's whole-body estimator (models/dreamoving/preprocess); used when "
                                       "driving is connected."),
                io.Int.Input("detect_resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Shorter side of the frames during pose detection; use the DWPose "
                                     "Estimator's value for the driving video."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Every score, per-frame value and unavailable "
                                                                 "score with its reason, as JSON."),
                io.Image.Output(display_name="plot", tooltip="The per-frame curves: identity, pose error, "
                                                              "consistency."),
                *(io.Float.Output(display_name=name, tooltip=NUMBER_TIPS[name]) for name in NUMBERS),
            ],
        )

    @classmethod
    def execute(cls, frames: torch.Tensor, detector: str, estimator: str, detect_resolution: int,
                driving=None, face: torch.Tensor | None = None, truth: torch.Tensor | None = None,
                insightface=None, clip_vision=None) -> io.NodeOutput:
        models, patchers = _models(insightface, clip_vision, detector, estimator, driving is not None,
                                   detect_resolution)
        load(*patchers)
        report = score_video(frames, driving=driving, face=face, truth=truth, models=models, progress=progress())
        picture = torch.from_numpy(plot_reports([("video", report)]).copy()).float()[None] / 255.0
        numbers = [report.scores.get(score, math.nan) for score in NUMBERS.values()]
        text = report.to_json()
        preview = ui.PreviewImage(picture, cls=cls).as_dict()
        return io.NodeOutput(text, picture, *numbers, ui={**preview, "score_report": [text]})


NODES: list[type[io.ComfyNode]] = [ScoreVideo]
