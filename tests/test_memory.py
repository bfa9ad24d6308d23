"""ComfyUI's memory management holds every model of the pack: a forced partial (low-VRAM) load gives the output of a
full load, for each model kind, in process on ComfyUI's own loading code.

The CPU has one device, so a wrong placement cannot fail by itself here. Each kind is therefore also loaded
partially onto the ``meta`` device (the stand-in for a GPU): whatever ComfyUI moves goes to ``meta``, the rest stays
on the CPU, and the forward pass runs under a checker that fails any torch call mixing devices, which is what a real
GPU would do. The numbers come from a partial load onto the CPU, compared with a full load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from devtools.tiny import content_guider as tiny_guider
from devtools.tiny import pack_nodes
from devtools.tiny import preprocess as tiny_pre
from devtools.tiny.controlnet import video_controlnet
from devtools.tiny.motion import motion_module
from dreamoving_core.attention import sdpa_attention

FRAMES = 4
# casts, and indexing (a CPU index tensor may index a tensor on any device, as torch allows)
EXEMPT = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.__getitem__, torch.Tensor.__setitem__}


class SameDevice(TorchFunctionMode):
    """Fails any torch call whose tensor arguments sit on different devices (CPU scalars aside), as a GPU would;
    casts and indexing are fine. A meta tensor has no values: reading one (``.item()``, e.g. ZoeDepth's choice of
    its NYU or KITTI head) answers 0."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.item and args[0].is_meta:
            return 0
        if func not in EXEMPT:
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                       and not (t.ndim == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise AssertionError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}: "
                                     "a layer left on the offload device was used without being cast")
        return func(*args, **kwargs)


@dataclass
class Kind:
    """How to build one model kind the way its node does, and run it on inputs on ``device`` with an attention
    backend."""

    build: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, torch.device, Callable], torch.Tensor]


@pytest.fixture(scope="module")
def glue():
    return {topic: pack_nodes(topic) for topic in ("_models", "motion", "video_controlnet", "content_guider")}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kinds(glue) -> dict[str, Kind]:
    models = glue["_models"]

    def motion():
        from dreamoving_core.motion.format import load_motion_module

        module = load_motion_module(motion_module("v2"), ops=models.OPS)
        return module.to(models.unet_weight_dtype(module, torch.device("cpu")))

    def run_motion(module, device, attention):
        x = torch.randn(2 * FRAMES, 320, 4, 4, generator=_generator()).to(device)
        return torch.cat([block(x, FRAMES, attention=attention) for block in module.blocks()])

    def controlnet():
        from dreamoving_core.control.format import load_video_controlnet

        return load_video_controlnet(video_controlnet(), dtype=torch.float32, ops=models.OPS)

    def run_controlnet(model, device, attention):
        g = _generator()
        n = 2 * FRAMES
        out = model(torch.randn(n, 4, 8, 8, generator=g).to(device), torch.rand(n, 3, 64, 64, generator=g).to(device),
                    torch.full((n,), 500.0).to(device), torch.randn(n, 77, 768, generator=g).to(device), FRAMES,
                    attention)
        return torch.cat([r.flatten() for r in (*out.down, out.mid)])

    def guider():
        return glue["content_guider"].load_guider(str(tiny_guider.guider_file())).guider

    def run_guider(model, device, attention):
        from dreamoving_core.guider.model import ImageFeatures

        g = _generator()
        features = ImageFeatures(torch.randn(1, 1024, generator=g), torch.randn(1, 257, 1280, generator=g),
                                 torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1))
        on = glue["content_guider"]._on(features, device)
        kv = [model.source(slot).keys_values(on, on, attention=attention) for slot in ("face", "cloth")]
        return torch.cat([t.flatten() for source in kv for t in (*source.keys, *source.values)])

    def clip():
        return glue["content_guider"].load_clip_vision(str(tiny_guider.clip_vision_file())).encoder

    def run_clip(model, device, attention):
        out = model.encode(torch.rand(2, 48, 64, 3, generator=_generator()), device, attention)
        return torch.cat([out.image_embeds.flatten(), out.penultimate_hidden_states.flatten()])

    processors = []

    def zoedepth():
        from dreamoving_core.preprocess.zoedepth import load_zoedepth

        zoe = load_zoedepth(tiny_pre.zoedepth_dir(), ops=models.OPS)
        processors.append(zoe.processor)
        return models.LibraryModel(zoe.model)  # as the ZoeDepth node hands it to ComfyUI

    def run_zoedepth(model, device, attention):
        frames = torch.from_numpy(tiny_pre.synthetic_dance_frames(2, 64)).permute(0, 3, 1, 2)
        pixels = processors[-1](images=list(frames), return_tensors="pt")["pixel_values"].to(device)
        return model.held(pixel_values=pixels).predicted_depth

    return {"motion module": Kind(motion, run_motion), "video controlnet": Kind(controlnet, run_controlnet),
            "content guider": Kind(guider, run_guider), "clip vision": Kind(clip, run_clip),
            "zoedepth": Kind(zoedepth, run_zoedepth)}


