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
    sites = glue.injection_sites(tiny_model.get_model_object("diffusion_model"))
    assert [[s.index for s in level] for level in sites.down] == [[1], [3]]  # input_blocks 1 and 3
    assert (sites.mid.index, sites.mid.before) == (0, 2)  # after the attention, before the last res
    assert [[(s.index, s.before) for s in level] for level in sites.up] == [
        [(0, None), (1, 2)],  # before output_blocks.1's Upsample
        [(2, None), (3, None)]]
    assert sites.layout.down == ((320,), (320,)) and sites.layout.mid == 320


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


def test_motion_blocks_attend_through_comfyui_and_its_attention_override(glue, loaded_v2):
    calls = []

    def override(func, *args, **kwargs):
        calls.append(func)
        return func(*args, **kwargs)

    slot = glue.MotionSlot(loaded_v2.module.mid_block, 1.0)
    x = torch.randn(2 * 8, 320, 4, 4)
    plain = slot(x, {"cond_or_uncond": [1, 0]})
    overridden = slot(x, {"cond_or_uncond": [1, 0], "optimized_attention_override": override})
    assert len(calls) == 2, "both temporal attention blocks must go through the model's override"
    assert torch.equal(overridden, plain)


def test_frame_windows_find_the_step_for_per_frame_and_in_between_timesteps(glue):
    handler = glue.ContextOptions(length=4, overlap=1).handler()
    options = {"transformer_options": {"sample_sigmas": torch.tensor([14.6, 6.1, 2.2, 0.0])}}
    for timestep, step in [(torch.full((8,), 6.1), 1), (torch.full((8,), 4.0), 1), (torch.full((8,), 14.6), 0)]:
        handler.set_step(timestep, options)
        assert handler._step == step
    windows = handler.get_context_windows(None, torch.zeros(10, 4, 8, 8), options)
    assert sorted({i for w in windows for i in w.index_list}) == list(range(10))
    assert all(len(w.index_list) == 4 and w.total_frames == 10 for w in windows)


def test_context_fixes_are_applied_exactly_where_the_hosts_own_handler_needs_them(glue):
    import comfy.context_windows as cw

    overrides = pack_nodes("_comfy")
    own = cw.IndexListContextHandler(cw.get_matching_context_schedule("standard_uniform"),
                                     cw.get_matching_fuse_method("pyramid"), context_length=4, context_overlap=1)
    options = {"transformer_options": {"sample_sigmas": torch.tensor([14.6, 6.1, 2.2, 0.0])}}
    try:  # 8 frames, evaluated between the first two sigmas (as Heun's second evaluation is)
        own.set_step(torch.full((8,), 4.0), options)
        finds_steps = own._step == 0
    except Exception:
        finds_steps = False
    knows_length = all(getattr(w, "total_frames", None) == 10
                       for w in own.get_context_windows(None, torch.zeros(10, 4, 8, 8), options))
    assert (overrides.HOST_FINDS_STEPS, overrides.HOST_WINDOWS_KNOW_LENGTH) == (finds_steps, knows_length)
    fixed = type(glue.ContextOptions().handler())
    assert fixed is (cw.IndexListContextHandler if finds_steps and knows_length else overrides.FrameContextHandler)


def test_a_core_context_handler_is_copied_with_every_setting_it_has(glue):
    import inspect

    import comfy.context_windows as cw

    overrides = pack_nodes("_comfy")
    settings = {"context_schedule": cw.get_matching_context_schedule("looped_uniform"),
                "fuse_method": cw.get_matching_fuse_method("flat"), "context_length": 9, "context_overlap": 3,
                "context_stride": 2, "closed_loop": True, "dim": 0, "freenoise": True,
                "cond_retain_index_list": "0,2", "split_conds_to_windows": True}
    accepted = set(inspect.signature(cw.IndexListContextHandler.__init__).parameters) - {"self"}
    assert accepted <= set(settings), f"the host's handler has new settings {accepted - set(settings)}: add them"
    core = cw.IndexListContextHandler(**{k: v for k, v in settings.items() if k in accepted})
    core.callbacks = {cw.IndexListCallbacks.EXECUTE_START: {"other_pack": [print]}}
    copied = overrides.frame_windows(core)
    assert isinstance(copied, overrides.context_handler_class())
    assert vars(copied) == vars(core) and vars(core)["callbacks"] is vars(copied)["callbacks"]


