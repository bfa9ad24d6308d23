"""Motion nodes: injection glue in-process on the tiny U-Net, then the nodes over HTTP on a real ComfyUI server."""
from __future__ import annotations

import time

import pytest
import torch

from devtools.client import ExecutionFailed
from devtools.tiny import pack_nodes
from devtools.tiny.motion import BAD_KINDS, bad_file, malicious_marker, motion_module, tiny_module
from tests.graphs import base_graph, run_latent

NODE_IDS = ("DreaMovingLoadMotionModule", "DreaMovingApplyMotionModule", "DreaMovingContextOptions")


# -- in-process: the glue on ComfyUI's own U-Net -------------------------------------------------------------------

@pytest.fixture(scope="module")
def glue():
    """``nodes/motion.py`` imported in this process."""
    return pack_nodes("motion")


@pytest.fixture(scope="module")
def tiny_model(glue):
    import comfy.sd
    from devtools.tiny.checkpoint import sd15_checkpoint

    model, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint()), output_vae=False, output_clip=False)
    return model


@pytest.fixture(scope="module")
def loaded_v2(glue):
    import folder_paths

    path = motion_module("v2", "safetensors")
    folder_paths.folder_names_and_paths["dreamoving_motion"] = ([str(path.parent)], {".safetensors", ".ckpt"})
    return glue.load_for_comfy(path.name, 64, "sinusoid")


def test_sites_follow_animatediff_placement_on_the_tiny_unet(glue, tiny_model):
    down, mid, up = glue.injection_sites(tiny_model.get_model_object("diffusion_model"))
    assert [[s.path for s in level] for level in down] == [["diffusion_model.input_blocks.1"],
                                                          ["diffusion_model.input_blocks.3"]]
    assert (mid.path, mid.before) == ("diffusion_model.middle_block", 2)  # after the attention, before the last res
    assert [[(s.path.split(".", 1)[1], s.before) for s in level] for level in up] == [
        [("output_blocks.0", None), ("output_blocks.1", 2)],  # before output_blocks.1's Upsample
        [("output_blocks.2", None), ("output_blocks.3", None)]]


def test_patch_keeps_weight_names_so_base_model_loras_still_apply(glue, tiny_model, loaded_v2):
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.utils

    key = "diffusion_model.output_blocks.1.2.conv.weight"  # the Upsample conv, after which a slot is inserted
    lora = tiny_model.clone()
    bump = torch.full_like(comfy.utils.get_attr(tiny_model.model, key), 0.25)
    lora.add_patches({key: (bump,)}, 1.0)
    original = comfy.utils.get_attr(tiny_model.model, key).clone()
    patched = glue.apply_motion(lora, loaded_v2, 1.0)
    base_keys = set(tiny_model.model.state_dict())
    comfy.sampler_helpers.prepare_sampling(patched, (8, 4, 8, 8), {}, patched.model_options)  # as a sampler does
    try:
        assert set(patched.model.state_dict()) == base_keys, "motion weights must not join the U-Net's state dict"
        block = comfy.utils.get_attr(patched.model, "diffusion_model.output_blocks.1")
        assert list(block._modules) == ["0", "1", "motion", "2"]
        torch.testing.assert_close(comfy.utils.get_attr(patched.model, key), original + 0.25)
        loaded = comfy.model_management.current_loaded_models
        assert any(m.model is not None and m.model.model is loaded_v2.module for m in loaded), \
            "the motion module must be loaded by ComfyUI's memory management"
    finally:
        comfy.model_management.unload_all_models()
    assert comfy.utils.get_attr(tiny_model.model, "diffusion_model.output_blocks.1") is \
        tiny_model.get_model_object("diffusion_model.output_blocks.1")
    assert "motion" not in comfy.utils.get_attr(tiny_model.model, "diffusion_model.output_blocks.1")._modules
    torch.testing.assert_close(comfy.utils.get_attr(tiny_model.model, key), original)


