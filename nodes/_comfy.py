"""Every override of a ComfyUI internal the pack makes, in one place: a ComfyUI update touches this file only.

Each override says which ComfyUI behaviour it changes and is applied only where the host still behaves that way,
found by probing the host's own classes when the pack loads (not by reading its version):

- **Context windows over a video's frames** (``context_handler_class``, ``frame_windows``): ComfyUI's
  ``IndexListContextHandler.set_step`` looks the timestep up among the schedule's sigmas. ComfyUI 0.3.75 compares the
  whole per-frame timestep (one per frame in the batch) and fails for any video; 0.8.0 takes its first entry but
  still needs an exact sigma, so samplers that also evaluate between two sigmas (Heun, DPM2, the SDE midpoints)
  fail. Here such an evaluation counts as the step it is in. ComfyUI 0.3.75's windows also do not know the video's
  length (0.8.0's ``IndexListContextWindow.total_frames``); here they do, so a frame-count error can name it.
  A handler from the core Context Windows node is copied, attribute for attribute, never rebuilt from a constructor
  (0.8.0's has ``freenoise``, ``cond_retain_index_list``, ``split_conds_to_windows``; later ones may have more).
- **Hints that follow context windows** (``WindowedControlNet``): ComfyUI's ``ControlNet.get_control`` gives every
  call the first frames of the hint video (``broadcast_image_to``), in 0.3.75 and 0.8.0 alike, so each context
  window would be guided by frames 0..n-1. Here a call gets its window's hint frames; everything else is ComfyUI's
  own ``get_control``.
"""
from __future__ import annotations

import inspect

import torch

import comfy.context_windows
import comfy.controlnet
import comfy.utils

IndexListContextHandler = comfy.context_windows.IndexListContextHandler
IndexListContextWindow = comfy.context_windows.IndexListContextWindow


def _host_finds_steps_of_video_timesteps() -> bool:
    """Whether the host's ``set_step`` finds the step of a per-frame timestep, also between two sigmas."""
    probe = IndexListContextHandler.__new__(IndexListContextHandler)
    options = {"transformer_options": {"sample_sigmas": torch.tensor([2.0, 1.0, 0.0])}}
    steps = []
    try:
        for sigma in (2.0, 1.5, 1.0):  # two frames each; 1.5 lies inside the first step
            probe.set_step(torch.full((2,), sigma), options)
            steps.append(probe._step)
    except Exception:
        return False
    return steps == [0, 0, 1]


HOST_FINDS_STEPS = _host_finds_steps_of_video_timesteps()
HOST_WINDOWS_KNOW_LENGTH = "total_frames" in inspect.signature(IndexListContextWindow.__init__).parameters


class FrameContextHandler(IndexListContextHandler):
    """ComfyUI's index-list context windows with the fixes this host needs (see the module docstring)."""

    def set_step(self, timestep: torch.Tensor, model_options: dict) -> None:
        if HOST_FINDS_STEPS:
            return super().set_step(timestep, model_options)
        sigmas = model_options["transformer_options"]["sample_sigmas"]
        sigma = timestep.reshape(-1)[0].to(sigmas)
        self._step = max(int((sigmas >= sigma * (1 - 1e-4)).sum()) - 1, 0)

    def get_context_windows(self, model, x_in: torch.Tensor, model_options: dict) -> list[IndexListContextWindow]:
        windows = super().get_context_windows(model, x_in, model_options)
        if not HOST_WINDOWS_KNOW_LENGTH:
            for window in windows:
                window.total_frames = x_in.size(self.dim)
        return windows


def context_handler_class() -> type[IndexListContextHandler]:
    """The handler class for context windows over frames: ComfyUI's own where it needs no fix."""
    return IndexListContextHandler if HOST_FINDS_STEPS and HOST_WINDOWS_KNOW_LENGTH else FrameContextHandler


def frame_windows(handler: IndexListContextHandler) -> IndexListContextHandler:
    """``handler`` (e.g. from the core Context Windows node) with this host's fixes: a copy of every attribute it
    has under ``context_handler_class()``, or ``handler`` itself where nothing needs fixing or it is not ComfyUI's
    own class (another pack's subclass keeps its behaviour)."""
    cls = context_handler_class()
    if type(handler) is not IndexListContextHandler or cls is IndexListContextHandler:
        return handler
    frames = cls.__new__(cls)
    frames.__dict__.update(vars(handler))
    return frames


def video_frames(transformer_options: dict, frames_in_call: int) -> int | None:
    """How many frames the video of this model call has: the call's own ``frames_in_call`` without context windows,
    the window's ``total_frames`` under them (None for a handler the pack did not fix, on a host whose windows lack
    it)."""
    window = transformer_options.get("context_window")
    if window is None or len(window.index_list) != frames_in_call:
        return frames_in_call
    return getattr(window, "total_frames", None) or None


class WindowedControlNet(comfy.controlnet.ControlNet):
    """ComfyUI's ``ControlNet`` for a video control model, overriding only which hint frames a call gets.

    A call holds ``x_noisy: (batched_number·F, 4, h, w)``: all frames of the video, or one context window of them
    (``transformer_options["context_window"].index_list``). For a window, ``cond_hint_original`` (the hint video,
    one image per frame or one for all) is replaced by the window's frames for the duration of ComfyUI's
    ``get_control``, which does the rest: preparing the hints, strength, start/end percent, chaining with
    ``previous_controlnet``, merging. The window's frames come from the whole video resized once per latent size
    with ComfyUI's own resize (``comfy.utils.common_upscale``, kept on the device), so that ComfyUI's resize of a
    window is the identity instead of a new resize of full-size images in every call. The control model is called
    with ``num_frames`` (F) among its arguments. Subclasses check that a call's frames fit (``check_frames``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hint_window: list[int] | None = None  # the frames ComfyUI's cached ``cond_hint`` holds (None: all)
        self.sized_hints: torch.Tensor | None = None  # the whole hint video at the last call's pixel size

    def check_frames(self, frames: int, video: int | None, window: list[int] | None) -> None:
        """Raise unless a call of ``frames`` frames per video fits the hints and the model: the whole video
        (``window`` None), or the frames ``window`` of a video of ``video`` frames (None: not known)."""

    def _window_hints(self, window: list[int], height: int, width: int, device, dtype) -> torch.Tensor:
        sized = self.sized_hints
        if sized is None or sized.shape[-2:] != (height, width) or sized.device != device:
            sized = comfy.utils.common_upscale(self.cond_hint_original, width, height, self.upscale_algorithm,
                                               "center").to(device, dtype)
            self.sized_hints = sized
        return sized[window]

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict):
        frames = x_noisy.shape[0] // batched_number
        video = video_frames(transformer_options, frames)
        window = None if video == frames else list(transformer_options["context_window"].index_list)
        self.check_frames(frames, video, window)
        self.set_extra_arg("num_frames", frames)
        if self.cond_hint_original.shape[0] == 1:
            window = None  # one image for all frames: ComfyUI broadcasts it
        if window != self.hint_window:
            self.cond_hint, self.hint_window = None, window  # ComfyUI prepares the hints of the new frames
        if window is None:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        whole = self.cond_hint_original
        dtype = self.manual_cast_dtype or self.control_model.dtype
        self.cond_hint_original = self._window_hints(window, x_noisy.shape[-2] * self.compression_ratio,
                                                     x_noisy.shape[-1] * self.compression_ratio, x_noisy.device,
                                                     dtype)
        try:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        finally:
            self.cond_hint_original = whole

    def cleanup(self) -> None:
        self.hint_window = self.sized_hints = None
        super().cleanup()