def test_mismatched_unet_is_refused_at_apply_time(glue, tiny_model):
    narrow = tiny_module("v3", channels=(64, 64))
    motion = glue.LoadedMotionModule("narrow.ckpt", narrow, None)
    with pytest.raises(glue.InputMismatchError, match=r"'narrow.ckpt' is made for a U-Net with 2 levels of widths "
                                                        r"64/64.*this MODEL's U-Net has 2 levels of widths 320/320"):
        glue.apply_motion(tiny_model, motion, 1.0)


def loaded(glue, layout: str, **kw):
    """A tiny motion module of ``layout`` as Load Motion Module hands it on."""
    module = tiny_module(layout, **kw)
    return glue.LoadedMotionModule(layout, module, glue.managed(module))


def run_unet(patched, frames: int = 4, seed: int = 0) -> None:
    """One U-Net call of ``patched`` on cond + uncond videos of ``frames`` frames, as a sampler batches them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    context = torch.randn(2 * frames, 77, 768, generator=g)
    options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers, "cond_or_uncond": [0, 1]}
    with torch.no_grad():
        patched.model.diffusion_model(x, torch.full((2 * frames,), 500.0), context, transformer_options=options)


@pytest.mark.parametrize("layout", ["v1", "v2", "v3"])
def test_unet_group_norms_span_each_videos_frames_for_v1_and_stay_per_frame_otherwise(glue, tiny_model, layout):
    import comfy.utils
    import torch.nn.functional as F
    from einops import rearrange

    patched = glue.apply_motion(tiny_model, loaded(glue, layout, zero_out=True), 1.0)
    paths = glue.video_norm_paths(patched)
    assert len(paths) == 2 * (2 + 2 + 4) + 1  # in/out layers of the ResBlocks (input, middle, output), output norm
    seen = {}
    patched.patch_model()
    try:
        hooks = []

        def record(key, value) -> None:  # a forward hook that returns None keeps the output
            seen.setdefault(key, value)

        for path in paths:
            layers = comfy.utils.get_attr(patched.model, path)
            norm = layers._modules["0"]  # the U-Net's own norm, under its own key
            hooks.append(layers.register_forward_hook(
                lambda m, args, out, path=path, norm=norm: record(path, (args[0], norm))))
            hooks.append(norm.register_forward_hook(lambda m, args, out, path=path: record(path + "!", out)))
        run_unet(patched)
    finally:
        for hook in hooks:
            hook.remove()
        patched.unpatch_model()
    assert len(seen) == 2 * len(paths)
    for path in paths:
        x, norm = seen[path]
        out = seen[path + "!"]
        out = rearrange(out, "b c f h w -> (b f) c h w") if out.ndim == 5 else out

        def stats(videos):  # group norm with statistics over each of ``videos`` videos' frames
            folded = rearrange(x, "(b f) c h w -> b c f h w", b=videos)
            normed = F.group_norm(folded, norm.num_groups, norm.weight, norm.bias, norm.eps)
            return rearrange(normed, "b c f h w -> (b f) c h w")

        per_frame = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        expected = stats(2) if layout == "v1" else per_frame
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4, msg=path)
        assert (stats(2) - per_frame).abs().max() > 1e-4, "the two statistics must differ for the test to mean it"
        assert (stats(1) - stats(2)).abs().max() > 1e-4, "cond and uncond must not share statistics"
    assert not any(glue._is_folded(comfy.utils.get_attr(tiny_model.model, path)) for path in paths)


def test_v1_norm_patches_are_undone_by_a_later_v2_module_and_keep_weight_keys(glue, tiny_model):
    import comfy.utils

    v1 = glue.apply_motion(tiny_model, loaded(glue, "v1"), 1.0)
    path = "diffusion_model.input_blocks.1.0.in_layers"
    assert list(v1.get_model_object(path)._modules) == ["fold", "0", "unfold", "1", "2"]
    v2 = glue.apply_motion(v1, loaded(glue, "v2"), 1.0)
    assert list(v2.get_model_object(path)._modules) == ["0", "1", "2"]
    assert v2.get_additional_models_with_key(glue.ADDITIONAL_MODELS_KEY) != []
    assert v2.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, glue.VIDEO_NORMS_KEY) == []
    v1.patch_model()
    try:
        assert set(v1.model.state_dict()) == set(tiny_model.model.state_dict())
        assert comfy.utils.get_attr(v1.model, path + ".0.weight") is \
            comfy.utils.get_attr(tiny_model.model, path + ".0.weight")
    finally:
        v1.unpatch_model()
    assert list(comfy.utils.get_attr(tiny_model.model, path)._modules) == ["0", "1", "2"]


# -- over HTTP --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mm(install_model):
    """Names of the installed tiny motion modules: every layout, zero-output variants, the bad files."""
    names = {f"{layout}.{ext}": install_model(motion_module(layout, ext), "animatediff_models")
             for layout, ext in [("v1", "ckpt"), ("v2", "ckpt"), ("v2", "safetensors"), ("v3", "ckpt")]}
    names["ours"] = install_model(motion_module("dreamoving", "safetensors"), "dreamoving/motion")
    names["v2_zero"] = install_model(motion_module("v2", "ckpt", zero_out=True), "animatediff_models")
    names["v1_zero"] = install_model(motion_module("v1", "ckpt", zero_out=True), "animatediff_models")
    adapter = install_model(motion_module("v2", "diffusers").parent, "animatediff_models", "tiny_adapter_v2")
    names["v2 diffusers"] = f"{adapter}/diffusion_pytorch_model.safetensors"
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


def frame0_graph(comfy_base, checkpoint, motion, frame0: float):
    """8 frames whose starting latent is zero except frame 0, which is ``frame0`` everywhere (written as a
    ``.latent`` file and read by core LoadLatent: the tiny VAE encodes images to NaN, which would make any
    difference vacuous)."""
    from safetensors.torch import save_file

    name = f"dreamoving_frame0_{frame0:g}.latent"
    start = torch.zeros(8, 4, 8, 8)
    start[0] = frame0
    save_file({"latent_tensor": start, "latent_format_version_0": torch.tensor([])}, str(comfy_base / "input" / name))
    g, refs = base_graph(checkpoint, frames=8, prefix="interact")
    g.set(refs["sampler"], latent_image=g.node("LoadLatent", latent=name)[0])
    if motion is not None:
        splice_motion(g, refs, motion)
    return g, refs


@pytest.mark.parametrize("layout", ["v1.ckpt", "ours"])
def test_random_motion_makes_frames_interact_and_without_it_they_do_not(comfy, comfy_base, tiny_checkpoint, mm,
                                                                        layout):
    results = {}
    for motion in (None, mm[layout]):
        for frame0 in (0.0, 1.5):
            g, refs = frame0_graph(comfy_base, tiny_checkpoint, motion, frame0)
            results[motion, frame0] = run_latent(comfy, g, refs["save"])
            assert torch.isfinite(results[motion, frame0]).all()
    assert not torch.equal(results[None, 0.0][0], results[None, 1.5][0]), "frame 0's input must differ"
    assert torch.equal(results[None, 0.0][5], results[None, 1.5][5]), "without motion, frames are independent"
    assert not torch.equal(results[mm[layout], 0.0][5], results[mm[layout], 1.5][5]), \
        "with a motion module, frame 5 must depend on frame 0"


def test_v1_makes_frames_depend_on_each_other_through_the_unets_norms_even_with_silent_motion_blocks(
        comfy, comfy_base, tiny_checkpoint, mm):
    results = {}
    for motion in (mm["v1_zero"], mm["v2_zero"]):
        for frame0 in (0.0, 1.5):
            g, refs = frame0_graph(comfy_base, tiny_checkpoint, motion, frame0)
            results[motion, frame0] = run_latent(comfy, g, refs["save"])
            assert torch.isfinite(results[motion, frame0]).all()
    assert not torch.equal(results[mm["v1_zero"], 0.0][5], results[mm["v1_zero"], 1.5][5]), \
        "v1 normalises over the video's frames: frame 5 must depend on frame 0"
    assert torch.equal(results[mm["v2_zero"], 0.0][5], results[mm["v2_zero"], 1.5][5]), \
        "v2 normalises per frame: identity motion blocks leave frames independent"


def test_diffusers_adapter_folder_gives_the_output_of_the_same_weights_in_animatediffs_layout(
        comfy, tiny_checkpoint, mm):
    info = comfy.object_info("DreaMovingLoadMotionModule")["DreaMovingLoadMotionModule"]
    assert mm["v2 diffusers"] in combo_options(info["input"]["required"]["model_name"])
    assert torch.equal(latent(comfy, tiny_checkpoint, mm["v2 diffusers"], prefix="adapter"),
                       latent(comfy, tiny_checkpoint, mm["v2.ckpt"], prefix="adapter"))


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


WINDOWS = {"context_length": 8, "context_overlap": 3, "context_schedule": "standard_uniform", "context_stride": 2,
           "closed_loop": False, "fuse_method": "flat"}


def core_windows(comfy, g, model, **settings):
    """ComfyUI's own Context Windows (Manual) node on ``model`` with ``WINDOWS`` and ``settings``, over frames."""
    inputs = {**WINDOWS, "dim": 0, **settings}
    if "freenoise" in comfy.object_info("ContextWindowsManual")["ContextWindowsManual"]["input"]["required"]:
        inputs.setdefault("freenoise", False)  # a required input since ComfyUI 0.8.0
    return g.node("ContextWindowsManual", model=model, **inputs)


