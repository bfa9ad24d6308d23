"""Pose fidelity: does the person move as the driving video does? Our DWPose runs on the generated frames and its
keypoints are compared with the driving keypoints, frame by frame, for the body, the hands and the face apart.

Per frame, the driving video's main person (the most confident body) is compared with the generated person closest
to it. ``s`` = max(w, h) and ``A`` = w·h of the driving person's keypoint box (all parts). For each part, over the
driving joints present: the error is the mean distance / s over joints found in both; PCK@t the share of driving
joints found within t·s; OKS the mean of exp(−d² / (2·A·k²)) with COCO-WholeBody's k = 2σ, a joint not found
counting 0. A frame whose driving video has a person and whose generated frame has none is *lost*: PCK and OKS 0,
no error. Body = the 17 COCO joints (the neck OpenPose derives from the shoulders is left out), hands = both hands'
21 joints, face = the 68 iBUG points. Driving keypoints on another canvas are mapped onto the generated frame as the
Video ControlNet's hints are: scaled to cover it and centre-cropped.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputMismatchError
from ..preprocess.pose import COCO_TO_OPENPOSE_BODY, Person, PoseFrame, from_pose_keypoint
from .report import PARTS, PCK_THRESHOLDS

# COCO-WholeBody's per-keypoint OKS constants σ (github.com/jin-s13/COCO-WholeBody, evaluation/myeval_wholebody.py),
# in its 133-keypoint order: 17 body, 6 feet, 68 face, 21 left hand, 21 right hand.
_BODY_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
                0.087, 0.089, 0.089)
_FACE_SIGMAS = (0.042, 0.043, 0.044, 0.043, 0.040, 0.035, 0.031, 0.025, 0.020, 0.023, 0.029, 0.032, 0.037, 0.038,
                0.043, 0.041, 0.045, 0.013, 0.012, 0.011, 0.011, 0.012, 0.012, 0.011, 0.011, 0.013, 0.015, 0.009,
                0.007, 0.007, 0.007, 0.012, 0.009, 0.008, 0.016, 0.010, 0.017, 0.011, 0.009, 0.011, 0.009, 0.007,
                0.013, 0.008, 0.011, 0.012, 0.010, 0.034, 0.008, 0.008, 0.009, 0.008, 0.008, 0.007, 0.010, 0.008,
                0.009, 0.009, 0.009, 0.007, 0.007, 0.008, 0.011, 0.008, 0.008, 0.008, 0.010, 0.008)
_HAND_SIGMAS = (0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035, 0.018, 0.024, 0.022, 0.026, 0.017,
                0.021, 0.021, 0.032, 0.020, 0.019, 0.022, 0.031)
BODY_JOINTS = tuple(op for op, coco in enumerate(COCO_TO_OPENPOSE_BODY) if coco >= 0)  # OpenPose order, no neck
SIGMAS = {
    "body": np.array([_BODY_SIGMAS[COCO_TO_OPENPOSE_BODY[op]] for op in BODY_JOINTS]),
    "hands": np.array(_HAND_SIGMAS * 2),
    "face": np.array(_FACE_SIGMAS),
}


def part_points(person: Person, part: str) -> np.ndarray:
    """``(K, 3)`` ``(x, y, score)`` rows of ``part`` (``"body"``, ``"hands"``, ``"face"``) in :data:`SIGMAS` order."""
    if part == "body":
        return person.body[list(BODY_JOINTS)]
    if part == "hands":
        return np.concatenate([person.left_hand, person.right_hand])
    return person.face[:68]


def to_canvas(frame: PoseFrame, height: int, width: int) -> PoseFrame:
    """``frame`` mapped onto a ``height`` × ``width`` canvas: scaled to cover it, centre-cropped."""
    if (frame.height, frame.width) == (height, width):
        return frame
    scale = max(height / frame.height, width / frame.width)
    dx, dy = (width - frame.width * scale) / 2, (height - frame.height * scale) / 2
    people = []
    for person in frame.people:
        moved = person.copy()
        for part in moved.parts().values():
            present = part[:, 2] > 0
            part[present, 0] = part[present, 0] * scale + dx
            part[present, 1] = part[present, 1] * scale + dy
        people.append(moved)
    return PoseFrame(people, height, width)


def _present(person: Person) -> np.ndarray:
    rows = np.concatenate([p for p in person.parts().values()])
    return rows[rows[:, 2] > 0, :2]


def main_person(frame: PoseFrame) -> Person | None:
    """The person with the most confident body (ties: the first), ``None`` for a frame without keypoints."""
    people = [p for p in frame.people if len(_present(p)) >= 2]
    return max(people, key=lambda p: float(p.body[:, 2].sum())) if people else None


def closest_person(frame: PoseFrame, target: Person) -> Person | None:
    """The person of ``frame`` whose body joints lie closest to ``target``'s (the most confident when none share a
    joint), ``None`` when the frame has nobody."""
    if not frame.people:
        return None

    def distance(person: Person) -> float:
        both = (person.body[:, 2] > 0) & (target.body[:, 2] > 0)
        return float(np.linalg.norm(person.body[both, :2] - target.body[both, :2], axis=1).mean()) if both.any() \
            else np.inf

    best = min(frame.people, key=distance)
    return best if np.isfinite(distance(best)) else main_person(frame)


def as_pose_frames(driving) -> list[PoseFrame]:
    """``driving``: a list of :class:`PoseFrame`, or ``POSE_KEYPOINT`` (OpenPose dicts)."""
    if isinstance(driving, (list, tuple)) and all(isinstance(f, PoseFrame) for f in driving):
        return list(driving)
    return from_pose_keypoint(driving)


def pose_fidelity(generated: list[PoseFrame], driving: list[PoseFrame]
                  ) -> tuple[dict[str, float], dict[str, list[float | None]], dict[str, str]]:
    """Scores, per-frame errors (``pose/<part>/error``; ``None`` where undefined) and unavailable parts.

    ``generated``, ``driving``: one :class:`PoseFrame` per frame, the same count."""
    if len(generated) != len(driving):
        raise InputMismatchError(f"the driving keypoints have {len(driving)} frames, the video has {len(generated)}; "
                                 "give one driving pose per frame")
    per_part = {part: {"error": [], "pck": {t: [] for t in PCK_THRESHOLDS}, "oks": []} for part in PARTS}
    per_frame: dict[str, list[float | None]] = {f"pose/{part}/error": [] for part in PARTS}
    driven = lost = 0
    for gen_frame, drv_frame in zip(generated, driving):
        drv_frame = to_canvas(drv_frame, gen_frame.height, gen_frame.width)
        target = main_person(drv_frame)
        box = _present(target) if target is not None else np.zeros((0, 2))
        w, h = (box.max(0) - box.min(0)) if len(box) else (0.0, 0.0)
        if max(w, h) <= 0:
            for part in PARTS:
                per_frame[f"pose/{part}/error"].append(None)
            continue
        driven += 1
        match = closest_person(gen_frame, target)
        lost += match is None
        size, area = max(w, h), max(w * h, 1e-6)
        for part in PARTS:
            error = _part_scores(part, target, match, size, area, per_part[part])
            per_frame[f"pose/{part}/error"].append(error)
    scores: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if not driven:
        unavailable["pose"] = "the driving keypoints have no person in any frame"
        return scores, per_frame, unavailable
    scores["pose/lost_frames"] = float(lost)
    scores["pose/lost_share"] = lost / driven
    for part, acc in per_part.items():
        if not acc["oks"]:
            unavailable[f"pose/{part}"] = f"the driving keypoints have no {part} keypoints"
            continue
        if acc["error"]:
            scores[f"pose/{part}/error"] = float(np.mean(acc["error"]))
        else:
            unavailable[f"pose/{part}/error"] = f"no {part} keypoint of the driving video was found in the video"
        for t in PCK_THRESHOLDS:
            scores[f"pose/{part}/pck_{t}"] = float(np.mean(acc["pck"][t]))
        scores[f"pose/{part}/oks"] = float(np.mean(acc["oks"]))
    return scores, per_frame, unavailable


def _part_scores(part: str, target: Person, match: Person | None, size: float, area: float, acc: dict
                 ) -> float | None:
    """Adds one frame's PCK / OKS (and error) of ``part`` to ``acc``; returns the frame's error."""
    drv = part_points(target, part)
    visible = drv[:, 2] > 0
    if not visible.any():
        return None
    gen = part_points(match, part) if match is not None else np.zeros_like(drv)
    found = visible & (gen[:, 2] > 0)
    dist = np.linalg.norm(gen[:, :2] - drv[:, :2], axis=1)
    k = 2 * SIGMAS[part]
    count = visible.sum()
    for t in PCK_THRESHOLDS:
        acc["pck"][t].append(float((found & (dist < t * size)).sum() / count))
    acc["oks"].append(float(np.exp(-dist[found] ** 2 / (2 * area * k[found] ** 2)).sum() / count))
    if not found.any():
        return None
    error = float(dist[found].mean() / size)
    acc["error"].append(error)
    return error
