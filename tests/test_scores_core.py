"""Scores core (no ComfyUI): cases whose answer is known, with the tiny DWPose / InsightFace / CLIP models and tiny
feature networks in the real file formats; paired metrics against scikit-image and written-out formulas."""
from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.server import PACK_DIR
from devtools.tiny import content_guider as tiny_face
from devtools.tiny import eval as tiny
from devtools.tiny import preprocess as tiny_pose
from dreamoving_core.errors import InputMismatchError, ModelFormatError
from dreamoving_core.eval import EvalModels, ScoreReport, ValidationScorer, score_video
from dreamoving_core.eval.cli import compare_table, main
from dreamoving_core.eval.models import FEATURE_FILES
from dreamoving_core.eval.networks import Lpips, VideoFeatures, clips
from dreamoving_core.eval.paired import frechet_distance, pixel_metrics
from dreamoving_core.eval.pose_fidelity import main_person, to_canvas
from dreamoving_core.eval.temporal import low_pass_luma
from dreamoving_core.guider.clip_image import ClipImageEncoder
from dreamoving_core.guider.face_id import FaceAnalyzer
from dreamoving_core.preprocess.dwpose import DWPose
from dreamoving_core.preprocess.pose import PoseFrame, to_pose_keypoint

FRAMES = 8


@pytest.fixture(scope="module")
def dwpose() -> DWPose:
    return DWPose(tiny.following_yolox_onnx(), tiny_pose.dwpose_onnx(), device="cpu")


@pytest.fixture(scope="module")
def dance() -> np.ndarray:
    return tiny_pose.synthetic_dance_frames(FRAMES, 64)


@pytest.fixture(scope="module")
def driving(dwpose, dance) -> list[PoseFrame]:
    """The driving keypoints: our DWPose on the driving video's own frames."""
    return dwpose.video(dance, 64)


@pytest.fixture(scope="module")
def faces() -> FaceAnalyzer:
    return FaceAnalyzer(tiny_face.insightface_root() / "models" / "buffalo_l", "cpu")


@pytest.fixture(scope="module")
def clip():
    return EvalModels.from_clip_encoder(ClipImageEncoder.from_file(tiny_face.clip_vision_file(init_factor=4.0)))


def person_size(frame: PoseFrame) -> float:
    person = main_person(frame)
    rows = np.concatenate(list(person.parts().values()))
    xy = rows[rows[:, 2] > 0, :2]
    return float((xy.max(0) - xy.min(0)).max())


# --- pose fidelity ----------------------------------------------------------------------------------------------

def test_the_driving_videos_own_frames_give_pose_error_0_and_pck_1(dwpose, dance, driving):
    assert all(len(f.people) == 1 for f in driving)
    report = score_video(dance, driving=to_pose_keypoint(driving), models=EvalModels(dwpose=dwpose,
                                                                                      detect_resolution=64))
    for part in ("body", "hands", "face"):
        assert report.scores[f"pose/{part}/error"] == pytest.approx(0.0, abs=1e-6)
        assert report.scores[f"pose/{part}/pck_0.05"] == report.scores[f"pose/{part}/pck_0.1"] == 1.0
        assert report.scores[f"pose/{part}/oks"] == pytest.approx(1.0, abs=1e-6)
    assert report.scores["pose/lost_frames"] == 0
    assert report.per_frame["pose/body/error"] == pytest.approx([0.0] * FRAMES, abs=1e-6)


