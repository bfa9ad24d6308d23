"""The feature networks of the reference-based scores, loaded from the weight files their protocols use.

* LPIPS: torchmetrics' LPIPS (its bundled linear layers) on a torchvision VGG-16 or AlexNet backbone read from
  ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth`` (torchvision's ImageNet files; only ``features.*`` is used).
* FID: the TF FID Inception-v3 (torchvision's layers, the FID graph's pooling) with
  ``pt_inception-2015-12-05-6726825d.pth`` as pytorch-fid uses it: bilinear resize to 299², 2048-d pool features.
* FVD: I3D (Carreira & Zisserman 2017, Kinetics-400) with ``i3d_pretrained_400.pt`` (the piergiaj/pytorch-i3d
  layout DisCo and VideoGPT use): 16-frame clips at 224², pixels in −1 … 1, the 400 logits averaged over time.
* FID-VID: 3D ResNet-50 (Hara et al. 2018, Kinetics, shortcut B) with ``resnet-50-kinetics.pth``: 16-frame clips at
  112², raw 0 … 255 pixels minus the Kinetics mean, 2048-d pooled features (DisCo's FID-VID).

Every file is read with :func:`dreamoving_core.io.load_state_dict` (safetensors, or ``torch.load(weights_only=True)``).
The I3D and 3D ResNet widths and block counts are read from the file, so any file in those layouts loads.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ModelFormatError
from ..io import load_state_dict

CLIP_FRAMES = 16
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)  # 3D ResNet's training mean, 0 … 255 RGB


def _load(path: str | os.PathLike, what: str, required: str) -> dict[str, torch.Tensor]:
    """The weights of ``path`` with a ``module.`` (DataParallel) prefix removed; ``required`` must be a key."""
    weights = {k.removeprefix("module."): v.float() for k, v in load_state_dict(path).items()}
    if required not in weights:
        raise ModelFormatError(f"'{Path(path).name}' is not {what} (no '{required}' weights)")
    return weights


def _fill(module: nn.Module, weights: dict[str, torch.Tensor], path, what: str) -> nn.Module:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ModelFormatError(f"'{Path(path).name}' does not fit {what} ({str(err).splitlines()[0]})") from err
    return module.eval().requires_grad_(False)


def clips(frames: torch.Tensor, length: int = CLIP_FRAMES) -> torch.Tensor:
    """``frames`` ``(F, H, W, 3)`` → non-overlapping clips ``(N, 3, length, H, W)``, N = ⌈F / length⌉; the last clip
    is filled up by repeating the last frame (as DisCo does)."""
    missing = -len(frames) % length
    if missing:
        frames = torch.cat([frames, frames[-1:].expand(missing, -1, -1, -1)])
    return rearrange(frames, "(n t) h w c -> n c t h w", t=length)


def _resize_clips(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, T, H, W)`` → ``(N, C, T, size, size)``, bicubic with antialiasing (the aspect ratio is not kept)."""
    n = x.shape[0]
    flat = F.interpolate(rearrange(x, "n c t h w -> (n t) c h w"), size=(size, size), mode="bicubic",
                         antialias=True)
    return rearrange(flat, "(n t) c h w -> n c t h w", n=n)


# -------------------------------------------------------------------------------------------------------- LPIPS


LPIPS_BACKBONES = {"vgg": "VGG-16", "alex": "AlexNet"}


