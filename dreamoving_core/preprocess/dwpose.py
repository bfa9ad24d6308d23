"""DWPose: whole-body pose estimation in two ONNX stages, the pose source of DreaMoving's Video ControlNet.

Stage 1, a YOLOX person detector (``yolox_l.onnx``: input ``images`` ``(1, 3, 640, 640)``, output ``output``
``(1, 8400, 85)`` = per anchor ``(dx, dy, log w, log h, objectness, 80 class probabilities)`` before grid decoding).
Stage 2, the DWPose RTMPose estimator (``dw-ll_ucoco_384.onnx``: input ``input`` ``(1, 3, 384, 288)``, outputs
``simcc_x`` ``(1, 133, 576)`` and ``simcc_y`` ``(1, 133, 768)``: SimCC classification over x and y bins at twice the
input resolution) on an affine crop around each person. The pre/post-processing follows the DWPose annotator:
letterbox to the detector size padded with grey 114 (raw 0..255 pixels), candidate score 0.1, NMS IoU 0.45, kept
boxes above 0.3; crops of the box grown by 1.25 at the estimator's aspect ratio, ImageNet mean/std normalisation;
keypoints below 0.3 dropped. Images are RGB, as the annotator feeds both models.

onnxruntime is imported and sessions are created on first use only, cached per file, on the CUDA provider when it
is available and actually initialises, else on the CPU; one log line names the provider in use.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InputMismatchError, ModelFormatError
from ..io import first_line
from .pose import PoseFrame, from_wholebody

log = logging.getLogger("dreamoving.dwpose")

DETECTOR_FILE = "yolox_l.onnx"
ESTIMATOR_FILE = "dw-ll_ucoco_384.onnx"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
PERSON_CLASS = 0
LETTERBOX_FILL = 114
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

_sessions: dict[tuple, object] = {}
_logged_providers: set[str] = set()


@dataclass(frozen=True)
class DWPoseConfig:
    """Thresholds of the two stages (defaults: the DWPose annotator's)."""

    candidate_threshold: float = 0.1  # detector boxes entering NMS
    nms_threshold: float = 0.45  # IoU above which a lower-scored box is suppressed
    box_threshold: float = 0.3  # detector boxes kept after NMS
    box_padding: float = 1.25  # crop = box grown by this factor
    keypoint_threshold: float = 0.3  # keypoints kept
    simcc_split_ratio: float = 2.0  # SimCC bins per input pixel


def onnx_session(path: str | os.PathLike, device: str = "auto"):
    """A cached onnxruntime ``InferenceSession`` for ``path``.

    device: ``"auto"`` (CUDA when listed and it initialises, else CPU), ``"cuda"`` (same, but a warning when it
    falls back) or ``"cpu"``. The provider actually used is logged once per process.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFormatError(f"ONNX model '{path}' does not exist")
    key = (os.path.realpath(path), os.path.getmtime(path), device)
    if key in _sessions:
        return _sessions[key]
    import onnxruntime as ort

    want_cuda = device != "cpu" and CUDA in ort.get_available_providers()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. a failed CUDA init) are summarised below
    session = None
    if want_cuda:
        try:
            session = ort.InferenceSession(path, options, providers=[CUDA, CPU])
        except Exception as err:  # a CUDA provider that is listed but cannot start (driver, cuDNN missing)
            log.warning("DWPose: the CUDA provider failed to start (%s); using the CPU", err)
    if session is None:
        try:
            session = ort.InferenceSession(path, options, providers=[CPU])
        except Exception as err:
            raise ModelFormatError(f"'{os.path.basename(path)}' is not a loadable ONNX model ({first_line(err)}); "
                                   "the file may be truncated or corrupt: download it again") from err
    used = session.get_providers()[0]
    if device == "cuda" and used != CUDA:
        log.warning("DWPose: CUDA was requested but onnxruntime runs on %s", used)
    if used not in _logged_providers:
        _logged_providers.add(used)
        log.info("DWPose: onnxruntime runs on %s", used)
    _sessions[key] = session
    return session


def _input_hw(session, default: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the model's NCHW input; ``default`` for dynamic axes."""
    shape = session.get_inputs()[0].shape
    h, w = shape[2:4] if len(shape) == 4 else (None, None)
    return (h if isinstance(h, int) else default[0], w if isinstance(w, int) else default[1])


def _fixed_batch(session) -> bool:
    return session.get_inputs()[0].shape[0] == 1


def _check_image_input(session, name: str, model: str) -> None:
    """The model must take one ``(N, 3, H, W)`` image, as both DWPose stages do."""
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise ModelFormatError(f"'{name}' is not a {model}: expected one image input (1, 3, height, width), "
                               f"found {found}")


def _run(session, name: str, blob: np.ndarray) -> list[np.ndarray]:
    """``session`` on ``blob``; an error of onnxruntime's (a model that does not take the input) names the file."""
    try:
        return session.run(None, {session.get_inputs()[0].name: blob})
    except Exception as err:  # onnxruntime's own InvalidArgument / Fail types
        raise ModelFormatError(f"'{name}' refused its input {tuple(blob.shape)} ({first_line(err)}); "
                               "it is not the DWPose model it is named after") from err


def _check_detector(session, name: str) -> None:
    _check_image_input(session, name, "YOLOX detector")
    outs = session.get_outputs()
    last = outs[0].shape[-1] if len(outs) == 1 else None
    if len(outs) != 1 or len(outs[0].shape) != 3 or (isinstance(last, int) and last < 6):
        found = ", ".join(f"{o.name} {o.shape}" for o in outs)
        raise ModelFormatError(
            f"'{name}' is not a YOLOX detector: expected one output (1, anchors, 5 + classes), found {found}")


def _check_estimator(session, name: str) -> None:
    _check_image_input(session, name, "DWPose estimator")
    outs = session.get_outputs()
    if len(outs) != 2 or any(len(o.shape) != 3 for o in outs):
        found = ", ".join(f"{o.name} {o.shape}" for o in outs)
        raise ModelFormatError(
            f"'{name}' is not a DWPose estimator: expected outputs simcc_x and simcc_y, found {found}")


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize ``image`` ``(H, W, 3)`` uint8 to fit ``size`` = (h, w) keeping its aspect, top-left aligned on grey.

    Returns the detector input ``(3, h, w)`` float32 in 0..255 and the resize ratio.
    """
    import cv2

    h, w = size
    ratio = min(h / image.shape[0], w / image.shape[1])
    nh, nw = int(image.shape[0] * ratio), int(image.shape[1] * ratio)
    canvas = np.full((h, w, 3), LETTERBOX_FILL, dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), ratio


def decode_yolox(output: np.ndarray, size: tuple[int, int], strides: tuple[int, ...] = (8, 16, 32)):
    """Decode raw YOLOX predictions ``(A, 5 + C)`` on a detector input of ``size`` = (h, w).

    Returns boxes ``(A, 4)`` as ``(x1, y1, x2, y2)`` in input pixels and person scores ``(A,)`` = objectness x
    person probability.
    """
    grids, stride_of = [], []
    for s in strides:
        gy, gx = np.meshgrid(np.arange(size[0] // s), np.arange(size[1] // s), indexing="ij")
        grids.append(np.stack([gx, gy], axis=-1).reshape(-1, 2))
        stride_of.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(stride_of)
    if grid.shape[0] != output.shape[0]:
        raise ModelFormatError(
            f"YOLOX output has {output.shape[0]} anchors; a {size[1]}x{size[0]} input with strides {strides} "
            f"gives {grid.shape[0]}")
    centre = (output[:, :2] + grid) * stride
    wh = np.exp(output[:, 2:4]) * stride
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1)
    return boxes, output[:, 4] * output[:, 5 + PERSON_CLASS]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best first. Areas use the +1 pixel convention."""
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


def crop_affine(box: np.ndarray, input_wh: tuple[int, int], padding: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crop of person ``box`` ``(x1, y1, x2, y2)`` for an estimator input ``input_wh`` = (w, h).

    The box is grown by ``padding`` and widened or heightened to the input's aspect ratio. Returns the 2x3 affine
    matrix image -> crop, the crop centre and its size ``(w, h)`` in image pixels.
    """
    center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], dtype=np.float64)
    w, h = (box[2] - box[0]) * padding, (box[3] - box[1]) * padding
    aspect = input_wh[0] / input_wh[1]
    w, h = (w, w / aspect) if w > h * aspect else (h * aspect, h)
    s = input_wh[0] / w
    matrix = np.array([[s, 0, input_wh[0] / 2 - s * center[0]], [0, s, input_wh[1] / 2 - s * center[1]]])
    return matrix, center, np.array([w, h])


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = 2.0):
    """SimCC decoding: argmax of each axis' bins.

    simcc_x: ``(N, K, Wx)``; simcc_y: ``(N, K, Wy)``. Returns locations ``(N, K, 2)`` in input pixels (bin /
    ``split_ratio``; -1 where the score is not positive) and scores ``(N, K)`` = the lower of the two maxima.
    """
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], axis=-1).astype(np.float32) / split_ratio
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locs[scores <= 0] = -1
    return locs, scores


class DWPose:
    """The two-stage whole-body estimator on two ONNX files; sessions open on first call.

    >>> frame = DWPose("yolox_l.onnx", "dw-ll_ucoco_384.onnx")(rgb_uint8_hw3)   # PoseFrame
    """

    def __init__(self, detector_path: str | os.PathLike, estimator_path: str | os.PathLike, device: str = "auto",
                 config: DWPoseConfig = DWPoseConfig()):
        self.detector_path, self.estimator_path = os.fspath(detector_path), os.fspath(estimator_path)
        self.device, self.config = device, config

    @property
    def detector(self):
        session = onnx_session(self.detector_path, self.device)
        _check_detector(session, os.path.basename(self.detector_path))
        return session

    @property
    def estimator(self):
        session = onnx_session(self.estimator_path, self.device)
        _check_estimator(session, os.path.basename(self.estimator_path))
        return session

    @property
    def providers(self) -> list[str]:
        """Providers the two sessions run on (detector first)."""
        return [self.detector.get_providers()[0], self.estimator.get_providers()[0]]

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Person boxes ``(N, 4)`` ``(x1, y1, x2, y2)`` in pixels of ``image`` ``(H, W, 3)`` uint8 RGB."""
        session, cfg = self.detector, self.config
        size = _input_hw(session, (640, 640))
        blob, ratio = letterbox(image, size)
        output = _run(session, os.path.basename(self.detector_path), blob[None])[0][0]
        boxes, scores = decode_yolox(output, size)
        boxes = boxes / ratio
        candidate = scores > cfg.candidate_threshold
        boxes, scores = boxes[candidate], scores[candidate]
        keep = nms(boxes, scores, cfg.nms_threshold)
        keep = keep[scores[keep] > cfg.box_threshold]
        return boxes[keep]

    def estimate(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """COCO-WholeBody keypoints of the people in ``boxes`` ``(N, 4)``.

        Returns keypoints ``(N, 133, 2)`` in pixels of ``image`` and scores ``(N, 133)``.
        """
        import cv2

        session, cfg = self.estimator, self.config
        in_h, in_w = _input_hw(session, (384, 288))
        crops, centers, sizes = [], [], []
        for box in boxes:
            matrix, center, size = crop_affine(box, (in_w, in_h), cfg.box_padding)
            crop = cv2.warpAffine(image, matrix, (in_w, in_h), flags=cv2.INTER_LINEAR).astype(np.float32)
            crops.append(((crop - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1))
            centers.append(center)
            sizes.append(size)
        if not crops:
            return np.zeros((0, 133, 2), np.float32), np.zeros((0, 133), np.float32)
        batch = np.stack(crops).astype(np.float32)
        name = os.path.basename(self.estimator_path)
        chunks = [batch[i:i + 1] for i in range(len(batch))] if _fixed_batch(session) else [batch]
        outs = [_run(session, name, chunk) for chunk in chunks]
        by_name = {o.name: i for i, o in enumerate(session.get_outputs())}
        ix, iy = by_name.get("simcc_x", 0), by_name.get("simcc_y", 1)
        simcc_x = np.concatenate([o[ix] for o in outs])
        simcc_y = np.concatenate([o[iy] for o in outs])
        locs, scores = decode_simcc(simcc_x, simcc_y, cfg.simcc_split_ratio)
        sizes_a, centers_a = np.stack(sizes)[:, None], np.stack(centers)[:, None]
        keypoints = locs / np.array([in_w, in_h]) * sizes_a + centers_a - sizes_a / 2
        return keypoints.astype(np.float32), scores.astype(np.float32)

    def __call__(self, image: np.ndarray, detect_resolution: int = 512) -> PoseFrame:
        """Poses of all people in ``image`` ``(H, W, 3)`` uint8 RGB, in its own pixel coordinates.

        detect_resolution: the image is scaled so its shorter side has this many pixels before both stages
        (0 keeps it as it is).
        """
        import cv2

        height, width = image.shape[:2]
        work_h, work_w = work_size(height, width, detect_resolution)
        work = image
        if (work_h, work_w) != (height, width):
            interp = cv2.INTER_CUBIC if work_h > height else cv2.INTER_AREA
            work = cv2.resize(image, (work_w, work_h), interpolation=interp)
        boxes = self.detect(work)
        keypoints, scores = self.estimate(work, boxes)
        keypoints = keypoints * np.array([width / work.shape[1], height / work.shape[0]], dtype=np.float32)
        return from_wholebody(keypoints, scores, height, width, self.config.keypoint_threshold)

    def video(self, frames: torch.Tensor | np.ndarray, detect_resolution: int = 512,
              progress: Callable[[int], None] | None = None) -> list[PoseFrame]:
        """Poses of every frame of ``frames`` ``(F, H, W, 3)`` (float in 0..1, or uint8); ``progress(i)`` after
        each frame."""
        images = to_uint8(frames)
        out = []
        for i, image in enumerate(images):
            out.append(self(image, detect_resolution))
            if progress:
                progress(i + 1)
        return out


def work_size(height: int, width: int, detect_resolution: int) -> tuple[int, int]:
    """``(h, w)`` of a frame scaled so its shorter side is ``detect_resolution`` (0: unchanged)."""
    if detect_resolution <= 0:
        return height, width
    k = detect_resolution / min(height, width)
    return round(height * k), round(width * k)


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F, H, W, C)`` float 0..1 (ComfyUI IMAGE) or uint8 -> uint8 RGB ``(F, H, W, 3)``."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else (frames.float().clamp(0, 1) * 255).round().byte().numpy()
    elif frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if frames.ndim != 4:
        raise InputMismatchError(f"expected frames (F, H, W, C), got shape {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])
