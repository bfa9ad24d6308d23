"""Motion blocks and motion module files in plain torch (no ComfyUI): maths, positions, formats, bad files."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from dreamoving_core.errors import InputMismatchError, ModelFormatError
from dreamoving_core.io import read_metadata
from dreamoving_core.motion.model import (MotionBlock, MotionModule, MotionModuleConfig, extend_positional_encoding,
                                    sinusoidal_positions)
from dreamoving_core.motion.format import (animatediff_state_dict, from_animatediff_key, load_motion_module,
                                           motion_module_from_state_dict, save_motion_module, to_animatediff_key)
from devtools.tiny.motion import LAYOUTS, POSITIONS, bad_file, malicious_marker, motion_module, tiny_module

SMALL = MotionModuleConfig(channels=(64,), down_layers=1, up_layers=1, mid_block=False, positional_length=32)
FILES = [(layout, ext) for layout in LAYOUTS for ext in ("ckpt", "safetensors")
         if (layout, ext) != ("dreamoving", "ckpt")]


@functools.lru_cache(maxsize=None)
def reference(layout: str) -> dict[str, torch.Tensor]:
    """AnimateDiff-named weights of the tiny module the ``layout`` files were made from."""
    return animatediff_state_dict(tiny_module(layout))


def random_block(seed: int = 0, zero_out: bool = False) -> MotionBlock:
    torch.manual_seed(seed)
    block = MotionBlock(64, SMALL).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" not in name and not (zero_out and ".proj_out." in name):
                p.normal_(0, 0.1)
    return block


def features(videos: int = 2, frames: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(videos * frames, 64, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_block_with_zero_output_projection_is_exactly_the_identity():
    x = features()
    assert torch.equal(random_block(zero_out=True)(x, 8), x)


def test_motion_scale_zero_returns_the_input_untouched_and_scale_is_linear():
    block, x = random_block(), features()
    assert torch.equal(block(x, 8, scale=0.0), x)
    with torch.no_grad():
        full = block(x, 8) - x
        half = block(x, 8, scale=0.5) - x
    assert full.abs().max() > 1e-3
    torch.testing.assert_close(half, 0.5 * full)


def test_frames_interact_within_a_video_but_not_across_videos():
    block, x = random_block(), features(videos=2, frames=8)
    changed = x.clone()
    changed[0] += torch.randn(64, 4, 4)  # frame 0 of video 0
    with torch.no_grad():
        before, after = block(x, 8), block(changed, 8)
    assert (after[5] - before[5]).abs().max() > 1e-4, "frame 5 must see frame 0 through temporal attention"
    assert torch.equal(after[8:], before[8:]), "the second video (e.g. uncond) must not see the first"


def test_without_motion_frames_are_independent_per_frame():
    # the control for the test above: a per-frame op (the identity block) lets no change travel between frames
    block, x = random_block(zero_out=True), features()
    changed = x.clone()
    changed[0] += torch.randn(64, 4, 4)
    assert torch.equal(block(changed, 8)[5], block(x, 8)[5])


def test_more_frames_than_positions_is_a_clear_error():
    block = random_block()
    with pytest.raises(InputMismatchError, match="40 frames.*32 positions.*context windows"):
        block(torch.randn(40, 64, 2, 2), 40)
    with pytest.raises(InputMismatchError, match="does not split into videos of 7 frames"):
        block(torch.randn(16, 64, 2, 2), 7)


def test_positional_table_is_animatediffs_sinusoid():
    pe = sinusoidal_positions(24, 320)
    assert pe.shape == (1, 24, 320)
    for pos, i in [(0, 0), (5, 0), (23, 7), (11, 100)]:
        freq = math.exp(-math.log(10000.0) * 2 * i / 320)
        assert pe[0, pos, 2 * i].item() == pytest.approx(math.sin(pos * freq), abs=1e-5)
        assert pe[0, pos, 2 * i + 1].item() == pytest.approx(math.cos(pos * freq), abs=1e-5)


def test_sinusoid_extension_keeps_stored_rows_and_continues_the_formula():
    stored = sinusoidal_positions(24, 64) + 0.5  # a table that differs from the formula shows which rows were kept
    longer = extend_positional_encoding(stored, 64, "sinusoid")
    assert longer.shape == (1, 64, 64)
    assert torch.equal(longer[:, :24], stored)
    torch.testing.assert_close(longer[:, 24:], sinusoidal_positions(64, 64)[:, 24:])
    assert torch.equal(extend_positional_encoding(stored, 16, "sinusoid"), stored[:, :16])


def test_interpolation_extension_resamples_the_stored_rows():
    stored = torch.arange(4.0).reshape(1, 4, 1).expand(1, 4, 2)
    longer = extend_positional_encoding(stored, 7, "interpolate")
    torch.testing.assert_close(longer[0, :, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]))
    with pytest.raises(ValueError, match="sinusoid"):
        extend_positional_encoding(stored, 7, "cubic")


def test_key_maps_are_inverse_and_match_animatediff_names():
    with torch.device("meta"):
        module = MotionModule(MotionModuleConfig())
    keys = list(module.state_dict())
    assert len(module.blocks()) == 21  # SD1.5: 4x2 down, 1 mid, 4x3 up
    ad_keys = [to_animatediff_key(k) for k in keys]
    assert ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1."
            "pos_encoder.pe") in ad_keys
    assert "mid_block.motion_modules.0.temporal_transformer.proj_out.weight" in ad_keys
    assert "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight" in ad_keys
    assert [from_animatediff_key(k) for k in ad_keys] == keys


def test_full_size_modules_match_the_real_file_sizes():
    # mm_sd_v15.ckpt (v1) and mm_sd_v15_v2.ckpt are fp32 files of 1.67 GB and 1.82 GB
    for mid, positions, size in [(False, 24, 1.672), (True, 32, 1.818)]:
        with torch.device("meta"):
            module = MotionModule(MotionModuleConfig(mid_block=mid, positional_length=positions))
        nbytes = sum(v.numel() * 4 for v in module.state_dict().values())
        assert nbytes / 1e9 == pytest.approx(size, abs=0.001)


@pytest.mark.parametrize("layout,ext", FILES)
def test_every_layout_loads_with_its_weights_and_extends_to_64_positions(layout, ext):
    module = load_motion_module(motion_module(layout, ext))
    assert module.config.version == layout
    assert module.config.channels == (320, 320)
    assert (module.config.down_layers, module.config.up_layers) == (1, 2)
    assert module.config.mid_block == (layout in ("v2", "dreamoving"))
    assert module.config.positional_length == 64
    stored = {from_animatediff_key(k): v for k, v in reference(layout).items()}
    for key, value in module.state_dict().items():
        expected = stored[key][:, :POSITIONS[layout]] if key.endswith(".pe") else stored[key]
        got = value[:, :POSITIONS[layout]] if key.endswith(".pe") else value
        torch.testing.assert_close(got.float(), expected.half().float() if layout in ("v3", "dreamoving") else expected,
                                   msg=key)


def test_positional_length_and_extension_method_are_selectable():
    path = motion_module("v1", "safetensors")
    long = load_motion_module(path, positional_length=128, pe_extension="interpolate")
    short = load_motion_module(path, positional_length=16)

    def pe(module):
        return module.down_blocks[0][0].temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe

    assert pe(long).shape == (1, 128, 320) and pe(short).shape == (1, 16, 320)
    stored = sinusoidal_positions(24, 320)
    torch.testing.assert_close(pe(long)[:, -1], stored[:, -1])  # interpolation ends on the last trained position
    assert not torch.allclose(pe(long)[:, 24], sinusoidal_positions(25, 320)[:, 24])
    torch.testing.assert_close(pe(short), stored[:, :16])


def test_own_format_round_trips_with_metadata(tmp_path):
    module = load_motion_module(motion_module("v2", "ckpt"), positional_length=64)
    path = tmp_path / "mine.safetensors"
    save_motion_module(module, path, metadata={"trained_on": "dance"})
    meta = read_metadata(path)
    assert meta["format"] == "dreamoving_motion_module" and meta["version"] == "1" and meta["trained_on"] == "dance"
    again = load_motion_module(path)
    assert again.config.version == "dreamoving" and again.config.positional_length == 64
    x = torch.randn(16, 320, 2, 2)
    assert torch.equal(again.mid_block(x, 16), module.mid_block(x, 16))
    with pytest.raises(ValueError, match="safetensors"):
        save_motion_module(module, tmp_path / "mine.ckpt")


def test_training_prefix_and_dtype_are_handled():
    weights = {f"module.{k}": v for k, v in reference("v3").items()}
    module = motion_module_from_state_dict(weights, "train.ckpt", dtype=torch.float16)
    assert module.config.version == "v3"
    assert all(p.dtype == torch.float16 for p in module.parameters())


def test_incomplete_module_is_refused_with_the_missing_key():
    weights = dict(reference("v2"))
    weights.pop("up_blocks.1.motion_modules.1.temporal_transformer.proj_out.bias")
    with pytest.raises(ModelFormatError, match=r"'cut.ckpt' is an incomplete.*1 missing.*up_blocks\.1\.1"):
        motion_module_from_state_dict(weights, "cut.ckpt")
    weights = dict(reference("v2"))
    weights["mid_block.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.zeros(320, 64)
    with pytest.raises(ModelFormatError, match=r"proj_in.weight has shape \(320, 64\), expected \(320, 320\)"):
        motion_module_from_state_dict(weights, "odd.ckpt")


@pytest.mark.parametrize("kind,message", [
    ("sdxl", "is an SDXL motion module.*needs an SD1.5 one"),
    ("hotshotxl", "is a HotshotXL motion module"),
    ("motion_lora", "is a motion LoRA"),
    ("controlnet", "is a ControlNet, not a motion module.*models/controlnet"),
    ("truncated", "may be truncated or corrupt"),
    ("corrupt", "may be truncated or corrupt"),
])
def test_wrong_files_get_one_clear_message_naming_the_file(kind, message):
    path = bad_file(kind)
    with pytest.raises(ModelFormatError, match=f"'{path.name}' .*{message}"):
        load_motion_module(path)


def test_checkpoint_picked_by_mistake_is_named_as_such():
    from devtools.tiny.checkpoint import sd15_checkpoint

    with pytest.raises(ModelFormatError, match="is a Stable Diffusion checkpoint, not a motion module"):
        load_motion_module(sd15_checkpoint())


def test_malicious_pickle_is_refused_without_running_its_code():
    marker = malicious_marker()
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelFormatError, match="refused without running"):
        load_motion_module(bad_file("malicious"))
    assert not marker.exists()


# -- diffusers MotionAdapter layout ---------------------------------------------------------------------------------

def test_diffusers_export_has_the_keys_and_shapes_of_diffusers_own_motion_adapter():
    diffusers = pytest.importorskip("diffusers")
    import json

    from safetensors.torch import load_file

    path = motion_module("v2", "diffusers")
    config = {k: v for k, v in json.loads((path.parent / "config.json").read_text()).items() if not k.startswith("_")}
    reference = diffusers.MotionAdapter(**config).state_dict()
    ours = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe" in ours
    assert "mid_block.motion_modules.0.transformer_blocks.0.attn2.to_out.0.weight" in ours


@pytest.mark.parametrize("layout", ["v1", "v2", "v3"])
def test_diffusers_adapters_load_with_the_same_detection_and_weights(layout):
    module = load_motion_module(motion_module(layout, "diffusers"))
    assert module.config.version == layout
    assert module.config.unet_norms_span_frames == (layout == "v1")
    animatediff = load_motion_module(motion_module(layout, "ckpt"))
    expected = animatediff.state_dict()
    assert module.state_dict().keys() == expected.keys()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value.float(), expected[key].float(), rtol=0, atol=1e-3 if layout == "v3" else 0,
                                   msg=key)  # the v3 .ckpt is stored in fp16


def test_diffusers_motion_blocks_match_diffusers_up_to_its_group_norm_over_frames(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from dreamoving_core.motion.format import save_motion_adapter

    ours = tiny_module("v2", channels=(64, 64))
    save_motion_adapter(ours, tmp_path)
    theirs = diffusers.MotionAdapter.from_pretrained(tmp_path).down_blocks[1].motion_modules[0]
    block = ours.down_blocks[1][0]
    x = features(videos=2, frames=8)
    with torch.no_grad():
        reference = theirs(x, num_frames=8)
        assert (reference - block(x, 8)).abs().max() > 1e-3  # diffusers normalises over frames, AnimateDiff per frame
        block.temporal_transformer.norm = OverFrames(block.temporal_transformer.norm, 8)
        torch.testing.assert_close(block(x, 8), reference, atol=1e-6, rtol=1e-5)


class OverFrames(torch.nn.Module):
    """A group norm applied to each video's frames together, as diffusers' ``AnimateDiffTransformer3D`` does."""

    def __init__(self, norm: torch.nn.Module, frames: int):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from einops import rearrange

        return rearrange(self.norm(rearrange(h, "(b f) c h w -> b c f h w", f=self.frames)), "b c f h w -> (b f) c h w")


def test_diffusers_config_gives_heads_and_groups(tmp_path):
    import json

    from dreamoving_core.motion.format import save_motion_adapter

    module = motion_module_from_state_dict(animatediff_state_dict(tiny_module("v2")), "x", positional_length=32)
    weights = save_motion_adapter(module, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, motion_num_attention_heads=[4, 4],
                                                          motion_norm_num_groups=16)))
    loaded = load_motion_module(weights)
    assert (loaded.config.num_heads, loaded.config.norm_groups, loaded.config.positional_length) == (4, 16, 64)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, motion_num_attention_heads=[4, 8])))
    with pytest.raises(ModelFormatError, match="different attention heads per level"):
        load_motion_module(weights)
