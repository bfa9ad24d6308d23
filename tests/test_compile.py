"""The DreaMoving model under ``torch.compile``: no graph breaks in the pack's code, the same output as eager.

In this process, on the real ComfyUI U-Net and sampler (``devtools.harness``): motion blocks injected by Apply Motion
Module's function, face + cloth terms by the Content Guider's, a Video ControlNet in the conditioning. The graph
breaks are counted by ``torch._dynamo.explain`` on one U-Net call as the sampler makes it; ComfyUI's own
``set_torch_compile_wrapper`` (what its TorchCompileModel node runs) compiles the U-Net for a whole sampling run.
The ``eager`` dynamo backend traces exactly what inductor would be given, without its code generation (minutes on
two cores); the ``slow`` test runs the TorchCompileModel node itself, with inductor, through the server.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devtools import harness

PACK = Path(__file__).resolve().parents[1]
OURS = (str(PACK / "nodes"), str(PACK / "dreamoving_core"))


@pytest.fixture(scope="module")
def model() -> harness.DreaMovingModel:
    return harness.build(frames=2, size=64)


def unet_call(model: harness.DreaMovingModel, sigma: float):
    """``(fn, args)``: one U-Net call of a CFG step at ``sigma``, its options as ComfyUI's sampler passes them."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model.patcher])
    model.patcher.pre_run()
    options = dict(model.patcher.model_options["transformer_options"])
    frames = model.frames
    options.update(cond_or_uncond=[0, 1], sigmas=torch.full((2 * frames,), sigma))
    unet = model.patcher.model.diffusion_model
    context = torch.cat([model.positive[0][0], model.negative[0][0]]).repeat_interleave(frames, 0)
    x = torch.randn(2 * frames, 4, model.size // 8, model.size // 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2 * frames,), 500.0)

    def call(x, t, context):
        return unet(x, timesteps=t, context=context, transformer_options=options)

    return call, (x, t, context)


def ours(reason) -> bool:
    """A break whose innermost user frame is in the pack's code."""
    return bool(reason.user_stack) and reason.user_stack[-1].filename.startswith(OURS)


def test_the_patched_unet_call_has_no_graph_break_in_our_code(model):
    torch._dynamo.reset()
    call, args = unet_call(model, sigma=5.0)
    with torch.inference_mode():
        explained = torch._dynamo.explain(call)(*args)
    mine = [f"{r.reason.splitlines()[0]} at {r.user_stack[-1].filename}:{r.user_stack[-1].lineno}"
            for r in explained.break_reasons if ours(r)]
    assert not mine, "graph breaks in the pack's code:\n" + "\n".join(mine)
    assert explained.graph_break_count == 0, [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_comfyuis_compile_wrapper_gives_the_eager_latents_without_recompiling_between_steps(model):
    import comfy.model_management
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    torch._dynamo.reset()
    eager = model.sample(steps=2)
    compiled = model.patcher.clone()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    set_torch_compile_wrapper(compiled, backend=counting, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        latents = model.sample(steps=2, patcher=compiled)
    comfy.model_management.unload_all_models()
    assert len(graphs) == 1, f"{len(graphs)} graphs: the U-Net must compile once for every step"
    torch.testing.assert_close(latents, eager, rtol=1e-4, atol=1e-4)
