"""Pose retargeting: give the driving dancer the reference person's body proportions.

A driving video of a tall dancer makes the ControlNet draw the reference person with the dancer's long legs. The
skeleton is walked from the neck outwards and every bone vector of the driving pose is rescaled by
``ratio = (reference bone / reference size) / (driving bone / driving size)``, so joint angles are kept exactly,
the bones take the reference person's proportions and the dancer's overall size and position in the frame stay.
Driving bone lengths are the median over the video, so foreshortening within the dance is preserved. Hands follow
their wrists (bones rescaled the same way), the face follows the nose, scaled like the head.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputMismatchError
from .pose import LEFT_EYE, RIGHT_EYE, Person, PoseFrame
from .render import HAND_EDGES

# (parent, child) pairs of the 18-keypoint body tree rooted at the neck (1), parents before children.
BODY_TREE = (
    (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
HAND_TREE = HAND_EDGES  # every edge already goes from the wrist (0) outwards
WRISTS = {"right_hand": 4, "left_hand": 7}
NOSE, NECK = 0, 1
HEAD_BONE = BODY_TREE.index((1, 0))
FACE_EYES = [68, 69]  # the face's last two points are the body's eyes (OpenPose's 70-point face)


def bone_lengths(part: np.ndarray, tree: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Length of each bone of ``tree`` in ``part`` ``(K, 3)``; NaN where an end is missing."""
    out = np.full(len(tree), np.nan)
    for i, (a, b) in enumerate(tree):
        if part[a, 2] > 0 and part[b, 2] > 0:
            out[i] = np.linalg.norm(part[b, :2] - part[a, :2])
    return out


def _ratios(ref: np.ndarray, drv: np.ndarray, ref_size: float, drv_size: float, fallback: float) -> np.ndarray:
    """Per-bone factors ``(ref / ref_size) / (drv / drv_size)`` turning driving proportions into reference ones.

    Bones missing on either side get the median factor of the known ones (``fallback`` when none is known).
    """
    known = ~np.isnan(ref) & ~np.isnan(drv) & (drv > 0)
    ratios = np.full(len(ref), fallback)
    if known.any():
        ratios[known] = (ref[known] / ref_size) / (drv[known] / drv_size)
        ratios[~known] = np.median(ratios[known])
    return ratios


def _rebuild(part: np.ndarray, tree, ratios: np.ndarray, anchor: np.ndarray | None = None) -> np.ndarray:
    """Re-lay ``part`` along ``tree`` with each bone vector scaled by ``ratios``; the root moves to ``anchor``.

    A keypoint whose parent is missing stays where it was (its own children still follow it).
    """
    out = part.copy()
    root = tree[0][0]
    if anchor is not None and out[root, 2] > 0:
        out[root, :2] = anchor
    for (a, b), r in zip(tree, ratios):
        if part[a, 2] > 0 and part[b, 2] > 0:
            out[b, :2] = out[a, :2] + (part[b, :2] - part[a, :2]) * r
    return out


def _median_lengths(people: list[Person], name: str, tree) -> np.ndarray:
    lengths = np.stack([bone_lengths(getattr(p, name), tree) for p in people])
    valid = ~np.isnan(lengths).all(axis=0)
    out = np.full(len(tree), np.nan)
    out[valid] = np.nanmedian(lengths[:, valid], axis=0)
    return out


def retarget_poses(frames: list[PoseFrame], reference: Person) -> list[PoseFrame]:
    """Rescale the bones of every person in ``frames`` to the proportions of ``reference``; returns new frames.

    The driving bone lengths are medians over all frames and people (one dancer is the usual case).
    """
    people = [p for f in frames for p in f.people]
    if not people:
        return [PoseFrame([], f.height, f.width) for f in frames]
    if not (reference.body[:, 2] > 0).any():
        raise InputMismatchError("retargeting needs a reference pose with a body, but no body keypoint was found")
    ref_body, drv_body = bone_lengths(reference.body, BODY_TREE), _median_lengths(people, "body", BODY_TREE)
    common = ~np.isnan(ref_body) & ~np.isnan(drv_body)
    if not common.any():
        raise InputMismatchError("retargeting needs a bone seen in both the reference and the driving poses; "
                                 "none of the 17 body bones is")
    # every size is measured against the body, so hands keep their size relative to the new body
    ref_size, drv_size = ref_body[common].sum(), drv_body[common].sum()
    body_ratios = _ratios(ref_body, drv_body, ref_size, drv_size, 1.0)
    fallback = float(np.median(body_ratios))
    hand_ratios = {
        name: _ratios(bone_lengths(getattr(reference, name), HAND_TREE), _median_lengths(people, name, HAND_TREE),
                      ref_size, drv_size, fallback)
        for name in WRISTS
    }
    out = []
    for frame in frames:
        retargeted = []
        for person in frame.people:
            new = person.copy()
            new.body = _rebuild(person.body, BODY_TREE, body_ratios)
            for name, wrist in WRISTS.items():
                hand = getattr(person, name)
                anchor = new.body[wrist, :2] if person.body[wrist, 2] > 0 else None
                setattr(new, name, _rebuild(hand, HAND_TREE, hand_ratios[name], anchor))
            if person.body[NOSE, 2] > 0:
                present = person.face[:, 2] > 0
                head = body_ratios[HEAD_BONE]
                new.face[present, :2] = new.body[NOSE, :2] + (person.face[present, :2] - person.body[NOSE, :2]) * head
                new.face[FACE_EYES] = new.body[[RIGHT_EYE, LEFT_EYE]]
            retargeted.append(new)
        out.append(PoseFrame(retargeted, frame.height, frame.width))
    return out
