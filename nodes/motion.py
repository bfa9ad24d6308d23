"""Motion nodes: load a motion module, inject its motion blocks into a MODEL, context windows for long videos.

Injection is data on a ``model.clone()``: every U-Net block that gets a motion block is replaced (object patch) by a
copy of its ``TimestepEmbedSequential`` holding the original layers plus a parameter-free ``MotionSlot``; the slot
runs through ComfyUI's ``forward_timestep_embed_patch`` hook. The motion weights live in their own ``ModelPatcher``,
registered as an additional model, so ComfyUI's memory management loads and offloads them with the U-Net. The
patcher restores the original blocks when another model is loaded, after a prompt ends, fails or is interrupted.

Long videos use ComfyUI's own context windows (``comfy.context_windows.IndexListContextHandler``): each U-Net call
then holds one window of frames, and ``transformer_options["context_window"].index_list`` names its frames (see
``window_frame_indices``), which is how ControlNet hints and guider conditioning follow the same windows.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

import comfy.context_windows
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import (Downsample, ResBlock, TimestepEmbedSequential,
                                                            Upsample)
from comfy_api.latest import io

from dreamoving_core.errors import InputMismatchError
from dreamoving_core.motion.model import DEFAULT_POSITIONAL_LENGTH, PE_EXTENSIONS, MotionBlock, MotionModule
from dreamoving_core.motion.format import load_motion_module

from ._common import ModelCombo, ModelFolder, custom_type, node_error

CATEGORY = "DreaMoving/Motion"
LOAD_NAME = "Load Motion Module"
APPLY_NAME = "Apply Motion Module"
CONTEXT_NAME = "Motion Context Options"
MOTION_FOLDER = ModelFolder(("dreamoving_motion", "animatediff_models"), "motion module",
                            "put mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt (huggingface.co/guoyww/animatediff) or a "
                            "DreaMoving motion module there")
ADDITIONAL_MODELS_KEY = "dreamoving_motion"
WRAPPER_KEY = "dreamoving_motion_frames"

@dataclass
class LoadedMotionModule:
    """What a MOTION_MODULE wire carries: the file name, the core module and the patcher that memory-manages it."""

    name: str
    module: MotionModule
    patcher: comfy.model_patcher.ModelPatcher


MotionModuleIO = custom_type("MOTION_MODULE", LoadedMotionModule)

class FrameContextHandler(comfy.context_windows.IndexListContextHandler):
    """ComfyUI's index-list context windows over dimension 0, where SD1.5 videos keep their frames.

    ComfyUI 0.3.75 finds the current step (which shifts the uniform schedules' windows) by looking the timestep up in
    the schedule's sigmas. That fails with frames in the batch (one timestep per frame) and for samplers that also
    evaluate between two sigmas (Heun, DPM2, SDE variants); here such an evaluation counts as the step it is in.
    """

    def set_step(self, timestep: torch.Tensor, model_options: dict) -> None:
        sigmas = model_options["transformer_options"]["sample_sigmas"]
        sigma = timestep.reshape(-1)[0].to(sigmas)
        self._step = max(int((sigmas >= sigma * (1 - 1e-4)).sum()) - 1, 0)

    @classmethod
    def like(cls, handler: comfy.context_windows.IndexListContextHandler) -> FrameContextHandler:
        """The same windows as ``handler`` (e.g. from the core Context Windows node), working over frames."""
        frames = cls(handler.context_schedule, handler.fuse_method, handler.context_length, handler.context_overlap,
                     handler.context_stride, handler.closed_loop, dim=0)
        frames.callbacks = handler.callbacks
        return frames


@dataclass(frozen=True)
class ContextOptions:
    """Sliding context windows over frames, in the terms of ``comfy.context_windows``."""

    length: int = 16
    overlap: int = 4
    schedule: str = comfy.context_windows.ContextSchedules.STATIC_STANDARD
    stride: int = 1
    closed_loop: bool = False
    fuse_method: str = comfy.context_windows.ContextFuseMethods.PYRAMID

    def handler(self) -> FrameContextHandler:
        return FrameContextHandler(
            context_schedule=comfy.context_windows.get_matching_context_schedule(self.schedule),
            fuse_method=comfy.context_windows.get_matching_fuse_method(self.fuse_method),
            context_length=self.length, context_overlap=self.overlap, context_stride=self.stride,
            closed_loop=self.closed_loop, dim=0)


ContextOptionsIO = custom_type("DREAMOVING_CONTEXT_OPTIONS", ContextOptions)


def window_frame_indices(transformer_options: dict, num_frames: int) -> list[int]:
    """Indices (into the whole video) of the frames in the current U-Net call: the context window's frames when
    ComfyUI's context windows are active, else ``0..num_frames-1``. Per-frame inputs (ControlNet hints, guider
    features) pick their frames with it."""
    window = transformer_options.get("context_window")
    return list(window.index_list) if window is not None else list(range(num_frames))


def load_for_comfy(name: str, positional_length: int, pe_extension: str) -> LoadedMotionModule:
    """Load a motion module with ComfyUI's casting layers (weights follow the input's device and dtype) in the
    U-Net's storage dtype, wrapped in a ``ModelPatcher`` so ComfyUI moves it between devices."""
    module = load_motion_module(MOTION_FOLDER.path(name, "model_name"), positional_length=positional_length,
                                pe_extension=pe_extension, ops=comfy.ops.manual_cast)
    params = sum(p.numel() for p in module.parameters())
    dtype = comfy.model_management.unet_dtype(model_params=params,
                                              supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    module.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return LoadedMotionModule(name, module, patcher)


class MotionSlot(torch.nn.Module):
    """Runs one motion block inside a U-Net block: ``(B·F, C, H, W) -> (B·F, C, H, W)``.

    Holds no parameters: the block belongs to the motion module's patcher, so the U-Net's own state dict, size and
    weight patches (LoRAs) are unchanged. ComfyUI batches cond and uncond videos, so the frame count is the batch
    divided by the number of videos in ``transformer_options["cond_or_uncond"]``.
    """

    def __init__(self, block: MotionBlock, scale: float):
        super().__init__()
        object.__setattr__(self, "block", block)  # deliberately not registered as a submodule
        self.scale = scale

    def forward(self, x: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        videos = len(transformer_options.get("cond_or_uncond") or [0])
        return self.block(x, x.shape[0] // videos, self.scale)


def run_motion_slot(layer, x, emb, context, transformer_options, output_shape, time_context, num_video_frames,
                    image_only_indicator):
    """``forward_timestep_embed_patch`` handler for ``MotionSlot`` layers."""
    return layer(x, transformer_options)


def _kind(layer) -> str:
    if isinstance(layer, ResBlock):
        return "res"
    if isinstance(layer, SpatialTransformer):
        return "attn"
    if isinstance(layer, Downsample):
        return "down"
    if isinstance(layer, Upsample):
        return "up"
    if isinstance(layer, MotionSlot):
        return "motion"
    return "other"


def _width(block: TimestepEmbedSequential) -> int:
    return next(layer.out_channels for layer in block if isinstance(layer, ResBlock))


@dataclass(frozen=True)
class Site:
    """Where a motion block goes: U-Net block ``path``, before the layer at position ``before`` (None: at the end)."""

    path: str
    before: int | None
    width: int


def injection_sites(unet) -> tuple[list[list[Site]], Site | None, list[list[Site]]]:
    """Motion sites of a ComfyUI ``UNetModel`` as AnimateDiff places them: after each res(+attention) layer of each
    down level and up level (before an Upsample), and after the middle block's attention. Returns
    ``(down[level], mid, up[level])`` with ``up[0]`` the innermost level."""
    down: list[list[Site]] = [[]]
    for i, block in enumerate(unet.input_blocks):
        kinds = [_kind(layer) for layer in block]
        if "down" in kinds:
            down.append([])
        elif "res" in kinds:
            down[-1].append(Site(f"diffusion_model.input_blocks.{i}", None, _width(block)))
    mid = None
    middle = getattr(unet, "middle_block", None)
    if middle is not None and len(middle) > 0:
        kinds = [_kind(layer) for layer in middle if _kind(layer) != "motion"]
        anchor = max((j for j, k in enumerate(kinds) if k == "attn"), default=kinds.index("res"))
        mid = Site("diffusion_model.middle_block", anchor + 1, _width(middle))
    up: list[list[Site]] = [[]]
    for i, block in enumerate(unet.output_blocks):
        kinds = [_kind(layer) for layer in block if _kind(layer) != "motion"]
        up[-1].append(Site(f"diffusion_model.output_blocks.{i}", kinds.index("up") if "up" in kinds else None,
                           _width(block)))
        if "up" in kinds:
            up.append([])
    return down, mid, up


def _describe(levels: list[list[int]]) -> str:
    return f"{len(levels)} levels of widths {'/'.join(str(lv[0]) if lv else '?' for lv in levels)} with " \
           f"{'/'.join(str(len(lv)) for lv in levels)} layers"


def check_fit(motion: LoadedMotionModule, down, mid, up) -> None:
    """Raise ``InputMismatchError`` unless the motion module's levels, layers and widths match the U-Net's sites."""
    config = motion.module.config
    want_down = [[c] * config.down_layers for c in config.channels]
    want_up = [[c] * config.up_layers for c in reversed(config.channels)]
    have_down = [[s.width for s in level] for level in down]
    have_up = [[s.width for s in level] for level in up]
    if want_down != have_down or want_up != have_up:
        raise InputMismatchError(
            f"motion module '{motion.name}' is made for a U-Net with {_describe(want_down)} per down level, but this "
            f"MODEL's U-Net has {_describe(have_down)}; use a motion module made for this model (SD1.5: "
            "mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt or a DreaMoving motion module)")
    if config.mid_block and mid is None:
        raise InputMismatchError(f"motion module '{motion.name}' has a middle block but this MODEL's U-Net has none")
    if config.mid_block and mid.width != config.mid_channels:
        raise InputMismatchError(f"motion module '{motion.name}' has a middle block of width {config.mid_channels}, "
                                 f"this MODEL's middle block is {mid.width} wide")


def _with_slot(block: TimestepEmbedSequential, before: int | None = None,
               slot: MotionSlot | None = None) -> TimestepEmbedSequential:
    """A new block with the same layers under the same names (so weight keys and LoRA patches still resolve), the
    motion slots of an earlier application dropped and ``slot`` (if any) inserted before layer ``before``."""
    layers = [(name, layer) for name, layer in block._modules.items() if not isinstance(layer, MotionSlot)]
    if slot is not None:
        layers.insert(len(layers) if before is None else before, ("motion", slot))
    patched = TimestepEmbedSequential(OrderedDict(layers))
    patched.train(block.training)
    return patched


def _has_slot(obj) -> bool:
    return isinstance(obj, TimestepEmbedSequential) and any(isinstance(layer, MotionSlot) for layer in obj)


def _eject(model: comfy.model_patcher.ModelPatcher) -> None:
    """Remove the motion blocks of an earlier Apply Motion Module from ``model`` (a clone), keeping other patches."""
    for path, obj in list(model.object_patches.items()):
        if _has_slot(obj):
            model.add_object_patch(path, _with_slot(obj))
    model.remove_additional_models(ADDITIONAL_MODELS_KEY)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)


class FrameCheck:
    """Outer-sample wrapper: before any step, checks the frame count against the motion module's positions and the
    context windows, so a mismatch is one clear message instead of an error deep inside the U-Net."""

    def __init__(self, name: str, positions: int):
        self.name = name
        self.positions = positions

    def __call__(self, executor, noise, *args, **kwargs):
        frames = noise.shape[0]
        model_options = executor.class_obj.model_options  # this sampling run's own copy
        handler = model_options.get("context_handler")
        if handler is not None and getattr(handler, "dim", 0) != 0:
            raise node_error(APPLY_NAME, f"context windows run over dimension {handler.dim}, but SD1.5 videos keep "
                                         "their frames in dimension 0; set dim to 0 or use Motion Context Options")
        if type(handler) is comfy.context_windows.IndexListContextHandler:
            model_options["context_handler"] = handler = FrameContextHandler.like(handler)
        window = getattr(handler, "context_length", None) if handler is not None else None
        longest = frames if window is None else min(frames, window)
        if longest > self.positions:
            hint = (f"use context windows of at most {self.positions} frames" if window is not None else
                    "connect Motion Context Options (e.g. 16 frames, overlap 4)")
            raise node_error(APPLY_NAME, f"{longest} frames run through the motion module at once but "
                                         f"'{self.name}' has {self.positions} positions; {hint}, or load it with a "
                                         "longer positional length")
        return executor(noise, *args, **kwargs)


def apply_motion(model, motion: LoadedMotionModule, scale: float,
                 context: ContextOptions | None = None) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` with ``motion``'s blocks injected at ``scale`` (0: none), replacing any motion module an
    earlier Apply Motion Module gave it."""
    patched = model.clone()
    _eject(patched)
    if context is not None:
        patched.model_options["context_handler"] = context.handler()
        comfy.context_windows.create_prepare_sampling_wrapper(patched)
    if scale == 0:
        return patched
    unet = patched.get_model_object("diffusion_model")
    down, mid, up = injection_sites(unet)
    check_fit(motion, down, mid, up)
    module = motion.module
    sites = [(site, block) for levels, blocks in ((down, module.down_blocks), (up, module.up_blocks))
             for level, level_blocks in zip(levels, blocks) for site, block in zip(level, level_blocks)]
    if module.mid_block is not None:
        sites.append((mid, module.mid_block))
    for site, block in sites:
        original = patched.get_model_object(site.path)
        patched.add_object_patch(site.path, _with_slot(original, site.before, MotionSlot(block, scale)))
    patches = patched.model_options["transformer_options"].get("patches", {})
    if (MotionSlot, run_motion_slot) not in patches.get("forward_timestep_embed_patch", []):
        patched.set_model_forward_timestep_embed_patch((MotionSlot, run_motion_slot))
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, [motion.patcher.clone()])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                 FrameCheck(motion.name, module.config.positional_length))
    return patched


class LoadMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingLoadMotionModule",
            display_name=LOAD_NAME,
            category=CATEGORY,
            description="Load an SD1.5 motion module: AnimateDiff v1/v2/v3 (.ckpt or .safetensors) or a DreaMoving "
                        "motion module, from models/animatediff_models or models/dreamoving/motion.",
            inputs=[
                ModelCombo("model_name", MOTION_FOLDER,
                           tooltip="Motion module file: mm_sd_v15.ckpt, mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt or a "
                                   "DreaMoving .safetensors, from models/animatediff_models or "
                                   "models/dreamoving/motion."),
                io.Int.Input("positional_length", default=DEFAULT_POSITIONAL_LENGTH, min=1, max=4096,
                             tooltip="Frames the motion module can see at once. Modules trained on fewer positions "
                                     "(AnimateDiff v1: 24, v2/v3: 32) are extended to this length, longer tables "
                                     "are cut."),
                io.Combo.Input("pe_extension", options=list(PE_EXTENSIONS), default="sinusoid",
                               tooltip="How new positions are made: 'sinusoid' keeps the trained ones and continues "
                                       "the formula; 'interpolate' stretches the trained positions over the new "
                                       "length."),
            ],
            outputs=[MotionModuleIO.Output(display_name="motion_module",
                                           tooltip="The loaded motion module, for Apply Motion Module.")],
        )

    @classmethod
    def execute(cls, model_name: str, positional_length: int, pe_extension: str) -> io.NodeOutput:
        return io.NodeOutput(load_for_comfy(model_name, positional_length, pe_extension))


class ApplyMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingApplyMotionModule",
            display_name=APPLY_NAME,
            category=CATEGORY,
            description="Insert the motion module's temporal blocks after every U-Net block so the frames of a "
                        "batch become one coherent video. The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 MODEL (LoRAs may already be applied)."),
                MotionModuleIO.Input("motion_module", tooltip="From Load Motion Module."),
                io.Float.Input("motion_scale", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Strength of the motion blocks' residual; 0 gives the plain per-frame model."),
                ContextOptionsIO.Input("context_options", optional=True,
                                       tooltip="Sliding windows for videos longer than the motion module's "
                                               "positions (from Motion Context Options). Leave empty for up to "
                                               "positional_length frames."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the MODEL with motion blocks; use it in the sampler.")],
        )

    @classmethod
    def execute(cls, model, motion_module: LoadedMotionModule, motion_scale: float,
                context_options: ContextOptions | None = None) -> io.NodeOutput:
        positions = motion_module.module.config.positional_length
        if context_options is not None and context_options.length > positions:
            raise InputMismatchError(
                f"context windows of {context_options.length} frames are longer than the {positions} positions "
                f"of '{motion_module.name}'; shorten the windows or load it with a longer positional length")
        return io.NodeOutput(apply_motion(model, motion_module, motion_scale, context_options))


class MotionContextOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        schedules = comfy.context_windows.ContextSchedules
        return io.Schema(
            node_id="DreaMovingContextOptions",
            display_name=CONTEXT_NAME,
            category=CATEGORY,
            description="Sliding context windows over frames for long videos (ComfyUI's context windows with "
                        "AnimateDiff's defaults): memory is bounded by the window, not the video.",
            inputs=[
                io.Int.Input("context_length", default=16, min=1, max=4096,
                             tooltip="Frames per window (AnimateDiff: 16). At most the motion module's positions."),
                io.Int.Input("context_overlap", default=4, min=0, max=4096,
                             tooltip="Frames shared by neighbouring windows; more overlap is smoother and slower."),
                io.Combo.Input("context_schedule", default=schedules.STATIC_STANDARD,
                               options=[schedules.STATIC_STANDARD, schedules.UNIFORM_STANDARD,
                                        schedules.UNIFORM_LOOPED, schedules.BATCHED],
                               tooltip="standard_static: fixed windows; standard_uniform: windows shift every step; "
                                       "looped_uniform: windows wrap around (looping videos); batched: no overlap."),
                io.Int.Input("context_stride", default=1, min=1, max=32,
                             tooltip="Uniform schedules only: also use windows of every 2nd, 4th... frame."),
                io.Boolean.Input("closed_loop", default=False,
                                 tooltip="looped_uniform only: let windows wrap from the last frame to the first."),
                io.Combo.Input("fuse_method", default=comfy.context_windows.ContextFuseMethods.PYRAMID,
                               options=list(comfy.context_windows.ContextFuseMethods.LIST_STATIC),
                               tooltip="How overlapping windows are blended: pyramid weighs a window's middle "
                                       "frames most; flat averages; overlap-linear ramps across the overlap."),
            ],
            outputs=[ContextOptionsIO.Output(display_name="context_options",
                                             tooltip="For the context_options input of Apply Motion Module.")],
        )

    @classmethod
    def execute(cls, context_length: int, context_overlap: int, context_schedule: str, context_stride: int,
                closed_loop: bool, fuse_method: str) -> io.NodeOutput:
        if context_overlap >= context_length:
            raise node_error(CONTEXT_NAME, f"context_overlap ({context_overlap}) must be smaller than "
                                           f"context_length ({context_length})")
        return io.NodeOutput(ContextOptions(context_length, context_overlap, context_schedule, context_stride,
                                            closed_loop, fuse_method))


NODES: list[type[io.ComfyNode]] = [LoadMotionModule, ApplyMotionModule, MotionContextOptions]
