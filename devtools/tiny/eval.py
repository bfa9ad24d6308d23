"""Tiny models for the score tests, random weights in the real file formats.

- ``following_yolox_onnx()``: a ``yolox_l.onnx`` (real IO) whose one person box (the size of ``TINY_PEOPLE[0]``) is
  centred on the bright pixels (mean RGB above 178) of its input, and absent when there are none. With the tiny
  DWPose estimator, whose keypoints sit at fixed places in the person's crop, the keypoints follow the dancer:
  frames shifted by k pixels give keypoints shifted by k pixels, a dark frame gives no person.
- Feature networks of ``models/dreamoving/eval`` under their real names: ``alexnet-owt-7be5be79.pth`` (torchvision
  AlexNet ``features.*``, real widths: LPIPS' linear layers need them), ``pt_inception-2015-12-05-6726825d.pth`` (the
  FID Inception-v3 state dict at full size: its architecture is fixed), ``i3d_pretrained_400.pt`` (I3D keys at 1/8
  of the widths) and ``resnet-50-kinetics.pth`` (a 3D-ResNets-PyTorch training checkpoint: ``{"epoch", "arch",
  "state_dict": {"module.…"}, "optimizer"}``, bottlenecks at 1/16 of the widths). Convolutions get He-normal
  weights so activations neither vanish nor explode through the random layers.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from devtools.tiny import cached
from devtools.tiny.preprocess import DETECTOR_SIZE, NUM_CLASSES, STRIDES, TINY_PEOPLE, _anchor_index, _export

BRIGHT = 178.0  # mean RGB (0..255) above which a detector pixel counts as "the dancer"


class FollowingYolox(nn.Module):
    """One person box centred on the input's bright pixels, at the stride-32 anchor of ``TINY_PEOPLE[0]``."""

    def __init__(self, person=TINY_PEOPLE[0]):
        super().__init__()
        cx, cy, w, h, score = person
        anchors = sum((DETECTOR_SIZE[0] // s) * (DETECTOR_SIZE[1] // s) for s in STRIDES)
        index, _, _ = _anchor_index(cx, cy)
        s = STRIDES[-1]
        self.grid = (int(cx // s), int(cy // s))
        self.size = (math.log(w / s), math.log(h / s))
        self.logit = math.log(math.sqrt(score) / (1 - math.sqrt(score)))  # objectness x class = score
        bias = torch.zeros(1, anchors, 5 + NUM_CLASSES)
        bias[..., 4:] = -9.0
        onehot = torch.zeros(1, anchors, 1)
        onehot[0, index] = 1.0
        self.register_buffer("bias", bias)
        self.register_buffer("onehot", onehot)
        self.register_buffer("xs", torch.arange(DETECTOR_SIZE[1], dtype=torch.float32))
        self.register_buffer("ys", torch.arange(DETECTOR_SIZE[0], dtype=torch.float32))

    def forward(self, images):
        weight = torch.relu(images.mean(dim=1)[0] - BRIGHT)  # (H, W)
        mass = weight.sum()
        cx = (weight.sum(0) * self.xs).sum() / (mass + 1e-6)
        cy = (weight.sum(1) * self.ys).sum() / (mass + 1e-6)
        present = torch.clamp(mass / 100.0, 0.0, 1.0)
        logit = -9.0 + (self.logit + 9.0) * present
        s = STRIDES[-1]
        head = torch.stack([cx / s - self.grid[0], cy / s - self.grid[1], torch.full_like(logit, self.size[0]),
                            torch.full_like(logit, self.size[1]), logit, logit])
        values = torch.cat([head, torch.full((NUM_CLASSES - 1,), -9.0)])
        raw = self.bias + self.onehot * (values - self.bias[0, 0])
        return torch.cat([raw[..., :4], torch.sigmoid(raw[..., 4:])], dim=-1)


def following_yolox_onnx() -> Path:
    """A tiny ``yolox_l.onnx`` whose person follows the bright pixels (see the module docstring)."""

    def build(path: Path) -> None:
        _export(FollowingYolox(), (1, 3, *DETECTOR_SIZE), "images", ["output"], path)

    return cached("eval/v2/yolox_following/yolox_l.onnx", build)


def _he(gen: torch.Generator, *shape: int) -> torch.Tensor:
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)


def _bn(prefix: str, channels: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.ones(channels), f"{prefix}.bias": torch.zeros(channels),
            f"{prefix}.running_mean": torch.zeros(channels), f"{prefix}.running_var": torch.ones(channels)}


def _he_init(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data = _he(gen, *m.weight.shape)
            if m.bias is not None:
                m.bias.data.zero_()
    return module.state_dict()


def alexnet_file() -> Path:
    """torchvision's AlexNet ``features.*`` (random, real widths) as ``alexnet-owt-7be5be79.pth``."""

    def build(path: Path) -> None:
        import torchvision

        weights = _he_init(torchvision.models.alexnet(weights=None), seed=1)
        torch.save({k: v for k, v in weights.items() if k.startswith("features.")}, str(path))

    return cached("eval/v1/alexnet-owt-7be5be79.pth", build)


def inception_file() -> Path:
    """The FID Inception-v3 state dict (torchvision layout, 1008 classes; random) as
    ``pt_inception-2015-12-05-6726825d.pth``."""

    def build(path: Path) -> None:
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        torch.save(_he_init(net, seed=2), str(path))

    return cached("eval/v1/pt_inception-2015-12-05-6726825d.pth", build)


# I3D's Inception blocks: endpoint -> (b0, b1a, b1b, b2a, b2b, b3b) output widths (Carreira & Zisserman 2017)
I3D_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def i3d_weights(divisor: int = 8, classes: int = 400, seed: int = 3) -> dict[str, torch.Tensor]:
    """An I3D state dict in the piergiaj/pytorch-i3d key layout with every width divided by ``divisor``."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def unit(name: str, cin: int, cout: int, k: tuple[int, int, int]) -> int:
        sd[f"{name}.conv3d.weight"] = _he(gen, cout, cin, *k)
        sd.update(_bn(f"{name}.bn", cout))
        return cout

    c = unit("Conv3d_1a_7x7", 3, 64 // divisor, (7, 7, 7))
    c = unit("Conv3d_2b_1x1", c, 64 // divisor, (1, 1, 1))
    c = unit("Conv3d_2c_3x3", c, 192 // divisor, (3, 3, 3))
    for name, widths in I3D_MIXED.items():
        w = [max(2, x // divisor) for x in widths]
        unit(f"{name}.b0", c, w[0], (1, 1, 1))
        unit(f"{name}.b1a", c, w[1], (1, 1, 1))
        unit(f"{name}.b1b", w[1], w[2], (3, 3, 3))
        unit(f"{name}.b2a", c, w[3], (1, 1, 1))
        unit(f"{name}.b2b", w[3], w[4], (3, 3, 3))
        unit(f"{name}.b3b", c, w[5], (1, 1, 1))
        c = w[0] + w[2] + w[4] + w[5]
    sd["logits.conv3d.weight"] = _he(gen, classes, c, 1, 1, 1)
    sd["logits.conv3d.bias"] = torch.zeros(classes)
    return sd


def i3d_file() -> Path:
    """A tiny ``i3d_pretrained_400.pt`` (a plain state dict, as the real file)."""
    return cached("eval/v1/i3d_pretrained_400.pt", lambda p: torch.save(i3d_weights(), str(p)))


def resnet3d_weights(planes=(4, 8, 16, 32), blocks=(2, 1, 1, 1), stem: int = 8, seed: int = 4
                     ) -> dict[str, torch.Tensor]:
    """A 3D ResNet (Bottleneck, shortcut B) state dict in the 3D-ResNets-PyTorch key layout."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": _he(gen, stem, 3, 7, 7, 7), **_bn("bn1", stem)}
    cin = stem
    for layer, (width, count) in enumerate(zip(planes, blocks), 1):
        for b in range(count):
            p = f"layer{layer}.{b}."
            sd[f"{p}conv1.weight"] = _he(gen, width, cin, 1, 1, 1)
            sd[f"{p}conv2.weight"] = _he(gen, width, width, 3, 3, 3)
            sd[f"{p}conv3.weight"] = _he(gen, width * 4, width, 1, 1, 1)
            for i, c in ((1, width), (2, width), (3, width * 4)):
                sd.update(_bn(f"{p}bn{i}", c))
            if b == 0:
                sd[f"{p}downsample.0.weight"] = _he(gen, width * 4, cin, 1, 1, 1)
                sd.update(_bn(f"{p}downsample.1", width * 4))
            cin = width * 4
    sd["fc.weight"], sd["fc.bias"] = _he(gen, 400, cin), torch.zeros(400)
    return sd


def resnet3d_file() -> Path:
    """A tiny ``resnet-50-kinetics.pth``: a training checkpoint wrapping ``module.``-prefixed weights."""

    def build(path: Path) -> None:
        weights = {f"module.{k}": v for k, v in resnet3d_weights().items()}
        torch.save({"epoch": 200, "arch": "resnet-50", "state_dict": weights,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}, str(path))

    return cached("eval/v1/resnet-50-kinetics.pth", build)


def eval_dir() -> Path:
    """A ``models/dreamoving/eval`` folder holding every tiny feature network under its real name."""

    def build(path: Path) -> None:
        path.mkdir(parents=True)
        for file in (alexnet_file(), inception_file(), i3d_file(), resnet3d_file()):
            (path / file.name).symlink_to(file)

    return cached("eval/v1/models_eval", build)
