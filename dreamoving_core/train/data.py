"""Training samples from a prepared data folder: clips (video stages) and face images (Content Guider stage).

The manifests are read through :mod:`dreamoving_core.data.manifest`; :func:`check_clips` / :func:`check_faces`
report missing files and too-short clips before any model is loaded. Every sample is drawn from an explicit seed
(:class:`StepSampler`), so a run resumed at step ``s`` sees exactly the samples an uninterrupted run sees, on every
process. Clips and images are read with data preparation's readers (``dreamoving_core.data.video``).
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from ..data.manifest import CLIPS_FILE, FACES_FILE, ClipRecord, FaceRecord, read_records
from ..data.video import read_frames, read_image
from ..errors import InputMismatchError
from ..preprocess.pose import from_pose_keypoint, to_pose_keypoint
from ..preprocess.render import draw_poses
from ..preprocess.smoothing import smooth_poses
from ..preprocess.zoedepth import depth_to_hint

CLIP_SIZE = 224  # the CLIP image tower's input


def resize_center_crop(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """``(N, C, H, W)`` → ``(N, C, size, size)``: shorter side resized to ``size`` (antialiased for bilinear and
    bicubic), then the centre crop — the rule of AnimateDiff's data loader and of CLIP's preprocessing."""
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        target = (max(size, round(height * scale)), max(size, round(width * scale)))
        smooth = mode in ("bilinear", "bicubic")
        images = F.interpolate(images, size=target, mode=mode, antialias=smooth, **(
            {"align_corners": False} if smooth else {}))
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


def read_clip_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` (ascending, in decoding order, as the hints were extracted) of a clip as
    ``(len(indices), H, W, 3)`` uint8 RGB, read with data preparation's reader."""
    wanted, frames = set(indices), {}
    for index, (_, image) in enumerate(read_frames(path)):
        if index in wanted:
            frames[index] = image
        if index >= indices[-1]:
            break
    if len(frames) != len(wanted):
        raise InputMismatchError(f"clip '{path}' has fewer frames than the {indices[-1] + 1} needed (the manifest's "
                                 "frame count is wrong or the file is damaged)")
    return np.stack([frames[i] for i in indices])


def image_tensor(path: str | Path) -> torch.Tensor:
    """An image file as ``(H, W, 3)`` float32 in [0, 1], upright."""
    return torch.from_numpy(read_image(path).copy()).float() / 255.0


def _manifest(root: str | Path, manifest: str | Path | None, default: str) -> Path:
    if root is None and manifest is None:
        raise InputMismatchError("data.root is not set; point it at a folder made by `python -m dreamoving_core.data "
                                 "prepare`")
    return Path(manifest) if manifest is not None else Path(root) / default


def _listing(items: list[str], total: int) -> str:
    shown = ", ".join(items[:5])
    return f"{shown}{f' and {len(items) - 5} more' if len(items) > 5 else ''} (of {total})"


def span(frames: int, stride: int) -> int:
    """Source frames covered by ``frames`` samples ``stride`` apart."""
    return (frames - 1) * stride + 1


def check_clips(root: str | Path | None, manifest: str | Path | None, frames: int, stride: int,
                hint: str | None) -> tuple[Path, list[ClipRecord]]:
    """Read ``clips.jsonl`` and raise ``InputMismatchError`` naming the rows whose clip (or ``hint`` file) is
    missing or which are shorter than ``frames`` frames ``stride`` apart. Returns ``(data folder, records)``."""
    path = _manifest(root, manifest, CLIPS_FILE)
    records = read_records(path, ClipRecord)
    if not records:
        raise InputMismatchError(f"manifest '{path}' has no clips")
    folder = path.parent
    missing = [r.clip for r in records if not (folder / r.clip).is_file()]
    if missing:
        raise InputMismatchError(f"manifest '{path}': clip files missing: {_listing(missing, len(records))}")
    if hint is not None:
        absent = [r.clip for r in records if getattr(r, hint) is None or not (folder / getattr(r, hint)).is_file()]
        if absent:
            raise InputMismatchError(f"manifest '{path}': {hint} hints missing for {_listing(absent, len(records))};"
                                     f" extract them with `python -m dreamoving_core.data prepare` or set data.hint")
    needed = span(frames, stride)
    short = [f"{r.clip} ({r.frames} frames)" for r in records if r.frames < needed]
    if short:
        raise InputMismatchError(
            f"manifest '{path}': {len(short)} clips are shorter than the {needed} frames that data.frames={frames} "
            f"at data.frame_stride={stride} need: {_listing(short, len(records))}; lower data.frames or "
            "data.frame_stride, or prepare longer clips")
    return folder, records


def check_faces(root: str | Path | None, manifest: str | Path | None) -> tuple[Path, list[FaceRecord]]:
    """Read ``faces.jsonl`` and raise ``InputMismatchError`` naming rows whose image, face crop, ArcFace file or
    cloth crop is missing. Returns ``(data folder, records)``."""
    path = _manifest(root, manifest, FACES_FILE)
    records = read_records(path, FaceRecord)
    if not records:
        raise InputMismatchError(f"manifest '{path}' has no face images")
    folder = path.parent
    missing = [f for r in records for f in (r.image, r.face, r.arcface, r.cloth)
               if f is not None and not (folder / f).is_file()]
    if missing:
        raise InputMismatchError(f"manifest '{path}': files missing: {_listing(missing, len(records))}")
    return folder, records