def test_training_validation_scorer_is_score_video_with_the_models_of_a_models_folder(tmp_path, dance, driving,
                                                                                      monkeypatch):
    from dreamoving_core.train.validate import load_scorer

    scorer = load_scorer("dreamoving_core.eval:validation_scorer")
    assert isinstance(scorer, ValidationScorer)
    frames = torch.from_numpy(dance).float() / 255
    keypoints = to_pose_keypoint(driving)
    monkeypatch.setenv("DREAMOVING_EVAL_MODELS", str(tmp_path))  # an empty models folder: no pose model
    bare = ValidationScorer()(frames, driving=keypoints, face=None)
    assert bare == score_video(frames, driving=keypoints).flat() and "temporal/flicker" in bare
    assert not any(k.startswith("pose/") for k in bare)
    preprocess = tmp_path / "dreamoving" / "preprocess"
    preprocess.mkdir(parents=True)
    for src, name in ((tiny.following_yolox_onnx(), "yolox_l.onnx"), (tiny_pose.dwpose_onnx(), "dw-ll_ucoco_384.onnx")):
        (preprocess / name).symlink_to(src)
    posed = ValidationScorer(tmp_path)(frames, driving=keypoints, face=None)
    assert "pose/body/pck_0.1" in posed and posed["temporal/flicker"] == bare["temporal/flicker"]
    assert posed == score_video(frames, driving=keypoints, models=EvalModels.from_models_dir(tmp_path)).flat()


def test_frames_shifted_by_k_pixels_give_an_error_growing_with_k(dwpose, dance, driving):
    models = EvalModels(dwpose=dwpose, detect_resolution=64)
    size = np.mean([person_size(f) for f in driving])
    errors, pck, oks = [], [], []
    for k in (1, 2, 4, 8):
        report = score_video(np.roll(dance, k, axis=2), driving=driving, models=models)  # k pixels to the right
        errors.append(report.scores["pose/body/error"])
        pck.append(report.scores["pose/body/pck_0.05"])
        oks.append(report.scores["pose/body/oks"])
        assert report.scores["pose/body/error"] == pytest.approx(k / size, rel=0.05)
    assert errors == sorted(errors) and len(set(errors)) == 4
    assert oks == sorted(oks, reverse=True) and oks[0] < 1 and oks[-1] < 0.5
    assert pck[0] == 1.0 and pck[-1] == 0.0  # 1 px is within 0.05 person sizes, 8 px is not


def test_frames_without_a_person_are_counted_as_lost_not_crashed_on(dwpose, dance, driving):
    dark = dance.copy()
    dark[[2, 5]] = 0
    report = score_video(dark, driving=driving, models=EvalModels(dwpose=dwpose, detect_resolution=64))
    assert report.scores["pose/lost_frames"] == 2 and report.scores["pose/lost_share"] == 2 / FRAMES
    assert report.per_frame["pose/body/error"][2] is None and report.per_frame["pose/body/error"][5] is None
    assert report.scores["pose/body/pck_0.1"] == pytest.approx(6 / FRAMES)
    assert report.scores["pose/body/error"] == pytest.approx(0.0, abs=1e-6)
    # driving frames without a person are not scored at all
    empty = [PoseFrame([], 64, 64)] * FRAMES
    report = score_video(dance, driving=empty, models=EvalModels(dwpose=dwpose, detect_resolution=64))
    assert "pose/body/error" not in report.scores and "no person" in report.unavailable["pose"]


def test_driving_keypoints_on_another_canvas_are_centre_cropped_like_the_hints(driving):
    wide = PoseFrame([p.scaled(2.0, 1.0) for p in driving[0].people], 64, 128)  # the same pose on a 2:1 canvas
    for person in wide.people:
        for part in person.parts().values():
            part[part[:, 2] > 0, 0] += 32  # ... centred in it
    mapped = to_canvas(wide, 64, 64)
    # scaled to cover 64x64 (factor 1) and centre-cropped (shift -32): x back to 2x, then minus 32
    original, moved = driving[0].people[0].body, mapped.people[0].body
    present = original[:, 2] > 0
    np.testing.assert_allclose(moved[present, 0], original[present, 0] * 2, atol=1e-4)
    np.testing.assert_allclose(moved[present, 1], original[present, 1], atol=1e-4)


# --- identity ---------------------------------------------------------------------------------------------------

