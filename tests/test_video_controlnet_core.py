"""Video ControlNet core (pure torch): layouts load alike, motion blocks make residuals temporal, bad files are refused.

Tiny files: the tiny SD1.5 U-Net's widths (320/320, 2 levels), 8x8 latents, 64x64 hints.
"""
from __future__ import annotations

import json

import pytest
import torch

from devtools.tiny.controlnet import (control_lora, sd15_controlnet, sdxl_controlnet, t2i_adapter,
                                      video_controlnet)
from devtools.tiny.motion import bad_file, motion_module, tiny_module
from dreamoving_core.control.format import (build_video_controlnet, detect_layout, load_video_controlnet,
                                               save_video_controlnet)
from dreamoving_core.errors import InputMismatchError, ModelFormatError
from dreamoving_core.io import load_state_dict, read_metadata
from dreamoving_core.control.model import ControlNetConfig, VideoControlNet

FRAMES = 4


def inputs(videos: int = 1, frames: int = FRAMES, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = videos * frames
    return dict(x=torch.randn(n, 4, 8, 8, generator=g), hint=torch.rand(n, 3, 64, 64, generator=g),
                timesteps=torch.full((n,), 500.0), context=torch.randn(n, 77, 768, generator=g) * 0.5,
                num_frames=frames)


@torch.no_grad()
def residuals(model: VideoControlNet, **kw) -> list[torch.Tensor]:
    out = model.eval()(**kw)
    return [*out.down, out.mid]


@pytest.fixture(scope="module")
def plain() -> VideoControlNet:
    return load_video_controlnet(sd15_controlnet("pth"))


@pytest.fixture(scope="module")
def video() -> VideoControlNet:
    return load_video_controlnet(video_controlnet())


def test_residuals_have_the_unet_input_block_shapes(plain):
    out = plain(**inputs())
    assert [tuple(r.shape) for r in out.down] == [(FRAMES, 320, 8, 8), (FRAMES, 320, 8, 8), (FRAMES, 320, 4, 4),
                                                  (FRAMES, 320, 4, 4)]
    assert out.mid.shape == (FRAMES, 320, 4, 4)
    assert all(r.abs().max() > 0 for r in out.down), "tiny ControlNet must not be silent"


def test_original_pth_safetensors_and_diffusers_layouts_load_the_same_controlnet(plain):
    expected = plain.state_dict()
    for layout in ("safetensors", "diffusers"):
        path = sd15_controlnet(layout)
        assert detect_layout(load_state_dict(path), path.name) == ("original" if layout == "safetensors"
                                                                   else "diffusers")
        loaded = load_video_controlnet(path, dtype=torch.float32)
        assert loaded.config == plain.config and not loaded.has_motion
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value.float(), expected[key], atol=1e-3, rtol=1e-3, msg=key)


def test_plain_layout_without_prefix_is_accepted(tmp_path, plain):
    sd = {k.removeprefix("control_model."): v for k, v in load_state_dict(sd15_controlnet("pth")).items()}
    path = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file(sd, str(path))
    assert detect_layout(sd, path.name) == "plain"
    torch.testing.assert_close(residuals(load_video_controlnet(path), **inputs()), residuals(plain, **inputs()))


def test_zero_initialised_motion_gives_the_plain_controlnet_residuals_frame_by_frame(plain):
    video_zero = load_video_controlnet(video_controlnet(zero_motion=True))
    assert video_zero.has_motion
    kw = inputs()
    got = residuals(video_zero, **kw)
    for f in range(FRAMES):
        one = {k: (v[f:f + 1] if torch.is_tensor(v) else 1) for k, v in kw.items()}
        for r_video, r_frame in zip(got, residuals(plain, **one)):
            torch.testing.assert_close(r_video[f:f + 1], r_frame, atol=1e-5, rtol=1e-5)


