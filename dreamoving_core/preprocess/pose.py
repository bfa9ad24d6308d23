"""Pose keypoints: the OpenPose layout DreaMoving's pose hints use, and its JSON form (``POSE_KEYPOINT``).

A pose is kept in pixel coordinates of its canvas. Every part is a ``(K, 3)`` float32 array of ``(x, y, score)``
rows; a keypoint with score 0 is missing. Body parts follow OpenPose's 18-keypoint order, hands its 21-keypoint
order, the face the 68 iBUG points plus the two eyes (70, as OpenPose writes them).

The JSON form is the OpenPose output format that comfyui_controlnet_aux passes around as ``POSE_KEYPOINT``: one dict
per frame, ``{"people": [{"pose_keypoints_2d": [x, y, c, ...], "face_keypoints_2d": ..., "hand_left_keypoints_2d":
..., "hand_right_keypoints_2d": ...}], "canvas_height": H, "canvas_width": W}``, coordinates in pixels, ``c`` 1.0
for a detected keypoint and ``[0, 0, 0]`` for a missing one, a part with no keypoint at all written as ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputMismatchError

BODY_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
NUM_BODY, NUM_HAND, NUM_FACE = 18, 21, 70
RIGHT_EYE, LEFT_EYE = 14, 15

# COCO-WholeBody (133 keypoints, DWPose's output): 0-16 body, 17-22 feet, 23-90 face, 91-111 left hand,
# 112-132 right hand. OpenPose body index -> COCO index; the neck (-1) is the shoulders' midpoint.
COCO_TO_OPENPOSE_BODY = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
WHOLEBODY_FACE = slice(23, 91)
WHOLEBODY_LEFT_HAND = slice(91, 112)
WHOLEBODY_RIGHT_HAND = slice(112, 133)

JSON_PARTS = (
    ("body", "pose_keypoints_2d", NUM_BODY),
    ("face", "face_keypoints_2d", NUM_FACE),
    ("left_hand", "hand_left_keypoints_2d", NUM_HAND),
    ("right_hand", "hand_right_keypoints_2d", NUM_HAND),
)


def missing(num: int) -> np.ndarray:
    """A part of ``num`` missing keypoints, ``(num, 3)`` zeros."""
    return np.zeros((num, 3), dtype=np.float32)


@dataclass
class Person:
    """One person's keypoints, ``(K, 3)`` arrays of ``(x, y, score)`` in canvas pixels; score 0 = missing."""

    body: np.ndarray = field(default_factory=lambda: missing(NUM_BODY))
    left_hand: np.ndarray = field(default_factory=lambda: missing(NUM_HAND))
    right_hand: np.ndarray = field(default_factory=lambda: missing(NUM_HAND))
    face: np.ndarray = field(default_factory=lambda: missing(NUM_FACE))

    def parts(self) -> dict[str, np.ndarray]:
        return {"body": self.body, "left_hand": self.left_hand, "right_hand": self.right_hand, "face": self.face}

    def copy(self) -> Person:
        return Person(**{name: part.copy() for name, part in self.parts().items()})

    def scaled(self, sx: float, sy: float) -> Person:
        """The same person with coordinates multiplied by ``(sx, sy)`` (missing keypoints stay at 0)."""
        out = self.copy()
        for part in out.parts().values():
            part[:, 0] *= sx
            part[:, 1] *= sy
        return out


@dataclass
class PoseFrame:
    """The people found in one frame, on a ``height`` x ``width`` canvas."""

    people: list[Person]
    height: int
    width: int

    def resized(self, height: int, width: int) -> PoseFrame:
        """The same poses on a canvas of another size (coordinates rescaled)."""
        sx, sy = width / self.width, height / self.height
        return PoseFrame([p.scaled(sx, sy) for p in self.people], height, width)


