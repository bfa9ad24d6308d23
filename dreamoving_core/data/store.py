"""The prepared data folder: one sub-folder per source, atomic file writes, and the manifests rebuilt from every
source's own rows.

Layout of ``OUT``::

    clips.jsonl, faces.jsonl      the manifests (rebuilt from sources/*/, never appended to)
    sources/<id>/                 everything made from one source video or image
        clips.jsonl, faces.jsonl  that source's rows, written when it is finished
        failed.txt                why it could not be read (removed once it succeeds)
        ...                       clips, keyframes, hints, caption caches, face crops (see prepare.py)

Every file is written to a temporary name and renamed into place, so a file that exists is complete: an
interrupted run leaves nothing half-written to be mistaken for finished work. Shards and workers never write the
same file: a source belongs to exactly one of them, and each manifest is rebuilt under an exclusive lock by
concatenating the per-source rows, so the last process to finish writes a manifest holding every finished source.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .manifest import CLIPS_FILE, FACES_FILE, ClipRecord, FaceRecord, read_records, record_line

SOURCES_DIR = "sources"
FAILED_FILE = "failed.txt"
LOCK_FILE = ".manifest.lock"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent) for the block: one process at a time (flock on
    POSIX, msvcrt on Windows; released when the file closes)."""
    with open(path, "a+b") as f:
        if os.name == "nt":
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds, removed when
    it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # keeps the suffix: writers pick formats by it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def beside(stem: Path, suffix: str) -> Path:
    """The file of ``stem`` (a path without its suffix) with ``suffix``: ``beside(dir/"a", ".pose.json")``."""
    return stem.with_name(stem.name + suffix)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, leaving the file untouched when it already holds exactly that."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class Store:
    """The prepared data folder ``root``; paths in records are relative to it."""

    root: Path

    def source_dir(self, source_id: str) -> Path:
        return self.root / SOURCES_DIR / source_id

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def write_rows(self, source_id: str, clips: list[ClipRecord] | None, faces: list[FaceRecord]) -> None:
        """Record a finished source: its clip rows (``None`` for an image) and face rows; clears its failure."""
        folder = self.source_dir(source_id)
        for name, rows in ((CLIPS_FILE, clips), (FACES_FILE, faces)):
            if rows is not None:
                write_text(folder / name, _jsonl(rows))
        (folder / FAILED_FILE).unlink(missing_ok=True)

    def write_failure(self, source_id: str, text: str) -> None:
        write_text(self.source_dir(source_id) / FAILED_FILE, text)

    def rebuild_manifests(self) -> tuple[int, int, list[str]]:
        """Rewrite ``clips.jsonl`` and ``faces.jsonl`` from every source's rows, under an exclusive lock.

        Returns the number of clip rows, face rows, and the ids of sources whose last attempt failed."""
        sources = self.root / SOURCES_DIR
        sources.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / LOCK_FILE):
            folders = sorted(p for p in sources.iterdir() if p.is_dir())
            counts = []
            for name, kind in ((CLIPS_FILE, ClipRecord), (FACES_FILE, FaceRecord)):
                rows = [r for folder in folders if (folder / name).is_file() for r in read_records(folder / name, kind)]
                write_text(self.root / name, _jsonl(rows))
                counts.append(len(rows))
            failed = [p.name for p in folders if (p / FAILED_FILE).is_file()]
        return counts[0], counts[1], failed



def _jsonl(rows: list[ClipRecord] | list[FaceRecord]) -> str:
    return "".join(record_line(r) for r in rows)