class ClipDataset(Dataset):
    """Samples of the video stages. Item ``(index, seed)`` → ``pixels`` ``(F, 3, R, R)`` in [0, 1] (``F =
    frames`` from a start drawn with ``seed``), ``caption`` and, with ``hint``, ``hint`` ``(F, 3, R, R)`` in [0, 1]:
    the pose drawn as OpenPose pictures or the ZoeDepth hint, at the clip's size, then resized and cropped like the
    frames (nearest-exact, as ComfyUI resizes ControlNet hints)."""

    def __init__(self, folder: Path, records: list[ClipRecord], frames: int, stride: int, resolution: int,
                 hint: str | None = None):
        self.folder, self.records = folder, records
        self.frames, self.stride, self.resolution, self.hint = frames, stride, resolution, hint

    def __len__(self) -> int:
        return len(self.records)

    def indices(self, item: tuple[int, int]) -> list[int]:
        """The clip frames of sample ``item``."""
        index, seed = item
        start = random.Random(seed).randint(0, self.records[index].frames - span(self.frames, self.stride))
        return list(range(start, start + span(self.frames, self.stride), self.stride))

    def poses(self, record: ClipRecord) -> list:
        """The clip's poses, One-Euro smoothed over the whole clip (as the DWPose node smooths by default)."""
        frames = from_pose_keypoint(json.loads((self.folder / record.pose).read_text(encoding="utf-8")))
        if len(frames) < record.frames:
            raise InputMismatchError(f"pose file '{record.pose}' has {len(frames)} frames, the clip {record.frames}")
        return smooth_poses(frames, record.fps)

    def driving_poses(self, item: tuple[int, int]) -> list[dict] | None:
        """``POSE_KEYPOINT`` of sample ``item``'s frames (what its pose hint shows), or None without poses."""
        record = self.records[item[0]]
        if record.pose is None:
            return None
        poses = self.poses(record)
        return to_pose_keypoint([poses[i] for i in self.indices(item)])

    def _hint(self, record: ClipRecord, indices: list[int]) -> torch.Tensor:
        if self.hint == "pose":
            poses = self.poses(record)
            hint = draw_poses([poses[i] for i in indices], record.height, record.width)
        else:
            from safetensors import safe_open

            with safe_open(str(self.folder / record.depth), "pt") as f:  # only the sampled frames are read
                stored = f.get_slice("depth")
                depth = torch.stack([stored[i] for i in indices])
            hint = depth_to_hint(depth.float())
        return resize_center_crop(hint.movedim(-1, 1), self.resolution, "nearest-exact")

    def __getitem__(self, item: tuple[int, int]) -> dict:
        record = self.records[item[0]]
        indices = self.indices(item)
        pixels = torch.from_numpy(read_clip_frames(self.folder / record.clip, indices)).movedim(-1, 1).float() / 255.0
        sample = {"pixels": resize_center_crop(pixels, self.resolution).clamp(0, 1), "caption": record.caption}
        if self.hint is not None:
            sample["hint"] = self._hint(record, indices)
        return sample


class FaceDataset(Dataset):
    """Samples of the Content Guider stage. Item ``(index, seed)`` → ``pixels`` ``(1, 3, R, R)`` (the image),
    ``face`` ``(224, 224, 3)`` (the aligned face crop), ``arcface`` ``(512,)``, ``cloth`` ``(224, 224, 3)`` (the
    cloth crop resized and cropped as CLIP's preprocessing does; black when absent), ``has_cloth`` and ``caption``."""

    def __init__(self, folder: Path, records: list[FaceRecord], resolution: int):
        self.folder, self.records, self.resolution = folder, records, resolution

    def __len__(self) -> int:
        return len(self.records)

    def _clip_input(self, name: str | None) -> torch.Tensor:
        if name is None:
            return torch.zeros(CLIP_SIZE, CLIP_SIZE, 3)
        image = image_tensor(self.folder / name).movedim(-1, 0)[None]
        return resize_center_crop(image, CLIP_SIZE, "bicubic")[0].movedim(0, -1)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        from safetensors.torch import load_file

        record = self.records[item[0]]
        image = image_tensor(self.folder / record.image).movedim(-1, 0)[None]
        arcface = load_file(str(self.folder / record.arcface))["embedding"].float().reshape(-1)
        return {"pixels": resize_center_crop(image, self.resolution).clamp(0, 1), "face": self._clip_input(record.face),
                "arcface": arcface, "cloth": self._clip_input(record.cloth), "has_cloth": record.cloth is not None,
                "caption": record.caption}


def sample_seed(seed: int, position: int) -> int:
    """The seed of global sample ``position`` of a run seeded with ``seed``."""
    return random.Random(f"{seed}:{position}").getrandbits(63)


class StepSampler(Sampler):
    """Endless ``(dataset index, sample seed)`` items of one process, from its ``start``-th sample on.

    Global sample ``n`` goes to process ``n % world``; the order is a fresh seeded permutation of the dataset every
    epoch. A resumed run passes ``start = steps done × samples per step`` and continues exactly."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.start
        order, epoch = None, -1
        while True:
            position = n * self.world + self.rank
            e, offset = divmod(position, self.size)
            if e != epoch:
                order, epoch = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + e)), e
            yield int(order[offset]), sample_seed(self.seed, position)
            n += 1
