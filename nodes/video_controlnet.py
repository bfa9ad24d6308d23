"""Video ControlNet nodes: load a (Video) ControlNet, apply it with per-frame pose/depth hints.

``VideoControl`` subclasses ComfyUI's ``comfy.controlnet.ControlNet`` (itself a ``ControlBase``), so it is carried in
the conditioning like any ControlNet: it chains through ``previous_controlnet`` with other Video ControlNets and core
ControlNets (pose + depth = two Apply nodes in a row), its model is wrapped in a ``ModelPatcher`` and loaded/offloaded
by ComfyUI's memory manager, and strength and start/end percent behave as in core. Nothing is patched on the U-Net:
the residuals go through ComfyUI's ``control`` path, so no state outlives a prompt.

Frames: ComfyUI batches the cond and uncond videos of one step, ``batched_number`` of them, so a call holds
``batch // batched_number`` frames. With ComfyUI's context windows (Motion Context Options) a call holds one window,
and ``transformer_options["context_window"].index_list`` names its frames: the hints are sliced with it, so the
residuals follow the same windows as the U-Net's motion blocks.
"""
from __future__ import annotations

import torch
from einops import repeat

import comfy.controlnet
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from dreamoving_core.control.format import load_video_controlnet
from dreamoving_core.control.model import VideoControlNet

from ._common import ModelCombo, ModelFolder, custom_type, node_error
from .motion import MOTION_FOLDER, window_frame_indices

CATEGORY = "DreaMoving/Control"
LOAD_NAME = "Load Video ControlNet"
APPLY_NAME = "Apply Video ControlNet"
CONTROLNET_FOLDER = ModelFolder(("dreamoving_video_controlnet", "controlnet"), "ControlNet",
                                "put an SD1.5 ControlNet (e.g. control_v11p_sd15_openpose.pth from "
                                "huggingface.co/lllyasviel/ControlNet-v1-1) or a DreaMoving Video ControlNet there")
NO_MOTION = "none"


class VideoControl(comfy.controlnet.ControlNet):
    """ComfyUI control object for a ``VideoControlNet``: one per Apply node (a ``copy()`` holding that node's hints),
    all sharing the loaded model and its ``ModelPatcher``."""

    def __init__(self, control_model: VideoControlNet | None, name: str, load_device=None):
        super().__init__(control_model, load_device=load_device)
        self.name = name

    def copy(self) -> VideoControl:
        c = VideoControl(None, self.name, load_device=self.load_device)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c

    def frame_hints(self, frames: list[int], whole_video: bool, height: int, width: int, device,
                    dtype) -> torch.Tensor:
        """The hints of ``frames`` at ``height x width`` pixels: ``(len(frames), 3, height, width)``.

        ``whole_video``: the call holds every frame (no context window), so the hint count must equal it; under
        context windows the hints must cover every index. The resized hint video is cached until the latent size
        changes."""
        count = self.cond_hint_original.shape[0]
        if count != 1 and (count != len(frames) if whole_video else count <= max(frames)):
            raise node_error(APPLY_NAME, hint_count_message(count, len(frames) if whole_video else None,
                                                            max(frames) + 1))
        if self.cond_hint is None or self.cond_hint.shape[-2:] != (height, width):
            self.cond_hint = comfy.utils.common_upscale(self.cond_hint_original, width, height,
                                                        self.upscale_algorithm, "center").to(device, dtype)
        return self.cond_hint.expand(len(frames), -1, -1, -1) if count == 1 else self.cond_hint[frames]

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict):
        """Residuals for ``x_noisy: (batched_number·F, 4, h, w)``, merged with the previous ControlNets' (core
        semantics: strength scales ours only, outside start/end percent only the previous ones are returned)."""
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return control_prev

        num_frames = x_noisy.shape[0] // batched_number
        frames = window_frame_indices(transformer_options, num_frames)
        whole_video = "context_window" not in transformer_options or len(frames) != num_frames
        if whole_video:
            frames = list(range(num_frames))
        dtype = self.control_model.dtype
        device = x_noisy.device
        hint = self.frame_hints(frames, whole_video, x_noisy.shape[-2] * self.compression_ratio,
                                x_noisy.shape[-1] * self.compression_ratio, device, dtype)
        hint = repeat(hint, "f c h w -> (b f) c h w", b=batched_number)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        sampling = self.model_sampling_current
        x = sampling.calculate_input(t, x_noisy)
        residuals = self.control_model(x.to(dtype), hint, sampling.timestep(t).float(),
                                       comfy.model_management.cast_to_device(context, device, dtype), num_frames)
        return self.control_merge({"input": [], "middle": [residuals.mid], "output": list(residuals.down)},
                                  control_prev, output_dtype=None)


