"""The Content Guider's face set: images with a detected face, their aligned face crop and ArcFace embedding, and
a crop of the clothed body.

The face is the largest one InsightFace finds (:class:`dreamoving_core.guider.face_id.FaceAnalyzer`); faces whose
box is smaller than ``min_face_size`` pixels on a side are refused (ArcFace sees 112 × 112). The crop is aligned to
the ArcFace template at 224 × 224 (what FaceID-Plus projections show CLIP). The cloth crop is the person box of
DWPose's YOLOX detector that holds the face's centre, from the bottom of the face down: the body and its clothes
without the face, so the cloth branch cannot learn the identity. It is left out when no person box holds the face or
the part below the face is shorter than the face.

Results live beside the image's stem: ``<stem>.face.json`` (the outcome, also when no face was found, so a re-run
does not look again), ``<stem>.face.png``, ``<stem>.arcface.safetensors`` (``embedding``: ``(512,)`` float32,
L2-normalised) and ``<stem>.cloth.png``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputMismatchError
from ..io import save_state_dict
from .store import atomic_path, beside, write_text
from .video import write_image

FACE_CROP = 224


@dataclass(frozen=True)
class FaceFiles:
    """Where the face results of the image ``stem`` go."""

    outcome: Path
    face: Path
    arcface: Path
    cloth: Path

    @classmethod
    def of(cls, stem: Path) -> FaceFiles:
        return cls(beside(stem, ".face.json"), beside(stem, ".face.png"), beside(stem, ".arcface.safetensors"),
                   beside(stem, ".cloth.png"))

    def outcome_or_none(self) -> dict | None:
        """``{"found": bool, "cloth": bool | None (not looked for), ...}`` of an image already analysed, else
        ``None``."""
        return json.loads(self.outcome.read_text(encoding="utf-8")) if self.outcome.is_file() else None


def cloth_box(face_box: np.ndarray, people: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` of the clothed body below ``face_box`` inside the largest of the person boxes
    ``people`` ``(N, 4)`` that holds the face's centre, clipped to the image; ``None`` when there is none."""
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    holding = [b for b in people if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
    if not holding:
        return None
    box = max(holding, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    x1, x2 = int(max(0, box[0])), int(min(width, box[2]))
    y1, y2 = int(max(0, face_box[3])), int(min(height, box[3]))
    if y2 - y1 < face_box[3] - face_box[1] or x2 - x1 < 2:
        return None
    return x1, y1, x2, y2


def analyse_face(stem: Path, image: np.ndarray, label: str, analyzer, dwpose=None, min_face_size: int = 0) -> dict:
    """Find the face of ``image`` ``(H, W, 3)`` uint8 RGB and write its results beside ``stem`` (module
    docstring); the cloth crop only with ``dwpose``. Returns the outcome written to ``<stem>.face.json``."""
    files = FaceFiles.of(stem)
    try:
        identity = analyzer.identity(image.astype(np.float32) / 255.0, label, crop_size=FACE_CROP)
    except InputMismatchError:  # no face
        identity = None
    box = identity.face.bbox if identity is not None else None
    if identity is None or min(box[2] - box[0], box[3] - box[1]) < min_face_size:
        outcome = {"found": False, "cloth": None}
    else:
        write_image(files.face, identity.crop)
        with atomic_path(files.arcface) as tmp:
            save_state_dict({"embedding": torch.from_numpy(identity.embedding)}, tmp)
        body = cloth_box(box, dwpose.detect(image), *image.shape[:2]) if dwpose is not None else None
        if body is not None:
            x1, y1, x2, y2 = body
            write_image(files.cloth, image[y1:y2, x1:x2])
        outcome = {"found": True, "cloth": None if dwpose is None else body is not None,
                   "score": round(float(identity.face.score), 4), "bbox": [round(float(v), 1) for v in box]}
    write_text(files.outcome, json.dumps(outcome) + "\n")
    return outcome
