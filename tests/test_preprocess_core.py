"""Preprocessing core (no ComfyUI): DWPose decoding and pipeline, OpenPose JSON and rendering, smoothing,
retargeting, ZoeDepth. Tiny ONNX models with the real IO; 64x64 frames."""
from __future__ import annotations

import colorsys
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.tiny import preprocess as tiny
from dreamoving_core import dwpose
from dreamoving_core.errors import DreaMovingError, InputMismatchError, ModelFormatError
from dreamoving_core.preprocess.pose import (NUM_BODY, NUM_FACE, NUM_HAND, Person, PoseFrame, from_openpose_dict,
                                  from_pose_keypoint, from_wholebody, to_openpose_dict, to_pose_keypoint)
from dreamoving_core.preprocess.render import draw_pose, draw_poses
from dreamoving_core.preprocess.retarget import BODY_TREE, bone_lengths, retarget_poses
from dreamoving_core.preprocess.smoothing import smooth_poses
from dreamoving_core.preprocess.zoedepth import depth_to_hint, load_zoedepth

# OpenPose body index -> COCO-WholeBody index (neck = 1 is the shoulders' midpoint)
OPENPOSE_FROM_COCO = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15,
                      14: 2, 15: 1, 16: 4, 17: 3}


@pytest.fixture(scope="module")
def model() -> dwpose.DWPose:
    return dwpose.DWPose(tiny.yolox_onnx(), tiny.dwpose_onnx(), device="cpu")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return tiny.synthetic_dance_frames(4, 64)


# --- ONNX models and decoding -------------------------------------------------------------------------------------

