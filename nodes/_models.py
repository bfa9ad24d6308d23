"""How the pack's models live in ComfyUI: their layer classes, dtypes, patchers, attention backend and sessions.

Every torch model the pack runs (motion blocks, Video ControlNet, Content Guider projections, CLIP image tower,
ZoeDepth) is built from ComfyUI's casting layers (``comfy.ops.manual_cast``), stored in the dtype
``comfy.model_management`` picks for it (so ``--force-fp32``, ``--fp16-unet``, bf16 devices ... apply) and held by
a ``ModelPatcher``: ComfyUI loads it before use, leaves what does not fit on a small GPU on the offload device (the
layers cast their weights on the fly), and frees it with everything else. The onnxruntime sessions (DWPose,
InsightFace) are held by a weightless patcher whose detach, ComfyUI's way of freeing a model, closes them.

``GET /dreamoving/models`` reports the pack's models that are alive in the server and which of them ComfyUI has
loaded, so freeing memory can be measured.
"""
from __future__ import annotations

import gc
from functools import partial

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention

from dreamoving_core.attention import AttentionFn
from dreamoving_core.ops import stray_tensors

OPS = comfy.ops.manual_cast
"""The layer classes of every torch model the pack builds."""

ROUTE = "/dreamoving/models"


def attention_backend(transformer_options: dict | None = None, attn_precision=None) -> AttentionFn:
    """ComfyUI's ``optimized_attention`` as the pack's attention function; a model's
    ``optimized_attention_override`` in ``transformer_options`` applies to our layers as to ComfyUI's, and
    ``attn_precision`` as in ComfyUI's cross-attention."""
    if transformer_options is None and attn_precision is None:
        return optimized_attention
    return partial(optimized_attention, attn_precision=attn_precision, transformer_options=transformer_options)


def has_attention_override(transformer_options: dict | None) -> bool:
    return bool(transformer_options) and "optimized_attention_override" in transformer_options


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_weight_dtype(module: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype ComfyUI stores a diffusion model of ``module``'s size in on ``device``."""
    return comfy.model_management.unet_dtype(device=device, model_params=parameter_count(module),
                                             supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])


def _move_stray(names: list[str], patcher, device_to, *args) -> None:
    """ON_LOAD callback: parameters and buffers no casting layer holds go to the load device with every load."""
    if device_to is None:
        return
    for name in names:
        tensor = comfy.utils.get_attr(patcher.model, name)
        if isinstance(tensor, torch.nn.Parameter):
            comfy.utils.set_attr_param(patcher.model, name, tensor.to(device_to))
        else:
            comfy.utils.set_attr(patcher.model, name, tensor.to(device_to))


def managed(module: torch.nn.Module, load_device: torch.device | None = None,
            offload_device: torch.device | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` for ``module`` (on ``load_device``, default ComfyUI's torch device; offloaded to
    ``offload_device``, default the U-Net's). Parameters and buffers no casting layer holds (a library's class tokens,
    layer scales, constant buffers) are moved with each load: on a partial load ComfyUI moves only the layers that
    fit."""
    patcher = comfy.model_patcher.ModelPatcher(
        module, load_device=load_device or comfy.model_management.get_torch_device(),
        offload_device=offload_device or comfy.model_management.unet_offload_device())
    stray = stray_tensors(module, OPS)
    if stray:
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, partial(_move_stray, stray))
    return patcher


class LibraryModel(torch.nn.Module):
    """A model a library built (transformers' ZoeDepth), held one level down: ``ModelPatcher`` keeps its
    bookkeeping (``device``, loaded memory ...) as attributes of the model it holds, which such models may refuse."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.held = model


def load(*patchers: comfy.model_patcher.ModelPatcher) -> None:
    """Have ComfyUI load ``patchers`` onto their devices (partially when memory is short) before they run."""
    comfy.model_management.load_models_gpu(list(patchers))


class SessionHolder(torch.nn.Module):
    """The weightless model of a sessions patcher; ``owner`` (not a submodule) holds the onnxruntime sessions."""

    def __init__(self, owner):
        super().__init__()
        object.__setattr__(self, "owner", owner)


def _release(owner, patcher, *args) -> None:
    """ON_DETACH callback: ComfyUI freed the model, close the sessions."""
    owner.release()


def session_patcher(owner) -> comfy.model_patcher.ModelPatcher:
    """A weightless patcher for ``owner`` (anything with ``release()``, e.g. ``DWPose``, ``FaceAnalyzer``): loaded
    with :func:`load` before the sessions run, it sits in ComfyUI's loaded models, and when ComfyUI frees it
    (``/free``, unload models, room needed for another model) the sessions close; they reopen on the next use."""
    patcher = comfy.model_patcher.ModelPatcher(SessionHolder(owner),
                                               load_device=comfy.model_management.get_torch_device(),
                                               offload_device=torch.device("cpu"))
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, partial(_release, owner))
    return patcher


def _tracked_types() -> tuple[type, ...]:
    from dreamoving_core.control.model import VideoControlNet
    from dreamoving_core.guider.clip_image import ClipImageEncoder
    from dreamoving_core.guider.face_id import FaceAnalyzer
    from dreamoving_core.guider.model import ContentGuider
    from dreamoving_core.motion.model import MotionModule
    from dreamoving_core.preprocess.dwpose import DWPose
    from dreamoving_core.preprocess.zoedepth import ZoeDepth

    return MotionModule, VideoControlNet, ContentGuider, ClipImageEncoder, ZoeDepth, DWPose, FaceAnalyzer


def model_report() -> dict:
    """The pack's models alive in this process (``kind``; ``loaded``: ComfyUI holds it among its loaded models),
    the open onnxruntime sessions, and how many of ComfyUI's loaded models are the pack's."""
    from dreamoving_core.onnx_sessions import OnnxModel

    gc.collect()
    objects = gc.get_objects()
    tracked = _tracked_types()
    alive = [obj for obj in objects if isinstance(obj, tracked)]
    ours = {id(part) for obj in alive for part in (obj, getattr(obj, "model", None)) if part is not None}
    loaded = set()
    for entry in comfy.model_management.current_loaded_models:
        real = entry.model.model if entry.model is not None else None
        loaded.update(id(part) for part in (real, *(getattr(real, name, None) for name in ("owner", "held", "net")))
                      if part is not None)  # sessions (owner), LibraryModel (held), ComfyControlModel (net)
    return {"models": [{"kind": type(obj).__name__,
                        "loaded": id(obj) in loaded or id(getattr(obj, "model", None)) in loaded} for obj in alive],
            "open_sessions": sum(1 for obj in objects if isinstance(obj, OnnxModel) and obj.is_open),
            "loaded_by_comfyui": len(loaded & ours)}


def register_routes() -> None:
    """Serve :func:`model_report` at ``GET /dreamoving/models`` (once, inside a running ComfyUI server)."""
    from aiohttp import web
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is None or any(getattr(route, "path", None) == ROUTE for route in server.routes):
        return

    @server.routes.get(ROUTE)
    async def models(request):
        return web.json_response(model_report())