def motion_with_core_windows(comfy, checkpoint, motion, order, frames=20, positional_length=64, prefix="core",
                             **settings):
    """base graph with Apply Motion Module and the core Context Windows node ``before`` or ``after`` it."""
    g, refs = base_graph(checkpoint, frames=frames, prefix=prefix)
    if order == "before":
        refs["model"] = core_windows(comfy, g, refs["model"], **settings)[0]
        splice_motion(g, refs, motion, positional_length=positional_length)
    else:
        splice_motion(g, refs, motion, positional_length=positional_length)
        g.set(refs["sampler"], model=core_windows(comfy, g, g.nodes[refs["sampler"].id]["inputs"]["model"],
                                                  **settings)[0])
    return g, refs


@pytest.mark.parametrize("order", ["before", "after"])
def test_every_setting_of_the_core_context_windows_node_reaches_the_sampler(comfy, tiny_checkpoint, mm, order):
    ours = latent(comfy, tiny_checkpoint, mm["v2.ckpt"], frames=20, context=WINDOWS)
    g, refs = motion_with_core_windows(comfy, tiny_checkpoint, mm["v2.ckpt"], order, prefix=f"core_{order}")
    assert torch.equal(run_latent(comfy, g, refs["save"]), ours), "the core node's windows differ from the same ones"
    plain_windows = latent(comfy, tiny_checkpoint, mm["v2.ckpt"], frames=20, context={**WINDOWS, "context_stride": 1})
    assert not torch.equal(plain_windows, ours), "context_stride changed nothing: the comparison proves nothing"