KINDS = ("motion module", "video controlnet", "content guider", "clip vision", "zoedepth")


def partial_load(glue, model: torch.nn.Module, device: torch.device):
    """ComfyUI's low-VRAM path as ``load_models_gpu`` drives it, with a third of the weights' memory to spend."""
    import comfy.model_management

    patcher = glue["_models"].managed(model, device, torch.device("cpu"))
    loaded = comfy.model_management.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=patcher.model_size() // 3)
    return patcher, loaded


@pytest.mark.parametrize("kind", KINDS)
def test_forced_partial_load_gives_the_output_of_a_full_load(glue, kind):
    spec = kinds(glue)[kind]
    cpu = torch.device("cpu")
    with torch.no_grad():
        attention = glue["_models"].attention_backend()  # ComfyUI's, as the nodes run them
        full = spec.run(spec.build(), cpu, attention)
        model = spec.build()
        patcher, loaded = partial_load(glue, model, cpu)
        try:
            assert model.model_lowvram, "the budget must force a partial load"
            assert 0 < patcher.loaded_size() < patcher.model_size()
            partial = spec.run(model, cpu, attention)
        finally:
            loaded.model_unload()
    assert full.abs().max() > 0 and torch.isfinite(full).all()
    assert torch.equal(partial, full)


@pytest.mark.parametrize("kind", KINDS)
def test_partially_loaded_weights_are_cast_to_the_device_they_run_on(glue, kind):
    spec = kinds(glue)[kind]
    meta = torch.device("meta")
    model = spec.build()
    with torch.no_grad():
        patcher, _ = partial_load(glue, model, meta)  # a throwaway model: what moved to meta has no values any more
        assert model.model_lowvram
        left = [(name, param.device) for layer_name, layer in model.named_modules()
                for name, param in layer.named_parameters(prefix=layer_name, recurse=False)
                if param.device != meta and not getattr(layer, "comfy_cast_weights", False)]
        assert left == [], f"weights left on the offload device that nothing casts: {left[:5]}"
        with SameDevice():
            out = spec.run(model, meta, sdpa_attention)  # ComfyUI's CPU attention asks meta for free memory
    assert out.device == meta


def test_the_checker_catches_a_plain_layer_left_on_the_offload_device():
    # the control for the test above: a torch.nn layer (no casting) that ComfyUI leaves behind fails the forward
    layer = torch.nn.LayerNorm(8)
    with pytest.raises(AssertionError, match="mixes devices"), SameDevice():
        layer(torch.zeros(2, 8, device="meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_forced_partial_load_on_cuda_gives_the_output_of_a_full_load(glue, kind):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = kinds(glue)[kind]
    cuda = torch.device("cuda")
    attention = glue["_models"].attention_backend()
    with torch.no_grad():
        full = spec.run(spec.build().to(cuda), cuda, attention)
        model = spec.build()
        patcher, loaded = partial_load(glue, model, cuda)
        try:
            assert model.model_lowvram and 0 < patcher.loaded_size() < patcher.model_size()
            partial = spec.run(model, cuda, attention)
        finally:
            loaded.model_unload()
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=1e-5)
