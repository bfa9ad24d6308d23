"""DWPose: whole-body pose estimation in two ONNX stages, the pose source of DreaMoving's Video ControlNet.

Stage 1, a YOLOX person detector (``yolox_l.onnx``: input ``images`` ``(1, 3, 640, 640)``, output ``output``
``(1, 8400, 85)`` = per anchor ``(dx, dy, log w, log h, objectness, 80 class probabilities)`` before grid decoding).
Stage 2, the DWPose RTMPose estimator (``dw-ll_ucoco_384.onnx``: input ``input`` ``(1, 3, 384, 288)``, outputs
``simcc_x`` ``(1, 133, 576)`` and ``simcc_y`` ``(1, 133, 768)``: SimCC classification over x and y bins at twice the
input resolution) on an affine crop around each person. The pre/post-processing follows the DWPose annotator:
letterbox to the detector size padded with grey 114 (raw 0..255 pixels), candidate score 0.1, NMS IoU 0.45, kept
boxes above 0.3; crops of the box grown by 1.25 at the estimator's aspect ratio, ImageNet mean/std normalisation;
keypoints below 0.3 dropped. Images are RGB, as the annotator feeds both models.

Two backends run the same two files. ``"onnxruntime"``: each ``DWPose`` owns its two sessions
(``dreamoving_core.onnx_sessions``: opened on first use on CUDA when it is available and actually starts, else on the
CPU). ``"torch"``: the graphs converted at load time (``preprocess.onnx_torch``) run on torch's device, every
frame of a chunk in one detector call and every person of the chunk in one estimator call; onnxruntime-gpu is not
needed. ``"auto"`` picks torch where torch has CUDA (its batched GPU path is the fast one; onnxruntime-gpu often
fails to start and falls back to the CPU), else onnxruntime (faster than torch on the CPU). ``release()`` drops
sessions and modules; one log line names the backend and where it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..detection import nms
from ..errors import DreaMovingError, InputMismatchError, ModelFormatError
from ..io import first_line
from ..onnx_sessions import OnnxModel, log, log_providers, open_session
from .onnx_torch import OnnxModule, load_onnx_module
from .pose import PoseFrame, from_wholebody

DETECTOR_FILE = "yolox_l.onnx"
ESTIMATOR_FILE = "dw-ll_ucoco_384.onnx"
PERSON_CLASS = 0
LETTERBOX_FILL = 114
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
LABEL = "DWPose"
BACKENDS = ("auto", "onnxruntime", "torch")
FRAME_CHUNK = 16  # frames per detector call (and their people per estimator call) on the torch backend

onnx_session = open_session  # the name this module published first


@dataclass(frozen=True)
class DWPoseConfig:
    """Thresholds of the two stages (defaults: the DWPose annotator's)."""

    candidate_threshold: float = 0.1  # detector boxes entering NMS
    nms_threshold: float = 0.45  # IoU above which a lower-scored box is suppressed
    box_threshold: float = 0.3  # detector boxes kept after NMS
    box_padding: float = 1.25  # crop = box grown by this factor
    keypoint_threshold: float = 0.3  # keypoints kept
    simcc_split_ratio: float = 2.0  # SimCC bins per input pixel


def _input_hw(shape, default: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of an NCHW input ``shape``; ``default`` for dynamic axes."""
    h, w = shape[2:4] if len(shape) == 4 else (None, None)
    return (h if isinstance(h, int) and h > 0 else default[0], w if isinstance(w, int) and w > 0 else default[1])


def _check_image_input(inputs: list[list], name: str, model: str) -> None:
    """The model must take one ``(N, 3, H, W)`` image, as both DWPose stages do (``inputs``: the input shapes)."""
    shape = inputs[0] if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        found = ", ".join(str(list(s)) for s in inputs)
        raise ModelFormatError(f"'{name}' is not a {model}: expected one image input (1, 3, height, width), "
                               f"found {found}")


def _check_detector(outputs: list[tuple[str, list]], inputs: list[list], name: str) -> None:
    _check_image_input(inputs, name, "YOLOX detector")
    last = outputs[0][1][-1] if len(outputs) == 1 and outputs[0][1] else None
    if len(outputs) != 1 or len(outputs[0][1]) != 3 or (isinstance(last, int) and 0 < last < 6):
        found = ", ".join(f"{o} {shape}" for o, shape in outputs)
        raise ModelFormatError(
            f"'{name}' is not a YOLOX detector: expected one output (1, anchors, 5 + classes), found {found}")


def _check_estimator(outputs: list[tuple[str, list]], inputs: list[list], name: str) -> None:
    _check_image_input(inputs, name, "DWPose estimator")
    if len(outputs) != 2 or any(len(shape) != 3 for _, shape in outputs):
        found = ", ".join(f"{o} {shape}" for o, shape in outputs)
        raise ModelFormatError(
            f"'{name}' is not a DWPose estimator: expected outputs simcc_x and simcc_y, found {found}")


def pick_backend(backend: str, device: str) -> str:
    """The backend ``"auto"`` means on ``device`` (see the module docstring); others as given."""
    if backend not in BACKENDS:
        raise DreaMovingError(f"{LABEL}: backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend != "auto":
        return backend
    return "torch" if device != "cpu" and torch.cuda.is_available() else "onnxruntime"


class _Stage:
    """One of the two graphs on the chosen backend: ``run(batch (N, 3, h, w)) -> {output name: (N, ...)}``."""

    def __init__(self, path: str, device: str, backend: str, check: Callable):
        self.model = OnnxModel(path, device, LABEL)
        self.backend, self.check = backend, check
        self.torch_device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        self._module: OnnxModule | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def is_open(self) -> bool:
        return self._module is not None if self.backend == "torch" else self.model.is_open

    @property
    def where(self) -> str:
        return str(self.torch_device) if self.backend == "torch" else self.model.provider

    @property
    def module(self) -> OnnxModule:
        if self._module is None:
            module = load_onnx_module(self.model.path)
            self.check(list(zip(module.output_names, module.output_shapes)), module.input_shapes, self.name)
            self._module = module.to(self.torch_device)
        return self._module

    @property
    def session(self):
        session = self.model.session
        self.check([(o.name, o.shape) for o in session.get_outputs()], [i.shape for i in session.get_inputs()],
                   self.name)
        return session

    def input_hw(self, default: tuple[int, int]) -> tuple[int, int]:
        if self.backend == "torch":
            return _input_hw(self.module.input_shape, default)
        return _input_hw(self.session.get_inputs()[0].shape, default)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.backend == "torch":
            module = self.module
            with torch.inference_mode():
                outs = module(torch.from_numpy(batch).to(self.torch_device))
            return {n: o.float().cpu().numpy() for n, o in zip(module.output_names, outs)}
        session = self.session
        name = session.get_inputs()[0].name
        rows = [batch[i:i + 1] for i in range(len(batch))] if session.get_inputs()[0].shape[0] == 1 else [batch]
        try:
            outs = [session.run(None, {name: chunk}) for chunk in rows]
        except Exception as err:  # onnxruntime's own InvalidArgument / Fail types
            raise ModelFormatError(f"'{self.name}' refused its input {tuple(batch.shape)} ({first_line(err)}); "
                                   "it is not the DWPose model it is named after") from err
        return {o.name: np.concatenate([out[i] for out in outs]) for i, o in enumerate(session.get_outputs())}

    def release(self) -> None:
        self.model.release()
        self._module = None


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
    """The two-stage whole-body estimator on two ONNX files, on the ``backend`` of the module docstring; sessions or
    converted modules are made on first call, ``release()`` drops them (they come back when next used).

    >>> frame = DWPose("yolox_l.onnx", "dw-ll_ucoco_384.onnx")(rgb_uint8_hw3)   # PoseFrame
    """

    def __init__(self, detector_path: str | os.PathLike, estimator_path: str | os.PathLike, device: str = "auto",
                 config: DWPoseConfig = DWPoseConfig(), backend: str = "auto"):
        self.detector_path, self.estimator_path = os.fspath(detector_path), os.fspath(estimator_path)
        self.device, self.config = device, config
        self.backend = pick_backend(backend, device.lower())
        self.stages = (_Stage(self.detector_path, device, self.backend, _check_detector),
                       _Stage(self.estimator_path, device, self.backend, _check_estimator))
        self.models = tuple(stage.model for stage in self.stages)
        self._logged = False

    def _stage(self, index: int) -> _Stage:
        stage = self.stages[index]
        stage.input_hw((0, 0))  # opens and checks it
        if not self._logged and all(s.is_open for s in self.stages):
            if self.backend == "torch":
                log.info("%s: torch backend on %s (%s converted from ONNX)", LABEL, stage.where,
                         ", ".join(s.name for s in self.stages))
            else:
                log_providers(LABEL, list(self.models))
            self._logged = True
        return stage

    @property
    def detector(self):
        """The detector's onnxruntime session (onnxruntime backend)."""
        return self._stage(0).session

    @property
    def estimator(self):
        """The estimator's onnxruntime session (onnxruntime backend)."""
        return self._stage(1).session

    @property
    def providers(self) -> list[str]:
        """Where the two stages run (detector first): onnxruntime providers, or ``torch:<device>``."""
        return [self._stage(i).where if self.backend == "onnxruntime" else f"torch:{self._stage(i).where}"
                for i in range(2)]

    def release(self) -> None:
        """Close both sessions / drop both converted modules (their memory goes with them); the next call makes
        them again."""
        for stage in self.stages:
            stage.release()
        self._logged = False

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Person boxes ``(N, 4)`` ``(x1, y1, x2, y2)`` in pixels of ``image`` ``(H, W, 3)`` uint8 RGB."""
        return self.detect_frames([image])[0]

    def detect_frames(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """:meth:`detect` of every image, the detector run once on all of them."""
        stage, cfg = self._stage(0), self.config
        size = stage.input_hw((640, 640))
        blobs, ratios = zip(*(letterbox(image, size) for image in images))
        outputs = next(iter(stage.run(np.stack(blobs)).values()))
        found = []
        for output, ratio in zip(outputs, ratios):
            boxes, scores = decode_yolox(output, size)
            boxes = boxes / ratio
            candidate = scores > cfg.candidate_threshold
            boxes, scores = boxes[candidate], scores[candidate]
            keep = nms(boxes, scores, cfg.nms_threshold)
            found.append(boxes[keep[scores[keep] > cfg.box_threshold]])
        return found

    def estimate(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """COCO-WholeBody keypoints of the people in ``boxes`` ``(N, 4)``.

        Returns keypoints ``(N, 133, 2)`` in pixels of ``image`` and scores ``(N, 133)``.
        """
        return self.estimate_frames([image], [boxes])[0]

    def estimate_frames(self, images: list[np.ndarray],
                        boxes: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`estimate` of every image with its boxes, the estimator run once on all their people."""
        import cv2

        stage, cfg = self._stage(1), self.config
        in_h, in_w = stage.input_hw((384, 288))
        crops, centers, sizes = [], [], []
        for image, frame_boxes in zip(images, boxes):
            for box in frame_boxes:
                matrix, center, size = crop_affine(box, (in_w, in_h), cfg.box_padding)
                crop = cv2.warpAffine(image, matrix, (in_w, in_h), flags=cv2.INTER_LINEAR).astype(np.float32)
                crops.append(((crop - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1))
                centers.append(center)
                sizes.append(size)
        counts = [len(b) for b in boxes]
        if not crops:
            return [(np.zeros((0, 133, 2), np.float32), np.zeros((0, 133), np.float32)) for _ in images]
        outs = stage.run(np.stack(crops).astype(np.float32))
        names = list(outs)
        simcc_x = outs.get("simcc_x", outs[names[0]])
        simcc_y = outs.get("simcc_y", outs[names[1]])
        locs, scores = decode_simcc(simcc_x, simcc_y, cfg.simcc_split_ratio)
        sizes_a, centers_a = np.stack(sizes)[:, None], np.stack(centers)[:, None]
        keypoints = (locs / np.array([in_w, in_h]) * sizes_a + centers_a - sizes_a / 2).astype(np.float32)
        bounds = np.cumsum([0, *counts])
        return [(keypoints[a:b], scores[a:b].astype(np.float32)) for a, b in zip(bounds, bounds[1:])]

    def __call__(self, image: np.ndarray, detect_resolution: int = 512) -> PoseFrame:
        """Poses of all people in ``image`` ``(H, W, 3)`` uint8 RGB, in its own pixel coordinates.

        detect_resolution: the image is scaled so its shorter side has this many pixels before both stages
        (0 keeps it as it is).
        """
        return self.frames([image], detect_resolution)[0]

    def frames(self, images: list[np.ndarray], detect_resolution: int = 512) -> list[PoseFrame]:
        """:meth:`__call__` of every image (all of one size), both stages run once for all of them."""
        import cv2

        height, width = images[0].shape[:2]
        work_h, work_w = work_size(height, width, detect_resolution)
        works = images
        if (work_h, work_w) != (height, width):
            interp = cv2.INTER_CUBIC if work_h > height else cv2.INTER_AREA
            works = [cv2.resize(image, (work_w, work_h), interpolation=interp) for image in images]
        found = self.estimate_frames(works, self.detect_frames(works))
        scale = np.array([width / work_w, height / work_h], dtype=np.float32)
        return [from_wholebody(keypoints * scale, scores, height, width, self.config.keypoint_threshold)
                for keypoints, scores in found]

    def video(self, frames: torch.Tensor | np.ndarray, detect_resolution: int = 512,
              progress: Callable[[int], None] | None = None) -> list[PoseFrame]:
        """Poses of every frame of ``frames`` ``(F, H, W, 3)`` (float in 0..1, or uint8); ``progress(i)`` after
        each chunk of frames (one frame at a time on onnxruntime, ``FRAME_CHUNK`` on torch)."""
        images = to_uint8(frames)
        chunk = FRAME_CHUNK if self.backend == "torch" else 1
        out: list[PoseFrame] = []
        for start in range(0, len(images), chunk):
            out += self.frames(list(images[start:start + chunk]), detect_resolution)
            if progress:
                progress(len(out))
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
