"""Video ControlNet in ComfyUI: the control object in-process (against ComfyUI's own ControlNet), then the nodes over
HTTP on a real server with the tiny SD1.5 checkpoint (64x64 frames, 2 steps)."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from devtools.client import ExecutionFailed
from devtools.tiny import pack_nodes
from devtools.tiny.controlnet import sd15_controlnet, sdxl_controlnet, video_controlnet
from devtools.tiny.motion import motion_module
from dreamoving_core.control.format import load_video_controlnet
from tests.graphs import base_graph, run_latent

FRAMES = 4


# ---------------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def glue():
    """``nodes/video_controlnet.py`` imported in this process."""
    return pack_nodes("video_controlnet")


@pytest.fixture(scope="module")
def sampling(glue):
    import comfy.model_sampling as ms

    class Sampling(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    return Sampling()


@functools.lru_cache(maxsize=None)
def loaded(path, motion=None):
    """Each tiny file is loaded once per session (models are read-only during get_control)."""
    return load_video_controlnet(path, motion, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def core_loaded(path):
    import comfy.controlnet

    return comfy.controlnet.load_controlnet(str(path))


def control_for(glue, sampling, path, hint, strength=1.0, percent=(0.0, 1.0), previous=None, motion=None):
    import comfy.model_management

    model = loaded(path, motion)
    control = glue.VideoControl(model, path.name, load_device=comfy.model_management.get_torch_device())
    control = control.copy().set_cond_hint(hint, strength, percent)
    control.set_previous_controlnet(previous)
    control.pre_run(SimpleNamespace(model_sampling=sampling), sampling.percent_to_sigma)
    return control


def step_inputs(frames=FRAMES, videos=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(videos * frames, 4, 8, 8, generator=g) * 3
    sigma = torch.full((videos * frames,), 3.0)
    cond = {"c_crossattn": torch.randn(videos * frames, 77, 768, generator=g) * 0.5}
    return x, sigma, cond


def hints(frames=FRAMES, seed=1, size=64):
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flat(control: dict) -> list[torch.Tensor]:
    return [*control["output"], *control["middle"]]


@torch.no_grad()
def get(control, transformer_options=None, frames=FRAMES, videos=2):
    x, sigma, cond = step_inputs(frames, videos)
    return flat(control.get_control(x, sigma, cond, videos, transformer_options or {}))


def test_tiny_files_are_accepted_by_comfyuis_own_controlnet_loader(glue):
    import comfy.cldm.cldm

    for path in (sd15_controlnet("pth"), sd15_controlnet("safetensors"), video_controlnet()):
        core = core_loaded(path)
        assert isinstance(core.control_model, comfy.cldm.cldm.ControlNet), path.name


def test_full_size_sd15_layout_matches_comfyuis_controlnet_key_for_key(glue):
    import comfy.cldm.cldm
    import comfy.ops

    from dreamoving_core.control.model import ControlNetConfig, VideoControlNet

    with torch.device("meta"):
        ours = VideoControlNet(ControlNetConfig()).state_dict()
        theirs = comfy.cldm.cldm.ControlNet(
            image_size=32, in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=2,
            channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, context_dim=768,
            use_linear_in_transformer=False, operations=comfy.ops.disable_weight_init, device="meta").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_residuals_equal_comfyuis_own_controlnet_plain_and_with_zero_motion(glue, sampling):
    hint = hints()
    core = core_loaded(sd15_controlnet("pth")).copy().set_cond_hint(hint, 0.8)
    core.pre_run(SimpleNamespace(model_sampling=sampling), sampling.percent_to_sigma)
    expected = get(core)
    for control in (control_for(glue, sampling, sd15_controlnet("pth"), hint, 0.8),
                    control_for(glue, sampling, video_controlnet(zero_motion=True), hint, 0.8),
                    control_for(glue, sampling, sd15_controlnet("pth"), hint, 0.8,
                                motion=motion_module("v2", "ckpt", zero_out=True))):
        got = get(control)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_chained_pose_and_depth_residuals_are_the_sum_of_each_alone(glue, sampling):
    pose, depth = video_controlnet(seed=0), video_controlnet(seed=5)
    alone_pose = get(control_for(glue, sampling, pose, hints(seed=1), 0.7))
    alone_depth = get(control_for(glue, sampling, depth, hints(seed=2), 1.3))
    chained = get(control_for(glue, sampling, depth, hints(seed=2), 1.3,
                              previous=control_for(glue, sampling, pose, hints(seed=1), 0.7)))
    for c, a, b in zip(chained, alone_pose, alone_depth):
        torch.testing.assert_close(c, a + b, atol=1e-5, rtol=1e-5)
        assert (a - b).abs().max() > 1e-3


def test_chains_with_a_core_controlnet_in_either_order(glue, sampling):
    def core(previous=None):
        c = core_loaded(sd15_controlnet("pth", seed=3)).copy().set_cond_hint(hints(seed=4))
        c.set_previous_controlnet(previous)
        c.pre_run(SimpleNamespace(model_sampling=sampling), sampling.percent_to_sigma)
        return c

    ours = get(control_for(glue, sampling, video_controlnet(), hints()))
    theirs = get(core())
    for chained in (get(control_for(glue, sampling, video_controlnet(), hints(), previous=core())),
                    get(core(previous=control_for(glue, sampling, video_controlnet(), hints())))):
        for c, a, b in zip(chained, ours, theirs):
            torch.testing.assert_close(c, a + b, atol=1e-5, rtol=1e-5)


def test_start_end_percent_switch_the_control_off_and_pass_previous_through(glue, sampling):
    late = control_for(glue, sampling, video_controlnet(), hints(), percent=(0.5, 1.0))
    assert late.get_control(*step_inputs(), 2, {}) is None  # sigma 3.0 is early in sampling (< 50 %)
    early = control_for(glue, sampling, video_controlnet(), hints(), percent=(0.0, 0.5))
    assert early.get_control(*step_inputs(), 2, {}) is not None
    previous = control_for(glue, sampling, video_controlnet(seed=5), hints(seed=2))
    chained = control_for(glue, sampling, video_controlnet(), hints(), percent=(0.5, 1.0), previous=previous)
    for a, b in zip(get(chained), get(previous)):
        torch.testing.assert_close(a, b)


def context_windows(frames: int, length: int = 4, overlap: int = 0) -> list:
    """The context windows ComfyUI (with the pack's fixes where this host needs them) makes for a video."""
    motion = pack_nodes("motion")
    options = {"transformer_options": {"sample_sigmas": torch.tensor([3.0, 0.0])}}
    return motion.ContextOptions(length=length, overlap=overlap).handler().get_context_windows(
        None, torch.zeros(frames, 4, 8, 8), options)


def test_context_window_slices_the_hints_to_the_windows_frames(glue, sampling):
    video_hints = hints(frames=12)
    windows = context_windows(12)
    assert [w.index_list for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    control = control_for(glue, sampling, video_controlnet(), video_hints)
    for window in (windows[1], windows[2], windows[1]):  # each call its own window's hints, not the last call's
        windowed = get(control, {"context_window": window})
        alone = get(control_for(glue, sampling, video_controlnet(), video_hints[window.index_list]))
        for a, b in zip(windowed, alone):
            torch.testing.assert_close(a, b)


def test_comfyuis_own_controlnet_gives_every_window_the_first_hint_frames(glue, sampling):
    """Why WindowedControlNet exists: if this fails, the host slices hints per window itself and the override can
    go (see nodes/_comfy.py)."""
    video_hints = hints(frames=12)

    def core(h):
        c = core_loaded(sd15_controlnet("pth")).copy().set_cond_hint(h)
        c.pre_run(SimpleNamespace(model_sampling=sampling), sampling.percent_to_sigma)
        return c

    windowed = get(core(video_hints), {"context_window": context_windows(12)[1]})
    for a, b in zip(windowed, get(core(video_hints[:4]))):
        torch.testing.assert_close(a, b)


def test_under_context_windows_a_wrong_hint_count_names_the_videos_length(glue, sampling):
    control = control_for(glue, sampling, video_controlnet(), hints(frames=12))
    with pytest.raises(Exception, match="got 12 hint images for a video of 16 frames"):
        get(control, {"context_window": context_windows(16)[0]})
    overrides = pack_nodes("_comfy")
    if not overrides.HOST_WINDOWS_KNOW_LENGTH:  # a core handler's window on such a host does not know the length
        from comfy.context_windows import IndexListContextWindow

        assert get(control, {"context_window": IndexListContextWindow([8, 9, 10, 11])})
        with pytest.raises(Exception, match="got 12 hint images for a video whose context windows reach frame 15"):
            get(control, {"context_window": IndexListContextWindow([11, 12, 13, 14])})


def test_frames_beyond_the_controlnets_motion_positions_name_the_apply_node(glue, sampling):
    import comfy.model_management

    model = load_video_controlnet(video_controlnet(), positional_length=FRAMES - 1, dtype=torch.float32)
    control = glue.VideoControl(model, "vcn.safetensors", load_device=comfy.model_management.get_torch_device())
    control = control.copy().set_cond_hint(hints(), 1.0, (0.0, 1.0))
    control.node = "Apply Video ControlNet (node 7)"
    control.pre_run(SimpleNamespace(model_sampling=sampling), sampling.percent_to_sigma)
    with pytest.raises(Exception, match=rf"Apply Video ControlNet \(node 7\): {FRAMES} frames run through the motion "
                                        rf"blocks of 'vcn.safetensors' at once but they have {FRAMES - 1} positions"):
        get(control)


def test_one_hint_image_is_broadcast_and_a_wrong_count_names_both_counts(glue, sampling):
    one = hints(frames=1)
    broadcast = get(control_for(glue, sampling, video_controlnet(), one))
    repeated = get(control_for(glue, sampling, video_controlnet(), one.expand(FRAMES, -1, -1, -1)))
    for a, b in zip(broadcast, repeated):
        torch.testing.assert_close(a, b)
    for wrong in (3, 6):
        with pytest.raises(Exception) as err:
            get(control_for(glue, sampling, video_controlnet(), hints(frames=wrong)))
        assert f"Apply Video ControlNet: got {wrong} hint images for a video of {FRAMES} frames" in str(err.value)


def test_controlnet_attends_through_comfyui_and_its_attention_override(glue, sampling):
    calls = []

    def override(func, *args, **kwargs):
        calls.append(func)
        return func(*args, **kwargs)

    control = control_for(glue, sampling, video_controlnet(), hints())
    plain = get(control)
    overridden = get(control, {"optimized_attention_override": override})
    assert len(calls) == 3 * 2 + 3 * 2  # 3 spatial transformers (self + cross), 3 motion blocks (2 each)
    for a, b in zip(overridden, plain):
        assert torch.equal(a, b)


def test_copies_share_one_model_and_patcher_for_memory_management(glue, sampling):
    control = control_for(glue, sampling, video_controlnet(), hints())
    twin = control.copy()
    assert twin.control_model is control.control_model
    assert twin.get_models() == [control.control_model_wrapped]
    chained = control_for(glue, sampling, video_controlnet(seed=5), hints(), previous=control)
    assert len(chained.get_models()) == 2
    chained.cleanup()
    assert control.cond_hint is None and control.model_sampling_current is None


# ---------------------------------------------------------------------------------------------------------- HTTP


def synthetic_pose_frames(frames: int, size: int = 64) -> np.ndarray:
    """A stick figure waving its arms, one frame per video frame: ``(F, size, size, 3)`` uint8 on black."""
    from PIL import Image, ImageDraw

    out = []
    for f in range(frames):
        img = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(img)
        angle = np.pi * (0.25 + 0.5 * np.sin(2 * np.pi * f / max(frames, 8)))
        neck, hip = (size / 2, size * 0.3), (size / 2, size * 0.62)
        draw.line([neck, hip], fill=(0, 0, 255), width=3)
        for side, colour in ((-1, (255, 85, 0)), (1, (0, 255, 85))):
            hand = (neck[0] + side * size * 0.3 * np.cos(angle), neck[1] - size * 0.3 * np.sin(angle) + size * 0.15)
            draw.line([neck, hand], fill=colour, width=3)
            draw.line([hip, (hip[0] + side * size * 0.15, size * 0.92)], fill=colour[::-1], width=3)
        draw.ellipse([size / 2 - 5, size * 0.12, size / 2 + 5, size * 0.26], fill=(255, 0, 0))
        out.append(np.asarray(img))
    return np.stack(out)


def synthetic_depth_frames(frames: int, size: int = 64) -> np.ndarray:
    """A bright blob (near) drifting across a dark gradient: ``(F, size, size, 3)`` uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for f in range(frames):
        cx = 0.3 + 0.4 * f / max(frames - 1, 1)
        depth = 0.3 * yy + 0.7 * np.exp(-((xx - cx) ** 2 + (yy - 0.5) ** 2) / 0.03)
        out.append(np.repeat((depth * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1))
    return np.stack(out)


def install_hint_video(comfy_base, name: str, frames: np.ndarray) -> str:
    """Write ``frames`` as a multi-page TIFF in the server's input folder; LoadImage reads it as a batch (TIFF keeps
    repeated frames, which APNG and GIF writers merge)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    path = comfy_base / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:])
    return name


