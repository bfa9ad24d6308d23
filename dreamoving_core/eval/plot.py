"""The per-frame curves of one or more score reports as a picture (PIL): one panel per series of :data:`CURVES`
(identity, body pose error, CLIP consistency), one colour per run, frames without a value marked × along the
bottom (red for one run, in the run's colour when several are compared)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .report import CURVES, SCORE_INFO, ScoreReport

RUN_COLORS = ((31, 119, 180), (230, 85, 13), (44, 160, 44), (148, 103, 189))
MISSING_COLOR = (214, 39, 40)
GRID, AXIS, TEXT, BACKGROUND = (225, 225, 225), (90, 90, 90), (30, 30, 30), (255, 255, 255)
SCORE_OF_CURVE = {"identity/cosine": "identity/cosine_mean", "pose/body/error": "pose/body/error",
                  "temporal/clip_consistency": "temporal/clip_consistency"}
MISSING_LABEL = {"identity/cosine": "no face found", "pose/body/error": "person lost or no driving pose",
                 "temporal/clip_consistency": "no value"}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values from ``lo`` to ``hi``, about ``count`` of them (whole numbers when ``integer``)."""
    step = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1.0
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    step = max(1, round(step)) if integer else step
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _y_range(name: str, values: list[float]) -> tuple[float, float]:
    if name == "pose/body/error":
        return 0.0, max(0.05, max(values, default=0.0) * 1.15)
    low = min(values, default=0.0)
    return (min(0.0, math.floor(low * 10) / 10), 1.0)


def plot_reports(runs: list[tuple[str, ScoreReport]], width: int = 960, panel_height: int = 210) -> np.ndarray:
    """``(H, W, 3)`` uint8: the per-frame curves of ``runs`` (label, report), overlaid run by run."""
    names = [n for n in CURVES if any(n in r.per_frame for _, r in runs)]
    title_font, font = _font(16), _font(12)
    header = 34 if len(runs) > 1 else 8
    height = header + max(1, len(names)) * panel_height + 8
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if len(runs) > 1:
        x = 60
        for i, (label, _) in enumerate(runs):
            color = RUN_COLORS[i % len(RUN_COLORS)]
            draw.rectangle((x, 12, x + 24, 22), fill=color)
            draw.text((x + 30, 10), label, fill=TEXT, font=font)
            x += 40 + int(draw.textlength(label, font=font)) + 20
    if not names:
        draw.text((24, header + 20), "No per-frame curves: connect a reference face (identity), driving keypoints "
                  "(pose) or a CLIP vision model (consistency).", fill=TEXT, font=font)
        return np.asarray(image)
    frames = max(r.frames for _, r in runs)
    for p, name in enumerate(names):
        top = header + p * panel_height
        _panel(draw, name, runs, frames, (60, top + 28, width - 20, top + panel_height - 34), title_font, font)
    return np.asarray(image)


def _panel(draw: ImageDraw.ImageDraw, name: str, runs, frames: int, box, title_font, font) -> None:
    left, top, right, bottom = box
    title = CURVES[name]
    score = SCORE_OF_CURVE[name]
    better = SCORE_INFO[score].better
    means = [f"{r.scores[score]:.3f}" if score in r.scores else "n/a" for _, r in runs]
    if len(runs) > 1:
        means = [f"{label} {mean}" for (label, _), mean in zip(runs, means)]
    draw.text((left, top - 24), f"{title}   mean {', '.join(means)}   ({better} is better)", fill=TEXT,
              font=title_font)
    values = [v for _, r in runs for v in r.per_frame.get(name, []) if v is not None and math.isfinite(v)]
    lo, hi = _y_range(name, values)
    offset = 0.5 if name == "temporal/clip_consistency" else 0.0  # pairs sit between their two frames

    def xy(i: float, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(frames - 1, 1))
        return x, bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)

    for t in _ticks(lo, hi):
        _, y = xy(0, t)
        draw.line((left, y, right, y), fill=GRID)
        draw.text((left - 8, y), f"{t:g}", fill=AXIS, font=font, anchor="rm")
    for t in _ticks(0, max(frames - 1, 1), min(frames, 9), integer=True):
        x, _ = xy(t, lo)
        draw.line((x, top, x, bottom), fill=GRID)
        draw.text((x, bottom + 4), f"{t:g}", fill=AXIS, font=font, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=AXIS)
    draw.text((right, bottom + 18), "frame", fill=AXIS, font=font, anchor="ra")
    missing_any = False
    for i, (_, report) in enumerate(runs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        series = report.per_frame.get(name, [])
        segment: list[tuple[float, float]] = []
        for f, v in enumerate(series + [None]):
            if v is not None and math.isfinite(v):
                segment.append(xy(f + offset, v))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=color, width=2)
            for x, y in segment if len(series) <= 64 else ():
                draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=color)
            segment = []
            if f < len(series):
                missing_any = True
                x, _ = xy(f + offset, lo)
                y = bottom - 6 - 8 * i  # one row of marks per run, in its colour
                draw.line((x - 3, y - 3, x + 3, y + 3), fill=MISSING_COLOR if len(runs) == 1 else color, width=2)
                draw.line((x - 3, y + 3, x + 3, y - 3), fill=MISSING_COLOR if len(runs) == 1 else color, width=2)
    if missing_any:
        draw.text((right - 4, top + 4), f"x = {MISSING_LABEL[name]}", fill=MISSING_COLOR if len(runs) == 1 else AXIS,
                  font=font, anchor="ra")
