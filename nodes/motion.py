"""Motion nodes: load a motion module, inject its motion blocks into a MODEL, context windows for long videos.

Injection is data on a ``model.clone()``: every U-Net block that gets a motion block (where ``unet.topology``
places them) is replaced (object patch) by a copy of its ``TimestepEmbedSequential`` holding the original layers plus
a parameter-free ``MotionSlot``; the slot runs through ComfyUI's ``forward_timestep_embed_patch`` hook, with ComfyUI's
attention. The motion weights live in their own ``ModelPatcher``, registered as an additional model, so ComfyUI's
memory management loads and offloads them with the U-Net. The patcher restores the original blocks when another
model is loaded, after a prompt ends, fails or is interrupted.

AnimateDiff v1 modules were trained in a U-Net whose ResBlock and output group norms take their statistics over all
frames of a video: for them, each of those norms is object-patched into a sequence that folds the batch into videos
around the very same norm layer (same weights, same keys) and unfolds it after, the number of videos coming from
the U-Net call (a ``DIFFUSION_MODEL`` wrapper reads ``cond_or_uncond``). v2, v3 and ours keep per-frame norms.

Long videos use ComfyUI's own context windows (``comfy.context_windows.IndexListContextHandler``, with the fixes
of ``_comfy.py`` where the host needs them): each U-Net call then holds one window of frames, and
``transformer_options["context_window"].index_list`` names its frames, which is how ControlNet hints follow the same
windows. Frame counts are checked when the patch is applied where the MODEL already carries the windows, otherwise
before the first sampling step; either way the message names the Apply Motion Module node.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

import comfy.context_windows
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import (Downsample, ResBlock, TimestepEmbedSequential,
                                                            Upsample)
from comfy_api.latest import io

from dreamoving_core.errors import InputMismatchError
from dreamoving_core.motion.format import load_motion_module
from dreamoving_core.motion.model import DEFAULT_POSITIONAL_LENGTH, PE_EXTENSIONS, MotionBlock, MotionModule
from dreamoving_core.unet.topology import Block, MotionSites, check_motion_fit, motion_sites

from ._comfy import context_handler_class, frame_windows
from ._common import ModelCombo, ModelFolder, custom_type, node_error
from ._models import OPS, attention_backend, managed, unet_weight_dtype

CATEGORY = "DreaMoving/Motion"
LOAD_NAME = "Load Motion Module"
APPLY_NAME = "Apply Motion Module"
CONTEXT_NAME = "Motion Context Options"
MOTION_FOLDER = ModelFolder(("dreamoving_motion", "animatediff_models"), "motion module",
                            "put mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt (huggingface.co/guoyww/animatediff) or a "
                            "DreaMoving motion module there")
ADDITIONAL_MODELS_KEY = "dreamoving_motion"
WRAPPER_KEY = "dreamoving_motion_frames"
VIDEO_NORMS_KEY = "dreamoving_video_norms"


@dataclass
class LoadedMotionModule:
    """What a MOTION_MODULE wire carries: the file name, the core module and the patcher that memory-manages it."""

    name: str
    module: MotionModule
    patcher: comfy.model_patcher.ModelPatcher


MotionModuleIO = custom_type("MOTION_MODULE", LoadedMotionModule)


@dataclass(frozen=True)
class ContextOptions:
    """Sliding context windows over frames, in the terms of ``comfy.context_windows``."""

    length: int = 16
    overlap: int = 4
    schedule: str = comfy.context_windows.ContextSchedules.STATIC_STANDARD
    stride: int = 1
    closed_loop: bool = False
    fuse_method: str = comfy.context_windows.ContextFuseMethods.PYRAMID

    def handler(self) -> comfy.context_windows.IndexListContextHandler:
        return context_handler_class()(
            context_schedule=comfy.context_windows.get_matching_context_schedule(self.schedule),
            fuse_method=comfy.context_windows.get_matching_fuse_method(self.fuse_method),
            context_length=self.length, context_overlap=self.overlap, context_stride=self.stride,
            closed_loop=self.closed_loop, dim=0)


ContextOptionsIO = custom_type("DREAMOVING_CONTEXT_OPTIONS", ContextOptions)


def load_for_comfy(name: str, positional_length: int, pe_extension: str) -> LoadedMotionModule:
    """Load a motion module with ComfyUI's casting layers (weights follow the input's device and dtype) in the
    dtype ComfyUI stores a U-Net of its size in, wrapped in a ``ModelPatcher`` so ComfyUI moves it between devices."""
    module = load_motion_module(MOTION_FOLDER.path(name, "model_name"), positional_length=positional_length,
                                pe_extension=pe_extension, ops=OPS)
    load_device = comfy.model_management.get_torch_device()
    module.to(unet_weight_dtype(module, load_device))
    return LoadedMotionModule(name, module, managed(module, load_device))


def videos_in(transformer_options: dict) -> int:
    """Videos in one U-Net call: ComfyUI batches the cond and uncond videos named in ``cond_or_uncond``."""
    return len(transformer_options.get("cond_or_uncond") or [0])


class MotionSlot(torch.nn.Module):
    """Runs one motion block inside a U-Net block: ``(B·F, C, H, W) -> (B·F, C, H, W)``.

    Holds no parameters: the block belongs to the motion module's patcher, so the U-Net's own state dict, size and
    weight patches (LoRAs) are unchanged. The frame count is the batch divided by the videos in the call; attention
    is ComfyUI's, with the model's ``optimized_attention_override`` if it has one.
    """

    def __init__(self, block: MotionBlock, scale: float):
        super().__init__()
        object.__setattr__(self, "block", block)  # deliberately not registered as a submodule
        self.scale = scale

    def forward(self, x: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        return self.block(x, x.shape[0] // videos_in(transformer_options), self.scale,
                          attention_backend(transformer_options))


def run_motion_slot(layer, x, emb, context, transformer_options, *more: Any, **named: Any):
    """``forward_timestep_embed_patch`` handler for ``MotionSlot`` layers. ComfyUI passes ``(layer, x, emb, context,
    transformer_options, output_shape, ...)`` by position; only the first five are read, so arguments it adds later
    pass through."""
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
    return "other"


def describe_block(block: TimestepEmbedSequential) -> Block:
    """A ComfyUI U-Net block's layer kinds (motion slots of an earlier application left out) and width."""
    layers = [layer for layer in block if not isinstance(layer, MotionSlot)]
    width = next((layer.out_channels for layer in layers if isinstance(layer, ResBlock)), None)
    return Block(tuple(_kind(layer) for layer in layers), width)