class Lpips(nn.Module):
    """LPIPS distance; ``net``: ``"vgg"`` or ``"alex"``."""

    def __init__(self, model: nn.Module, net: str):
        super().__init__()
        self.model, self.net = model, net

    @classmethod
    def from_file(cls, path: str | os.PathLike, net: str) -> Lpips:
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        weights = _load(path, f"a torchvision {LPIPS_BACKBONES[net]}", "features.0.weight")
        # pretrained: the LPIPS linear layers torchmetrics ships; pnet_rand: an empty backbone, filled from the file
        model = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
        backbone = {f"{name}.{idx}.{param}": weights[f"features.{idx}.{param}"]
                    for name, part in model.net.named_children() for idx, layer in part.named_children()
                    for param, _ in layer.named_parameters()
                    if f"features.{idx}.{param}" in weights}
        _fill(model.net, backbone, path, f"LPIPS' {LPIPS_BACKBONES[net]}")
        return cls(model, net)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``, ``y``: ``(N, H, W, 3)`` in 0 … 1 → ``(N,)`` distances."""
        device = next(self.model.parameters()).device
        x, y = (t.movedim(-1, 1).to(device, torch.float32) for t in (x, y))
        return self.model(x, y, normalize=True).flatten().cpu()


# ---------------------------------------------------------------------------------------------------------- FID


# The TF FID graph differs from torchvision's Inception-v3 only in the pooling branch of its A, C and E blocks
# (average pooling that leaves the padding out; max pooling in the last block), as pytorch-fid's FIDInception*
# blocks have it. Each branch is a chain of layers; a tuple is a fork whose outputs are concatenated.
_BRANCHES_A = (("branch1x1",), ("branch5x5_1", "branch5x5_2"), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"))
_BRANCHES_C = (("branch1x1",), ("branch7x7_1", "branch7x7_2", "branch7x7_3"),
               tuple(f"branch7x7dbl_{i}" for i in range(1, 6)))
_BRANCHES_E = (("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
               ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")))
FID_BLOCKS = {
    **{name: (_BRANCHES_A, "avg") for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d")}, "Mixed_6a": None,
    **{name: (_BRANCHES_C, "avg") for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")}, "Mixed_7a": None,
    "Mixed_7b": (_BRANCHES_E, "avg"), "Mixed_7c": (_BRANCHES_E, "max"),
}
FID_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2")


def _fid_block(block: nn.Module, x: torch.Tensor, branches, pool: str) -> torch.Tensor:
    outs = []
    for chain in branches:
        y = x
        for step in chain:
            fork = isinstance(step, tuple)
            y = torch.cat([getattr(block, s)(y) for s in step], 1) if fork else getattr(block, step)(y)
        outs.append(y)
    pooled = F.max_pool2d(x, 3, 1, 1) if pool == "max" else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return torch.cat(outs + [block.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 (pytorch-fid's protocol): ``(N, H, W, 3)`` in 0 … 1, resized to 299² (bilinear) →
    ``(N, 2048)`` pool features."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> InceptionFeatures:
        import torchvision

        weights = _load(path, "the FID Inception-v3", "Mixed_7c.branch_pool.conv.weight")
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                              num_classes=weights.get("fc.weight", torch.zeros(1008)).shape[0])
        return cls(_fill(net, weights, path, "the FID Inception-v3"))

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
        device = next(self.net.parameters()).device
        out = []
        for chunk in frames.split(batch):
            x = chunk.movedim(-1, 1).to(device, torch.float32).clamp(0, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
            for name in FID_STEM:
                x = getattr(self.net, name)(x)
            for name, spec in FID_BLOCKS.items():
                block = getattr(self.net, name)
                x = block(x) if spec is None else _fid_block(block, x, *spec)
            out.append(x.mean(dim=(2, 3)).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------- I3D


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """TensorFlow "SAME" zero padding of ``x`` ``(N, C, T, H, W)`` for a window ``kernel`` moving by ``stride``."""
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """I3D's unit: Conv3d with "SAME" padding, BatchNorm (eps 1e-3), ReLU; the logits unit has a bias instead."""

    def __init__(self, weight_shape, stride=(1, 1, 1), logits: bool = False):
        super().__init__()
        out_ch, in_ch, *kernel = weight_shape
        self.conv3d = nn.Conv3d(in_ch, out_ch, kernel, stride, bias=logits)
        self.bn = None if logits else nn.BatchNorm3d(out_ch, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.conv3d.kernel_size, self.conv3d.stride))
        return x if self.bn is None else F.relu(self.bn(x))


class MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock3D(nn.Module):
    """Four branches: 1×1; 1×1 → 3×3; 1×1 → 3×3; 3×3 max-pool → 1×1; concatenated over channels."""

    BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")

    def __init__(self, shapes: dict[str, torch.Size]):
        super().__init__()
        for name in self.BRANCHES:
            setattr(self, name, Unit3D(shapes[name]))
        self.pool = MaxPoolSame((3, 3, 3), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.pool(x))], dim=1)


POOL, MIXED = "pool", "mixed"
# (endpoint, kind, stride of a unit / (kernel, stride) of a pool), in order.
I3D_LAYOUT = (
    ("Conv3d_1a_7x7", "unit", (2, 2, 2)), ("MaxPool3d_2a_3x3", POOL, ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "unit", (1, 1, 1)), ("Conv3d_2c_3x3", "unit", (1, 1, 1)),
    ("MaxPool3d_3a_3x3", POOL, ((1, 3, 3), (1, 2, 2))), ("Mixed_3b", MIXED, None), ("Mixed_3c", MIXED, None),
    ("MaxPool3d_4a_3x3", POOL, ((3, 3, 3), (2, 2, 2))),
    *((f"Mixed_4{c}", MIXED, None) for c in "bcdef"),
    ("MaxPool3d_5a_2x2", POOL, ((2, 2, 2), (2, 2, 2))), ("Mixed_5b", MIXED, None), ("Mixed_5c", MIXED, None),
)