VideoControlNetIO = custom_type("VIDEO_CONTROLNET", VideoControl)


def hint_count_message(count: int, frames: int | None, needed: int) -> str:
    """'got N hint images for a video of F frames' (``frames`` None under context windows: at least ``needed``)."""
    video = f"a video of {frames} frames" if frames is not None else f"a video of at least {needed} frames"
    return (f"got {count} hint images for {video}; the images input needs one image per frame ({frames or needed}), "
            "or a single image for all frames")


def load_for_comfy(controlnet_name: str, motion_name: str | None) -> VideoControl:
    """Load the files in the dtype ComfyUI would run a U-Net of this size in, wrapped for memory management."""
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(device=load_device)
    dtype = comfy.model_management.unet_manual_cast(dtype, load_device) or dtype
    model = load_video_controlnet(CONTROLNET_FOLDER.path(controlnet_name, "controlnet_name"),
                                  MOTION_FOLDER.path(motion_name, "motion_module") if motion_name else None,
                                  dtype=dtype)
    return VideoControl(model, controlnet_name, load_device=load_device)


class LoadVideoControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingLoadVideoControlNet",
            display_name=LOAD_NAME,
            category=CATEGORY,
            description="Load a Video ControlNet: a DreaMoving Video ControlNet file, or any SD1.5 ControlNet "
                        "(control_v11p_sd15_openpose, control_v11f1p_sd15_depth; original or diffusers layout, "
                        ".pth or .safetensors) made temporal with a motion module's down and middle blocks.",
            inputs=[
                ModelCombo("controlnet_name", CONTROLNET_FOLDER,
                           tooltip="An SD1.5 ControlNet from models/controlnet, or a Video ControlNet from "
                                   "models/dreamoving/video_controlnet."),
                ModelCombo("motion_module", MOTION_FOLDER, choices=(NO_MOTION,), default=NO_MOTION, optional=True,
                           tooltip="Optional motion module (mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt, DreaMoving) whose "
                                   "down/middle motion blocks are added after the ControlNet's blocks; they "
                                   "replace a Video ControlNet file's own. 'none': the file as it is (a plain "
                                   "ControlNet stays per-frame)."),
            ],
            outputs=[VideoControlNetIO.Output(display_name="video_controlnet",
                                              tooltip="For Apply Video ControlNet.")],
        )

    @classmethod
    def execute(cls, controlnet_name: str, motion_module: str = NO_MOTION) -> io.NodeOutput:
        motion = None if motion_module in (None, "", NO_MOTION) else motion_module
        return io.NodeOutput(load_for_comfy(controlnet_name, motion))


class ApplyVideoControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingApplyVideoControlNet",
            display_name=APPLY_NAME,
            category=CATEGORY,
            description="Guide every frame with its hint image (pose, depth) through a Video ControlNet. Chain two "
                        "for pose + depth; also chains with core ControlNets.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning (may already carry ControlNets)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (may already carry ControlNets)."),
                VideoControlNetIO.Input("video_controlnet", tooltip="From Load Video ControlNet."),
                io.Image.Input("images", tooltip="Hint video: one image per frame (e.g. DWPose or ZoeDepth output), "
                                                 "or one image for all frames. Resized to the latent size."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Scale of the ControlNet's residuals (DreaMoving: 1.0); 0 disables it."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the control starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the control ends."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Accepted like core Apply ControlNet; SD1.5 ControlNets take the hint in pixels "
                                     "and do not use it."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, negative, video_controlnet: VideoControl, images: torch.Tensor, strength: float,
                start_percent: float, end_percent: float, vae=None) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(positive, negative)
        return io.NodeOutput(*apply_control(positive, negative, video_controlnet, images.movedim(-1, 1), strength,
                                            (start_percent, end_percent), vae))


def apply_control(positive, negative, control: VideoControl, hint: torch.Tensor, strength: float,
                  percent_range: tuple[float, float], vae=None) -> tuple[list, list]:
    """Conditioning copies carrying a copy of ``control`` with ``hint: (F, 3, H, W)`` chained after each entry's
    previous ControlNet; entries that shared a ControlNet share the new one (so cond and uncond still batch)."""
    by_previous: dict = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if previous not in by_previous:
                by_previous[previous] = control.copy().set_cond_hint(hint, strength, percent_range, vae=vae)
                by_previous[previous].set_previous_controlnet(previous)
            options["control"] = by_previous[previous]
            options["control_apply_to_uncond"] = False
            entries.append([embedding, options])
        out.append(entries)
    return out[0], out[1]


NODES: list[type[io.ComfyNode]] = [LoadVideoControlNet, ApplyVideoControlNet]