def test_applying_again_replaces_the_first_motion_module(glue, tiny_model, loaded_v2):
    def slots(model, path):
        return [m for m in model.get_model_object(path) if isinstance(m, glue.MotionSlot)]

    first = glue.apply_motion(tiny_model, loaded_v2, 1.0)
    twice = glue.apply_motion(first, loaded_v2, 0.5)
    assert [s.scale for s in slots(twice, "diffusion_model.output_blocks.1")] == [0.5]
    assert len(twice.model_options["transformer_options"]["patches"]["forward_timestep_embed_patch"]) == 1
    without_mid = glue.LoadedMotionModule("v1", tiny_module("v1"), loaded_v2.patcher)
    v1 = glue.apply_motion(first, without_mid, 1.0)
    assert slots(v1, "diffusion_model.middle_block") == [], "the v2 middle block must not survive a v1 module"
    off = glue.apply_motion(first, loaded_v2, 0.0)
    assert all(slots(off, path) == [] for path in first.object_patches)
    assert off.get_additional_models_with_key(glue.ADDITIONAL_MODELS_KEY) == []
    assert slots(first, "diffusion_model.middle_block"), "the input MODEL keeps its own patches"


def test_slot_folds_cond_and_uncond_videos_and_casts_fp16(glue, loaded_v2):
    block = loaded_v2.module.mid_block
    slot = glue.MotionSlot(block, 1.0)
    x = torch.randn(2 * 8, 320, 4, 4)
    out = slot(x, {"cond_or_uncond": [1, 0]})
    torch.testing.assert_close(out, block(x, 8))
    half = slot(x.half(), {"cond_or_uncond": [1, 0]})
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, atol=2e-2, rtol=2e-2)


def test_frame_windows_find_the_step_for_per_frame_and_in_between_timesteps(glue):
    handler = glue.ContextOptions(length=4, overlap=1).handler()
    options = {"transformer_options": {"sample_sigmas": torch.tensor([14.6, 6.1, 2.2, 0.0])}}
    for timestep, step in [(torch.full((8,), 6.1), 1), (torch.full((8,), 4.0), 1), (torch.full((8,), 14.6), 0)]:
        handler.set_step(timestep, options)
        assert handler._step == step
    windows = handler.get_context_windows(None, torch.zeros(10, 4, 8, 8), options)
    assert sorted({i for w in windows for i in w.index_list}) == list(range(10))
    assert all(len(w.index_list) == 4 for w in windows)


def test_mismatched_unet_is_refused_at_apply_time(glue, tiny_model):
    narrow = tiny_module("v3", channels=(64, 64))
    motion = glue.LoadedMotionModule("narrow.ckpt", narrow, None)
    with pytest.raises(glue.InputMismatchError, match=r"'narrow.ckpt' is made for a U-Net with 2 levels of widths "
                                                        r"64/64.*this MODEL's U-Net has 2 levels of widths 320/320"):
        glue.apply_motion(tiny_model, motion, 1.0)


# -- over HTTP --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mm(install_model):
    """Names of the installed tiny motion modules: every layout, zero-output variants, the bad files."""
    names = {f"{layout}.{ext}": install_model(motion_module(layout, ext), "animatediff_models")
             for layout, ext in [("v1", "ckpt"), ("v2", "ckpt"), ("v2", "safetensors"), ("v3", "ckpt")]}
    names["ours"] = install_model(motion_module("dreamoving", "safetensors"), "dreamoving/motion")
    names["v2_zero"] = install_model(motion_module("v2", "ckpt", zero_out=True), "animatediff_models")
    names["ours_zero"] = install_model(motion_module("dreamoving", "safetensors", zero_out=True), "dreamoving/motion")
    for kind in BAD_KINDS:
        names[kind] = install_model(bad_file(kind), "animatediff_models")
    return names


def splice_motion(g, refs, name: str, scale: float = 1.0, context: dict | None = None, positional_length: int = 64):
    load = g.node("DreaMovingLoadMotionModule", model_name=name, positional_length=positional_length,
                  pe_extension="sinusoid")
    inputs = dict(model=refs["model"], motion_module=load[0], motion_scale=scale)
    if context is not None:
        inputs["context_options"] = g.node("DreaMovingContextOptions", **{
            "context_length": 16, "context_overlap": 4, "context_schedule": "standard_static", "context_stride": 1,
            "closed_loop": False, "fuse_method": "pyramid", **context})[0]
    apply = g.node("DreaMovingApplyMotionModule", **inputs)
    g.set(refs["sampler"], model=apply[0])
    return g


def latent(comfy, checkpoint, motion=None, frames=8, prefix="motion", text=None, **kw):
    g, refs = base_graph(checkpoint, frames=frames, prefix=prefix)
    if text is not None:
        g.nodes[refs["positive"][0]]["inputs"]["text"] = text
    if motion is not None:
        splice_motion(g, refs, motion, **kw)
    return run_latent(comfy, g, refs["save"])