def test_freenoise_set_on_the_core_context_windows_node_reaches_the_sampler(comfy, tiny_checkpoint, mm):
    inputs = comfy.object_info("ContextWindowsManual")["ContextWindowsManual"]["input"]["required"]
    if "freenoise" not in inputs:
        pytest.skip("this ComfyUI's Context Windows node has no FreeNoise (it came with ComfyUI 0.8.0)")
    runs = {}
    for freenoise in (False, True):
        g, refs = motion_with_core_windows(comfy, tiny_checkpoint, mm["v2.ckpt"], "after",
                                           prefix=f"freenoise_{freenoise}", freenoise=freenoise)
        before = comfy.server.log().count("Applying FreeNoise")
        runs[freenoise] = run_latent(comfy, g, refs["save"])
        assert comfy.server.log().count("Applying FreeNoise") - before == int(freenoise)
    assert not torch.equal(runs[True], runs[False])


def test_frame_count_errors_name_the_apply_motion_module_node_and_come_as_early_as_possible(comfy, tiny_checkpoint,
                                                                                          mm):
    def failure(g):
        with pytest.raises(ExecutionFailed) as failed:
            comfy.run(g.to_api())
        return failed.value

    # the MODEL carries windows longer than the positions when the patch is applied: refused by Apply Motion Module
    g, refs = motion_with_core_windows(comfy, tiny_checkpoint, mm["v3.ckpt"], "before", frames=12,
                                       positional_length=6, prefix="early")
    early = failure(g)
    assert early.node_type == "DreaMovingApplyMotionModule"
    assert early.message.startswith("Apply Motion Module: context windows of 8 frames are longer than the 6 "
                                    f"positions of '{mm['v3.ckpt']}'"), early.message
    # windows added after the patch, or no windows: found before the first step, in the Apply node's name and id
    for order, expected in (("after", "context windows of 8 frames are longer than the 6 positions"),
                            (None, "12 frames run through the motion module at once but")):
        if order is None:
            g, refs = base_graph(tiny_checkpoint, frames=12, prefix="late")
            splice_motion(g, refs, mm["v3.ckpt"], positional_length=6)
        else:
            g, refs = motion_with_core_windows(comfy, tiny_checkpoint, mm["v3.ckpt"], order, frames=12,
                                               positional_length=6, prefix="late_core")
        apply_id = next(k for k, v in g.nodes.items() if v["class_type"] == "DreaMovingApplyMotionModule")
        late = failure(g)
        assert late.node_type == "KSampler"
        assert late.message.startswith(f"Apply Motion Module (node {apply_id}): {expected}"), late.message


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


@pytest.mark.parametrize("sampler,scheduler", [("euler_ancestral", "karras"), ("dpmpp_2m_sde", "exponential"),
                                               ("heun", "normal")])  # heun: evaluations between two sigmas
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