def injection_sites(unet) -> MotionSites:
    """Motion sites of a ComfyUI ``UNetModel`` (``unet.topology``): ``down[level]``, ``mid``, ``up[level]`` with
    ``up[0]`` the innermost level; site indices are block indices of ``input_blocks`` / ``output_blocks``."""
    middle = getattr(unet, "middle_block", None)
    return motion_sites([describe_block(b) for b in unet.input_blocks],
                        describe_block(middle) if middle is not None and len(middle) > 0 else None,
                        [describe_block(b) for b in unet.output_blocks])


def _with_slot(block: TimestepEmbedSequential, before: int | None = None,
               slot: MotionSlot | None = None) -> TimestepEmbedSequential:
    """A new block with the same layers under the same names (so weight keys and LoRA patches still resolve), the
    motion slots of an earlier application dropped and ``slot`` (if any) inserted before layer ``before``."""
    layers = [(name, layer) for name, layer in block.named_children() if not isinstance(layer, MotionSlot)]
    if slot is not None:
        layers.insert(len(layers) if before is None else before, ("motion", slot))
    patched = TimestepEmbedSequential(OrderedDict(layers))
    patched.train(block.training)
    return patched


def _has_slot(obj) -> bool:
    return isinstance(obj, TimestepEmbedSequential) and any(isinstance(layer, MotionSlot) for layer in obj)


