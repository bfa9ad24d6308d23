"""Tiny pose and depth models in the real file formats, plus a synthetic dance video.

- ``yolox_onnx()``: an ONNX graph with the IO of ``yolox_l.onnx`` (input ``images`` (1, 3, 640, 640), output
  ``output`` (1, 8400, 85): raw box offsets / log sizes, sigmoid objectness and class scores). Its weights are tiny
  and random, but a fixed bias plants person detections at known anchors (``TINY_PEOPLE``), so the pipeline finds
  them whatever the frame.
- ``dwpose_onnx()``: the IO of ``dw-ll_ucoco_384.onnx`` (input ``input`` (1, 3, 384, 288), outputs ``simcc_x``
  (1, 133, 576), ``simcc_y`` (1, 133, 768)). A fixed bias puts a SimCC peak for every COCO-WholeBody keypoint at
  ``TINY_WHOLEBODY`` (coordinates relative to the person box), so decoded keypoints land at known pixels.
- ``zoedepth_dir()``: ``ZoeDepthForDepthEstimation`` from a tiny ``ZoeDepthConfig`` (tiny BEiT backbone, the
  two-domain NYU + KITTI head of Intel/zoedepth-nyu-kitti) saved with ``save_pretrained``, with its processor.
- ``synthetic_dance_video(path)``: a stick figure waving its arms, as an H.264 MP4 (PyAV).

ONNX graphs are exported at build time with ``torch.onnx.export(..., dynamo=False)``: the detector at opset 11 (as
the DWPose files were exported), the estimator at opset 17, so the torch backend (``preprocess.onnx_torch``) is
tested on both forms of ``Split``, ``Squeeze`` and the reductions. Their operator sets are those of the real graphs
(see the two classes), so what the torch backend maps is what the real files need.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from devtools.tiny import cached

DETECTOR_SIZE = (640, 640)
ESTIMATOR_SIZE = (384, 288)  # (h, w)
STRIDES = (8, 16, 32)
NUM_CLASSES = 80
NUM_KEYPOINTS = 133

# (centre x, centre y, width, height, score) on the 640x640 detector input; the first is "the dancer" of the
# synthetic video (a 64x64 frame fills the detector input 10x).
TINY_PEOPLE = ((320.0, 330.0, 220.0, 560.0, 0.9),)
TWO_PEOPLE = ((176.0, 330.0, 200.0, 560.0, 0.9), (480.0, 330.0, 200.0, 560.0, 0.8))


def _wholebody_layout() -> np.ndarray:
    """COCO-WholeBody keypoints ``(133, 2)`` of a standing person, relative to the person's box (0..1)."""
    body = [
        (0.50, 0.08), (0.54, 0.06), (0.46, 0.06), (0.58, 0.07), (0.42, 0.07),  # nose, eyes, ears (left first)
        (0.70, 0.20), (0.30, 0.20), (0.80, 0.35), (0.20, 0.35), (0.85, 0.50), (0.15, 0.50),  # arms
        (0.62, 0.55), (0.38, 0.55), (0.63, 0.75), (0.37, 0.75), (0.64, 0.95), (0.36, 0.95),  # legs
    ]
    feet = [(0.66, 0.98), (0.69, 0.98), (0.63, 0.97), (0.34, 0.98), (0.31, 0.98), (0.37, 0.97)]
    face = [(0.50 + 0.06 * math.cos(2 * math.pi * i / 68), 0.09 + 0.05 * math.sin(2 * math.pi * i / 68))
            for i in range(68)]

    def hand(wrist, side):
        pts = [wrist]
        for f in range(5):
            for j in range(1, 5):
                pts.append((wrist[0] + side * (f - 2) * 0.012 * j, wrist[1] + 0.012 * j))
        return pts

    return np.array(body + feet + face + hand(body[9], 1) + hand(body[10], -1), dtype=np.float32)


TINY_WHOLEBODY = _wholebody_layout()
TINY_KEYPOINT_SCORE = 0.9


