"""Scores that say whether a DreaMoving video is good: identity (ArcFace), pose fidelity (DWPose against the driving
keypoints), temporal consistency (CLIP, flicker) and, against a ground-truth video, L1 / PSNR / SSIM / LPIPS and the
FID / FID-VID / FVD Fréchet distances.

>>> from dreamoving_core.eval import EvalModels, score_video
>>> models = EvalModels.from_models_dir("ComfyUI/models")           # whatever of the models is there
>>> report = score_video(frames, driving=pose_keypoint, face=face_image, models=models)
>>> report.flat()                                                   # {"identity/cosine_mean": 0.71, ...}

``python -m dreamoving_core.eval score VIDEO ...`` and ``... compare RUN_A RUN_B`` are the command line.
"""
from .models import EvalModels, FEATURE_FILES
from .plot import plot_reports
from .report import SCORES, ScoreInfo, ScoreReport
from .score import score_video
from .validation import ValidationScorer, validation_scorer

__all__ = ["EvalModels", "FEATURE_FILES", "SCORES", "ScoreInfo", "ScoreReport", "ValidationScorer", "plot_reports",
           "score_video", "validation_scorer"]