def combo_options(spec: list) -> list:
    """A combo input's choices from /object_info (V3 nodes list them under "options")."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_nodes_are_listed_with_category_tooltips_and_both_folders(comfy, mm):
    info = comfy.object_info()
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] == "DreaMoving/Motion"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    options = combo_options(info["DreaMovingLoadMotionModule"]["input"]["required"]["model_name"])
    assert mm["v2.ckpt"] in options and mm["ours"] in options


def test_zero_output_projections_equal_the_unpatched_model_exactly(comfy, tiny_checkpoint, mm):
    plain = latent(comfy, tiny_checkpoint)
    for name in (mm["v2_zero"], mm["ours_zero"]):
        assert torch.equal(latent(comfy, tiny_checkpoint, name), plain), name


def test_motion_scale_zero_equals_no_motion_module(comfy, tiny_checkpoint, mm):
    plain = latent(comfy, tiny_checkpoint)
    assert torch.equal(latent(comfy, tiny_checkpoint, mm["v2.ckpt"], scale=0.0), plain)
    assert not torch.equal(latent(comfy, tiny_checkpoint, mm["v2.ckpt"], scale=1.0), plain)


def frame0_graph(checkpoint, motion, frame0_color):
    """8 frames whose starting latent is empty except frame 0, which is the VAE encoding of a solid colour."""
    g, refs = base_graph(checkpoint, frames=7, prefix="interact")
    image = g.node("EmptyImage", width=64, height=64, batch_size=1, color=frame0_color)
    first = g.node("VAEEncode", pixels=image[0], vae=refs["vae"])
    batch = g.node("LatentBatch", samples1=first[0], samples2=refs["latent"])
    g.set(refs["sampler"], latent_image=batch[0])
    if motion is not None:
        splice_motion(g, refs, motion)
    return g, refs


@pytest.mark.parametrize("layout", ["v1.ckpt", "ours"])
def test_random_motion_makes_frames_interact_and_without_it_they_do_not(comfy, tiny_checkpoint, mm, layout):
    results = {}
    for motion in (None, mm[layout]):
        for color in (0, 0xFF8000):
            g, refs = frame0_graph(tiny_checkpoint, motion, color)
            results[motion, color] = run_latent(comfy, g, refs["save"])
    assert not torch.equal(results[None, 0][0], results[None, 0xFF8000][0]), "frame 0's input must differ"
    assert torch.equal(results[None, 0][5], results[None, 0xFF8000][5]), "without motion, frames are independent"
    assert not torch.equal(results[mm[layout], 0][5], results[mm[layout], 0xFF8000][5]), \
        "with a motion module, frame 5 must depend on frame 0"


def test_no_patch_leaks_after_a_motion_prompt_succeeds_or_fails(comfy, tiny_checkpoint, mm):
    text = "a person dancing on a beach"
    before = latent(comfy, tiny_checkpoint, text=text)
    assert not torch.equal(latent(comfy, tiny_checkpoint, mm["v2.ckpt"], text=text), before)
    # a trailing space tokenizes the same but makes ComfyUI run the sampler again instead of reusing its cache
    assert torch.equal(latent(comfy, tiny_checkpoint, text=text + " "), before)
    with pytest.raises(ExecutionFailed, match="8 frames run through the motion module at once but .* 4 positions"):
        latent(comfy, tiny_checkpoint, mm["v3.ckpt"], text=text, positional_length=4)
    assert torch.equal(latent(comfy, tiny_checkpoint, text=text + "  "), before)
    # interrupted while sampling with motion blocks
    g, refs = base_graph(tiny_checkpoint, frames=8, steps=200, prefix="interrupted")
    splice_motion(g, refs, mm["v2.safetensors"])
    prompt_id = comfy.queue(g.to_api())
    deadline = time.monotonic() + 300
    while not any(e.get("type") == "progress" for e in comfy.events_for(prompt_id)):
        assert time.monotonic() < deadline, "the motion prompt never started sampling"
        time.sleep(0.1)
    comfy.interrupt()
    with pytest.raises(ExecutionFailed) as stopped:
        comfy.wait(prompt_id)
    assert stopped.value.message in ("", "interrupted"), stopped.value.message  # interrupted, not an error
    assert torch.equal(latent(comfy, tiny_checkpoint, text=text + "   "), before)


def test_long_videos_run_in_windows_no_longer_than_the_positions(comfy, tiny_checkpoint, mm):
    # 24 frames through a 16-position module: only possible because every U-Net call holds one window
    out = latent(comfy, tiny_checkpoint, mm["v1.ckpt"], frames=24, positional_length=16,
                 context={"context_schedule": "looped_uniform", "closed_loop": True, "fuse_method": "flat"})
    assert out.shape[0] == 24 and torch.isfinite(out).all()
    with pytest.raises(ExecutionFailed, match="context windows of 24 frames are longer than the 16 positions"):
        latent(comfy, tiny_checkpoint, mm["v1.ckpt"], frames=24, positional_length=16, context={"context_length": 24})


def test_core_context_windows_node_works_with_motion(comfy, tiny_checkpoint, mm):
    g, refs = base_graph(tiny_checkpoint, frames=24, prefix="core_windows")
    splice_motion(g, refs, mm["v1.ckpt"], positional_length=16)
    apply_ref = g.nodes[refs["sampler"].id]["inputs"]["model"]
    windows = g.node("ContextWindowsManual", model=apply_ref, context_length=16, context_overlap=4,
                     context_schedule="standard_static", context_stride=1, closed_loop=False, fuse_method="pyramid",
                     dim=0)
    g.set(refs["sampler"], model=windows[0])
    assert run_latent(comfy, g, refs["save"]).shape[0] == 24


@pytest.mark.parametrize("kind,message", [
    ("sdxl", "is an SDXL motion module"),
    ("hotshotxl", "is a HotshotXL motion module"),
    ("motion_lora", "is a motion LoRA"),
    ("controlnet", "is a ControlNet, not a motion module"),
    ("truncated", "may be truncated or corrupt"),
    ("corrupt", "may be truncated or corrupt"),
    ("malicious", "refused without running"),
    ("checkpoint", "is a Stable Diffusion checkpoint"),
])
def test_bad_files_get_their_clear_message_and_the_server_keeps_serving(comfy, tiny_checkpoint, mm, install_model,
                                                                        kind, message):
    if kind == "checkpoint":
        from devtools.tiny.checkpoint import sd15_checkpoint

        name = install_model(sd15_checkpoint(), "animatediff_models")
    else:
        name = mm[kind]
    malicious_marker().unlink(missing_ok=True)
    g, refs = base_graph(tiny_checkpoint, frames=2, steps=1, prefix="bad")
    splice_motion(g, refs, name)
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(g.to_api())
    assert failed.value.node_type == "DreaMovingLoadMotionModule"
    assert failed.value.message.startswith(f"Load Motion Module: '{name}'"), failed.value.message
    assert message in failed.value.message
    assert not malicious_marker().exists()
    g, refs = base_graph(tiny_checkpoint, frames=2, steps=1, prefix=f"after_{kind}")
    assert run_latent(comfy, g, refs["save"]).shape[0] == 2


def sample_with_motion(comfy, checkpoint, motion, sampler, scheduler, steps=2):
    g, refs = base_graph(checkpoint, frames=4, steps=steps, sampler=sampler, scheduler=scheduler, prefix="samplers")
    splice_motion(g, refs, motion, context={"context_length": 3, "context_overlap": 1,
                                            "context_schedule": "standard_uniform"})
    out = run_latent(comfy, g, refs["save"])
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all(), (sampler, scheduler)


@pytest.mark.parametrize("sampler,scheduler", [("euler_ancestral", "karras"), ("dpmpp_2m_sde", "exponential")])
def test_motion_runs_with_core_samplers_and_schedulers(comfy, tiny_checkpoint, mm, sampler, scheduler):
    sample_with_motion(comfy, tiny_checkpoint, mm["v2.safetensors"], sampler, scheduler)


@pytest.mark.slow
def test_motion_runs_with_every_core_sampler_and_scheduler(comfy, tiny_checkpoint, mm):
    ksampler = comfy.object_info("KSampler")["KSampler"]["input"]["required"]
    samplers, schedulers = combo_options(ksampler["sampler_name"]), combo_options(ksampler["scheduler"])
    for sampler in samplers:
        sample_with_motion(comfy, tiny_checkpoint, mm["v2.safetensors"], sampler, "normal", steps=3)
    for scheduler in schedulers:
        sample_with_motion(comfy, tiny_checkpoint, mm["v2.safetensors"], "euler", scheduler, steps=3)