def _anchor_index(cx: float, cy: float) -> tuple[int, float, float]:
    """Index of the stride-32 anchor holding centre ``(cx, cy)`` and the offsets that decode to it."""
    s = STRIDES[-1]
    offset = sum((DETECTOR_SIZE[0] // t) * (DETECTOR_SIZE[1] // t) for t in STRIDES[:-1])
    gx, gy = int(cx // s), int(cy // s)
    return offset + gy * (DETECTOR_SIZE[1] // s) + gx, cx / s - gx, cy / s - gy


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU as YOLOX and RTMPose export it: ``Sigmoid`` then ``Mul``."""
    return x * torch.sigmoid(x)


class TinyYolox(nn.Module):
    """YOLOX's graph in miniature (Focus slices, SiLU convolutions, SPP max pools, a nearest-upsampling path, per-level
    reg / obj / cls heads, flattened and transposed), with random tiny weights whose outputs a fixed bias pushes to
    planted detections."""

    def __init__(self, people):
        super().__init__()
        self.stem = nn.Conv2d(12, 8, 3, stride=4, padding=1)  # after Focus (stride 2): stride 8
        self.down16, self.down32 = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.spp = nn.Conv2d(32, 8, 1)
        self.lateral = nn.Conv2d(16, 8, 1)
        self.reg = nn.ModuleList(nn.Conv2d(8, 4, 1) for _ in STRIDES)
        self.obj = nn.ModuleList(nn.Conv2d(8, 1, 1) for _ in STRIDES)
        self.cls = nn.ModuleList(nn.Conv2d(8, NUM_CLASSES, 1) for _ in STRIDES)
        anchors = sum((DETECTOR_SIZE[0] // s) * (DETECTOR_SIZE[1] // s) for s in STRIDES)
        bias = torch.zeros(1, anchors, 5 + NUM_CLASSES)
        bias[..., 4:] = -9.0  # logits: nothing anywhere ...
        for cx, cy, w, h, score in people:  # ... but these people
            i, dx, dy = _anchor_index(cx, cy)
            logit = math.log(math.sqrt(score) / (1 - math.sqrt(score)))  # objectness x class = score
            bias[0, i, :4] = torch.tensor([dx, dy, math.log(w / STRIDES[-1]), math.log(h / STRIDES[-1])])
            bias[0, i, 4], bias[0, i, 5] = logit, logit
        start = 0
        for k, s in enumerate(STRIDES):  # per level as (1, 85, h, w), like the head's outputs
            h, w = DETECTOR_SIZE[0] // s, DETECTOR_SIZE[1] // s
            self.register_buffer(f"bias{k}", bias[:, start:start + h * w].transpose(1, 2).reshape(1, -1, h, w))
            start += h * w

    def forward(self, images):
        focus = torch.cat([images[..., ::2, ::2], images[..., 1::2, ::2], images[..., ::2, 1::2],
                           images[..., 1::2, 1::2]], dim=1)
        p8 = silu(self.stem(focus * 1e-2))
        p16 = silu(self.down16(p8))
        p32 = silu(self.down32(p16))
        p32 = silu(self.spp(torch.cat([p32] + [nn.functional.max_pool2d(p32, k, 1, k // 2) for k in (5, 9, 13)], 1)))
        up = nn.functional.interpolate(p32, scale_factor=2.0, mode="nearest")
        p16 = silu(self.lateral(torch.cat([up, p16], dim=1)))
        outs = []
        for k, p in enumerate((p8, p16, p32)):
            raw = torch.cat([self.reg[k](p), self.obj[k](p), self.cls[k](p)], dim=1) * 1e-3 + getattr(self, f"bias{k}")
            outs.append(torch.cat([raw[:, :4], torch.sigmoid(raw[:, 4:5]), torch.sigmoid(raw[:, 5:])], dim=1))
        return torch.cat([o.flatten(start_dim=2) for o in outs], dim=2).permute(0, 2, 1)


def _crop_coords(box_rel: np.ndarray, box) -> np.ndarray:
    """Estimator-input pixels of box-relative points, for a box ``(cx, cy, w, h)`` cropped like DWPose does."""
    cx, cy, w, h = box
    in_h, in_w = ESTIMATOR_SIZE
    cw, ch = w * 1.25, h * 1.25
    aspect = in_w / in_h
    cw, ch = (cw, cw / aspect) if cw > ch * aspect else (ch * aspect, ch)
    x = cx - w / 2 + box_rel[:, 0] * w
    y = cy - h / 2 + box_rel[:, 1] * h
    return np.stack([(x - cx) / cw * in_w + in_w / 2, (y - cy) / ch * in_h + in_h / 2], axis=1)


class ScaleNorm(nn.Module):
    """RTMPose's ScaleNorm: ``x / max(‖x‖·d^-½, eps) · g`` (exported as ``ReduceL2``, ``Clip``, ``Div``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale, self.g = dim ** -0.5, nn.Parameter(torch.ones(1))

    def forward(self, x):
        norm = torch.linalg.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=1e-5) * self.g


class TinyDWPose(nn.Module):
    """RTMPose's graph in miniature (CSPNeXt-style SiLU and depthwise convolutions with channel attention, the SimCC
    head's 7x7 convolution, ScaleNorm, gated attention unit and x / y classifiers), with random tiny weights whose
    SimCC outputs a fixed bias pushes to planted keypoints."""

    def __init__(self, box, hidden: int = 16, e: int = 32, s: int = 8):
        super().__init__()
        self.e, self.s = e, s
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.depthwise, self.pointwise = nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 8, 3, stride=8, padding=1)  # stride 32 in all
        self.attention = nn.Conv2d(8, 8, 1)
        self.final = nn.Conv2d(8, NUM_KEYPOINTS, 7, padding=3)
        in_h, in_w = ESTIMATOR_SIZE
        flat = (in_h // 32) * (in_w // 32)
        self.mlp_norm, self.mlp = ScaleNorm(flat), nn.Linear(flat, hidden, bias=False)
        self.gau_norm, self.uv = ScaleNorm(hidden), nn.Linear(hidden, 2 * e + s, bias=False)
        self.gamma, self.beta = nn.Parameter(torch.rand(2, s)), nn.Parameter(torch.zeros(2, s))
        self.o = nn.Linear(e, hidden, bias=False)
        self.cls_x, self.cls_y = nn.Linear(hidden, 2 * in_w, bias=False), nn.Linear(hidden, 2 * in_h, bias=False)
        pts = _crop_coords(TINY_WHOLEBODY, box)
        bias_x, bias_y = torch.zeros(1, NUM_KEYPOINTS, 2 * in_w), torch.zeros(1, NUM_KEYPOINTS, 2 * in_h)
        for k, (x, y) in enumerate(pts):
            bias_x[0, k, int(round(x * 2))] = TINY_KEYPOINT_SCORE
            bias_y[0, k, int(round(y * 2))] = TINY_KEYPOINT_SCORE
        self.register_buffer("bias_x", bias_x)
        self.register_buffer("bias_y", bias_y)

    def forward(self, input):
        x = silu(self.stem(input))
        x = x + silu(self.pointwise(self.depthwise(x)))
        x = silu(self.down(x))
        x = x * nn.functional.hardsigmoid(self.attention(nn.functional.adaptive_avg_pool2d(x, 1)))
        feats = self.mlp(self.mlp_norm(torch.flatten(self.final(x), 2)))
        u, v, base = torch.split(silu(self.uv(self.gau_norm(feats))), [self.e, self.e, self.s], dim=2)
        q, k = torch.unbind(base.unsqueeze(2) * self.gamma[None, None] + self.beta, dim=2)
        kernel = torch.square(torch.relu(torch.bmm(q, k.permute(0, 2, 1)) / math.sqrt(self.s)))
        feats = feats + self.o(u * torch.bmm(kernel, v))
        return self.cls_x(feats) * 1e-3 + self.bias_x, self.cls_y(feats) * 1e-3 + self.bias_y


def _export(module: nn.Module, shape, input_name: str, output_names: list[str], path: Path, opset: int = 17) -> None:
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is the one that needs no onnxscript
        torch.onnx.export(module, (torch.rand(*shape) * 255,), str(path), input_names=[input_name],
                          output_names=output_names, dynamo=False, opset_version=opset)


def yolox_onnx(people=TINY_PEOPLE) -> Path:
    """A tiny ``yolox_l.onnx`` (real IO) that detects ``people`` ``(cx, cy, w, h, score)`` on its 640x640 input."""
    tag = "_".join(f"{int(cx)}-{int(cy)}-{int(w)}-{int(h)}-{int(s * 100)}" for cx, cy, w, h, s in people)

    def build(path: Path) -> None:
        torch.manual_seed(0)
        _export(TinyYolox(people), (1, 3, *DETECTOR_SIZE), "images", ["output"], path, opset=11)

    return cached(f"preprocess/v2/yolox_{tag}/yolox_l.onnx", build)


def dwpose_onnx(box=TINY_PEOPLE[0][:4]) -> Path:
    """A tiny ``dw-ll_ucoco_384.onnx`` (real IO) that puts ``TINY_WHOLEBODY`` into a crop of ``box``."""
    tag = "-".join(str(int(v)) for v in box)

    def build(path: Path) -> None:
        torch.manual_seed(0)
        _export(TinyDWPose(box), (1, 3, *ESTIMATOR_SIZE), "input", ["simcc_x", "simcc_y"], path)

    return cached(f"preprocess/v2/dwpose_{tag}/dw-ll_ucoco_384.onnx", build)


def expected_keypoints(person=TINY_PEOPLE[0], frame_size: int = 64) -> np.ndarray:
    """Where the tiny pair puts the COCO-WholeBody keypoints ``(133, 2)`` on a square ``frame_size`` frame."""
    cx, cy, w, h, _ = person
    k = frame_size / DETECTOR_SIZE[0]
    return np.stack([(cx - w / 2 + TINY_WHOLEBODY[:, 0] * w) * k, (cy - h / 2 + TINY_WHOLEBODY[:, 1] * h) * k], 1)


def zoedepth_config(tiny: bool = True):
    """``ZoeDepthConfig`` of Intel/zoedepth-nyu-kitti (BEiT-L/384, NYU + KITTI heads), or a tiny one."""
    from transformers import BeitConfig, ZoeDepthConfig

    bins = [{"name": "nyu", "n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0},
            {"name": "kitti", "n_bins": 64, "min_depth": 1e-3, "max_depth": 80.0}]
    if not tiny:
        backbone = BeitConfig(image_size=384, num_hidden_layers=24, hidden_size=1024, intermediate_size=4096,
                              num_attention_heads=16, use_relative_position_bias=True, reshape_hidden_states=False,
                              out_features=["stage6", "stage12", "stage18", "stage24"])
        return ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[256, 512, 1024, 1024],
                              bin_configurations=bins, num_patch_transformer_layers=4,
                              patch_transformer_hidden_size=128, patch_transformer_intermediate_size=1024,
                              patch_transformer_num_attention_heads=4)
    for b in bins:
        b["n_bins"] = 8
    backbone = BeitConfig(image_size=64, patch_size=16, num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                          num_attention_heads=2, use_relative_position_bias=True, reshape_hidden_states=False,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    # the metric head hard-codes 4 patch-transformer layers and a 128-wide domain classifier
    return ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                          bottleneck_features=16, num_relative_features=8, bin_embedding_dim=16,
                          num_attractors=[4, 2, 2, 1], bin_configurations=bins, num_patch_transformer_layers=4,
                          patch_transformer_hidden_size=128, patch_transformer_intermediate_size=32,
                          patch_transformer_num_attention_heads=2)


def zoedepth_dir() -> Path:
    """A tiny ZoeDepth model folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``)."""

    def build(path: Path) -> None:
        from transformers import ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

        torch.manual_seed(0)
        config = zoedepth_config(tiny=True)
        config.initializer_range = 0.3  # at the usual 0.02 a tiny random ZoeDepth predicts one flat depth
        ZoeDepthForDepthEstimation(config).save_pretrained(path)
        ZoeDepthImageProcessor(size={"height": 64, "width": 64}, ensure_multiple_of=32).save_pretrained(path)

    return cached("preprocess/v3/zoedepth-nyu-kitti", build)


def dance_skeleton(t: float, size: int = 64) -> dict[str, tuple[float, float]]:
    """Joint positions of the synthetic dancer at phase ``t`` (0..1) on a ``size`` square frame."""
    k = size / 64
    sway = math.sin(2 * math.pi * t)
    joints = {"head": (32, 13), "neck": (32, 21), "hip": (32 + 2 * sway, 40)}
    for side, sign in (("l", 1), ("r", -1)):
        angle = math.radians(30 + 60 * (0.5 + 0.5 * sign * sway))  # arms swing in turn
        elbow = (32 + sign * (6 + 9 * math.cos(angle)), 21 + 9 * math.sin(-angle) + 9)
        joints[f"{side}_elbow"] = elbow
        joints[f"{side}_hand"] = (elbow[0] + sign * 7 * math.cos(angle), elbow[1] - 7 * math.sin(angle))
        joints[f"{side}_knee"] = (32 + sign * 5, 50)
        joints[f"{side}_foot"] = (32 + sign * (6 + sway), 60)
    return {name: (x * k, y * k) for name, (x, y) in joints.items()}


def synthetic_dance_frames(frames: int = 16, size: int = 64) -> np.ndarray:
    """``(F, size, size, 3)`` uint8 RGB frames of a stick figure dancing on a gradient floor."""
    import cv2

    out = []
    bones = [("head", "neck"), ("neck", "hip")] + [
        pair for s in "lr" for pair in (("neck", f"{s}_elbow"), (f"{s}_elbow", f"{s}_hand"), ("hip", f"{s}_knee"),
                                        (f"{s}_knee", f"{s}_foot"))]
    for i in range(frames):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = np.linspace(40, 160, size, dtype=np.uint8)[:, None, None] * np.array([0.6, 0.7, 1.0])
        j = dance_skeleton(i / frames, size)
        width = max(1, size // 24)
        for a, b in bones:
            pa, pb = (tuple(int(round(v)) for v in j[n]) for n in (a, b))
            cv2.line(img, pa, pb, (230, 200, 170), width, lineType=cv2.LINE_AA)
        cv2.circle(img, tuple(int(round(v)) for v in j["head"]), max(2, size // 13), (240, 210, 180), -1)
        out.append(img)
    return np.stack(out)


def synthetic_dance_video(path: str | Path, frames: int = 16, size: int = 64, fps: int = 8) -> Path:
    """Write the synthetic dance as an H.264 MP4 (yuv420p) at ``path``; returns the path."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for img in synthetic_dance_frames(frames, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
