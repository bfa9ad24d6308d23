"""ArcFace identity embeddings from an InsightFace model pack (``antelopev2``, ``buffalo_l``), run with onnxruntime.

A pack is a folder of ONNX files (``models/insightface/models/<pack>/``). Two are used, recognised by their
input/output signature the way InsightFace routes them:

* the face **detector** (SCRFD, e.g. ``det_10g.onnx`` / ``scrfd_10g_bnkps.onnx``): 9 outputs — scores, box distances
  and 5-point landmark offsets for strides 8, 16, 32 with 2 anchors per cell (15 outputs: strides up to 128, one
  anchor); input ``(1, 3, H, W)`` RGB, ``(x − 127.5) / 128``;
* the **recognition** model (ArcFace, e.g. ``w600k_r50.onnx`` / ``glintr100.onnx``): input ``(N, 3, 112, 112)``
  RGB, ``(x − 127.5) / 127.5``, output ``(N, 512)``.

Other files of a pack (landmarks 192×192, gender/age 96×96) are ignored. The face is aligned to the ArcFace
5-point template by a similarity transform. Detection, alignment and recognition are implemented here on
onnxruntime (+ numpy, OpenCV for the warp) rather than through the ``insightface`` package, whose API differs
between releases; the files are the same.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import InputMismatchError, ModelFormatError
from ..io import first_line

log = logging.getLogger(__name__)

# ArcFace 5-point template (eyes, nose, mouth corners) for a 112×112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
DETECTOR_SIZE = 640
PACK_SUBFOLDER = "models"  # InsightFace keeps packs in <root>/models/<pack>
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4


@dataclass
class Face:
    """A detected face in image pixels: ``bbox`` ``(4,)`` x1 y1 x2 y2, ``score``, ``kps`` ``(5, 2)`` landmarks."""

    bbox: np.ndarray
    score: float
    kps: np.ndarray

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


@dataclass
class FaceIdentity:
    """The largest face of an image: ``embedding`` ``(512,)`` L2-normalised ArcFace, ``crop`` ``(S, S, 3)`` float
    RGB in [0, 1] aligned to the ArcFace template (what FaceID-Plus adapters show CLIP), and the detection."""

    embedding: np.ndarray
    crop: np.ndarray
    face: Face


def select_providers(preference: str = "auto") -> list[str]:
    """onnxruntime providers: ``"auto"`` = CUDA when available, else CPU; ``"cpu"``; ``"cuda"`` (error if absent)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    preference = preference.lower()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        raise InputMismatchError(f"the CUDA provider was requested but onnxruntime {onnxruntime.__version__} offers "
                                 f"only {', '.join(available)}; install onnxruntime-gpu (and not onnxruntime) or "
                                 "choose 'auto'")
    return ["CPUExecutionProvider"]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` to ``dst`` points
    (Umeyama 1991); returns the 2×3 affine matrix."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / s.var(0).sum()
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]]).astype(np.float32)


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` ``(H, W, 3)`` so the landmarks ``kps`` land on the ArcFace template scaled to ``size``."""
    import cv2

    ratio = size / 112.0 if size % 112 == 0 else size / 128.0
    template = ARCFACE_TEMPLATE * ratio + (0 if size % 112 == 0 else np.array([8.0 * ratio, 0], np.float32))
    matrix = similarity_transform(kps, template)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        iou = inter / (areas[i] + areas[order[1:]] - inter + 1e-9)
        order = order[1:][iou <= threshold]
    return keep


class FaceAnalyzer:
    """Detector + ArcFace of one pack. ``identity(image, label)`` → :class:`FaceIdentity` of the largest face."""

    def __init__(self, pack_dir: str | os.PathLike, provider: str = "auto"):
        import onnxruntime

        self.pack = Path(pack_dir)
        files = sorted(self.pack.glob("*.onnx"))
        if not files:
            raise ModelFormatError(f"InsightFace pack '{self.pack.name}' has no .onnx files (looked in {self.pack})")
        providers = select_providers(provider)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.detector = self.recognizer = None
        for file in files:
            try:
                session = onnxruntime.InferenceSession(str(file), sess_options=options, providers=providers)
            except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
                raise ModelFormatError(f"InsightFace pack '{self.pack.name}': '{file.name}' is not a readable ONNX "
                                       f"model ({first_line(err)}); download the pack again") from err
            inputs = session.get_inputs()
            shape = inputs[0].shape if inputs else []
            if len(shape) != 4 or isinstance(shape[1], int) and shape[1] != 3:
                continue  # not an (N, 3, H, W) image model: neither of the two we use
            if len(session.get_outputs()) in (9, 15) and self.detector is None:
                self.detector = session
            elif len(inputs) == 1 and shape[2] == shape[3] == 112 and self.recognizer is None:
                self.recognizer = session
        missing = [what for what, s in (("face detector (SCRFD)", self.detector),
                                        ("recognition model (ArcFace, 112×112)", self.recognizer)) if s is None]
        if missing:
            raise ModelFormatError(f"InsightFace pack '{self.pack.name}' lacks a {' and a '.join(missing)} (its "
                                   "models must take (N, 3, H, W) images); use antelopev2 or buffalo_l")
        self.provider = self.detector.get_providers()[0]
        log.info("DreaMoving face ID: onnxruntime %s runs InsightFace pack '%s' on %s", onnxruntime.__version__,
                 self.pack.name, self.provider)

    def _run(self, session, blob: np.ndarray) -> list[np.ndarray]:
        """``session`` on ``blob``; a model that does not take it (wrong input size or type) is a bad pack."""
        try:
            return session.run(None, {session.get_inputs()[0].name: blob})
        except Exception as err:  # onnxruntime raises its own InvalidArgument / Fail types
            raise ModelFormatError(f"InsightFace pack '{self.pack.name}': a model refused its input "
                                   f"{tuple(blob.shape)} ({first_line(err)}); use antelopev2 or "
                                   "buffalo_l") from err

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` ``(H, W, 3)`` uint8 RGB, largest first."""
        import cv2

        fixed = self.detector.get_inputs()[0].shape[2:]
        det_h, det_w = (int(d) for d in fixed) if all(isinstance(d, int) for d in fixed) else (DETECTOR_SIZE,) * 2
        scale = min(det_h / image.shape[0], det_w / image.shape[1])
        resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))))
        canvas = np.zeros((det_h, det_w, 3), np.float32)
        canvas[:resized.shape[0], :resized.shape[1]] = resized
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self._run(self.detector, blob)
        levels = len(outputs) // 3
        strides, anchors = (8, 16, 32, 64, 128)[:levels], 2 if levels == 3 else 1
        boxes, scores, points = [], [], []
        for i, stride in enumerate(strides):
            score, dist, kps = (np.asarray(outputs[i + j * levels]).reshape(-1, n) for j, n in ((0, 1), (1, 4), (2, 10)))
            gh, gw = det_h // stride, det_w // stride
            ys, xs = np.mgrid[:gh, :gw]
            centers = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, anchors, axis=0).astype(np.float32)
            hit = score[:, 0] >= SCORE_THRESHOLD
            c, d, k = centers[hit], dist[hit] * stride, kps[hit].reshape(-1, 5, 2) * stride
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
            points.append(c[:, None] + k)
            scores.append(score[hit, 0])
        boxes, scores, points = (np.concatenate(a) / s for a, s in ((boxes, scale), (scores, 1), (points, scale)))
        faces = [Face(boxes[i], float(scores[i]), points[i]) for i in _nms(boxes, scores, NMS_THRESHOLD)]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def identity(self, image: np.ndarray, label: str, crop_size: int = 224) -> FaceIdentity:
        """ArcFace embedding and aligned crop of the largest face of ``image`` ``(H, W, 3)`` float RGB in [0, 1].

        Raises ``InputMismatchError`` naming ``label`` when no face is found. RGBA loses its alpha, grayscale
        ``(H, W, 1)`` is repeated to RGB."""
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise InputMismatchError(f"{label} must be an (H, W, 3) RGB image, got an array of shape {image.shape}")
        image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        faces = self.detect(pixels)
        if not faces:
            raise InputMismatchError(f"no face found in {label} ({image.shape[1]}×{image.shape[0]} pixels); use a "
                                     "photo where the face is clearly visible and roughly frontal")
        face = faces[0]
        embedding = self.embed(align_face(pixels, face.kps, 112)[None])[0]
        crop = align_face(pixels, face.kps, crop_size).astype(np.float32) / 255.0
        return FaceIdentity(embedding, crop, face)

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """L2-normalised ArcFace embeddings ``(N, 512)`` float32 of faces aligned by :func:`align_face`:
        ``aligned`` ``(N, 112, 112, 3)`` uint8 RGB, run as one batch (one at a time for a fixed-batch model)."""
        blob = ((aligned.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
        step = 1 if self.recognizer.get_inputs()[0].shape[0] == 1 else len(blob)
        out = np.concatenate([self._run(self.recognizer, blob[i:i + step])[0]
                              for i in range(0, len(blob), max(step, 1))])
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _pack_roots(roots: list[str | os.PathLike]) -> list[Path]:
    return [Path(r) / PACK_SUBFOLDER for r in roots] + [Path(r) for r in roots]


def _has_onnx(folder: Path) -> bool:
    return any(folder.glob("*.onnx"))


def find_pack(roots: list[str | os.PathLike], name: str) -> Path:
    """The folder of pack ``name`` under any of ``roots`` (``<root>/models/<name>`` as InsightFace lays it out, or
    ``<root>/<name>``), resolved only inside them (``paths.find``)."""
    found = paths.find(name, _pack_roots(roots), folder=True)
    if found is None or not _has_onnx(found):
        raise InputMismatchError(f"InsightFace pack '{name}' not found; put its .onnx files in "
                                 f"models/insightface/models/{name}/")
    return found


def list_packs(roots: list[str | os.PathLike]) -> list[str]:
    """Names of the pack folders (holding .onnx files) under ``roots``."""
    return paths.list_folders(_pack_roots(roots), _has_onnx)
