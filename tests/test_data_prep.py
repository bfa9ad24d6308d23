"""Data preparation (no ComfyUI): ``python -m dreamoving_core.data prepare`` on a synthetic dance film with two hard
cuts and a fade through black, a corrupt video and two photos, with tiny random models in their real formats.

The first run is the real command in a subprocess whose ``sys.path`` has no ComfyUI, with two workers; the other
runs call the same entry point in this process."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from devtools.tiny import data as tiny
from devtools.tiny import preprocess as tiny_preprocess
from dreamoving_core.data import cli
from dreamoving_core.data.captions import CACHE_SUFFIX, Captioner
from dreamoving_core.data.manifest import ClipRecord, FaceRecord, read_records
from dreamoving_core.data.prepare import find_sources
from dreamoving_core.data.scenes import ClipBounds, clip_ranges
from dreamoving_core.data.video import read_frames, read_image

PACK_ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--captioner", "tiny-llava", "--insightface", "buffalo_l", "--min-seconds", str(tiny.FILM_BOUNDS[0]),
        "--max-seconds", str(tiny.FILM_BOUNDS[1]), "--min-face-size", "0", "--caption-max-tokens", "12",
        "--depth-batch", "32"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("data")
    src, models, out = tiny.data_sources(root / "src"), tiny.models_folder(root / "models"), root / "out"
    run = subprocess.run([sys.executable, "-m", "dreamoving_core.data", "prepare", str(src), str(out),
                          "--models", str(models), "--workers", "2", *ARGS],
                         cwd=PACK_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    return SimpleNamespace(root=root, src=src, models=models, out=out, stdout=run.stdout,
                           clips=read_records(out / "clips.jsonl", ClipRecord),
                           faces=read_records(out / "faces.jsonl", FaceRecord))


def prepare_here(capsys, src: Path, out: Path, *args: str) -> str:
    """Run the command in this process; its standard output."""
    capsys.readouterr()
    assert cli.main(["prepare", str(src), str(out), *args]) == 0
    return capsys.readouterr().out


def frame_range(row: ClipRecord) -> tuple[int, int]:
    return round(row.start * row.fps), round(row.end * row.fps)


def decoded(path: Path) -> np.ndarray:
    return np.stack([image for _, image in read_frames(path)])


def test_corrupt_video_is_reported_by_name_and_the_batch_goes_on(prepared):
    assert "skipped 1 unreadable source:\n  broken.mp4: 'broken.mp4' is not a readable video" in prepared.stdout
    failed = list(prepared.out.glob("sources/*/failed.txt"))
    assert [p.parent.name.split("-")[0] for p in failed] == ["broken"]
    assert "broken.mp4" in failed[0].read_text()
    assert len(prepared.clips) == len(tiny.FILM_CLIPS) and prepared.faces


def test_clips_are_cut_at_the_hard_cuts_and_the_fade_within_two_frames(prepared):
    got = [frame_range(row) for row in prepared.clips]
    assert len(got) == len(tiny.FILM_CLIPS), got  # the 0.8 s shot is dropped, the 5 s shot split in two
    for (start, end), (want_start, want_end) in zip(got, tiny.FILM_CLIPS):
        assert abs(start - want_start) <= 2 and abs(end - want_end) <= 2, (got, tiny.FILM_CLIPS)
    film = tiny.synthetic_dance_film_frames().astype(np.float32)
    for row, (start, end) in zip(prepared.clips, got):
        frames = decoded(prepared.out / row.clip)
        assert (row.frames, row.fps, row.width, row.height) == (end - start, 10.0, 64, 64) == (len(frames), 10.0,
                                                                                                  64, 64)
        assert row.source == str((prepared.src / "videos" / "film.mp4").resolve())
        # the right frames, not just the right labels: a frame of another shot or of the fade is far off
        assert np.abs(frames - film[start:end]).mean(axis=(1, 2, 3)).max() < 8


def test_each_clip_is_captioned_by_the_captioner_from_its_centre_keyframe(prepared):
    keyframes = [read_image(prepared.out / row.clip.replace(".mp4", ".keyframe.png")) for row in prepared.clips]
    for row, keyframe in zip(prepared.clips, keyframes):
        centre = decoded(prepared.out / row.clip)[row.frames // 2].astype(np.float32)
        assert np.abs(keyframe - centre).mean() < 4
    captioner = Captioner(tiny.captioner_dir(), max_new_tokens=12)  # the default prompt is the paper's
    assert [row.caption for row in prepared.clips] == captioner.caption(keyframes)
    for row in prepared.clips:
        words = row.caption.split()
        assert len(words) >= 6 and set(words) <= set(tiny.CAPTION_WORDS), row.caption
    assert len({row.caption for row in prepared.clips}) > 1


def test_a_captioning_model_without_chat_template_gets_the_prompt_as_plain_text(prepared):
    keyframes = [read_image(prepared.out / row.clip.replace(".mp4", ".keyframe.png")) for row in prepared.clips[:2]]
    for prompt in ("", "a dancer"):  # unconditional, and a prefix BLIP continues
        for caption in Captioner(tiny.blip_captioner_dir(), prompt=prompt, max_new_tokens=8).caption(keyframes):
            words = caption.split()
            assert len(words) >= 4 and set(words) <= set(tiny.CAPTION_WORDS) and caption.startswith(prompt), caption


def test_the_caption_key_follows_the_model_files_not_where_they_are(tmp_path):
    from dreamoving_core.data.captions import fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny.captioner_dir(), model)
    (model / ".cache").mkdir()
    (model / ".cache" / "download.lock").write_text("1")
    shutil.copytree(model, tmp_path / "copy")
    (tmp_path / "copy" / ".cache" / "download.lock").write_text("2")
    assert fingerprint(model) == fingerprint(tmp_path / "copy")
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of the last weight
    (model / "model.safetensors").write_bytes(bytes(weights))
    assert fingerprint(model) != fingerprint(tmp_path / "copy")
    assert Captioner(model).key != Captioner(tmp_path / "copy").key != Captioner(model, prompt="other").key


def test_hints_hold_one_pose_and_one_depth_map_per_frame(prepared):
    from dreamoving_core.preprocess.zoedepth import load_zoedepth

    nose = tiny_preprocess.expected_keypoints(frame_size=64)[0]
    for row in prepared.clips:
        poses = json.loads((prepared.out / row.pose).read_text())
        assert len(poses) == row.frames
        for frame in poses:
            assert (frame["canvas_width"], frame["canvas_height"], len(frame["people"])) == (64, 64, 1)
            assert np.allclose(frame["people"][0]["pose_keypoints_2d"][:2], nose, atol=1.0)
        depth = load_file(prepared.out / row.depth)["depth"]
        assert depth.shape == (row.frames, 64, 64) and depth.dtype == torch.float16
    row = prepared.clips[0]
    frames = torch.from_numpy(decoded(prepared.out / row.clip)).float() / 255
    reference = load_zoedepth(tiny_preprocess.zoedepth_dir()).depth(frames, batch_size=32)
    assert torch.allclose(load_file(prepared.out / row.depth)["depth"].float(), reference, rtol=2e-3, atol=2e-3)


def test_depth_is_stored_at_most_512_pixels_on_its_shorter_side_as_an_area_average():
    from dreamoving_core.data.hints import bounded_depth

    depth = torch.rand(2, 1080, 1920)
    stored = bounded_depth(depth)
    assert stored.shape == (2, 512, 910) and stored.dtype == torch.float16
    assert torch.allclose(stored.float().mean((1, 2)), depth.mean((1, 2)), atol=1e-3)
    small = torch.rand(3, 64, 96)
    assert torch.equal(bounded_depth(small), small.half())  # already small enough: as extracted


def test_face_set_holds_the_photo_and_the_keyframes_with_a_face_and_nothing_else(prepared):
    from dreamoving_core.guider.face_id import FaceAnalyzer

    with_face = [row.clip.replace(".mp4", ".keyframe.png") for row in prepared.clips
                 if frame_range(row) in tiny.FILM_FACE_CLIPS]
    photo = next(prepared.out.glob("sources/face-*/image.png"))
    assert sorted(f.image for f in prepared.faces) == sorted(with_face + [photo.relative_to(prepared.out).as_posix()])
    noface = json.loads(next(prepared.out.glob("sources/noface-*/image.face.json")).read_text())
    assert noface["found"] is False
    analyzer = FaceAnalyzer(prepared.models / tiny.MODEL_NAMES["insightface"], "cpu")
    captions = {row.clip.replace(".mp4", ".keyframe.png"): row.caption for row in prepared.clips}
    for face in prepared.faces:
        image = read_image(prepared.out / face.image)
        identity = analyzer.identity(image / 255.0, face.image)
        embedding = load_file(prepared.out / face.arcface)["embedding"]
        assert embedding.shape == (512,) and torch.allclose(embedding, torch.from_numpy(identity.embedding), atol=1e-5)
        assert read_image(prepared.out / face.face).shape == (224, 224, 3)
        cloth = read_image(prepared.out / face.cloth)  # the tiny YOLOX's person box, below the face
        assert cloth.shape[0] >= identity.face.bbox[3] - identity.face.bbox[1] and cloth.shape[1] > 2
        assert face.caption == captions.get(face.image, face.caption) and face.caption


def test_a_second_run_does_no_work_and_loads_no_model(prepared, capsys, tmp_path):
    garbage = tiny.models_folder(tmp_path / "garbage", garbage=True)  # a model loaded now would fail the run

    def files() -> dict[Path, int]:  # but the corrupt video's failure note: it is tried again every run
        return {p: p.stat().st_mtime_ns for p in prepared.out.rglob("*") if p.is_file() and p.name != "failed.txt"}

    before = files()
    out = prepare_here(capsys, prepared.src, prepared.out, "--models", str(garbage), *ARGS)
    assert "work done: none (everything was done already)\nmodels loaded: none\n" in out
    assert "broken.mp4" in out
    assert files() == before


def test_a_changed_prompt_captions_again_and_the_old_captions_are_kept(prepared, capsys, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(prepared.out, out_dir)
    args = ["--models", str(prepared.models), *ARGS, "--skip", "pose,depth,faces"]
    out = prepare_here(capsys, prepared.src, out_dir, *args, "--caption-prompt", "describe the dancer")
    assert f"work done: captions {len(prepared.clips)}\nmodels loaded: captioner\n" in out
    for row in prepared.clips:
        cache = json.loads((out_dir / row.clip.replace(".mp4", CACHE_SUFFIX)).read_text())
        assert len(cache) == 2 and row.caption in cache.values()
    out = prepare_here(capsys, prepared.src, out_dir, *args)  # back to the default prompt: all cached
    assert "work done: none" in out
    assert [r.caption for r in read_records(out_dir / "clips.jsonl", ClipRecord)] == [r.caption for r in prepared.clips]


def test_shards_partition_the_sources_and_their_rows_meet_in_one_manifest(prepared, capsys, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--skip", "captions,pose,depth,faces", "--min-seconds", "2", "--max-seconds", "3"]
    owned = []
    for shard in ("0/2", "1/2"):
        seen = {p.name for p in (out_dir / "sources").glob("*")} if out_dir.exists() else set()
        prepare_here(capsys, prepared.src, out_dir, *args, "--shard", shard)
        owned.append({p.name for p in (out_dir / "sources").glob("*")} - seen)
        rows = read_records(out_dir / "clips.jsonl", ClipRecord)
        assert {r.clip.split("/")[1] for r in rows} <= set().union(*owned)
    assert not owned[0] & owned[1] and owned[0] | owned[1] == {s.id for s in find_sources([prepared.src], out_dir)}
    assert [(r.clip, frame_range(r)) for r in rows] == [(r.clip, frame_range(r)) for r in prepared.clips]
    manifest = (out_dir / "clips.jsonl").read_text()
    (out_dir / "clips.jsonl").unlink()
    assert cli.main(["merge", str(out_dir)]) == 0  # what a job after the whole array runs
    assert (out_dir / "clips.jsonl").read_text() == manifest


def test_shards_split_many_sources_evenly_and_each_to_exactly_one_shard(tmp_path):
    for i in range(300):
        (tmp_path / f"dance_{i:03d}.mp4").write_bytes(b"x" * (i % 7 + 1))
    sources = find_sources([tmp_path], tmp_path / "out")
    owners = [[k for k in range(3) if s.in_shard((k, 3))] for s in sources]
    assert all(len(o) == 1 for o in owners)
    counts = np.bincount([o[0] for o in owners], minlength=3)
    assert counts.min() > 70, counts


def test_missing_models_are_named_with_what_to_download_before_any_work(prepared, capsys, tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    out_dir = tmp_path / "out"
    assert cli.main(["prepare", str(prepared.src), str(out_dir), "--models", str(empty)]) == 2
    err = capsys.readouterr().err
    for expected in ("dwpose_detector (for pose, cloth)", "yolox_l.onnx", "huggingface.co/yzd-v/DWPose",
                     "zoedepth (for depth)", "Intel/zoedepth-nyu-kitti", "insightface (for faces)", "antelopev2",
                     "captioner (for captions): --captioner not given", "nothing was done"):
        assert expected in err, err
    assert not out_dir.exists()


def test_long_scenes_are_split_into_bounded_clips_and_short_ones_dropped():
    scenes = [(0, 79), (100, 180), (200, 300), (300, 550), (600, 705)]
    assert clip_ranges(scenes, 10, ClipBounds(8, 10)) == [
        (100, 180), (200, 300),  # 8 s and 10 s: kept whole; 7.9 s: dropped
        (300, 383), (383, 467), (467, 550),  # 25 s: three equal parts of 8.3 s
        (602, 702),  # 10.5 s: halves would be 5.25 s, so one 10 s clip, centred
    ]


def test_rotated_phone_videos_are_read_upright_and_scaled(tmp_path):
    import av

    coded = np.zeros((32, 64, 3), np.uint8)
    coded[:, :8] = 255  # a white bar at the left of the stored picture
    with av.open(str(tmp_path / "phone.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # shown turned a quarter counter-clockwise: the bar at the bottom
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for short_side, shape in ((0, (64, 32, 3)), (16, (32, 16, 3))):
        frames = [image for _, image in read_frames(tmp_path / "phone.mp4", short_side)]
        assert len(frames) == 3 and frames[0].shape == shape
        bar = shape[0] // 8
        assert frames[0][-bar:].mean() > 200 and frames[0][:-bar - 1].mean() < 30


@pytest.mark.gpu
def test_preparation_runs_its_models_on_the_gpu_with_the_cpu_results(prepared, capsys, tmp_path):
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    out_dir = tmp_path / "out"
    torch.cuda.reset_peak_memory_stats()
    out = prepare_here(capsys, prepared.src, out_dir, "--models", str(prepared.models), *ARGS, "--device", "cuda")
    assert torch.cuda.max_memory_allocated() > 0 and "models loaded: captioner, dwpose, insightface, zoedepth" in out
    rows = read_records(out_dir / "clips.jsonl", ClipRecord)
    assert [frame_range(r) for r in rows] == [frame_range(r) for r in prepared.clips]
    for gpu, cpu in zip(rows, prepared.clips):
        assert gpu.caption
        depth_gpu, depth_cpu = (load_file(o / r.depth)["depth"].float() for o, r in ((out_dir, gpu),
                                                                                      (prepared.out, cpu)))
        assert torch.allclose(depth_gpu, depth_cpu, rtol=1e-2, atol=1e-2)
        poses = [json.loads((o / r.pose).read_text()) for o, r in ((out_dir, gpu), (prepared.out, cpu))]
        assert np.allclose([f["people"][0]["pose_keypoints_2d"] for f in poses[0]],
                           [f["people"][0]["pose_keypoints_2d"] for f in poses[1]], atol=1.0)
    assert len(read_records(out_dir / "faces.jsonl", FaceRecord)) == len(prepared.faces)