def test_random_motion_makes_one_frames_residuals_depend_on_other_frames_hints(plain, video):
    kw = inputs()
    changed = dict(kw, hint=kw["hint"].clone())
    changed["hint"][3] = 1.0 - changed["hint"][3]
    video_a, video_b = residuals(video, **kw), residuals(video, **changed)
    torch.testing.assert_close(video_a[0][0], video_b[0][0], atol=0, rtol=0)  # conv_in + hint: before any motion
    for r_a, r_b in zip(video_a[1:], video_b[1:]):
        assert (r_a[0] - r_b[0]).abs().max() > 1e-3, "frame 0 ignored frame 3's hint"
    for r_a, r_b in zip(residuals(plain, **kw), residuals(plain, **changed)):
        torch.testing.assert_close(r_a[0], r_b[0], atol=0, rtol=0)  # per-frame ControlNet: no cross-frame path


def test_videos_in_one_batch_do_not_mix(video):
    """Cond and uncond (or two videos) are folded into one batch; motion attention stays within each video."""
    kw = inputs(videos=2)
    changed = dict(kw, hint=kw["hint"].clone())
    changed["hint"][FRAMES:] = 0.0
    for r_a, r_b in zip(residuals(video, **kw), residuals(video, **changed)):
        torch.testing.assert_close(r_a[:FRAMES], r_b[:FRAMES], atol=1e-5, rtol=0)
        assert (r_a[FRAMES:] - r_b[FRAMES:]).abs().max() > 1e-4


def test_video_format_round_trips_and_is_documented_in_metadata(tmp_path, video):
    path = tmp_path / "round.safetensors"
    save_video_controlnet(video, path)  # motion_config: the one the loader kept
    meta = read_metadata(path)
    assert meta["format"] == "dreamoving_video_controlnet" and meta["version"] == "1"
    assert json.loads(meta["motion_config"])["channels"] == [320, 320]
    keys = load_state_dict(path)
    assert "control_model.zero_convs.0.0.weight" in keys and "control_model.middle_block_out.0.weight" in keys
    assert any(k.startswith("motion_modules.down_blocks.1.0.temporal_transformer.") for k in keys)
    assert any(k.startswith("motion_modules.mid_block.temporal_transformer.") for k in keys)
    assert detect_layout(keys, path.name) == "video"
    torch.testing.assert_close(residuals(load_video_controlnet(path), **inputs()), residuals(video, **inputs()))


def test_plain_controlnet_combined_with_motion_blocks_equals_the_video_file(plain, video):
    motion = tiny_module("v2", seed=1)
    combined = build_video_controlnet(plain.state_dict(), "plain.pth", [list(level) for level in motion.down_blocks],
                                      motion.mid_block, "mm")
    torch.testing.assert_close(residuals(combined, **inputs()), residuals(video, **inputs()))


@pytest.mark.parametrize("layout, ext", [("v1", "ckpt"), ("dreamoving", "safetensors")])
def test_controlnet_file_combined_with_a_motion_module_file(layout, ext, plain):
    combined = load_video_controlnet(sd15_controlnet("safetensors"), motion_module(layout, ext), dtype=torch.float32)
    assert combined.has_motion and (combined.motion_mid is not None) == (layout in ("v2", "dreamoving"))
    kw = inputs()
    changed = dict(kw, hint=kw["hint"].clone())
    changed["hint"][3] = 0.0
    assert (residuals(combined, **kw)[-1][0] - residuals(combined, **changed)[-1][0]).abs().max() > 1e-3


def test_zero_motion_module_file_combined_equals_plain(plain):
    combined = load_video_controlnet(sd15_controlnet("pth"), motion_module("v2", "ckpt", zero_out=True))
    torch.testing.assert_close(residuals(combined, **inputs()), residuals(plain, **inputs()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels, layers, problem", [((320, 320, 320), 1, "3 levels of widths 320/320/320"),
                                                       ((64, 64), 1, "2 levels of widths 64/64"),
                                                       ((320, 320), 2, "2 levels of widths 320/320 (2/2 layers)")])
