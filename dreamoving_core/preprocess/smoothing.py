"""Temporal smoothing of pose keypoints with the One-Euro filter (Casiez et al., CHI 2012).

Per-frame pose estimates jitter by a few pixels, which the Video ControlNet turns into flicker. The One-Euro filter
is a low-pass filter whose cutoff rises with speed: still joints are smoothed hard, fast ones follow with little
lag. People are tracked across frames by their nearest body centre; a keypoint that disappears restarts its filter.
Coordinates are filtered in units of the canvas' shorter side, so the defaults do not depend on the resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .pose import Person, PoseFrame


@dataclass(frozen=True)
class OneEuroConfig:
    """One-Euro parameters. Speeds are in canvas short sides per second."""

    min_cutoff: float = 1.0  # Hz, cutoff of a still keypoint: lower = smoother
    beta: float = 20.0  # cutoff gain per unit of speed: higher = less lag in fast moves
    d_cutoff: float = 1.0  # Hz, cutoff of the speed estimate
    max_match_distance: float = 0.25  # a person further than this from every track starts a new track


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over ``(K, 2)`` points with a presence mask; absent points reset their state."""

    def __init__(self, num_points: int, config: OneEuroConfig):
        self.config = config
        self.x = np.zeros((num_points, 2))
        self.dx = np.zeros((num_points, 2))
        self.seen = np.zeros(num_points, dtype=bool)

    def __call__(self, points: np.ndarray, present: np.ndarray, dt: float) -> np.ndarray:
        """Filter ``points`` ``(K, 2)``; rows where ``present`` is False are returned unchanged and reset."""
        cfg = self.config
        cont = present & self.seen
        dx = (points - self.x) / dt
        dx_hat = _alpha(cfg.d_cutoff, dt) * dx + (1 - _alpha(cfg.d_cutoff, dt)) * self.dx
        cutoff = cfg.min_cutoff + cfg.beta * np.linalg.norm(dx_hat, axis=1, keepdims=True)
        a = _alpha(cutoff, dt)
        x_hat = a * points + (1 - a) * self.x
        out = np.where(cont[:, None], x_hat, points)
        self.x = np.where(present[:, None], out, self.x)
        self.dx = np.where(cont[:, None], dx_hat, 0.0)
        self.seen = present.copy()
        return out


def _centre(person: Person) -> np.ndarray | None:
    body = person.body[person.body[:, 2] > 0, :2]
    return body.mean(axis=0) if len(body) else None


class _Track:
    def __init__(self, person: Person, config: OneEuroConfig):
        self.filters = {name: OneEuroFilter(len(part), config) for name, part in person.parts().items()}
        self.centre = _centre(person)


def smooth_poses(frames: list[PoseFrame], fps: float = 30.0, config: OneEuroConfig = OneEuroConfig()) -> list[PoseFrame]:
    """One-Euro-filter every keypoint of every tracked person through ``frames``; returns new frames."""
    if not frames:
        return []
    dt = 1.0 / max(fps, 1e-3)
    tracks: list[_Track] = []
    out = []
    for frame in frames:
        unit = float(min(frame.height, frame.width))
        free = list(range(len(tracks)))
        people = []
        for person in frame.people:
            centre = _centre(person)
            track = None
            if centre is not None and free:
                dists = [np.inf if tracks[t].centre is None else np.linalg.norm(tracks[t].centre - centre) / unit
                         for t in free]
                best = int(np.argmin(dists))
                if dists[best] <= config.max_match_distance:
                    track = tracks[free.pop(best)]
            if track is None:
                track = _Track(person, config)
                tracks.append(track)
            smoothed = person.copy()
            for name, part in smoothed.parts().items():
                present = part[:, 2] > 0
                part[:, :2] = track.filters[name](part[:, :2] / unit, present, dt) * unit
            track.centre = _centre(smoothed) if centre is not None else track.centre
            people.append(smoothed)
        out.append(PoseFrame(people, frame.height, frame.width))
    return out