@pytest.fixture(scope="module")
def controlnets(install_model):
    return {"pose": install_model(video_controlnet(seed=0), "dreamoving/video_controlnet"),
            "depth": install_model(sd15_controlnet("pth", seed=5), "controlnet"),
            "motion": install_model(motion_module("v2", "ckpt"), "animatediff_models"),
            "sdxl": install_model(sdxl_controlnet(), "controlnet")}


def pose_depth_graph(checkpoint: str, controlnets: dict, pose_image: str, depth_image: str, frames: int,
                     strength: float = 1.0, context: bool = False, motion: bool = False, **base):
    """base graph (``base``: its size/steps/cfg) + Load/Apply Video ControlNet for pose (Video ControlNet file) then
    depth (plain ControlNet + motion module); optionally the U-Net's motion module with context windows of 16."""
    g, refs = base_graph(checkpoint, frames=frames, **base)
    pose = g.node("LoadImage", image=pose_image)
    depth = g.node("LoadImage", image=depth_image)
    cn_pose = g.node("DreaMovingLoadVideoControlNet", controlnet_name=controlnets["pose"])
    cn_depth = g.node("DreaMovingLoadVideoControlNet", controlnet_name=controlnets["depth"],
                      motion_module=controlnets["motion"])
    first = g.node("DreaMovingApplyVideoControlNet", positive=refs["positive"], negative=refs["negative"],
                   video_controlnet=cn_pose[0], images=pose[0], strength=strength, start_percent=0.0,
                   end_percent=1.0)
    second = g.node("DreaMovingApplyVideoControlNet", positive=first[0], negative=first[1],
                    video_controlnet=cn_depth[0], images=depth[0], strength=strength, start_percent=0.0,
                    end_percent=1.0)
    model = refs["model"]
    if motion or context:
        mm = g.node("DreaMovingLoadMotionModule", model_name=controlnets["motion"], positional_length=32,
                    pe_extension="sinusoid")
        inputs = dict(model=model, motion_module=mm[0], motion_scale=1.0)
        if context:
            inputs["context_options"] = g.node(
                "DreaMovingContextOptions", context_length=16, context_overlap=4, context_schedule="standard_static",
                context_stride=1, closed_loop=False, fuse_method="pyramid")[0]
        model = g.node("DreaMovingApplyMotionModule", **inputs)[0]
    g.set(refs["sampler"], model=model, positive=second[0], negative=second[1])
    return g, refs