def test_motion_blocks_that_do_not_fit_the_controlnet_are_refused(plain, channels, layers, problem):
    motion = tiny_module("v2", channels=channels, down_layers=layers)
    with pytest.raises(InputMismatchError) as err:
        build_video_controlnet(plain.state_dict(), "cn.pth", [list(level) for level in motion.down_blocks],
                               motion.mid_block, "mm_bad.ckpt")
    assert str(err.value).startswith(f"motion module 'mm_bad.ckpt' is made for a U-Net with {problem}")
    assert "but ControlNet 'cn.pth' has 2 levels of widths 320/320 (1/1 layers)" in str(err.value)


def test_sdxl_motion_module_file_or_a_controlnet_as_motion_module_is_refused():
    with pytest.raises(ModelFormatError, match="SDXL"):
        load_video_controlnet(sd15_controlnet("pth"), bad_file("sdxl"))
    with pytest.raises(ModelFormatError, match="is a ControlNet, not a motion module"):
        load_video_controlnet(sd15_controlnet("pth"), sd15_controlnet("safetensors"))


@pytest.mark.parametrize("builder, words", [(sdxl_controlnet, "SDXL ControlNet"), (t2i_adapter, "T2I-Adapter"),
                                            (control_lora, "control LoRA")])
def test_non_sd15_control_files_are_refused_with_a_clear_error(builder, words):
    path = builder()
    with pytest.raises(ModelFormatError, match=words) as err:
        load_video_controlnet(path)
    assert path.name in str(err.value) and "SD1.5" in str(err.value)


def test_sdxl_diffusers_and_sd2_controlnets_are_refused():
    sd = {k: v for k, v in load_state_dict(sd15_controlnet("diffusers")).items()}
    with pytest.raises(ModelFormatError, match="SDXL"):
        load_video_controlnet_sd(dict(sd, **{"add_embedding.linear_1.weight": torch.zeros(8, 2816)}))
    sd2 = {k: (torch.zeros(v.shape[0], 1024) if k.endswith("attn2.to_k.weight") else v) for k, v in sd.items()}
    with pytest.raises(ModelFormatError, match="SD2"):
        load_video_controlnet_sd(sd2)


def load_video_controlnet_sd(sd: dict) -> VideoControlNet:
    from dreamoving_core.control.format import controlnet_weights
    weights = controlnet_weights(sd, detect_layout(sd, "x.safetensors"), "x.safetensors")
    return build_video_controlnet(weights, "x.safetensors")


def test_a_motion_module_or_random_file_given_as_controlnet_is_refused():
    for layout, ext in (("v2", "ckpt"), ("dreamoving", "safetensors")):
        with pytest.raises(ModelFormatError, match="motion module, not a ControlNet"):
            load_video_controlnet(motion_module(layout, ext))
    with pytest.raises(ModelFormatError, match="not a ControlNet"):
        detect_layout({"foo.weight": torch.zeros(1)}, "foo.safetensors")


def test_truncated_file_is_a_model_format_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(sd15_controlnet("safetensors").read_bytes()[:5000])
    with pytest.raises(ModelFormatError, match="broken.safetensors"):
        load_video_controlnet(path)


def test_missing_weights_are_named(tmp_path):
    sd = load_state_dict(sd15_controlnet("pth"))
    del sd["control_model.input_blocks.1.1.proj_out.weight"]
    with pytest.raises(ModelFormatError, match="input_blocks.1.1.proj_out.weight"):
        load_video_controlnet_sd(sd)


def test_full_size_sd15_config_is_inferred_from_a_real_shaped_state_dict():
    with torch.device("meta"):
        model = VideoControlNet(ControlNetConfig())
    weights = model.state_dict()
    from dreamoving_core.control.format import infer_config
    assert infer_config(weights, "control_v11p_sd15_openpose.pth") == ControlNetConfig()
    assert len(model.block_widths) == 12 and model.block_widths[-1] == 1280
    assert not any(k.startswith("input_blocks.10.1") for k in weights), "SD1.5's lowest level has no attention"


def test_batch_not_divisible_by_frames_is_an_error(plain):
    with pytest.raises(ValueError, match="num_frames"):
        plain(**dict(inputs(), num_frames=3))