def other_face() -> torch.Tensor:
    """Another "face" for the tiny pack: still red (the tiny detector finds it), with a green ramp inside."""
    face = tiny_face.face_image(64)[0].clone()
    face[16:48, 16:48, 1] = torch.linspace(0, 1, 32)[None, :]
    return face


def test_a_face_scored_against_itself_gives_cosine_1_and_against_another_face_less(faces):
    face = tiny_face.face_image(64)[0]
    models = EvalModels(faces=faces)
    same = score_video(face[None].expand(4, -1, -1, -1), face=face, models=models)
    assert same.scores["identity/cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert same.scores["identity/cosine_min"] == pytest.approx(1.0, abs=1e-5)
    other = score_video(other_face()[None].expand(4, -1, -1, -1), face=face, models=models)
    assert other.scores["identity/cosine_mean"] < 0.95
    # the reference as an ArcFace embedding (a face record of data preparation) gives the same numbers
    embedding = torch.from_numpy(faces.identity(face.numpy(), "face").embedding) * 3.0
    assert score_video(other_face()[None], face=embedding, models=models).scores["identity/cosine_mean"] == \
        pytest.approx(other.scores["identity/cosine_mean"], abs=1e-6)


def test_frames_without_a_face_are_counted_and_a_reference_without_a_face_is_refused(faces):
    face, grey = tiny_face.face_image(64)[0], tiny_face.face_image(64, face=False)[0]
    models = EvalModels(faces=faces)
    report = score_video(torch.stack([face, grey, other_face(), grey]), face=face, models=models)
    assert report.scores["identity/no_face_share"] == 0.5
    cosine = report.per_frame["identity/cosine"]
    assert cosine[1] is None and cosine[3] is None and cosine[0] == pytest.approx(1.0, abs=1e-5)
    assert report.scores["identity/cosine_min"] == pytest.approx(cosine[2])
    nobody = score_video(grey[None].expand(3, -1, -1, -1), face=face, models=models)
    assert nobody.scores["identity/no_face_share"] == 1.0 and "identity/cosine_mean" not in nobody.scores
    assert "no face" in nobody.unavailable["identity/cosine_mean"]
    with pytest.raises(InputMismatchError, match="no face found in the face input"):
        score_video(face[None], face=grey, models=models)


# --- temporal consistency ---------------------------------------------------------------------------------------

def test_a_still_video_gives_consistency_1_and_flicker_0_and_a_noise_video_much_less(clip):
    models = EvalModels(clip=clip)
    still = score_video(torch.rand(1, 64, 64, 3).expand(6, -1, -1, -1), models=models)
    assert still.scores["temporal/clip_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert still.scores["temporal/flicker"] == 0.0
    noise = score_video(torch.rand(6, 64, 64, 3, generator=torch.Generator().manual_seed(0)), models=models)
    assert noise.scores["temporal/clip_consistency"] < 0.8
    assert noise.scores["temporal/flicker"] > 0.03
    assert len(noise.per_frame["temporal/clip_consistency"]) == len(noise.per_frame["temporal/flicker"]) == 5


def test_flicker_is_the_mean_change_of_cell_averaged_luma():
    frames = torch.rand(3, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    luma = 0.299 * frames[..., 0] + 0.587 * frames[..., 1] + 0.114 * frames[..., 2]
    cells = luma.reshape(3, 16, 2, 24, 2).mean(dim=(2, 4))  # 16 cells on the shorter side: 2x2 pixels each
    torch.testing.assert_close(low_pass_luma(frames), cells)
    report = score_video(frames)
    expected = [(cells[i + 1] - cells[i]).abs().mean().item() for i in range(2)]
    assert report.per_frame["temporal/flicker"] == pytest.approx(expected, abs=1e-6)
    brighter = score_video(torch.stack([frames[0], (frames[0] + 0.1).clamp(max=1)]))
    assert brighter.scores["temporal/flicker"] > 0.05


# --- paired metrics ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    truth = torch.from_numpy(tiny_pose.synthetic_dance_frames(4, 64)).float() / 255
    return (truth + 0.05 * torch.randn(truth.shape, generator=g)).clamp(0, 1), truth


def test_l1_psnr_and_ssim_equal_scikit_image_on_the_same_frames(pair):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    frames, truth = pair
    ours = pixel_metrics(frames, truth)
    x, y = frames.double().numpy(), truth.double().numpy()
    for i in range(len(x)):
        assert ours["paired/l1"][i].item() == pytest.approx(np.abs(x[i] - y[i]).mean(), abs=1e-6)
        assert ours["paired/psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(y[i], x[i], data_range=1.0),
                                                              abs=1e-4)
        # torchmetrics keeps the border (reflect-padded windows), scikit-image crops it: give scikit-image the
        # same reflected border, which it then crops away again
        padded = [np.pad(a, ((5, 5), (5, 5), (0, 0)), mode="reflect") for a in (y[i], x[i])]
        reference = structural_similarity(*padded, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
        assert ours["paired/ssim"][i].item() == pytest.approx(reference, abs=1e-5)
    same = pixel_metrics(truth, truth)
    assert same["paired/l1"].abs().max() == 0 and (same["paired/ssim"] - 1).abs().max() < 1e-6
    assert torch.isinf(same["paired/psnr"]).all()


def test_lpips_equals_the_lpips_formula_on_the_tiny_alexnet(pair):
    import torchvision
    from torchmetrics.functional.image import lpips as tm_lpips

    frames, truth = pair
    net = Lpips.from_file(tiny.alexnet_file(), "alex")
    ours = net(frames, truth)
    # Zhang et al. 2018: unit-normalise each layer's channels, squared difference, weighted by the linear
    # layers, spatial mean, summed over AlexNet's relu1..relu5.
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet.load_state_dict(torch.load(tiny.alexnet_file(), weights_only=True), strict=False)
    alexnet = alexnet.features
    lin = torch.load(Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth", map_location="cpu",
                     weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def layers(images):
        x = ((images.movedim(-1, 1) * 2 - 1) - shift) / scale
        out = []
        for i, layer in enumerate(alexnet):
            x = layer(x)
            if i in (1, 4, 7, 9, 11):
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8))
        return out

    with torch.no_grad():
        expected = sum((lin[f"lin{k}.model.1.weight"] * (a - b) ** 2).sum(1).mean(dim=(1, 2))
                       for k, (a, b) in enumerate(zip(layers(frames), layers(truth))))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (net(truth, truth).abs() < 1e-6).all()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula as pytorch-fid writes it (scipy's matrix square root)."""
    from scipy import linalg

    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # few samples: singular covariances
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n, m, d", [(40, 30, 8), (6, 9, 32), (5, 5, 64)], ids=["N > D", "N < D", "N = M < D"])
def test_frechet_distance_equals_the_scipy_formula(n, m, d):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a.double().numpy(), b.double().numpy()), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def feature_dir(tmp_path: Path, *files: Path) -> Path:
    """A models/dreamoving/eval folder holding only ``files`` (each score costs only its own network)."""
    folder = tmp_path / "eval"
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def test_fid_of_the_inception_equals_the_formula_on_its_features(pair, tmp_path):
    frames, truth = pair[0][:2], pair[1][:2]  # the FID Inception is full size: keep it to 2 + 2 frames
    models = EvalModels(feature_dirs=(feature_dir(tmp_path, tiny.inception_file()),), device=torch.device("cpu"))
    report = score_video(frames, truth=truth, models=models)
    net, source = models.feature_net("distribution/fid")
    assert source == report.details["distribution/fid"] == "pt_inception-2015-12-05-6726825d.pth"
    features = net(torch.cat([frames, truth]))
    assert features.shape == (4, 2048)
    expected = frechet_distance(features[:2], features[2:])  # the formula is checked against scipy above
    assert expected > 1e-3 and report.scores["distribution/fid"] == pytest.approx(expected, rel=1e-5)


def test_fvd_and_fid_vid_equal_the_formula_on_their_clip_features(pair, tmp_path):
    truth = pair[1].repeat(5, 1, 1, 1)[:17]  # 17 frames: two 16-frame clips
    frames = torch.flip(truth, dims=[2])
    models = EvalModels(feature_dirs=(feature_dir(tmp_path, tiny.i3d_file(), tiny.resnet3d_file()),),
                        device=torch.device("cpu"))
    report = score_video(frames, truth=truth, models=models)
    same = score_video(truth, truth=truth, models=models)
    short = score_video(truth[:16], truth=truth[:16], models=models)
    for score in ("distribution/fvd", "distribution/fid_vid"):
        net, _ = models.feature_net(score)
        features = [net(v).double().numpy() for v in (frames, truth)]
        assert features[0].shape[0] == 2
        expected = scipy_frechet(*features)
        assert expected > 0 and report.scores[score] == pytest.approx(expected, rel=1e-3)
        assert same.scores[score] == pytest.approx(0, abs=1e-3 * expected)
        assert short.unavailable[score] == "needs at least 2 clips of 16 frames (17+ frames); the video has 16"


@pytest.mark.gpu
def test_the_scores_on_the_gpu_equal_those_on_the_cpu(pair, tmp_path):
    if not torch.cuda.is_available():
        pytest.fail("-m gpu needs a CUDA device")
    truth = pair[1].repeat(5, 1, 1, 1)[:17]
    frames = (truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    folder = feature_dir(tmp_path, tiny.alexnet_file(), tiny.inception_file(), tiny.i3d_file(), tiny.resnet3d_file())
    reports = [score_video(frames, truth=truth, models=EvalModels(feature_dirs=(folder,), device=torch.device(d)))
               for d in ("cpu", "cuda")]
    assert set(reports[0].scores) == set(reports[1].scores) and "distribution/fvd" in reports[1].scores
    for name, value in reports[0].scores.items():
        # cuDNN convolutions run in TF32 by default: agreement to about a percent
        assert reports[1].scores[name] == pytest.approx(value, rel=2e-2, abs=1e-3), name


def test_clip_features_follow_each_protocol():
    frames = torch.rand(20, 40, 50, 3, generator=torch.Generator().manual_seed(4))
    split = clips(frames)
    assert split.shape == (2, 3, 16, 40, 50)
    torch.testing.assert_close(split[1, :, 3:], frames[-1].movedim(-1, 0)[:, None].expand(-1, 13, -1, -1))
    i3d, resnet = VideoFeatures.i3d(tiny.i3d_file()), VideoFeatures.resnet3d(tiny.resnet3d_file())
    assert i3d(frames).shape == (2, 400) and resnet(frames).shape == (2, 128)
    assert (i3d.size, resnet.size) == (224, 112)


# --- missing weights, bad input, files ---------------------------------------------------------------------------

def test_a_score_whose_weights_are_missing_is_unavailable_naming_the_file(pair, tmp_path):
    frames, truth = pair
    report = score_video(frames, truth=truth, models=EvalModels(feature_dirs=(tmp_path,)))
    for score, files in FEATURE_FILES.items():
        assert score not in report.scores
        for name, _ in files:
            assert name in report.unavailable[score] and str(tmp_path) in report.unavailable[score]
    assert "paired/psnr" in report.scores  # the pixel metrics need no weights
    assert "InsightFace" in score_video(frames, face=truth[0], models=EvalModels()).unavailable["identity"]
    assert "DWPose" in score_video(frames, driving=[PoseFrame([], 64, 64)] * 4).unavailable["pose"]


@pytest.mark.parametrize("call, message", [
    (lambda f: score_video(f[:0]), "frames: the video is empty"),
    (lambda f: score_video(f, truth=f[:3]), "truth: the ground-truth video has 3 frames, the video has 4"),
    (lambda f: score_video(f, truth=f[:, :32]), "truth: the ground-truth frames are 64×32, the video's 64×64"),
    (lambda f: score_video(f, driving=[PoseFrame([], 64, 64)] * 5),
     "driving: the driving keypoints have 5 frames, the video has 4"),
    (lambda f: score_video(f[..., 0]), "frames: expected frames (F, H, W, 3)"),
], ids=["empty video", "truth frame count", "truth size", "driving frame count", "frames shape"])
def test_bad_input_is_a_clear_error_naming_the_input(pair, call, message):
    with pytest.raises(InputMismatchError) as err:
        call(pair[1])
    assert str(err.value).startswith(message)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_feature_files_never_unpickle_code(tmp_path):
    path = tmp_path / "i3d_pretrained_400.pt"
    with open(path, "wb") as f:
        pickle.dump({"Mixed_5c.b3b.conv3d.weight": _Exploit()}, f)
    with pytest.raises(ModelFormatError, match="refused without running them"):
        VideoFeatures.i3d(path)
    (tmp_path / "resnet-50-kinetics.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFormatError, match="resnet-50-kinetics.pth"):
        VideoFeatures.resnet3d(tmp_path / "resnet-50-kinetics.pth")


# --- the report and the command line -----------------------------------------------------------------------------

def test_the_report_round_trips_through_json_and_its_flat_view_is_finite(pair):
    frames, truth = pair
    report = score_video(truth, truth=truth)
    data = json.loads(report.to_json())
    assert data["scores"]["paired/psnr"] is None  # ∞ (identical) is not JSON
    assert data["about"]["paired/ssim"]["better"] == "higher"
    again = ScoreReport.from_dict(data)
    assert again.scores["paired/ssim"] == pytest.approx(1.0)
    flat = report.flat()
    assert "paired/psnr" not in flat and all(math.isfinite(v) for v in flat.values())
    table = compare_table(score_video(frames, truth=truth), report, ("noisy", "exact"))
    row = next(line for line in table.splitlines() if line.startswith("paired/ssim"))
    assert row.split()[-1] == "exact"


def test_the_command_scores_a_video_and_compares_two_runs(tmp_path, capsys):
    video = tiny_pose.synthetic_dance_video(tmp_path / "dance.mp4", frames=FRAMES, size=64)
    models = tmp_path / "models"
    (models / "dreamoving" / "preprocess").mkdir(parents=True)
    (models / "dreamoving" / "preprocess" / "yolox_l.onnx").symlink_to(tiny.following_yolox_onnx())
    (models / "dreamoving" / "preprocess" / "dw-ll_ucoco_384.onnx").symlink_to(tiny_pose.dwpose_onnx())
    out = subprocess.run([sys.executable, "-m", "dreamoving_core.eval", "score", str(video), "--driving", str(video),
                          "--truth", str(video), "--models", str(models), "--detect-resolution", "64", "--device",
                          "cpu", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")],
                         capture_output=True, text=True, cwd=PACK_DIR, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = ScoreReport.load(tmp_path / "a.json")
    assert report.frames == FRAMES and report.scores["pose/body/pck_0.1"] == 1.0
    assert "vgg16-397923af.pth" in report.unavailable["paired/lpips"] and "pose/body/pck_0.1" in out.stdout
    assert (tmp_path / "a.png").stat().st_size > 1000

    worse = report.scores | {"pose/body/pck_0.1": 0.5}
    (tmp_path / "b.json").write_text(json.dumps(ScoreReport(FRAMES, worse).to_dict()))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--plot",
                 str(tmp_path / "cmp.png")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pose/body/pck_0.1"))
    assert row.split()[1:] == ["1.0000", "0.5000", "-0.5000", "a"]
    assert (tmp_path / "cmp.png").is_file()
    assert main(["score", str(tmp_path / "missing.mp4"), "--json", str(tmp_path / "c.json")]) == 2
    assert f"error: VIDEO: '{tmp_path / 'missing.mp4'}' does not exist" in capsys.readouterr().err
