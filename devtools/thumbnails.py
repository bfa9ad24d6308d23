"""Template-browser thumbnails (``workflows/<Title>.jpg``, 400x400 like ComfyUI's own), drawn from what a workflow
takes in: its reference images, and a moment of its driving video next to the pose / depth the graph makes of it
(or three moments of the video). A workflow with no shipped input shows its prompt. Deterministic: made from the
committed ``inputs/`` files, so ``python dev.py workflows`` rewrites them byte for byte.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from devtools.inputs import FPS, INPUTS_DIR

SIZE = 400
GAP = 4
MOMENTS = (1.0, 5.6, 8.1)  # seconds into the dance: arms up, a turn, jumping jacks
HINT_VIDEOS = {"DreaMovingDWPose": "dreamoving_pose.mp4", "DreaMovingZoeDepth": "dreamoving_depth.mp4"}


def video_frame(path: Path, seconds: float) -> np.ndarray:
    """The frame of ``path`` shown at ``seconds`` (uint8 RGB)."""
    import av

    wanted = int(round(seconds * FPS))
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == wanted:
                return frame.to_ndarray(format="rgb24")
    raise ValueError(f"{path.name} has no frame at {seconds} s")


def _panels(api: dict) -> list[np.ndarray]:
    from PIL import Image

    classes = [n["class_type"] for n in api.values()]
    images = [np.asarray(Image.open(INPUTS_DIR / n["inputs"]["image"]).convert("RGB")) for n in api.values()
              if n["class_type"] == "LoadImage" and (INPUTS_DIR / str(n["inputs"].get("image"))).is_file()]
    videos = [INPUTS_DIR / n["inputs"]["file"] for n in api.values()
              if n["class_type"] == "LoadVideo" and (INPUTS_DIR / str(n["inputs"].get("file"))).is_file()]
    if not videos:
        return images
    hints = [INPUTS_DIR / HINT_VIDEOS[c] for c in HINT_VIDEOS if c in classes]
    if "DreaMovingContextOptions" in classes:  # a long video: more moments of the dance
        return images + [video_frame(videos[0], t) for t in (*MOMENTS, 3.2)]
    if hints:  # the video next to what the graph makes of it; twice when that is all the graph does
        moments = MOMENTS[:1] if "KSampler" in classes else MOMENTS[:2]
        return images + [video_frame(v, t) for t in moments for v in (videos[0], *hints)]
    return images + [video_frame(videos[0], t) for t in MOMENTS]


def _fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` scaled to cover ``width`` x ``height`` and centre-cropped."""
    import cv2

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    resized = cv2.resize(image, (max(width, round(w * scale)), max(height, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return resized[top:top + height, left:left + width]


def _cells(count: int) -> list[tuple[int, int, int, int]]:
    """``(x, y, w, h)`` of ``count`` cells tiling the square: one row of up to three, else two rows."""
    rows = [count] if count <= 3 else [count // 2, count - count // 2] if count <= 6 else [3, 3, count - 6]
    cells, y = [], 0
    height = (SIZE - GAP * (len(rows) - 1)) // len(rows)
    for n in rows:
        width = (SIZE - GAP * (n - 1)) // n
        cells += [(i * (width + GAP), y, width, height) for i in range(n)]
        y += height + GAP
    return cells


def _prompt_card(api: dict) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    text = next((n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"), "DreaMoving")
    card = Image.new("RGB", (SIZE, SIZE), (43, 29, 79))
    draw = ImageDraw.Draw(card)
    font = ImageFont.load_default(size=30)
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) > SIZE - 60 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = candidate
    y = (SIZE - 40 * len(lines)) // 2
    for line in lines:
        draw.text((30, y), line, font=font, fill=(235, 225, 255))
        y += 40
    return np.asarray(card)


def thumbnail(api: dict) -> np.ndarray:
    """The ``SIZE`` x ``SIZE`` RGB thumbnail of the API graph ``api``."""
    panels = _panels(api)
    if not panels:
        return _prompt_card(api)
    canvas = np.full((SIZE, SIZE, 3), 24, np.uint8)
    for panel, (x, y, w, h) in zip(panels, _cells(len(panels))):
        canvas[y:y + h, x:x + w] = _fit(panel, w, h)
    return canvas


def write_thumbnail(api: dict, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(thumbnail(api)).save(path, format="JPEG", quality=85, optimize=True)
    return path