def from_wholebody(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int,
                   threshold: float = 0.3) -> PoseFrame:
    """Convert DWPose's COCO-WholeBody output to OpenPose parts.

    keypoints: ``(N, 133, 2)`` pixel coordinates; scores: ``(N, 133)``. Keypoints scoring below ``threshold`` are
    dropped (score 0), as the DWPose annotator does; the neck exists when both shoulders pass the threshold.
    """
    people = []
    for kp, sc in zip(np.asarray(keypoints, np.float32), np.asarray(scores, np.float32)):
        rows = np.concatenate([kp, sc[:, None]], axis=1)
        rows[rows[:, 2] < threshold] = 0.0
        body = missing(NUM_BODY)
        for op, coco in enumerate(COCO_TO_OPENPOSE_BODY):
            if coco >= 0:
                body[op] = rows[coco]
        shoulders = rows[[5, 6]]
        if (shoulders[:, 2] > 0).all():
            body[1] = (*shoulders[:, :2].mean(axis=0), shoulders[:, 2].min())
        face68 = rows[WHOLEBODY_FACE]
        eyes = body[[RIGHT_EYE, LEFT_EYE]] if (face68[:, 2] > 0).any() else missing(2)  # no face, no face eyes
        face = np.concatenate([face68, eyes], axis=0)
        people.append(Person(body, rows[WHOLEBODY_LEFT_HAND].copy(), rows[WHOLEBODY_RIGHT_HAND].copy(), face))
    return PoseFrame(people, int(height), int(width))


def _part_to_json(part: np.ndarray) -> list[float] | None:
    if not (part[:, 2] > 0).any():
        return None
    out: list[float] = []
    for x, y, s in part:
        out += [float(x), float(y), 1.0] if s > 0 else [0.0, 0.0, 0.0]
    return out


def to_openpose_dict(frame: PoseFrame) -> dict:
    """One frame as OpenPose JSON (the ``POSE_KEYPOINT`` element comfyui_controlnet_aux uses)."""
    return {
        "people": [
            {key: _part_to_json(getattr(person, name)) for name, key, _ in JSON_PARTS} for person in frame.people
        ],
        "canvas_height": int(frame.height),
        "canvas_width": int(frame.width),
    }


def _part_from_json(values, num: int, where: str) -> np.ndarray:
    if not values:
        return missing(num)
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size % 3:
        raise InputMismatchError(f"{where}: expected x, y, confidence triples, got {arr.size} numbers")
    rows = arr.reshape(-1, 3).copy()
    rows[rows[:, 2] <= 0] = 0.0
    if len(rows) < num:  # e.g. a 68-point face without the two eye points
        rows = np.concatenate([rows, missing(num - len(rows))])
    return rows


def from_openpose_dict(data: dict) -> PoseFrame:
    """Parse one OpenPose JSON frame. Accepts pixel or normalised (0..1) coordinates, flat or nested lists."""
    try:
        height, width = int(data["canvas_height"]), int(data["canvas_width"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputMismatchError(
            f"POSE_KEYPOINT frame needs 'canvas_height' and 'canvas_width', got keys {sorted(data)}") from err
    people = []
    for i, entry in enumerate(data.get("people") or []):
        people.append(Person(**{
            name: _part_from_json(entry.get(key), num, f"POSE_KEYPOINT person {i} '{key}'")
            for name, key, num in JSON_PARTS
        }))
    present = [part[part[:, 2] > 0, :2] for p in people for part in p.parts().values()]
    coords = np.concatenate(present) if present else np.zeros((0, 2))
    if len(coords) and np.abs(coords).max() <= 1.0:
        people = [p.scaled(width, height) for p in people]
    return PoseFrame(people, height, width)


def to_pose_keypoint(frames: list[PoseFrame]) -> list[dict]:
    """A sequence of frames as ``POSE_KEYPOINT`` (a list with one OpenPose dict per frame)."""
    return [to_openpose_dict(f) for f in frames]


def from_pose_keypoint(data: list[dict] | dict) -> list[PoseFrame]:
    """Parse ``POSE_KEYPOINT`` (a list of OpenPose dicts, or one dict) into frames."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)):
        raise InputMismatchError(f"POSE_KEYPOINT must be a list of OpenPose dicts, got {type(data).__name__}")
    return [from_openpose_dict(d) for d in data]
