"""OpenPose-style rendering of poses: the picture the OpenPose ControlNet was trained on.

Body: 17 limbs of the 18-keypoint skeleton drawn as ellipses (half-width 4 px) in 60 % of their colour, then the
joints as radius-4 discs in full colour; hands: 20 bones 2 px wide coloured around the HSV hue circle with blue
joints; face: white radius-3 dots. All on a black RGB canvas, in the order and colours of the ControlNet annotator.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
import torch

from .pose import PoseFrame

# 1-based keypoint pairs, in drawing order (the order fixes which limb wins where two overlap).
LIMB_SEQ = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
    (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
HAND_EDGES = tuple(
    (0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)
)
STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_WIDTH = 2
FACE_RADIUS = 3
HAND_JOINT_COLOR = (0, 0, 255)
FACE_COLOR = (255, 255, 255)
# The annotator skips hand/face points within 0.01 px of the canvas' top or left edge (undetected ones sit at 0).
EDGE_EPS = 0.01


def limb_color(i: int) -> tuple[int, int, int]:
    """Fill colour of body limb ``i``: 60 % of its keypoint colour, truncated like the annotator."""
    return tuple(int(c * 0.6) for c in BODY_COLORS[i])


def hand_edge_color(i: int) -> tuple[float, float, float]:
    """Colour of hand bone ``i`` of 20: hue ``i / 20`` at full saturation and value."""
    return tuple(c * 255.0 for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))


def _draw_body(canvas: np.ndarray, body: np.ndarray) -> None:
    import cv2

    for i, (a, b) in enumerate(LIMB_SEQ):
        p, q = body[a - 1], body[b - 1]
        if p[2] <= 0 or q[2] <= 0:
            continue
        mx, my = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
        length = math.hypot(p[0] - q[0], p[1] - q[1])
        angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
        polygon = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, limb_color(i))
    for (x, y, s), color in zip(body, BODY_COLORS):
        if s > 0:
            cv2.circle(canvas, (int(x), int(y)), JOINT_RADIUS, color, thickness=-1)


def _visible_point(p: np.ndarray) -> tuple[int, int] | None:
    """Integer pixel of a hand/face keypoint, or None when missing or on the top/left edge."""
    x, y = int(p[0]), int(p[1])
    return (x, y) if p[2] > 0 and x > EDGE_EPS and y > EDGE_EPS else None


def _draw_hand(canvas: np.ndarray, hand: np.ndarray) -> None:
    import cv2

    points = [_visible_point(p) for p in hand]
    for i, (a, b) in enumerate(HAND_EDGES):
        if points[a] and points[b]:
            cv2.line(canvas, points[a], points[b], hand_edge_color(i), thickness=HAND_WIDTH)
    for point in points:
        if point:
            cv2.circle(canvas, point, JOINT_RADIUS, HAND_JOINT_COLOR, thickness=-1)


def _draw_face(canvas: np.ndarray, face: np.ndarray) -> None:
    import cv2

    for point in map(_visible_point, face):
        if point:
            cv2.circle(canvas, point, FACE_RADIUS, FACE_COLOR, thickness=-1)


def draw_pose(frame: PoseFrame, height: int | None = None, width: int | None = None, body: bool = True,
              hands: bool = True, face: bool = True) -> np.ndarray:
    """Render one frame's people as an OpenPose picture, ``(H, W, 3)`` uint8 RGB.

    The canvas defaults to the frame's own size; another ``height``/``width`` rescales the keypoints to it (limb
    widths stay in pixels, as in the annotator).
    """
    height, width = height or frame.height, width or frame.width
    if (height, width) != (frame.height, frame.width):
        frame = frame.resized(height, width)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in frame.people:
        if body:
            _draw_body(canvas, person.body)
        if hands:
            _draw_hand(canvas, person.left_hand)
            _draw_hand(canvas, person.right_hand)
        if face:
            _draw_face(canvas, person.face)
    return canvas


def draw_poses(frames: list[PoseFrame], height: int | None = None, width: int | None = None, body: bool = True,
               hands: bool = True, face: bool = True) -> torch.Tensor:
    """Render a sequence as a ComfyUI-style image batch, ``(F, H, W, 3)`` float32 in ``[0, 1]``.

    Every frame is drawn at ``height`` x ``width`` (default: the first frame's canvas) so the batch stacks.
    """
    if not frames:
        raise ValueError("draw_poses needs at least one frame")
    height, width = height or frames[0].height, width or frames[0].width
    images = [draw_pose(f, height, width, body, hands, face) for f in frames]
    return torch.from_numpy(np.stack(images)).float() / 255.0