class VideoCount:
    """``DIFFUSION_MODEL`` wrapper: the number of videos in the current U-Net call, for ``FoldVideos`` (one object
    shared by the wrapper and the patched norms; model clones share their wrappers' objects)."""

    def __init__(self):
        self.videos: int | None = None

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        self.videos = videos_in(transformer_options)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            self.videos = None


class FoldVideos(torch.nn.Module):
    """``(B·F, C, H, W) -> (B, C, F, H, W)``: the group norm after it takes each video's statistics over all its
    frames (AnimateDiff v1's U-Net); ``B`` is the current call's video count."""

    def __init__(self, count: VideoCount):
        super().__init__()
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count.videos is None:
            raise RuntimeError("a U-Net group norm patched for AnimateDiff v1 ran outside a U-Net call")
        return rearrange(x, "(b f) c h w -> b c f h w", b=self.count.videos)


class UnfoldVideos(torch.nn.Module):
    """``(B, C, F, H, W) -> (B·F, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b c f h w -> (b f) c h w")


def _video_norm(layers: torch.nn.Sequential, count: VideoCount | None = None) -> torch.nn.Sequential:
    """A new sequence with the layers of ``layers`` (a group norm first) under the same names, so the norm's weights
    keep their keys: with ``count``, folded into videos around the norm; without, as it was."""
    children = [(n, layer) for n, layer in layers.named_children() if not isinstance(layer, (FoldVideos, UnfoldVideos))]
    if count is not None:
        children = [("fold", FoldVideos(count)), children[0], ("unfold", UnfoldVideos()), *children[1:]]
    patched = torch.nn.Sequential(OrderedDict(children))
    patched.train(layers.training)
    return patched


def _is_folded(obj) -> bool:
    return isinstance(obj, torch.nn.Sequential) and any(isinstance(layer, FoldVideos) for layer in obj)


def video_norm_paths(model: comfy.model_patcher.ModelPatcher) -> list[str]:
    """The U-Net's group-norm sequences AnimateDiff v1 normalises over frames: ``in_layers`` and ``out_layers`` of
    every ResBlock (input, middle and output blocks) and the output ``out``."""
    unet = model.get_model_object("diffusion_model")
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
    blocks += [("middle_block", unet.middle_block)] + [(f"output_blocks.{i}", b)
                                                        for i, b in enumerate(unet.output_blocks)]
    paths = [f"diffusion_model.{block}.{name}.{part}" for block, layers in blocks
             for name, layer in layers.named_children()
             if isinstance(layer, ResBlock) and not layer.use_scale_shift_norm for part in ("in_layers", "out_layers")]
    return paths + ["diffusion_model.out"]


def _eject(model: comfy.model_patcher.ModelPatcher) -> None:
    """Remove the motion blocks and video norms of an earlier Apply Motion Module from ``model`` (a clone), keeping
    other patches."""
    for path, obj in list(model.object_patches.items()):
        if _has_slot(obj):
            model.add_object_patch(path, _with_slot(obj))
        elif _is_folded(obj):
            model.add_object_patch(path, _video_norm(obj))
    model.remove_additional_models(ADDITIONAL_MODELS_KEY)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, VIDEO_NORMS_KEY)


def frames_problem(motion: str, positions: int, handler: comfy.context_windows.IndexListContextHandler | None,
                   frames: int | None = None) -> str | None:
    """Why the frames the motion module ``motion`` sees at once do not fit its ``positions``, or None: the context
    windows of ``handler`` (a MODEL's ``context_handler``, None without windows) for a video of ``frames`` frames
    (None: not known yet, only the windows are checked)."""
    if handler is not None and getattr(handler, "dim", 0) != 0:
        return (f"the context windows on this MODEL run over dimension {handler.dim}, but SD1.5 videos keep their "
                "frames in dimension 0; set dim to 0 on the Context Windows node, or use Motion Context Options")
    window = getattr(handler, "context_length", None) if handler is not None else None
    at_once = window if frames is None else frames if window is None else min(frames, window)
    if at_once is None or at_once <= positions:
        return None
    if at_once == window:
        return (f"context windows of {window} frames are longer than the {positions} positions of '{motion}'; "
                "shorten the windows (context_length) or load the module with a longer positional length")
    fix = (f"shorten the context windows to at most {positions} frames" if window is not None else
           "connect Motion Context Options (e.g. 16 frames, overlap 4)")
    return (f"{at_once} frames run through the motion module at once but '{motion}' has {positions} positions; "
            f"{fix}, or load it with a longer positional length")


class FrameCheck:
    """Sampler wrapper (``WrappersMP.SAMPLER_SAMPLE``): before the first step, gives the run's context windows this
    host's fixes (``_comfy.frame_windows``, in the run's own ``model_options``) and checks the frames that run
    through the motion module at once against its positions, so a mismatch is one message naming the Apply Motion
    Module node (``node``) instead of an error deep inside the U-Net."""

    def __init__(self, name: str, positions: int, node: str = APPLY_NAME):
        self.name = name
        self.positions = positions
        self.node = node

    def __call__(self, executor, guider, sigmas, extra_args: dict, callback, noise: torch.Tensor, *args, **kwargs):
        model_options = extra_args["model_options"]
        handler = model_options.get("context_handler")
        if handler is not None:
            model_options["context_handler"] = frame_windows(handler)
        problem = frames_problem(self.name, self.positions, handler, frames=noise.shape[0])
        if problem:
            raise node_error(self.node, problem)
        return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)


def apply_motion(model, motion: LoadedMotionModule, scale: float, context: ContextOptions | None = None,
                 node_id: str | None = None) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` with ``motion``'s blocks injected at ``scale`` (0: none), replacing any motion module an
    earlier Apply Motion Module gave it. Context windows the MODEL already carries (``context`` or a core Context
    Windows node before this one) are checked against the module's positions now (``InputMismatchError``), others
    before sampling, in an error naming the Apply Motion Module node ``node_id``."""
    patched = model.clone()
    _eject(patched)
    if context is not None:
        patched.model_options["context_handler"] = context.handler()
        comfy.context_windows.create_prepare_sampling_wrapper(patched)
    if scale == 0:
        return patched
    positions = motion.module.config.positional_length
    problem = frames_problem(motion.name, positions, patched.model_options.get("context_handler"))
    if problem:
        raise InputMismatchError(problem)
    sites = injection_sites(patched.get_model_object("diffusion_model"))
    module = motion.module
    check_motion_fit(module.layout, sites.layout, motion.name, "this MODEL's U-Net")
    placed = [(f"input_blocks.{site.index}", site, block) for level, blocks in zip(sites.down, module.down_blocks)
              for site, block in zip(level, blocks)]
    placed += [(f"output_blocks.{site.index}", site, block) for level, blocks in zip(sites.up, module.up_blocks)
               for site, block in zip(level, blocks)]
    if module.mid_block is not None:
        placed.append(("middle_block", sites.mid, module.mid_block))
    for block_path, site, block in placed:
        path = f"diffusion_model.{block_path}"
        patched.add_object_patch(path, _with_slot(patched.get_model_object(path), site.before,
                                                  MotionSlot(block, scale)))
    patches = patched.model_options["transformer_options"].get("patches", {})
    if (MotionSlot, run_motion_slot) not in patches.get("forward_timestep_embed_patch", []):
        patched.set_model_forward_timestep_embed_patch((MotionSlot, run_motion_slot))
    if module.config.unet_norms_span_frames:
        count = VideoCount()
        for path in video_norm_paths(patched):
            patched.add_object_patch(path, _video_norm(patched.get_model_object(path), count))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, VIDEO_NORMS_KEY, count)
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, [motion.patcher.clone()])
    node = APPLY_NAME if node_id is None else f"{APPLY_NAME} (node {node_id})"
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                 FrameCheck(motion.name, positions, node))
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
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, motion_module: LoadedMotionModule, motion_scale: float,
                context_options: ContextOptions | None = None) -> io.NodeOutput:
        return io.NodeOutput(apply_motion(model, motion_module, motion_scale, context_options,
                                          node_id=cls.hidden.unique_id))


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
