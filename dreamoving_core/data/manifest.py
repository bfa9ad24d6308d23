"""The training manifests: one JSON object per line, written by data preparation and read by the training loaders.

Two files live in a prepared data folder (paths inside them are relative to that folder):

* ``clips.jsonl``: one :class:`ClipRecord` per transition-free clip cut from a source dance video;
* ``faces.jsonl``: one :class:`FaceRecord` per image with a detected face (the Content Guider stage's data).

JSON Lines needs no extra dependency and concatenates: data preparation keeps each source's rows in its own file
and rebuilds the two manifests from them (:mod:`dreamoving_core.data.store`), so re-runs and shards never append to a
shared file.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, TypeVar

from ..errors import InputMismatchError

CLIPS_FILE = "clips.jsonl"
FACES_FILE = "faces.jsonl"


@dataclass(frozen=True)
class ClipRecord:
    """A clip of ``frames`` frames at ``fps``, ``width`` × ``height`` pixels, cut from ``source`` at
    ``start``..``end`` seconds; ``caption`` describes its centre keyframe.

    ``pose``: a JSON file holding the clip's ``POSE_KEYPOINT`` (one OpenPose dict per frame, canvas = the clip's
    size, the format of :func:`dreamoving_core.preprocess.pose.to_pose_keypoint`). ``depth``: a safetensors file
    holding ``depth``, ``(frames, height, width)`` float16 metric depth (larger = further), to be turned into hints
    with :func:`dreamoving_core.preprocess.zoedepth.depth_to_hint`. Either is ``None`` when not extracted.
    """

    clip: str
    source: str
    start: float
    end: float
    fps: float
    frames: int
    width: int
    height: int
    caption: str
    pose: str | None = None
    depth: str | None = None


@dataclass(frozen=True)
class FaceRecord:
    """An image with a detected face: ``image`` (the picture), ``face`` (the face crop aligned to the ArcFace
    template, a 224 × 224 PNG, what FaceID-Plus projections show CLIP), ``arcface`` (a safetensors file holding
    ``embedding``: ``(512,)`` float32, L2-normalised), ``cloth`` (an optional crop of the clothed body, PNG) and
    ``caption`` (its text prompt, may be empty)."""

    image: str
    face: str
    arcface: str
    cloth: str | None = None
    caption: str = ""


Record = TypeVar("Record", ClipRecord, FaceRecord)


def record_line(record: ClipRecord | FaceRecord) -> str:
    """One record as its manifest line (a JSON object and a newline)."""
    return json.dumps(asdict(record), ensure_ascii=False) + "\n"


def write_records(path: str | os.PathLike, records: Iterable[ClipRecord | FaceRecord], append: bool = True) -> None:
    """Write ``records`` to the JSON Lines file ``path`` (appended by default), one object per line."""
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.writelines(record_line(record) for record in records)


def read_records(path: str | os.PathLike, kind: type[Record]) -> list[Record]:
    """The records of the JSON Lines file ``path`` as ``kind`` (:class:`ClipRecord` or :class:`FaceRecord`).

    Raises ``InputMismatchError`` naming the file and line for a missing file or a malformed row."""
    path = Path(path)
    if not path.is_file():
        raise InputMismatchError(f"manifest '{path}' does not exist; run `python -m dreamoving_core.data prepare` "
                                 "to make it")
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is MISSING}
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise InputMismatchError(f"manifest '{path}', line {number}: not JSON ({err})") from err
            if not isinstance(row, dict) or not required <= row.keys() or not row.keys() <= names:
                raise InputMismatchError(
                    f"manifest '{path}', line {number}: expected a {kind.__name__} with the fields "
                    f"{sorted(names)}, found {sorted(row) if isinstance(row, dict) else type(row).__name__}")
            records.append(kind(**row))
    return records