def test_tiny_onnx_models_have_the_real_io_names_and_shapes():
    import onnxruntime as ort

    def io(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return ([(i.name, i.shape) for i in s.get_inputs()], [(o.name, o.shape) for o in s.get_outputs()])

    assert io(tiny.yolox_onnx()) == ([("images", [1, 3, 640, 640])], [("output", [1, 8400, 85])])
    assert io(tiny.dwpose_onnx()) == ([("input", [1, 3, 384, 288])],
                                      [("simcc_x", [1, 133, 576]), ("simcc_y", [1, 133, 768])])


def test_simcc_decoding_matches_a_hand_computed_example():
    simcc_x = np.array([[[0.1, 0.2, 0.9, 0.3, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.7],
                         [-0.5, -0.2, -0.1, -0.4, -0.3, -0.6]]], dtype=np.float32)
    simcc_y = np.array([[[0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9]]], dtype=np.float32)
    locs, scores = dwpose.decode_simcc(simcc_x, simcc_y, split_ratio=2.0)
    # bins (2, 3) -> pixels (1.0, 1.5), score min(0.9, 0.4); bins (5, 1) -> (2.5, 0.5), min(0.7, 0.8);
    # a keypoint whose x maximum is negative has no location
    np.testing.assert_allclose(locs[0], [[1.0, 1.5], [2.5, 0.5], [-1, -1]])
    np.testing.assert_allclose(scores[0], [0.4, 0.7, -0.1], rtol=1e-6)


def test_yolox_decoding_puts_boxes_on_the_anchor_grid_and_nms_keeps_the_best():
    size = (64, 64)  # anchors: 8x8 (stride 8) + 4x4 (16) + 2x2 (32) = 84
    out = np.zeros((84, 85), np.float32)
    # stride-16 anchor at grid (1, 2): index 64 + 2 * 4 + 1
    out[73, :4] = [0.5, 0.25, math.log(20 / 16), math.log(30 / 16)]
    out[73, 4], out[73, 5], out[73, 6] = 0.9, 0.8, 0.95  # person score 0.72 (class 1 ignored)
    out[74, :4] = [0.0, 0.25, math.log(20 / 16), math.log(30 / 16)]  # grid (2, 2), 8 px to the right: IoU 0.448
    out[74, 4], out[74, 5] = 0.9, 0.5
    out[72, :4] = [1.75, 0.25, math.log(20 / 16), math.log(30 / 16)]  # grid (0, 2), 4 px to the right: IoU 0.68
    out[72, 4], out[72, 5] = 0.9, 0.6
    boxes, scores = dwpose.decode_yolox(out, size)
    np.testing.assert_allclose(boxes[73], [24 - 10, 36 - 15, 24 + 10, 36 + 15], atol=1e-5)
    assert scores[73] == pytest.approx(0.72)
    keep = dwpose.nms(boxes[[73, 74, 72]], scores[[73, 74, 72]], 0.45)
    assert keep.tolist() == [0, 1]
    with pytest.raises(ModelFormatError, match="84"):
        dwpose.decode_yolox(np.zeros((100, 85), np.float32), size)


def test_letterbox_keeps_the_aspect_ratio_top_left_on_grey():
    image = np.full((32, 64, 3), 200, np.uint8)
    blob, ratio = dwpose.letterbox(image, (640, 640))
    assert ratio == 10 and blob.shape == (3, 640, 640) and blob.dtype == np.float32
    assert (blob[:, :320] == 200).all() and (blob[:, 320:] == 114).all()


def test_crop_affine_maps_the_padded_box_onto_the_estimator_input():
    matrix, center, size = dwpose.crop_affine(np.array([10.0, 20.0, 30.0, 100.0]), (288, 384), 1.25)
    np.testing.assert_allclose(center, [20, 60])
    np.testing.assert_allclose(size, [75, 100])  # 20x80 grown to 25x100, widened to 3:4
    corners = np.array([[center[0] - 37.5, center[1] - 50, 1], [center[0] + 37.5, center[1] + 50, 1]])
    np.testing.assert_allclose(corners @ matrix.T, [[0, 0], [288, 384]], atol=1e-9)


# --- the two-stage pipeline ---------------------------------------------------------------------------------------

def test_dwpose_finds_the_planted_person_with_openpose_body_order(model, frames):
    frame = model(frames[0], detect_resolution=64)
    assert (frame.height, frame.width) == (64, 64) and len(frame.people) == 1
    person, expected = frame.people[0], tiny.expected_keypoints()
    for op, coco in OPENPOSE_FROM_COCO.items():
        np.testing.assert_allclose(person.body[op, :2], expected[coco], atol=0.1, err_msg=f"body {op}")
    np.testing.assert_allclose(person.body[1, :2], expected[[5, 6]].mean(0), atol=0.1)  # neck
    np.testing.assert_allclose(person.left_hand[:, :2], expected[91:112], atol=0.1)
    np.testing.assert_allclose(person.right_hand[:, :2], expected[112:133], atol=0.1)
    np.testing.assert_allclose(person.face[:68, :2], expected[23:91], atol=0.1)
    np.testing.assert_allclose(person.face[68:, :2], person.body[[14, 15], :2])  # OpenPose's 70-point face
    assert (person.body[:, 2] > 0.85).all()


def test_detect_resolution_changes_the_work_size_not_the_coordinates(model, frames):
    small, large = model(frames[1], detect_resolution=0), model(frames[1], detect_resolution=512)
    np.testing.assert_allclose(large.people[0].body[:, :2], small.people[0].body[:, :2], atol=0.1)
    assert (large.height, large.width) == (64, 64)


def test_dwpose_finds_several_people():
    m = dwpose.DWPose(tiny.yolox_onnx(tiny.TWO_PEOPLE), tiny.dwpose_onnx(tiny.TWO_PEOPLE[0][:4]), device="cpu")
    frame = m(np.zeros((64, 64, 3), np.uint8), detect_resolution=64)
    assert len(frame.people) == 2
    for person, planted in zip(frame.people, tiny.TWO_PEOPLE):  # best score first
        np.testing.assert_allclose(person.body[0, :2], tiny.expected_keypoints(planted)[0], atol=0.1)


def test_keypoints_below_the_threshold_are_dropped(model, frames):
    strict = dwpose.DWPose(model.detector_path, model.estimator_path, "cpu",
                           dwpose.DWPoseConfig(keypoint_threshold=0.95))
    assert strict(frames[0], 64).people[0].body[:, 2].max() == 0


def test_no_person_gives_an_empty_frame(frames):
    nobody = dwpose.DWPose(tiny.yolox_onnx(((320.0, 330.0, 220.0, 560.0, 0.2),)), tiny.dwpose_onnx(), "cpu")
    frame = nobody(frames[0], 64)
    assert frame.people == [] and (frame.height, frame.width) == (64, 64)
    assert draw_pose(frame).max() == 0


def test_video_reports_progress_per_frame(model, frames):
    seen = []
    out = model.video(torch.from_numpy(frames).float() / 255, detect_resolution=64, progress=seen.append)
    assert seen == [1, 2, 3, 4] and len(out) == 4


def test_cpu_fallback_when_cuda_is_listed_but_fails(monkeypatch, caplog):
    import onnxruntime as ort

    real_session = ort.InferenceSession
    tried = []

    def session(path, options=None, providers=None):
        tried.append(list(providers))
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return real_session(path, options, providers=providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    with caplog.at_level(logging.INFO, logger="dreamoving_core.onnx_sessions"):
        m = dwpose.DWPose(tiny.yolox_onnx(), tiny.dwpose_onnx(), device="auto")
        assert m.providers == ["CPUExecutionProvider", "CPUExecutionProvider"]
        assert len(m(tiny.synthetic_dance_frames(1)[0], 64).people) == 1
    assert tried == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]] * 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("the CUDA provider failed to start" in w and "libcudnn" in w for w in warnings)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["DWPose: onnxruntime runs yolox_l.onnx on CPUExecutionProvider, dw-ll_ucoco_384.onnx on "
                     "CPUExecutionProvider"]


