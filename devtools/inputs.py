"""The input files the shipped workflows name, made here and committed in ``inputs/`` (small, reproducible).

``python dev.py inputs`` rewrites them. The pack copies them into ComfyUI's input folder when it loads
(``nodes/inputs.py``), so every template queues as it opens.

- ``dreamoving_face.png``, ``dreamoving_cloth.png``: the face and the orange suit of scikit-image's ``astronaut``
  (Eileen Collins, a NASA photograph in the public domain, shipped inside the scikit-image wheel);
  ``dreamoving_style.png``: the same photograph painted with OpenCV's stylization filter (a stylised reference).
- A driving motion of our own: a procedurally animated dancer (a 3-D skeleton, 10 s at 16 fps, four dance phases),
  rendered three ways from the same keypoints: ``dreamoving_pose.mp4`` (DWPose-style OpenPose picture drawn by
  ``dreamoving_core.preprocess.render``), ``dreamoving_depth.mp4`` (near is bright, as ZoeDepth hints) and
  ``dreamoving_dance.mp4`` (a shaded mannequin in a room, for the workflows that run DWPose / ZoeDepth on a video).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devtools.server import PACK_DIR

INPUTS_DIR = PACK_DIR / "inputs"
FPS = 16
SECONDS = 10
SIZE = 384  # square frames; the hints are resized to the latent by the ControlNet anyway
CAMERA = 4.0  # metres from the dancer
FOCAL = 0.78 * SIZE * CAMERA / 1.9  # the 1.9 m tall figure fills ~78 % of the frame


# ------------------------------------------------------------------------------------------------- the skeleton


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _limb(abduction: float, forward: float, side: float) -> np.ndarray:
    """Direction of a limb hanging down, raised sideways by ``abduction`` and forwards by ``forward`` (radians)."""
    d = np.array([side * math.sin(abduction), -math.cos(abduction), 0.0])
    c, s = math.cos(forward), math.sin(forward)
    return _unit(np.array([d[0], d[1] * c - d[2] * s, -d[1] * s + d[2] * c]))


def _bend(direction: np.ndarray, angle: float, towards: np.ndarray) -> np.ndarray:
    """``direction`` turned by ``angle`` towards ``towards`` (a joint bending)."""
    n = towards - direction * float(direction @ towards)
    n = _unit(n if np.linalg.norm(n) > 1e-6 else np.array([0.0, 0.0, 1.0]))
    return _unit(direction * math.cos(angle) + n * math.sin(angle))


@dataclass
class Pose3D:
    """Joint positions in metres (x: the viewer's right, y: up, z: towards the camera) and the head's yaw."""

    joints: dict[str, np.ndarray]
    yaw: float


def _smooth(x: float) -> float:
    return x * x * (3 - 2 * x)


def dance_pose(t: float) -> Pose3D:
    """The dancer at ``t`` seconds: four 2.5 s phases (arm waves, hip sway with claps, a turn, jumping jacks) on a
    2 Hz beat, blended smoothly into each other."""
    beat = 2 * math.pi * 2.0 * t
    phase = min(int(t / 2.5), 3)
    local = (t - 2.5 * phase) / 2.5
    mix = _smooth(min(1.0, max(0.0, (local - 0.8) / 0.2)))  # the last 0.5 s of a phase blends into the next

    def phase_params(p: int) -> dict[str, float]:
        s, c = math.sin(beat), math.cos(beat)
        if p == 0:  # arm waves: the arms rise in turn, knees bounce
            return dict(sway=0.03 * s, bounce=0.03 * abs(s), yaw=0.15 * s, r_abd=1.6 + 0.9 * s, l_abd=1.6 - 0.9 * s,
                        r_fwd=0.2, l_fwd=0.2, r_elb=0.6 + 0.4 * c, l_elb=0.6 - 0.4 * c, r_leg=0.12, l_leg=0.12,
                        r_knee=0.25 + 0.2 * abs(s), l_knee=0.25 + 0.2 * abs(s), tilt=0.05 * s)
        if p == 1:  # hip sway, claps in front of the chest
            clap = 0.5 + 0.5 * math.cos(2 * beat)
            return dict(sway=0.12 * s, bounce=0.02 * abs(c), yaw=-0.25 * s, r_abd=0.5 + 0.5 * clap,
                        l_abd=0.5 + 0.5 * clap, r_fwd=1.1, l_fwd=1.1, r_elb=1.2 - 0.6 * clap, l_elb=1.2 - 0.6 * clap,
                        r_leg=0.1 + 0.08 * s, l_leg=0.1 - 0.08 * s, r_knee=0.2 + 0.25 * max(0, s),
                        l_knee=0.2 + 0.25 * max(0, -s), tilt=0.12 * s)
        if p == 2:  # a slow turn to each side with one arm up
            turn = math.sin(math.pi * 2 * local)
            return dict(sway=0.05 * turn, bounce=0.02 * abs(s), yaw=0.75 * turn, r_abd=2.7, l_abd=0.4 + 0.3 * abs(s),
                        r_fwd=0.1, l_fwd=0.3, r_elb=0.3, l_elb=1.0, r_leg=0.18, l_leg=0.05,
                        r_knee=0.15, l_knee=0.35 + 0.2 * abs(s), tilt=-0.08 * turn)
        jack = 0.5 - 0.5 * math.cos(beat)  # jumping jacks
        return dict(sway=0.0, bounce=0.1 * jack, yaw=0.1 * math.sin(beat / 2), r_abd=0.3 + 2.4 * jack,
                    l_abd=0.3 + 2.4 * jack, r_fwd=0.05, l_fwd=0.05, r_elb=0.2, l_elb=0.2, r_leg=0.05 + 0.3 * jack,
                    l_leg=0.05 + 0.3 * jack, r_knee=0.1 + 0.3 * (1 - jack), l_knee=0.1 + 0.3 * (1 - jack), tilt=0.0)

    a, b = phase_params(phase), phase_params(min(phase + 1, 3))
    p = {k: a[k] * (1 - mix) + b[k] * mix for k in a}

    up, forward = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
    pelvis = np.array([p["sway"], 0.98 + p["bounce"] - 0.08 * (p["r_knee"] + p["l_knee"]) / 2, 0.0])
    spine = _unit(np.array([-0.4 * p["tilt"], 1.0, 0.05]))
    neck = pelvis + 0.5 * spine
    head = neck + 0.2 * _unit(spine + np.array([0.3 * p["tilt"], 0.0, 0.1]))
    j = {"pelvis": pelvis, "neck": neck, "head": head}
    for side, sign in (("r", -1.0), ("l", 1.0)):  # the dancer faces the camera: their right is the viewer's left
        shoulder = neck + np.array([sign * 0.19, -0.03, 0.0])
        upper = _limb(p[f"{side}_abd"], p[f"{side}_fwd"], sign)
        elbow = shoulder + 0.29 * upper
        wrist = elbow + 0.26 * _bend(upper, p[f"{side}_elb"], up + 0.5 * forward)
        hip = pelvis + np.array([sign * 0.1, -0.03, 0.0])
        thigh = _limb(p[f"{side}_leg"], 0.25 * p[f"{side}_knee"], sign)
        knee = hip + 0.44 * thigh
        ankle = knee + 0.43 * _bend(thigh, p[f"{side}_knee"], -forward)
        j |= {f"{side}_shoulder": shoulder, f"{side}_elbow": elbow, f"{side}_wrist": wrist, f"{side}_hip": hip,
              f"{side}_knee": knee, f"{side}_ankle": ankle, f"{side}_toe": ankle + np.array([sign * 0.03, -0.04, 0.14])}
    yaw = p["yaw"]
    c, s = math.cos(yaw), math.sin(yaw)
    centre = np.array([pelvis[0], 0.0, 0.0])
    for name, v in j.items():  # the whole body turns about the vertical axis through the pelvis
        x, z = v[0] - centre[0], v[2]
        j[name] = np.array([centre[0] + c * x + s * z, v[1], -s * x + c * z])
    return Pose3D(j, yaw)


def project(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection of ``(N, 3)`` points: pixel ``(N, 2)`` and the pixels-per-metre scale ``(N,)``."""
    scale = FOCAL / (CAMERA - points[:, 2])
    u = SIZE / 2 + points[:, 0] * scale
    v = SIZE * 0.93 - points[:, 1] * scale  # the floor line sits near the bottom of the frame
    return np.stack([u, v], 1), scale


# ---------------------------------------------------------------------------------------------- the keypoints


# 68 iBUG face points on a unit face (x right, y down, centre at the nose bridge), then the two pupils.
def _face_template() -> np.ndarray:
    jaw = [(math.cos(a) * 0.95, 0.1 + math.sin(a) * 1.1) for a in np.linspace(math.pi, 0, 17)]
    brows = [(-0.75 + 0.13 * i, -0.45 - 0.08 * math.sin(math.pi * i / 4)) for i in range(5)]
    brows += [(0.23 + 0.13 * i, -0.45 - 0.08 * math.sin(math.pi * i / 4)) for i in range(5)]
    nose = [(0.0, -0.3 + 0.13 * i) for i in range(4)] + [(-0.18 + 0.09 * i, 0.28) for i in range(5)]

    def eye(cx):
        return [(cx + 0.2 * math.cos(a), -0.2 + 0.08 * math.sin(a)) for a in np.linspace(math.pi, -math.pi, 7)[:6]]

    mouth = [(0.38 * math.cos(a), 0.6 + 0.14 * math.sin(a)) for a in np.linspace(math.pi, -math.pi, 13)[:12]]
    mouth += [(0.22 * math.cos(a), 0.6 + 0.05 * math.sin(a)) for a in np.linspace(math.pi, -math.pi, 9)[:8]]
    pupils = [(-0.4, -0.2), (0.4, -0.2)]
    return np.array([(-x, y) for x, y in jaw + brows + nose + eye(-0.4) + eye(0.4) + mouth] + pupils)


FACE_TEMPLATE = _face_template()


def _hand(wrist: np.ndarray, direction: np.ndarray, side: float) -> np.ndarray:
    """21 hand points (OpenPose order) of an open hand at ``wrist`` pointing along ``direction``."""
    across = _unit(np.cross(direction, np.array([0.0, 0.0, 1.0])) * side + 1e-6)
    points = [wrist]
    for finger, spread in enumerate((-0.9, -0.35, 0.0, 0.3, 0.6)):
        base = wrist + direction * (0.05 if finger else 0.025) + across * (spread * 0.04)
        dirn = _unit(direction + across * spread * (0.8 if finger == 0 else 0.25))
        length = 0.025 if finger == 0 else 0.028
        for k in range(1, 5):
            points.append(base + dirn * length * k)
    return np.array(points)


def pose_frame(pose: Pose3D):
    """The OpenPose keypoints of ``pose``: a :class:`dreamoving_core.preprocess.pose.PoseFrame` on the frame."""
    from dreamoving_core.preprocess.pose import NUM_FACE, NUM_HAND, Person, PoseFrame

    j = pose.joints
    head, neck = j["head"], j["neck"]
    c, s = math.cos(pose.yaw), math.sin(pose.yaw)
    right, forward = np.array([c, 0.0, -s]), np.array([s, 0.0, c])
    face_centre = head + forward * 0.09 + np.array([0.0, -0.01, 0.0])
    eyes = [face_centre + right * dx * 0.035 - np.array([0, 0.01, 0]) for dx in (-1, 1)]
    ears = [head + right * dx * 0.08 for dx in (-1, 1)]
    order = [face_centre + np.array([0, -0.02, 0]), neck, j["r_shoulder"], j["r_elbow"], j["r_wrist"],
             j["l_shoulder"], j["l_elbow"], j["l_wrist"], j["r_hip"], j["r_knee"], j["r_ankle"], j["l_hip"],
             j["l_knee"], j["l_ankle"], eyes[0], eyes[1], ears[0], ears[1]]
    pixels, _ = project(np.array(order))
    body = np.concatenate([pixels, np.ones((18, 1))], 1).astype(np.float32)
    # an ear turned away from the camera is hidden, as DWPose reports it
    if pose.yaw > 0.5:
        body[17] = 0
    if pose.yaw < -0.5:
        body[16] = 0
    face3d = (face_centre + right[None] * FACE_TEMPLATE[:, :1] * 0.065
              - np.array([0.0, 1.0, 0.0])[None] * FACE_TEMPLATE[:, 1:] * 0.07)
    face_px, _ = project(face3d)
    face = np.concatenate([face_px, np.ones((NUM_FACE, 1))], 1).astype(np.float32)
    hands = {}
    for side, sign in (("r", -1.0), ("l", 1.0)):
        points = _hand(j[f"{side}_wrist"], _unit(j[f"{side}_wrist"] - j[f"{side}_elbow"]), sign)
        px, _ = project(points)
        hands[side] = np.concatenate([px, np.ones((NUM_HAND, 1))], 1).astype(np.float32)
    person = Person(body=body, left_hand=hands["l"], right_hand=hands["r"], face=face)
    return PoseFrame([person], SIZE, SIZE)


# ------------------------------------------------------------------------------------------------- rendering


SKIN, SHIRT, TROUSERS, SHOES, HAIR = (np.array(c, np.float32) / 255 for c in
                                      ((224, 172, 138), (34, 150, 160), (40, 52, 96), (30, 30, 34), (60, 40, 30)))


def _capsules(pose: Pose3D) -> list[tuple[np.ndarray, np.ndarray, float, float, np.ndarray]]:
    """The mannequin as capsules ``(a, b, radius a, radius b, colour)`` in metres, back to front unimportant."""
    j = pose.joints
    parts = [(j["pelvis"], j["neck"], 0.15, 0.17, SHIRT), (j["neck"], j["head"], 0.05, 0.05, SKIN),
             (j["head"], j["head"] + np.array([0, 0.01, 0]), 0.11, 0.11, SKIN)]
    for side in "rl":
        parts += [(j[f"{side}_shoulder"], j[f"{side}_elbow"], 0.055, 0.045, SHIRT),
                  (j[f"{side}_elbow"], j[f"{side}_wrist"], 0.04, 0.032, SKIN),
                  (j[f"{side}_wrist"], j[f"{side}_wrist"] + 0.07 * _unit(j[f"{side}_wrist"] - j[f"{side}_elbow"]),
                   0.035, 0.03, SKIN),
                  (j[f"{side}_hip"], j[f"{side}_knee"], 0.08, 0.06, TROUSERS),
                  (j[f"{side}_knee"], j[f"{side}_ankle"], 0.06, 0.045, TROUSERS),
                  (j[f"{side}_ankle"], j[f"{side}_toe"], 0.045, 0.04, SHOES)]
    return parts


def render_surfaces(pose: Pose3D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: camera distance ``(S, S)`` (inf = background), unit normal ``(S, S, 3)``, colour ``(S, S, 3)``."""
    ys, xs = np.mgrid[:SIZE, :SIZE].astype(np.float32) + 0.5
    depth = np.full((SIZE, SIZE), np.inf, np.float32)
    normal = np.zeros((SIZE, SIZE, 3), np.float32)
    colour = np.zeros((SIZE, SIZE, 3), np.float32)
    for a, b, ra, rb, col in _capsules(pose):
        (pa, pb), scale = project(np.stack([a, b]))
        seg = pb - pa
        t = np.clip(((xs - pa[0]) * seg[0] + (ys - pa[1]) * seg[1]) / max(float(seg @ seg), 1e-6), 0, 1)
        cx, cy = pa[0] + t * seg[0], pa[1] + t * seg[1]
        radius = (ra + (rb - ra) * t) * (scale[0] + (scale[1] - scale[0]) * t)
        d2 = (xs - cx) ** 2 + (ys - cy) ** 2
        inside = d2 < radius ** 2
        bulge = np.sqrt(np.maximum(radius ** 2 - d2, 0))
        px_per_m = scale[0] + (scale[1] - scale[0]) * t
        z_axis = a[2] + (b[2] - a[2]) * t
        dist = CAMERA - z_axis - bulge / px_per_m
        closer = inside & (dist < depth)
        depth[closer] = dist[closer]
        n = np.stack([(xs - cx) / np.maximum(radius, 1e-6), (ys - cy) / np.maximum(radius, 1e-6),
                      bulge / np.maximum(radius, 1e-6)], -1)
        normal[closer] = n[closer]
        colour[closer] = col
    # hair on the top and back of the head
    head, _ = project(pose.joints["head"][None])
    head_radius = 0.11 * FOCAL / CAMERA
    hair = ((ys - head[0, 1]) < -0.45 * head_radius) & np.isfinite(depth) & (
        (xs - head[0, 0]) ** 2 + (ys - head[0, 1]) ** 2 < (1.15 * head_radius) ** 2)
    colour[hair] = HAIR
    return depth, normal, colour


def _room(ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background colour and camera distance of a wall with a floor in front of it."""
    horizon = SIZE * 0.62
    floor = ys > horizon
    wall_col = np.array([0.80, 0.76, 0.70], np.float32) - 0.12 * (ys / SIZE)[..., None]
    floor_col = np.array([0.55, 0.42, 0.30], np.float32) + 0.1 * ((ys - horizon) / SIZE)[..., None]
    colour = np.where(floor[..., None], floor_col, wall_col)
    distance = np.where(floor, CAMERA + 2.0 - 3.0 * (ys - horizon) / (SIZE - horizon), CAMERA + 2.0)
    return colour.astype(np.float32), distance.astype(np.float32)


def dancer_frame(pose: Pose3D) -> np.ndarray:
    """The mannequin in its room, shaded, ``(S, S, 3)`` uint8 RGB."""
    depth, normal, colour = render_surfaces(pose)
    ys = np.mgrid[:SIZE, :SIZE][0].astype(np.float32) + 0.5
    room, _ = _room(ys)
    light = _unit(np.array([-0.4, -0.6, 0.7], np.float32))
    shade = 0.35 + 0.65 * np.clip(normal @ light, 0, 1)
    image = np.where(np.isfinite(depth)[..., None], colour * shade[..., None], room)
    # a soft shadow on the floor under the feet
    (fx, fy), = project(np.array([[pose.joints["pelvis"][0], 0.0, 0.0]]))[0]
    xs = np.mgrid[:SIZE, :SIZE][1].astype(np.float32) + 0.5
    shadow = np.exp(-(((xs - fx) / (SIZE * 0.12)) ** 2 + ((ys - fy) / (SIZE * 0.02)) ** 2))
    image = image * (1 - 0.35 * shadow * ~np.isfinite(depth))[..., None]
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return _draw_face_features(image, pose)


def _draw_face_features(image: np.ndarray, pose: Pose3D) -> np.ndarray:
    """Eyes, brows and a mouth where the face keypoints are, so the mannequin reads as a person."""
    import cv2

    face = pose_frame(pose).people[0].face
    if abs(pose.yaw) < 1.2:
        for eye in face[68:70]:
            cv2.circle(image, (int(round(eye[0])), int(round(eye[1]))), 2, (40, 30, 30), -1, cv2.LINE_AA)
        for part in (face[17:22], face[22:27], face[48:60]):
            cv2.polylines(image, [np.round(part[:, :2]).astype(np.int32)], part is face[48:60], (90, 50, 45), 1,
                          cv2.LINE_AA)
    return image


def depth_frame(pose: Pose3D) -> np.ndarray:
    """A depth hint of the same scene: inverse distance scaled to 0..255, near is bright (``(S, S, 3)`` uint8)."""
    depth, _, _ = render_surfaces(pose)
    ys = np.mgrid[:SIZE, :SIZE][0].astype(np.float32) + 0.5
    _, room = _room(ys)
    distance = np.where(np.isfinite(depth), depth, room)
    near, far = CAMERA - 0.6, CAMERA + 2.0
    value = (1 / distance - 1 / far) / (1 / near - 1 / far)
    grey = (np.clip(value, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1)


def dance(frames: int = FPS * SECONDS) -> list[Pose3D]:
    return [dance_pose(i / FPS) for i in range(frames)]


# ------------------------------------------------------------------------------------------------------ files


def write_video(path: Path, frames, fps: int = FPS, crf: int = 26) -> Path:
    """H.264 MP4 (yuv420p) of ``frames`` ``(H, W, 3)`` uint8, small enough to commit."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "slow"})
        first = True
        for image in frames:
            if first:
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "yuv420p"
                first = False
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def astronaut_images() -> dict[str, np.ndarray]:
    """Face, cloth and stylised reference images from scikit-image's astronaut (uint8 RGB)."""
    import cv2
    from skimage import data

    photo = data.astronaut()
    face = cv2.resize(photo[0:210, 120:330], (256, 256), interpolation=cv2.INTER_AREA)
    cloth = cv2.resize(photo[130:512, 0:382], (320, 320), interpolation=cv2.INTER_AREA)
    style = cv2.stylization(cv2.resize(photo, (384, 384), interpolation=cv2.INTER_AREA), sigma_s=60, sigma_r=0.45)
    return {"dreamoving_face.png": face, "dreamoving_cloth.png": cloth, "dreamoving_style.png": style}


def write_all(folder: Path = INPUTS_DIR) -> list[Path]:
    """Write every shipped input file into ``folder``; returns their paths."""
    from PIL import Image

    from dreamoving_core.preprocess.render import draw_pose

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in astronaut_images().items():
        Image.fromarray(image).save(folder / name, optimize=True)
        written.append(folder / name)
    poses = dance()
    written.append(write_video(folder / "dreamoving_pose.mp4", (draw_pose(pose_frame(p)) for p in poses)))
    written.append(write_video(folder / "dreamoving_depth.mp4", (depth_frame(p) for p in poses)))
    written.append(write_video(folder / "dreamoving_dance.mp4", (dancer_frame(p) for p in poses)))
    return written


if __name__ == "__main__":
    for path in write_all():
        print(f"wrote {path.relative_to(PACK_DIR)} ({path.stat().st_size // 1024} KiB)")
