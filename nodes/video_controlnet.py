"""Video ControlNet nodes: load a (Video) ControlNet, apply it with per-frame pose/depth hints.

``VideoControl`` is ComfyUI's ``comfy.controlnet.ControlNet`` (a ``ControlBase``) with hints that follow context
windows (``_comfy.WindowedControlNet``): ComfyUI's own ``get_control`` and Apply ControlNet loop
(``nodes.ControlNetApplyAdvanced``) run it, so it is carried in the conditioning like any ControlNet, chains through
``previous_controlnet`` with other Video ControlNets and core ControlNets (pose + depth = two Apply nodes in a row),
its model is wrapped in a ``ModelPatcher`` and loaded/offloaded by ComfyUI's memory manager, and strength and
start/end percent behave as in core. Nothing is patched on the U-Net: the residuals go through ComfyUI's
``control`` path, so no state outlives a prompt.

Frames: ComfyUI batches the cond and uncond videos of one step, ``batched_number`` of them, so a call holds
``batch // batched_number`` frames. With context windows (Motion Context Options, or the core Context Windows node)
a call holds one window and gets that window's hints, so the residuals follow the same windows as the U-Net's
motion blocks. A hint count that does not match the video is found in the first call and reported in the name of
the Apply node (with its node id: ComfyUI reports the sampler, which was running).
"""
from __future__ import annotations

import torch

import comfy.model_management
import nodes
from comfy_api.latest import io

from dreamoving_core.control.format import load_video_controlnet
from dreamoving_core.control.model import VideoControlNet

from ._comfy import WindowedControlNet
from ._common import ModelCombo, ModelFolder, custom_type, node_error
from ._models import OPS, attention_backend
from .motion import MOTION_FOLDER

CATEGORY = "DreaMoving/Control"
LOAD_NAME = "Load Video ControlNet"
APPLY_NAME = "Apply Video ControlNet"
CONTROLNET_FOLDER = ModelFolder(("dreamoving_video_controlnet", "controlnet"), "ControlNet",
                                "put an SD1.5 ControlNet (e.g. control_v11p_sd15_openpose.pth from "
                                "huggingface.co/lllyasviel/ControlNet-v1-1) or a DreaMoving Video ControlNet there")
NO_MOTION = "none"


class ComfyControlModel(torch.nn.Module):
    """The control model ComfyUI's ``get_control`` calls: a ``VideoControlNet`` answering with ComfyUI's residual
    dict (``output``: one residual per U-Net input block, ``middle``: the middle block's)."""

    def __init__(self, net: VideoControlNet):
        super().__init__()
        self.net = net

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                num_frames: int, attention=None) -> dict[str, list[torch.Tensor]]:
        residuals = self.net(x, hint, timesteps, context, num_frames, attention or attention_backend())
        return {"input": [], "middle": [residuals.mid], "output": list(residuals.down)}


class VideoControl(WindowedControlNet):
    """ComfyUI control object for a ``VideoControlNet``: one per Apply node (a ``copy()`` holding that node's hints),
    all sharing the loaded model and its ``ModelPatcher``. ``node`` names the Apply node in errors raised while
    sampling (where ComfyUI reports the sampler)."""

    def __init__(self, control_model: VideoControlNet | None, name: str, load_device=None):
        super().__init__(None if control_model is None else ComfyControlModel(control_model),
                         load_device=load_device)
        self.name = name
        self.node = APPLY_NAME

    def copy(self) -> VideoControl:
        c = VideoControl(None, self.name, load_device=self.load_device)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        c.node = self.node
        self.copy_to(c)
        return c

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict):
        # ComfyUI calls control models without transformer_options: their attention override comes as an argument
        self.set_extra_arg("attention", attention_backend(transformer_options))
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    @property
    def positions(self) -> int | None:
        """Frames the Video ControlNet's motion blocks see at once (None: it has none)."""
        return getattr(self.control_model.net.motion_config, "positional_length", None)

    def check_frames(self, frames: int, video: int | None, window: list[int] | None) -> None:
        hints = self.cond_hint_original.shape[0]
        needed = max(window) + 1 if window else frames
        if hints != 1 and (hints != video if video is not None else hints < needed):
            raise node_error(self.node, hint_count_message(hints, video, needed))
        if self.positions is not None and frames > self.positions:
            raise node_error(self.node, f"{frames} frames run through the motion blocks of '{self.name}' at once "
                                        f"but they have {self.positions} positions; sample in context windows of "
                                        f"at most {self.positions} frames (Motion Context Options on Apply Motion "
                                        "Module)")


VideoControlNetIO = custom_type("VIDEO_CONTROLNET", VideoControl)


def hint_count_message(count: int, frames: int | None, needed: int) -> str:
    """'got N hint images for a video of F frames' (``frames`` None: a context window reaches frame ``needed``)."""
    video = f"a video of {frames} frames" if frames is not None else \
        f"a video whose context windows reach frame {needed}"
    return (f"got {count} hint images for {video}; the images input needs one image per frame of the video, "
            "or a single image for all frames")


def load_for_comfy(controlnet_name: str, motion_name: str | None) -> VideoControl:
    """Load the files with ComfyUI's casting layers in the dtype ComfyUI would run a U-Net in, wrapped for memory
    management (``comfy.controlnet.ControlNet`` holds it in a ``ModelPatcher``)."""
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(device=load_device)
    dtype = comfy.model_management.unet_manual_cast(dtype, load_device) or dtype
    model = load_video_controlnet(CONTROLNET_FOLDER.path(controlnet_name, "controlnet_name"),
                                  MOTION_FOLDER.path(motion_name, "motion_module") if motion_name else None,
                                  dtype=dtype, ops=OPS)
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
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, positive, negative, video_controlnet: VideoControl, images: torch.Tensor, strength: float,
                start_percent: float, end_percent: float, vae=None) -> io.NodeOutput:
        return io.NodeOutput(*apply_control(positive, negative, video_controlnet, images, strength,
                                            (start_percent, end_percent), vae, node_id=cls.hidden.unique_id))


def apply_control(positive, negative, control: VideoControl, images: torch.Tensor, strength: float,
                  percent_range: tuple[float, float], vae=None, node_id: str | None = None) -> tuple[list, list]:
    """ComfyUI's own Apply ControlNet (``nodes.ControlNetApplyAdvanced``) with ``control`` and the hint video
    ``images: (F, H, W, 3)``: conditioning copies whose entries carry a copy chained after their previous
    ControlNet. Errors found while sampling name the Apply node ``node_id``."""
    control = control.copy()
    control.node = APPLY_NAME if node_id is None else f"{APPLY_NAME} (node {node_id})"
    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, images, strength,
                                                            *percent_range, vae=vae)


NODES: list[type[io.ComfyNode]] = [LoadVideoControlNet, ApplyVideoControlNet]