def test_sessions_open_on_first_use_stay_open_and_release_closes_them():
    m = dwpose.DWPose(tiny.yolox_onnx(), tiny.dwpose_onnx(), device="cpu")
    assert not any(model.is_open for model in m.models)
    assert m.detector is m.detector and [model.is_open for model in m.models] == [True, False]
    before = m(tiny.synthetic_dance_frames(1)[0], 64)
    m.release()
    assert not any(model.is_open for model in m.models)
    after = m(tiny.synthetic_dance_frames(1)[0], 64)  # reopened
    np.testing.assert_array_equal(after.people[0].body, before.people[0].body)


def test_swapped_model_files_are_refused_with_a_clear_message():
    swapped = dwpose.DWPose(tiny.dwpose_onnx(), tiny.yolox_onnx(), device="cpu")
    with pytest.raises(ModelFormatError, match="'dw-ll_ucoco_384.onnx' is not a YOLOX detector"):
        swapped(np.zeros((64, 64, 3), np.uint8))


def test_missing_or_corrupt_onnx_file_is_a_dreamoving_error(tmp_path):
    with pytest.raises(DreaMovingError, match="does not exist"):
        dwpose.onnx_session(tmp_path / "yolox_l.onnx")
    bad = tmp_path / "dw-ll_ucoco_384.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ModelFormatError, match="'dw-ll_ucoco_384.onnx' is not a loadable ONNX model"):
        dwpose.onnx_session(bad, "cpu")


