"""The one entry point the node, the command and training validation call: :func:`score_video`."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputMismatchError
from ..preprocess.dwpose import to_uint8
from . import identity, paired, pose_fidelity, temporal
from .models import FEATURE_FILES, EvalModels, feature_file_hint
from .networks import CLIP_FRAMES
from .report import ScoreReport

Progress = Callable[[int, int], None]
"""``progress(done, total)``: work units (one per frame and stage) done so far."""


def as_frames(frames, name: str) -> torch.Tensor:
    """``(F, H, W, C)`` float in 0 … 1 or uint8 (tensor or array) → float32 ``(F, H, W, 3)`` on the CPU;
    an ``InputMismatchError`` naming ``name`` for an empty video or another shape."""
    x = torch.as_tensor(frames).detach().cpu()
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise InputMismatchError(f"{name}: expected frames (F, H, W, 3), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise InputMismatchError(f"{name}: the video is empty (shape {tuple(x.shape)})")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return (x.expand(-1, -1, -1, 3) if x.shape[-1] == 1 else x[..., :3]).clamp(0, 1)


class _Ticker:
    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def score_video(frames, *, driving=None, face=None, truth=None, models: EvalModels | None = None,
                progress: Progress | None = None) -> ScoreReport:
    """Every score of a generated video that its inputs and models allow.

    frames: the video, ``(F, H, W, 3)`` in 0 … 1 (a ComfyUI IMAGE batch) or uint8.
    driving: the driving keypoints, one pose per frame (``POSE_KEYPOINT`` = OpenPose dicts, or
    :class:`~dreamoving_core.preprocess.pose.PoseFrame` s) → ``pose/*``.
    face: the reference face, an image ``(H, W, 3)`` / ``(1, H, W, 3)`` or its ArcFace embedding ``(512,)`` →
    ``identity/*``.
    truth: the ground-truth video, same frame count and size → ``paired/*``, ``distribution/*``.
    models: :class:`EvalModels` (default: none loaded, so only flicker and the pixel metrics run).

    Scores whose input is absent, whose model or weights file is missing, or that the video is too short for are
    listed in ``report.unavailable`` with the reason. Raises ``InputMismatchError`` naming the input for an empty
    video, frame counts that differ, frames of another size or a reference image without a face.
    """
    frames = as_frames(frames, "frames")
    count = len(frames)
    if truth is not None:
        truth = as_frames(truth, "truth")
        if len(truth) != count:
            raise InputMismatchError(f"truth: the ground-truth video has {len(truth)} frames, the video has {count}")
        if truth.shape[1:3] != frames.shape[1:3]:
            raise InputMismatchError(f"truth: the ground-truth frames are {truth.shape[2]}×{truth.shape[1]}, the "
                                     f"video's {frames.shape[2]}×{frames.shape[1]}; resize one to the other")
    driving_frames = pose_fidelity.as_pose_frames(driving) if driving is not None else None
    if driving_frames is not None and len(driving_frames) != count:
        raise InputMismatchError(f"driving: the driving keypoints have {len(driving_frames)} frames, the video has "
                                 f"{count}; give one driving pose per frame")
    models = models if models is not None else EvalModels()
    report = ScoreReport(frames=count)
    needs = models.needs

    run_identity = face is not None and models.faces is not None
    run_pose = driving_frames is not None and models.dwpose is not None
    run_clip = models.clip is not None and count > 1
    nets = {s: models.feature_net(s) for s in FEATURE_FILES} if truth is not None else {}
    tick = _Ticker(count * (run_identity + run_pose + run_clip + (truth is not None) + sum(map(bool, nets.values()))),
                   progress)
    pixels = to_uint8(frames) if run_identity or run_pose else None

    if face is None:
        report.unavailable["identity"] = "no reference face given (face)"
    elif not run_identity:
        report.unavailable["identity"] = "needs " + needs["faces"]
    else:
        reference = identity.reference_embedding(models.faces, face, "the face input")
        embeddings, found = identity.frame_embeddings(models.faces, pixels, tick)
        scores, report.per_frame["identity/cosine"], missing = identity.identity_scores(reference, embeddings, found)
        report.scores.update(scores)
        report.unavailable.update(missing)

    if driving_frames is None:
        report.unavailable["pose"] = "no driving keypoints given (driving)"
    elif not run_pose:
        report.unavailable["pose"] = "needs " + needs["dwpose"]
    else:
        start = tick.done
        poses = models.dwpose.video(pixels, models.detect_resolution, progress=lambda i: tick(start + i - tick.done))
        scores, per_frame, missing = pose_fidelity.pose_fidelity(poses, driving_frames)
        report.scores.update(scores)
        report.per_frame.update(per_frame)
        report.unavailable.update(missing)
        report.details["pose"] = f"DWPose at detect_resolution {models.detect_resolution}"

    if count < 2:
        report.unavailable["temporal"] = "needs at least 2 frames"
    else:
        _series(report, "temporal/flicker", temporal.flicker(frames))
        if run_clip:
            _series(report, "temporal/clip_consistency", temporal.clip_consistency(models.clip, frames, tick=tick))
        else:
            report.unavailable["temporal/clip_consistency"] = "needs " + needs["clip"]

    if truth is None:
        report.unavailable["paired"] = report.unavailable["distribution"] = "no ground-truth video given (truth)"
    else:
        _reference_scores(report, frames, truth, nets, models, tick)
    return report


def _series(report: ScoreReport, name: str, values: torch.Tensor) -> None:
    report.per_frame[name] = [float(v) for v in values]
    report.scores[name] = float(values.mean())


def _reference_scores(report: ScoreReport, frames: torch.Tensor, truth: torch.Tensor, nets: dict, models: EvalModels,
                      tick: _Ticker) -> None:
    for name, values in paired.pixel_metrics(frames, truth).items():
        _series(report, name, values)
    tick(len(frames))
    for score, loaded in nets.items():
        if loaded is None:
            report.unavailable[score] = feature_file_hint(score, models.feature_dirs)
            continue
        net, source = loaded
        report.details[score] = source
        if score == "paired/lpips":
            _series(report, score, paired.lpips(net, frames, truth))
        elif score == "distribution/fid" and len(frames) < 2:
            report.unavailable[score] = "needs at least 2 frames"
        elif score != "distribution/fid" and len(frames) <= CLIP_FRAMES:
            report.unavailable[score] = (f"needs at least 2 clips of {CLIP_FRAMES} frames ({CLIP_FRAMES + 1}+ "
                                         f"frames); the video has {len(frames)}")
        else:
            report.scores[score] = paired.frechet_distance(net(frames), net(truth))
        tick(len(frames))