@pytest.fixture(scope="module")
def hint_images(comfy_base):
    return {f"{kind}{n}": install_hint_video(comfy_base, f"dreamoving_test_{kind}_{n}.tiff", make(n))
            for n in (16, 96, 12, 24) for kind, make in (("pose", synthetic_pose_frames),
                                                     ("depth", synthetic_depth_frames))}


@pytest.fixture(scope="module")
def plain16(comfy, tiny_checkpoint) -> torch.Tensor:
    g, refs = base_graph(tiny_checkpoint, frames=16)
    return run_latent(comfy, g, refs["save"])


def test_pose_and_depth_graph_runs_over_http_for_16_frames_and_changes_the_output(comfy, tiny_checkpoint,
                                                                                 controlnets, hint_images, plain16):
    g, refs = pose_depth_graph(tiny_checkpoint, controlnets, hint_images["pose16"], hint_images["depth16"], 16)
    controlled = run_latent(comfy, g, refs["save"])
    assert controlled.shape == plain16.shape == (16, 4, 8, 8)
    assert (controlled - plain16).abs().max() > 1e-3


def test_pose_and_depth_graph_runs_for_96_frames_with_context_windows(comfy, tiny_checkpoint, controlnets,
                                                                      hint_images):
    # 32x32 frames, one step without CFG: 8 windows of ControlNet + motion work stay within seconds on 2 cores
    g, refs = pose_depth_graph(tiny_checkpoint, controlnets, hint_images["pose96"], hint_images["depth96"], 96,
                               context=True, width=32, height=32, steps=1, cfg=1.0)
    latent = run_latent(comfy, g, refs["save"], timeout=600)
    assert latent.shape == (96, 4, 4, 4) and torch.isfinite(latent).all()
    assert "context windows" in comfy.server.log() or "Using context windows" in comfy.server.log()