def test_core_imports_no_comfyui_and_no_heavy_library():
    code = ("import sys, dreamoving_core.preprocess.dwpose, dreamoving_core.preprocess.zoedepth, dreamoving_core.preprocess.render, "
            "dreamoving_core.preprocess.smoothing, dreamoving_core.preprocess.retarget\n"
            "bad = [m for m in ('onnxruntime', 'cv2', 'transformers', 'comfy', 'folder_paths') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


# --- OpenPose JSON (POSE_KEYPOINT) ---------------------------------------------------------------------------------

def test_openpose_json_has_the_comfyui_controlnet_aux_layout(model, frames):
    data = to_openpose_dict(model(frames[0], 64))
    assert set(data) == {"people", "canvas_height", "canvas_width"}
    assert (data["canvas_height"], data["canvas_width"]) == (64, 64)
    person = data["people"][0]
    assert set(person) == {"pose_keypoints_2d", "face_keypoints_2d", "hand_left_keypoints_2d",
                           "hand_right_keypoints_2d"}
    assert [len(person[k]) for k in sorted(person)] == [3 * NUM_FACE, 3 * NUM_HAND, 3 * NUM_HAND, 3 * NUM_BODY]
    assert all(isinstance(v, float) for v in person["pose_keypoints_2d"])
    assert person["pose_keypoints_2d"][2::3] == [1.0] * NUM_BODY  # present keypoints carry confidence 1.0


def test_wholebody_keypoints_map_to_openpose_order_with_neck_and_threshold():
    keypoints, scores = np.zeros((1, 133, 2)), np.zeros((1, 133))
    keypoints[0, :17] = [(10 * i, 10 * i + 1) for i in range(17)]
    scores[0, :17] = 0.9
    scores[0, 6] = 0.2  # right shoulder below the 0.3 threshold
    person = from_wholebody(keypoints, scores, 100, 200).people[0]
    for op, coco in OPENPOSE_FROM_COCO.items():
        expected = [0, 0, 0] if coco == 6 else [10 * coco, 10 * coco + 1, 0.9]
        np.testing.assert_allclose(person.body[op], expected, rtol=1e-6, err_msg=f"body {op}")
    assert person.body[1, 2] == 0  # no neck without both shoulders
    scores[0, 6] = 0.8
    neck = from_wholebody(keypoints, scores, 100, 200).people[0].body[1]
    np.testing.assert_allclose(neck, [55, 56, 0.8], rtol=1e-6)  # midpoint of shoulders 5 and 6, weaker score
    data = to_openpose_dict(from_wholebody(keypoints, scores, 100, 200))
    assert data["people"][0]["face_keypoints_2d"] is None  # eyes alone do not make a face


def test_openpose_json_marks_missing_keypoints_and_parts():
    p = Person()
    p.body[0] = (10, 20, 0.8)
    data = to_openpose_dict(PoseFrame([p], 48, 64))
    body = data["people"][0]["pose_keypoints_2d"]
    assert body[:3] == [10.0, 20.0, 1.0] and body[3:] == [0.0] * 51
    assert data["people"][0]["face_keypoints_2d"] is None and data["people"][0]["hand_left_keypoints_2d"] is None


def test_openpose_json_round_trips_and_reads_normalised_coordinates(model, frames):
    seq = [model(f, 64) for f in frames[:2]]
    back = from_pose_keypoint(to_pose_keypoint(seq))
    for a, b in zip(seq, back):
        for name, part in a.people[0].parts().items():
            np.testing.assert_allclose(getattr(b.people[0], name)[:, :2], part[:, :2], atol=1e-4)
    normalised = {"people": [{"pose_keypoints_2d": [0.5, 0.25, 1.0] + [0.0] * 51}], "canvas_height": 100,
                  "canvas_width": 200}
    assert from_openpose_dict(normalised).people[0].body[0].tolist() == [100.0, 25.0, 1.0]
    with pytest.raises(InputMismatchError, match="canvas_height"):
        from_openpose_dict({"people": []})


# --- rendering ------------------------------------------------------------------------------------------------------

# A spread-out person on a 512x512 canvas: no two limbs cross near their midpoints.
SPREAD_BODY = [(256, 60), (256, 120), (186, 120), (116, 200), (60, 280), (326, 120), (396, 200), (452, 280),
               (206, 280), (190, 380), (176, 480), (306, 280), (322, 380), (336, 480), (226, 40), (286, 40),
               (196, 60), (316, 60)]
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
OPENPOSE_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                   (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                   (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def spread_person() -> Person:
    p = Person()
    p.body[:] = [(x, y, 1.0) for x, y in SPREAD_BODY]
    return p


def test_body_limb_midpoints_and_joints_have_the_openpose_colours():
    image = draw_pose(PoseFrame([spread_person()], 512, 512), hands=False, face=False)
    for i, (a, b) in enumerate(LIMBS):
        (xa, ya), (xb, yb) = SPREAD_BODY[a - 1], SPREAD_BODY[b - 1]
        mid = image[int((ya + yb) / 2), int((xa + xb) / 2)]
        assert tuple(mid) == tuple(int(c * 0.6) for c in OPENPOSE_COLORS[i]), f"limb {i} {a}-{b}"
    for k, (x, y) in enumerate(SPREAD_BODY):
        assert tuple(image[y, x]) == OPENPOSE_COLORS[k], f"joint {k}"
    assert tuple(image[500, 10]) == (0, 0, 0)


def test_hand_bones_have_hsv_colours_and_blue_joints_and_face_dots_are_white():
    p = Person()
    wrist = np.array([256.0, 100.0])
    p.right_hand[0] = (*wrist, 1.0)
    for f in range(5):
        direction = np.array([math.cos(math.radians(30 + 30 * f)), math.sin(math.radians(30 + 30 * f))])
        for j in range(1, 5):
            p.right_hand[4 * f + j] = (*(wrist + direction * 40 * j), 1.0)
    p.face[0] = (100, 400, 1.0)
    image = draw_pose(PoseFrame([p], 512, 512), body=False)
    edges = [(0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)]
    for i, (a, b) in enumerate(edges):
        mid = (p.right_hand[a, :2] + p.right_hand[b, :2]) / 2
        expected = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(i / 20, 1.0, 1.0))
        pixel = image[int(round(mid[1])), int(round(mid[0]))]
        assert np.abs(pixel.astype(int) - expected).max() <= 1, f"hand bone {i}: {pixel} != {expected}"
    tip = p.right_hand[4, :2].astype(int)
    assert tuple(image[tip[1], tip[0]]) == (0, 0, 255)
    assert tuple(image[400, 100]) == (255, 255, 255)


def test_toggles_and_canvas_size():
    frame = PoseFrame([spread_person()], 512, 512)
    assert draw_pose(frame, body=False).max() == 0
    batch = draw_poses([frame, frame], 128, 64)
    assert batch.shape == (2, 128, 64, 3) and batch.dtype == torch.float32 and 0 < batch.max() <= 1
    # keypoints are rescaled to the canvas: the nose (256, 60) of 512x512 lands at (32, 15) of 64x128
    assert tuple((batch[0, 15, 32] * 255).round().int().tolist()) == OPENPOSE_COLORS[0]


# --- smoothing ----------------------------------------------------------------------------------------------------

def noisy_track(frames: int = 90, fps: float = 30.0, noise: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / fps
    moving = np.stack([256 + 100 * np.sin(2 * np.pi * 0.8 * t), 256 + 40 * np.cos(2 * np.pi * 0.5 * t)], 1)
    still = np.full_like(moving, 200.0)
    seq = []
    for i in range(frames):
        p = Person()
        p.body[:, :2], p.body[:, 2] = moving[i] + rng.normal(0, noise, 2), 1.0
        p.body[1, :2] = still[i] + rng.normal(0, noise, 2)
        seq.append(PoseFrame([p], 512, 512))
    return seq, moving, still


def jitter(track: np.ndarray) -> float:
    return float(np.abs(np.diff(track, 2, axis=0)).mean())


def test_one_euro_smoothing_lowers_jitter_on_a_noisy_track():
    seq, moving, still = noisy_track()
    out = smooth_poses(seq, fps=30.0)
    raw_m, raw_s = (np.stack([f.people[0].body[k, :2] for f in seq]) for k in (0, 1))
    sm_m, sm_s = (np.stack([f.people[0].body[k, :2] for f in out]) for k in (0, 1))
    assert jitter(sm_s) < 0.3 * jitter(raw_s)  # a still joint: jitter mostly gone
    assert np.sqrt(((sm_s[10:] - still[10:]) ** 2).mean()) < 0.6 * np.sqrt(((raw_s - still) ** 2).mean())
    assert jitter(sm_m) < 0.8 * jitter(raw_m)  # a dancing joint: smoother, and it keeps up
    assert np.sqrt(((sm_m - moving) ** 2).mean()) < 4.0
    assert seq[5].people[0].body[0, 0] == raw_m[5, 0], "smoothing must not modify its input"


def test_smoothing_follows_people_by_position_and_restarts_lost_keypoints():
    seq, _, _ = noisy_track(frames=20, noise=0.0)
    far = []
    for i, f in enumerate(seq):
        other = f.people[0].scaled(0.2, 1.0)
        people = [other, f.people[0]] if i % 2 else [f.people[0], other]  # list order flips every frame
        far.append(PoseFrame(people, 512, 512))
    far[10].people[1 if 10 % 2 else 0].body[0, 2] = 0  # the nose vanishes for one frame
    out = smooth_poses(far)
    for f_in, f_out in zip(far, out):
        for a, b in zip(f_in.people, f_out.people):
            assert abs(a.body[2, 0] - b.body[2, 0]) < 20, "people were swapped between tracks"
    assert out[10].people[0].body[0, 2] == 0
    np.testing.assert_allclose(out[11].people[1].body[0, :2], far[11].people[1].body[0, :2])  # restarted


# --- retargeting ----------------------------------------------------------------------------------------------------

def test_retargeting_keeps_joint_angles_and_takes_the_reference_proportions():
    reference = spread_person()
    reference.body[[9, 10, 12, 13], 1] += 60  # long legs: knees and ankles lower
    reference.body[[10, 13], 1] += 60
    rng = np.random.default_rng(1)
    frames = []
    for i in range(6):
        p = Person()
        p.body[1] = (256, 150, 1)
        for (a, b), length in zip(BODY_TREE, [40, 50, 45, 40, 50, 45, 90, 70, 70, 90, 70, 70, 50, 15, 20, 15, 20]):
            angle = rng.uniform(0, 2 * np.pi)
            p.body[b] = (*(p.body[a, :2] + length * np.array([np.cos(angle), np.sin(angle)])), 1)
        frames.append(PoseFrame([p], 512, 512))
    out = retarget_poses(frames, reference)
    ref_len = bone_lengths(reference.body, BODY_TREE)
    drv_size = bone_lengths(frames[0].people[0].body, BODY_TREE).sum()
    for f_in, f_out in zip(frames, out):
        a, b = f_in.people[0].body, f_out.people[0].body
        new_len = bone_lengths(b, BODY_TREE)
        np.testing.assert_allclose(new_len / new_len.sum(), ref_len / ref_len.sum(), rtol=1e-5)  # proportions
        assert new_len.sum() == pytest.approx(drv_size, rel=1e-5)  # the dancer's size is kept
        for p, c in BODY_TREE:  # every bone keeps its direction: joint angles unchanged
            u, v = a[c, :2] - a[p, :2], b[c, :2] - b[p, :2]
            assert math.atan2(u[1], u[0]) == pytest.approx(math.atan2(v[1], v[0]), abs=1e-5)
        np.testing.assert_allclose(b[1, :2], a[1, :2])  # anchored at the neck


def test_retargeting_carries_hands_and_face_along():
    drv = spread_person()
    drv.right_hand[:, :2], drv.right_hand[:, 2] = drv.body[4, :2] + np.arange(21)[:, None] * [1.0, 2.0], 1
    drv.face[:68, :2], drv.face[:68, 2] = drv.body[0, :2] + np.arange(68)[:, None] * [0.5, 0.1], 1
    ref = spread_person()
    ref.body[3, :2] = ref.body[2, :2] + (ref.body[3, :2] - ref.body[2, :2]) * 1.5  # longer upper arm
    ref.body[4, :2] = ref.body[3, :2] + (drv.body[4, :2] - drv.body[3, :2])
    out = retarget_poses([PoseFrame([drv], 512, 512)], ref)[0].people[0]
    np.testing.assert_allclose(out.right_hand[0, :2], out.body[4, :2])  # the hand follows its wrist
    assert not np.allclose(out.body[4, :2], drv.body[4, :2])
    np.testing.assert_allclose(out.face[0, :2], out.body[0, :2])  # the face follows the nose


def test_retargeting_needs_a_reference_body():
    with pytest.raises(InputMismatchError, match="reference pose with a body"):
        retarget_poses([PoseFrame([spread_person()], 512, 512)], Person())


# --- ZoeDepth -------------------------------------------------------------------------------------------------------

def test_zoedepth_from_a_tiny_config_end_to_end():
    model = load_zoedepth(tiny.zoedepth_dir())
    assert load_zoedepth(tiny.zoedepth_dir()) is not model  # nothing is cached between calls
    frames = torch.from_numpy(tiny.synthetic_dance_frames(3, 64)[:, 8:56]).float() / 255  # 48x64
    seen = []
    depth = model.depth(frames, batch_size=2, progress=seen.append)
    assert depth.shape == (3, 48, 64) and torch.isfinite(depth).all() and depth.std() > 0
    assert seen == [2, 3]
    hint = depth_to_hint(depth)
    assert hint.shape == (3, 48, 64, 3) and hint.min() >= 0 and hint.max() == 1
    # padding removal and resize agree with transformers' own post-processing
    pixels = model.processor(images=list((frames * 255).round().byte().permute(0, 3, 1, 2)), return_tensors="pt")
    with torch.no_grad():
        outputs = model.model(**pixels)
    ref = model.processor.post_process_depth_estimation(outputs, source_sizes=[(48, 64)] * 3)
    torch.testing.assert_close(depth, torch.stack([r["predicted_depth"] for r in ref]), atol=1e-3, rtol=1e-3)


def test_depth_hint_is_bright_near_and_shares_the_video_scale():
    depth = torch.linspace(1, 10, 100).reshape(1, 10, 10).repeat(2, 1, 1)
    depth[1] *= 2  # the second frame is further away everywhere
    hint = depth_to_hint(depth)[..., 0]
    assert hint[0, 0, 0] == 1 and hint[1, -1, -1] == 0  # nearest bright, beyond the 85th percentile black
    assert (hint[0].flatten().diff() <= 0).all()
    assert hint[1].mean() < hint[0].mean()  # one scale for the whole video
    per_frame = depth_to_hint(depth, per_frame=True)[..., 0]
    torch.testing.assert_close(per_frame[0], per_frame[1])


def test_a_folder_that_is_not_zoedepth_is_refused(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_zoedepth(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "dpt"}')
    with pytest.raises(ModelFormatError, match="'dpt' model; expected a ZoeDepth"):
        load_zoedepth(tmp_path)


# --- GPU (python dev.py test -m gpu) ---------------------------------------------------------------------------------

@pytest.mark.gpu
def test_zoedepth_in_fp16_on_cuda_matches_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    frames = torch.from_numpy(tiny.synthetic_dance_frames(4, 64)).float() / 255
    cpu = load_zoedepth(tiny.zoedepth_dir()).depth(frames)
    gpu = load_zoedepth(tiny.zoedepth_dir(), "cuda", torch.float16).depth(frames)
    assert gpu.shape == cpu.shape and torch.isfinite(gpu).all()
    assert (gpu - cpu).abs().max() < 0.1 * cpu.abs().max()


@pytest.mark.gpu
def test_dwpose_runs_on_the_cuda_provider_when_onnxruntime_has_it(frames):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider: {ort.get_available_providers()}")
    m = dwpose.DWPose(tiny.yolox_onnx(), tiny.dwpose_onnx(), device="cuda")
    assert m.providers == ["CUDAExecutionProvider", "CUDAExecutionProvider"]
    expected = tiny.expected_keypoints()
    np.testing.assert_allclose(m(frames[0], 64).people[0].body[0, :2], expected[0], atol=0.1)