class I3D(nn.Module):
    """Inception-v1 I3D: ``(N, 3, T, 224, 224)`` in −1 … 1 → logits ``(N, classes)`` averaged over time."""

    def __init__(self, shapes: dict[str, torch.Size]):
        super().__init__()
        self.endpoints = []
        for name, kind, spec in I3D_LAYOUT:
            if kind == POOL:
                layer = MaxPoolSame(*spec)
            elif kind == MIXED:
                layer = InceptionBlock3D({b: shapes[f"{name}.{b}.conv3d.weight"] for b in InceptionBlock3D.BRANCHES})
            else:
                layer = Unit3D(shapes[f"{name}.conv3d.weight"], spec)
            self.add_module(name, layer)
            self.endpoints.append(name)
        self.logits = Unit3D(shapes["logits.conv3d.weight"], logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.endpoints:
            x = getattr(self, name)(x)
        x = x.mean(dim=(3, 4), keepdim=True)  # I3D's 1×7×7 average pool at 224²
        return self.logits(x).flatten(2).mean(dim=2)


class VideoFeatures(nn.Module):
    """A clip network with its input protocol: ``(F, H, W, 3)`` frames in 0 … 1 → one feature row per 16-frame
    clip ``(⌈F / 16⌉, num_features)``."""

    def __init__(self, net: nn.Module, size: int, scale: float, offset: tuple[float, float, float],
                 num_features: int):
        super().__init__()
        self.net, self.size, self.scale, self.num_features = net, size, scale, num_features
        self.register_buffer("offset", torch.tensor(offset).view(1, 3, 1, 1, 1), persistent=False)

    @classmethod
    def i3d(cls, path: str | os.PathLike) -> VideoFeatures:
        weights = _load(path, "an I3D network (i3d_pretrained_400.pt layout)", "Mixed_5c.b3b.conv3d.weight")
        try:
            net = I3D({k: v.shape for k, v in weights.items()})
        except KeyError as err:
            raise ModelFormatError(f"'{Path(path).name}': I3D weights are incomplete (missing {err})") from err
        classes = weights["logits.conv3d.weight"].shape[0]
        return cls(_fill(net, weights, path, "I3D"), 224, 2.0, (1.0, 1.0, 1.0), classes)

    @classmethod
    def resnet3d(cls, path: str | os.PathLike) -> VideoFeatures:
        weights = _load(path, "a 3D ResNet (resnet-50-kinetics.pth layout)", "layer4.0.conv1.weight")
        try:
            net = ResNet3D({k: v.shape for k, v in weights.items()})
        except KeyError as err:
            raise ModelFormatError(f"'{Path(path).name}': 3D ResNet weights are incomplete (missing {err})") from err
        weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
        return cls(_fill(net, weights, path, "a 3D ResNet"), 112, 255.0, KINETICS_MEAN, net.num_features)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, batch: int = 4) -> torch.Tensor:
        device = self.offset.device
        out = []
        for chunk in clips(frames.float()).split(batch):
            x = _resize_clips(chunk.to(device), self.size).clamp(0, 1) * self.scale - self.offset
            out.append(self.net(x).float().cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------- 3D ResNet


class Bottleneck3D(nn.Module):
    """1×1×1 → 3×3×3 (stride) → 1×1×1 with a 1×1×1 convolution shortcut where the shape changes (type B)."""

    def __init__(self, shapes: dict[str, torch.Size], prefix: str, stride: int):
        super().__init__()
        for i, (k, s) in enumerate(((1, 1), (3, stride), (1, 1)), 1):
            out_ch, in_ch = shapes[f"{prefix}conv{i}.weight"][:2]
            setattr(self, f"conv{i}", nn.Conv3d(in_ch, out_ch, k, s, padding=k // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm3d(out_ch))
        self.downsample = None
        if f"{prefix}downsample.0.weight" in shapes:
            out_ch, in_ch = shapes[f"{prefix}downsample.0.weight"][:2]
            self.downsample = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm3d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet3D(nn.Module):
    """Hara et al.'s 3D ResNet: ``(N, 3, 16, 112, 112)`` → pooled features ``(N, C)`` (the classifier unused)."""

    def __init__(self, shapes: dict[str, torch.Size]):
        super().__init__()
        out_ch, in_ch, *kernel = shapes["conv1.weight"]
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, (1, 2, 2), padding=[k // 2 for k in kernel], bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        for layer in range(1, 5):
            blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith(f"layer{layer}.")})
            if not blocks:
                raise KeyError(f"layer{layer}.0.conv1.weight")
            self.add_module(f"layer{layer}", nn.Sequential(*(
                Bottleneck3D(shapes, f"layer{layer}.{b}.", 2 if layer > 1 and b == 0 else 1) for b in blocks)))
        self.num_features = shapes[f"layer4.{blocks[-1]}.conv3.weight"][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))  # the 1×4×4 average pool at 16 × 112²