def test_strength_zero_is_bit_identical_to_no_controlnet(comfy, tiny_checkpoint, controlnets, hint_images, plain16):
    g, refs = pose_depth_graph(tiny_checkpoint, controlnets, hint_images["pose16"], hint_images["depth16"], 16,
                               strength=0.0)
    assert torch.equal(run_latent(comfy, g, refs["save"]), plain16)


@pytest.mark.parametrize("frames,context", [(16, False), (24, True)])
def test_frame_count_mismatch_names_the_apply_node_and_the_server_keeps_serving(comfy, tiny_checkpoint, controlnets,
                                                                                hint_images, frames, context):
    g, refs = pose_depth_graph(tiny_checkpoint, controlnets, hint_images["pose12"], hint_images[f"depth{frames}"],
                               frames, context=context)
    pose_apply = next(k for k, v in g.nodes.items() if v["class_type"] == "DreaMovingApplyVideoControlNet")
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(g.to_api())
    assert failed.value.node_type == "KSampler"  # ComfyUI reports the node that ran; the message names the culprit
    assert failed.value.message.startswith(f"Apply Video ControlNet (node {pose_apply}): got 12 hint images for a "
                                           f"video of {frames} frames;"), failed.value.message
    g0, refs0 = base_graph(tiny_checkpoint, frames=2, steps=1)
    assert run_latent(comfy, g0, refs0["save"]).shape == (2, 4, 8, 8)


