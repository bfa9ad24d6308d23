"""Box utilities shared by the two detectors the pack runs: DWPose's person detector (YOLOX) and InsightFace's face
detector (SCRFD)."""
from __future__ import annotations

import numpy as np


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression of ``boxes`` ``(N, 4)`` ``(x1, y1, x2, y2)`` in pixels: indices of the kept
    boxes, best score first.

    Areas count both edge pixels (``x2 - x1 + 1``), the convention of both reference implementations (the DWPose
    annotator of comfyui_controlnet_aux and InsightFace's SCRFD), so both detectors keep exactly the boxes their
    references keep; a box survives while its IoU with every better one is at most ``iou_threshold``.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou_threshold]
    return np.array(keep, dtype=np.int64)
