"""ZoeDepth: metric depth per frame, the depth source of DreaMoving's Video ControlNet.

The model is transformers' ``ZoeDepthForDepthEstimation`` (BEiT backbone, in transformers itself: no timm) loaded
from a local folder in the layout of ``Intel/zoedepth-nyu-kitti`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``). Frames go through the folder's ``ZoeDepthImageProcessor`` (reflect padding,
aspect-keeping resize to multiples of 32, normalisation); the depth comes back resized to the padded frame with the
padding cut off, as transformers' post-processing does. The hint follows the ControlNet depth annotator: depth between its 2nd and 85th
percentiles is mapped to 1..0, so near is bright; by default the percentiles are shared by the whole video so the
brightness of a still background does not flicker.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..errors import ModelFormatError
from ..images import rgb_frames
from ..io import first_line, verify_weights_file

NEAR_PERCENTILE, FAR_PERCENTILE = 2.0, 85.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the one transformers reads first, first
QUANTILE_SAMPLES = 4_000_000  # torch.quantile refuses inputs over 16M elements; a strided sample is plenty


@dataclass
class ZoeDepth:
    """A loaded ZoeDepth model and its image processor."""

    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def depth(self, frames: torch.Tensor, batch_size: int = 4, progress=None) -> torch.Tensor:
        """Metric depth (metres, larger = further) of ``frames`` ``(F, H, W, 3)`` float 0..1 -> ``(F, H, W)``
        (RGBA and grayscale frames are converted, unusable ones refused: ``images.rgb_frames``).

        ``progress(done)`` is called after every batch with the number of frames done.
        """
        frames = rgb_frames(frames, "ZoeDepth frames")
        images = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 3, 1, 2).cpu()
        height, width = images.shape[-2:]
        out = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            inputs = self.processor(images=chunk, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
            predicted = self.model(pixel_values=pixel_values).predicted_depth.float().cpu()
            out.append(self._to_frame_size(predicted, height, width))
            if progress:
                progress(min(start + batch_size, len(images)))
        return torch.cat(out)

    def _to_frame_size(self, predicted: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, h, w)`` model depth -> ``(B, height, width)``: resized to the padded frame, the padding cut off.

        The processor reflect-pads each side by ``int(sqrt(side / 2) * 3)`` pixels, as the original ZoeDepth does.
        """
        pad_h = int((height / 2) ** 0.5 * 3) if getattr(self.processor, "do_pad", True) else 0
        pad_w = int((width / 2) ** 0.5 * 3) if getattr(self.processor, "do_pad", True) else 0
        depth = torch.nn.functional.interpolate(predicted[:, None], size=(height + 2 * pad_h, width + 2 * pad_w),
                                                mode="bicubic", align_corners=False)
        return depth[:, 0, pad_h:pad_h + height, pad_w:pad_w + width]


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    flat = values.reshape(-1).float()
    if flat.numel() > QUANTILE_SAMPLES:
        flat = flat[:: flat.numel() // QUANTILE_SAMPLES + 1]
    return torch.quantile(flat, q / 100.0)


def depth_to_hint(depth: torch.Tensor, per_frame: bool = False) -> torch.Tensor:
    """ControlNet depth hint from depth ``(F, H, W)``: ``(F, H, W, 3)`` float 0..1, near bright, far dark.

    Depth at the 2nd percentile maps to 1, at the 85th to 0 (clipped beyond), over the whole video unless
    ``per_frame``.
    """
    groups = depth.unbind(0) if per_frame else [depth]
    hints = []
    for d in groups:
        near, far = _percentile(d, NEAR_PERCENTILE), _percentile(d, FAR_PERCENTILE)
        hints.append(1.0 - (d - near) / (far - near).clamp_min(1e-6))
    hint = torch.stack(hints) if per_frame else hints[0]
    hint = (hint.clamp(0, 1) * 255).round() / 255  # 8-bit like the annotator's PNG
    return hint.unsqueeze(-1).expand(*hint.shape, 3).contiguous().float()


def _check_folder(folder: str) -> None:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ModelFormatError(f"'{folder}' is not a ZoeDepth model folder: it has no config.json "
                               "(expected the Intel/zoedepth-nyu-kitti layout: config.json, model.safetensors, "
                               "preprocessor_config.json)")
    try:
        with open(config_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"ZoeDepth folder '{os.path.basename(folder)}': config.json is not readable JSON "
                               f"({err}); download it again") from err
    if model_type != "zoedepth":
        raise ModelFormatError(f"'{folder}' holds a '{model_type}' model; expected a ZoeDepth model "
                               "(config.json model_type 'zoedepth', e.g. Intel/zoedepth-nyu-kitti)")
    weights = [os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not weights:
        raise ModelFormatError(f"'{folder}' has no weights file ({' or '.join(WEIGHT_FILES)}); download it from "
                               "huggingface.co/Intel/zoedepth-nyu-kitti")
    try:
        verify_weights_file(weights[0])  # transformers' own errors would advise loading a pickle unsafely
    except ModelFormatError as err:
        raise ModelFormatError(f"ZoeDepth folder '{os.path.basename(folder)}': {err}") from err


_cache: dict[tuple, ZoeDepth] = {}


def load_zoedepth(folder: str | os.PathLike, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> ZoeDepth:
    """Load ZoeDepth from a local transformers folder; the last loaded model is kept for the next call."""
    folder = os.fspath(folder)
    _check_folder(folder)
    device = torch.device(device)
    key = (os.path.realpath(folder), os.path.getmtime(os.path.join(folder, "config.json")), str(device), dtype)
    if key in _cache:
        return _cache[key]
    from transformers import ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

    try:
        model = ZoeDepthForDepthEstimation.from_pretrained(folder, local_files_only=True)
        if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            processor = ZoeDepthImageProcessor.from_pretrained(folder, local_files_only=True)
        else:
            processor = ZoeDepthImageProcessor(ensure_multiple_of=32)
    except Exception as err:  # transformers raises OSError, ValueError, RuntimeError, its own errors...
        raise ModelFormatError(f"could not load ZoeDepth from '{folder}' ({first_line(err)}); download the "
                               "folder again from huggingface.co/Intel/zoedepth-nyu-kitti") from err
    _cache.clear()
    _cache[key] = ZoeDepth(model.to(device, dtype).eval(), processor, device, dtype)
    return _cache[key]