def test_sdxl_controlnet_is_refused_by_the_loader_over_http(comfy, tiny_checkpoint, controlnets, hint_images):
    g, refs = pose_depth_graph(tiny_checkpoint, dict(controlnets, pose=controlnets["sdxl"]), hint_images["pose16"],
                               hint_images["depth16"], 16)
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(g.to_api())
    assert failed.value.node_type == "DreaMovingLoadVideoControlNet"
    assert "Load Video ControlNet:" in failed.value.message and "SDXL ControlNet" in failed.value.message


def test_no_control_state_leaks_into_the_next_prompt(comfy, tiny_checkpoint, controlnets, hint_images, plain16):
    g, refs = pose_depth_graph(tiny_checkpoint, controlnets, hint_images["pose16"], hint_images["depth16"], 16)
    g.set(refs["save"], filename_prefix="latents/leak")
    assert not torch.equal(run_latent(comfy, g, refs["save"]), plain16)
    g1, refs1 = base_graph(tiny_checkpoint, frames=16, prefix="after")
    result = comfy.run(g1.to_api())
    cached = {n for e in result.events if e["type"] == "execution_cached" for n in e["data"].get("nodes", [])}
    assert refs1["sampler"].id not in cached, "the sampler did not run again; the check would prove nothing"
    after = load_file(str(next(p for p in result.files(refs1["save"].id) if p.suffix == ".latent")))["latent_tensor"]
    assert torch.equal(after, plain16)
