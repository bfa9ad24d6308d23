"""Core pieces every model shares (no ComfyUI): one attention function with a pluggable backend, the ops namespace,
U-Net topology rules, the onnxruntime session policy and NMS."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from einops import rearrange
from torch import nn

from devtools.tiny import content_guider as tiny_guider
from devtools.tiny import preprocess as tiny_pre
from devtools.tiny.controlnet import video_controlnet
from devtools.tiny.motion import motion_module, tiny_module
from dreamoving_core.attention import sdpa_attention
from dreamoving_core.detection import nms
from dreamoving_core.errors import DreaMovingError, InputMismatchError
from dreamoving_core.ops import LAYER_NAMES, TORCH_OPS, adopt_ops, stray_tensors
from dreamoving_core.unet.topology import Block, Layout, check_motion_fit, module_layout, motion_sites


def formula(q, k, v, heads):
    """softmax(Q Kᵀ/√d) V per head, written out."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return rearrange(weights @ v, "b h n d -> b n (h d)")


class Counting:
    """An attention backend: the written-out formula, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, heads):
        self.calls += 1
        return formula(q, k, v, heads)


# -- one attention function ------------------------------------------------------------------------------------------

def test_sdpa_backend_is_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 40, 64, generator=g), torch.randn(3, 7, 64, generator=g), torch.randn(3, 7, 64, generator=g)
    torch.testing.assert_close(sdpa_attention(q, k, v, 4), formula(q, k, v, 4), atol=1e-6, rtol=1e-5)


def _motion_run(attention):
    block = tiny_module("v2", channels=(64, 64)).mid_block
    x = torch.randn(2 * 8, 64, 4, 4, generator=torch.Generator().manual_seed(1))
    return block(x, 8, attention=attention)


def _controlnet_run(attention):
    from dreamoving_core.control.format import load_video_controlnet

    model = load_video_controlnet(video_controlnet(), dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    out = model(torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, 3, 64, 64, generator=g), torch.full((4,), 500.0),
                torch.randn(4, 77, 768, generator=g), 4, attention)
    return torch.cat([r.flatten() for r in (*out.down, out.mid)])


def _guider_run(attention):
    from dreamoving_core.guider.model import ImageFeatures, load_content_guider

    source = load_content_guider(tiny_guider.guider_file()).source("cloth")  # a perceiver resampler
    g = torch.Generator().manual_seed(3)
    features = ImageFeatures(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))
    return source.tokens(features, attention=attention)


def _clip_run(attention):
    from dreamoving_core.guider.clip_image import ClipImageEncoder

    encoder = ClipImageEncoder.from_file(tiny_guider.clip_vision_file())
    out = encoder.encode(torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4)), attention=attention)
    return torch.cat([out.image_embeds.flatten(), out.penultimate_hidden_states.flatten()])


# calls: 2 attention blocks per motion block; the tiny ControlNet's 3 spatial transformers (self + cross) and its 3
# motion blocks; 1 resampler layer; 2 tower layers
@pytest.mark.parametrize("run,calls", [(_motion_run, 2), (_controlnet_run, 3 * 2 + 3 * 2), (_guider_run, 1),
                                       (_clip_run, 2)],
                         ids=["motion block", "video controlnet", "guider resampler", "clip tower"])
def test_every_model_attends_through_the_backend_it_is_given(run, calls):
    backend = Counting()
    with torch.no_grad():
        through_backend, default = run(backend), run(sdpa_attention)
    assert backend.calls == calls, "every attention of the model must go through the backend"
    torch.testing.assert_close(through_backend, default, atol=2e-5, rtol=1e-4)


# -- ops ----------------------------------------------------------------------------------------------------------------

def marked_ops():
    """An ops namespace of marker subclasses (what a host's casting layers are to torch's)."""
    return type("MarkedOps", (), {name: type(f"Marked{name}", (getattr(nn, name),), {}) for name in LAYER_NAMES})


def _plain_layers(module: nn.Module) -> list[str]:
    return [name for name, layer in module.named_modules() if type(layer) in tuple(getattr(nn, n) for n in LAYER_NAMES)]


def test_every_model_kind_is_built_from_the_ops_it_is_given():
    from dreamoving_core.control.format import load_video_controlnet
    from dreamoving_core.guider.clip_image import ClipImageEncoder
    from dreamoving_core.guider.model import load_content_guider
    from dreamoving_core.motion.format import load_motion_module
    from dreamoving_core.preprocess.zoedepth import load_zoedepth

    ops = marked_ops()
    models = {"motion": load_motion_module(motion_module("v2"), ops=ops),
              "video controlnet": load_video_controlnet(video_controlnet(), ops=ops),
              "guider": load_content_guider(tiny_guider.guider_file(), ops=ops),
              "clip": ClipImageEncoder.from_file(tiny_guider.clip_vision_file(), ops=ops),
              "zoedepth": load_zoedepth(tiny_pre.zoedepth_dir(), ops=ops).model}
    for kind, model in models.items():
        assert _plain_layers(model) == [], f"{kind}: layers not built from ops"
        assert any(isinstance(layer, ops.Linear) for layer in model.modules()), kind


def test_adopted_ops_keep_weights_and_outputs_and_leave_library_subclasses_alone():
    class FancyNorm(nn.LayerNorm):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5), FancyNorm(5))
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ops = marked_ops()
    assert adopt_ops(model, ops) is model
    assert type(model[0]) is ops.Conv2d and type(model[2]) is ops.Linear and type(model[3]) is FancyNorm
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)
    with pytest.raises(TypeError, match="ops.Linear must be a subclass of torch.nn.Linear"):
        adopt_ops(model, type("Bad", (), {"Linear": nn.Conv2d}))


def test_stray_tensors_are_what_no_layer_holds():
    from dreamoving_core.guider.clip_image import ClipImageEncoder
    from dreamoving_core.preprocess.zoedepth import load_zoedepth

    clip = ClipImageEncoder.from_file(tiny_guider.clip_vision_file())
    assert stray_tensors(clip, TORCH_OPS) == ["tower.class_embedding", "tower.positional_embedding", "tower.proj"]
    stray = stray_tensors(load_zoedepth(tiny_pre.zoedepth_dir()).model, TORCH_OPS)
    layer = "backbone.beit.layers.0."
    assert stray[:4] == ["backbone.beit.embeddings.cls_token", f"{layer}lambda_1", f"{layer}lambda_2",
                         f"{layer}relative_position_bias.relative_position_bias_table"]
    assert "metric_head.conditional_log_binomial.nyu.log_binomial_transform.k_idx" in stray, \
        "buffers of weightless modules are stray too"
    assert len(stray) == 1 + 4 * 3 + 2 * 2  # nothing a layer holds


# -- topology ---------------------------------------------------------------------------------------------------------

SD15_INPUT = ([Block(("other",))] + [b for width in (320, 640, 1280) for b in
              (Block(("res", "attn"), width), Block(("res", "attn"), width), Block(("down",)))]
              + [Block(("res",), 1280), Block(("res",), 1280)])
SD15_MIDDLE = Block(("res", "attn", "res"), 1280)
SD15_OUTPUT = ([Block(("res",), 1280)] * 2 + [Block(("res", "up"), 1280)]
               + [b for width in (1280, 640) for b in (Block(("res", "attn"), width),) * 2
                  + (Block(("res", "attn", "up"), width),)] + [Block(("res", "attn"), 320)] * 3)


def test_motion_sites_of_the_sd15_unet_are_animatediffs():
    sites = motion_sites(SD15_INPUT, SD15_MIDDLE, SD15_OUTPUT)
    assert [[s.index for s in level] for level in sites.down] == [[1, 2], [4, 5], [7, 8], [10, 11]]
    assert (sites.mid.index, sites.mid.before) == (0, 2)
    assert [[(s.index, s.before) for s in level] for level in sites.up] == [
        [(0, None), (1, None), (2, 1)], [(3, None), (4, None), (5, 2)], [(6, None), (7, None), (8, 2)],
        [(9, None), (10, None), (11, None)]]
    with torch.device("meta"):
        from dreamoving_core.motion.model import MotionModule

        assert MotionModule().layout == sites.layout  # a full-size module fits, level by level


def test_the_video_controlnet_places_its_motion_blocks_by_the_same_rules():
    from dreamoving_core.control.model import VideoControlNet

    with torch.device("meta"):
        sites = VideoControlNet().motion_sites
    unet = motion_sites(SD15_INPUT, SD15_MIDDLE, SD15_OUTPUT)
    assert sites.down == unet.down and sites.mid == unet.mid and sites.up == ()


def test_fit_check_names_both_sides_and_what_differs():
    unet = Layout(((320,), (320,)), 320, ((320, 320), (320, 320)))
    check_motion_fit(unet, unet, "mm.ckpt", "this MODEL's U-Net")
    check_motion_fit(Layout(unet.down, None, unet.up), unet, "v1.ckpt", "this MODEL's U-Net")  # no middle: fine
    with pytest.raises(InputMismatchError, match=r"'narrow' is made for a U-Net with 2 levels of widths 64/64 "
                                                 r"\(1/1 layers down, 2/2 up\), but this MODEL's U-Net has 2 levels "
                                                 r"of widths 320/320 \(1/1 layers down, 2/2 up\)"):
        check_motion_fit(tiny_module("v3", channels=(64, 64)).layout, unet, "narrow", "this MODEL's U-Net")
    blocks = tiny_module("v2").down_blocks
    assert module_layout(blocks) == Layout(((320,), (320,)), None, ())
    with pytest.raises(InputMismatchError, match="has a middle block of width 640, but this MODEL's U-Net's middle "
                                                 "block is 320 wide"):
        check_motion_fit(Layout(unet.down, 640, unet.up), unet, "odd", "this MODEL's U-Net")
    with pytest.raises(InputMismatchError, match="has a middle block but ControlNet 'cn' has none"):
        check_motion_fit(Layout(unet.down, 320, ()), Layout(unet.down, None, ()), "mm", "ControlNet 'cn'",
                         decoder=False)


# -- onnxruntime sessions -------------------------------------------------------------------------------------------

@pytest.fixture
def recorded_sessions(monkeypatch):
    """onnxruntime with a CUDA provider listed; sessions record the providers asked for (a CUDA one fails to start
    when ``cuda_fails`` is set)."""
    import onnxruntime as ort

    real = ort.InferenceSession
    state = {"tried": [], "cuda_fails": False}

    def session(path, options=None, providers=None):
        state["tried"].append(list(providers))
        if "CUDAExecutionProvider" in providers:
            if state["cuda_fails"]:
                raise RuntimeError("CUDA failure 35: driver too old")
            providers = ["CPUExecutionProvider"]  # no GPU here: run what would have run on it on the CPU
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    return state


def test_session_policy_prefers_cuda_falls_back_to_the_cpu_and_says_so(recorded_sessions, caplog):
    from dreamoving_core.onnx_sessions import open_session

    path = tiny_pre.yolox_onnx()
    open_session(path, "auto")
    open_session(path, "CPU")
    assert recorded_sessions["tried"] == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    recorded_sessions["cuda_fails"] = True
    with caplog.at_level(logging.WARNING, logger="dreamoving_core.onnx_sessions"):
        open_session(path, "cuda", label="DWPose")
    assert recorded_sessions["tried"][-2:] == [["CUDAExecutionProvider", "CPUExecutionProvider"],
                                               ["CPUExecutionProvider"]]
    assert [r.getMessage() for r in caplog.records] == [
        "DWPose: the CUDA provider failed to start for 'yolox_l.onnx' (CUDA failure 35: driver too old); using the CPU"]
    with pytest.raises(DreaMovingError, match="device must be one of auto, cuda, cpu, got 'gpu'"):
        open_session(path, "gpu")


def test_dwpose_and_insightface_share_the_session_policy_and_nms():
    from dreamoving_core import detection, onnx_sessions
    from dreamoving_core.guider import face_id
    from dreamoving_core.preprocess import dwpose

    assert dwpose.nms is face_id.nms is detection.nms
    assert dwpose.OnnxModel is face_id.OnnxModel is onnx_sessions.OnnxModel


# -- NMS ------------------------------------------------------------------------------------------------------------------

def test_nms_counts_edge_pixels_and_keeps_boxes_up_to_the_threshold():
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [0, 0, 8, 8], [30, 30, 40, 40]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    # with edge pixels: box 0 and box 1 are 10x10 and share 5x10 -> IoU 50 / 150 = 1/3; box 2 (9x9) inside box 0:
    # IoU 81 / 100 = 0.81. Without edge pixels box 1 would overlap box 0 by 4x9 / (81 + 81 - 36) = 0.286.
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 3]
    assert nms(boxes, scores, 1 / 3).tolist() == [0, 1, 3]  # "at most the threshold" survives
    assert nms(boxes, scores, 0.3).tolist() == [0, 3]
