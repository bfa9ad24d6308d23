"""Driving-video nodes: the frames of a dance video of any length and rate, and the counts the graph derives from it.

``Driving Video Frames`` picks frames (skip / every n-th / cap) while decoding, so a long video never sits in memory
whole, and outputs the frame count (for the latent's batch size) and the frame rate of what it kept (for the pose
smoothing and the output video). It takes ComfyUI's ``VIDEO`` (core Load Video) or an ``IMAGE`` batch (e.g. the
frames VideoHelperSuite's Load Video already decoded, with their rate in ``images_fps``).
"""
from __future__ import annotations

from fractions import Fraction

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import VideoFromFile, io

from dreamoving_core.errors import InputMismatchError


CATEGORY = "DreaMoving/Video"
FRAMES_NAME = "Driving Video Frames"


def keeps(index: int, skip_first: int, every_nth: int) -> bool:
    """Whether source frame ``index`` (0-based) is kept after skipping ``skip_first`` and taking every n-th."""
    return index >= skip_first and (index - skip_first) % every_nth == 0


def _decode_file(source, skip_first: int, every_nth: int, frame_cap: int) -> tuple[list[np.ndarray], Fraction, int]:
    """Decode only the kept frames of a video file (path or file object) with PyAV, stopping at the cap; returns
    them, the stream's frame rate (0 if unknown) and how many frames were decoded."""
    import av

    kept: list[np.ndarray] = []
    seen = 0
    with av.open(source, mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(0)
        expected = len(range(skip_first, stream.frames, every_nth)) if stream.frames else 0
        bar = comfy.utils.ProgressBar(max(1, min(frame_cap, expected) if frame_cap else expected))
        for seen, frame in enumerate(container.decode(stream), start=1):
            if not keeps(seen - 1, skip_first, every_nth):
                continue
            comfy.model_management.throw_exception_if_processing_interrupted()
            kept.append(frame.to_ndarray(format="rgb24"))
            bar.update(1)
            if frame_cap and len(kept) == frame_cap:
                break
    return kept, rate, seen


def select_frames(video, skip_first: int, every_nth: int, frame_cap: int,
                  images_fps: float) -> tuple[torch.Tensor, float]:
    """The kept frames ``(F, H, W, 3)`` in [0, 1] and their frame rate (the source's divided by ``every_nth``).

    ``video``: a ComfyUI ``VideoInput`` (a file is decoded frame by frame, keeping only what is used) or an
    ``IMAGE`` batch whose rate is ``images_fps``."""
    if isinstance(video, torch.Tensor):
        frames, rate, total = video[skip_first::every_nth], Fraction(images_fps), video.shape[0]
        frames = frames[:frame_cap] if frame_cap else frames
    elif isinstance(video, VideoFromFile):
        kept, rate, total = _decode_file(video.get_stream_source(), skip_first, every_nth, frame_cap)
        frames = torch.from_numpy(np.stack(kept)).float() / 255.0 if kept else torch.zeros(0)
        rate = rate or Fraction(images_fps)
    else:  # a video made of frames in memory (e.g. from Create Video)
        components = video.get_components()
        return select_frames(components.images, skip_first, every_nth, frame_cap, float(components.frame_rate))
    if frames.shape[0] == 0:
        raise InputMismatchError(f"video: skip_first={skip_first} leaves no frame to use (the video has {total} "
                                 "frames); lower skip_first")
    return frames, float(rate) / every_nth


class DrivingVideoFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreaMovingVideoFrames",
            display_name=FRAMES_NAME,
            category=CATEGORY,
            description="The frames of the driving video to animate, with their count and frame rate, so the "
                        "latent batch and the output video follow whatever video you load.",
            inputs=[
                io.MultiType.Input("video", types=[io.Video, io.Image],
                                   tooltip="The driving video from Load Video, or frames already loaded as images "
                                           "(e.g. VideoHelperSuite's Load Video)."),
                io.Int.Input("frame_cap", default=16, min=0, max=100000,
                             tooltip="Use at most this many frames (after skipping); 0 uses them all."),
                io.Int.Input("skip_first", default=0, min=0, max=100000,
                             tooltip="Frames to drop from the start of the video."),
                io.Int.Input("every_nth", default=1, min=1, max=100,
                             tooltip="Keep every n-th frame: 2 turns a 30 fps video into 15 fps, for instance."),
                io.Float.Input("images_fps", default=8.0, min=0.1, max=240.0, step=0.1,
                               tooltip="Frame rate of frames given as images (a video input brings its own)."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The kept frames."),
                io.Float.Output(display_name="fps", tooltip="Their frame rate: the video's divided by every_nth."),
                io.Int.Output(display_name="frame_count",
                              tooltip="How many frames were kept: connect it to the latent's batch_size."),
            ],
        )

    @classmethod
    def execute(cls, video, frame_cap: int, skip_first: int, every_nth: int, images_fps: float) -> io.NodeOutput:
        frames, fps = select_frames(video, skip_first, every_nth, frame_cap, images_fps)
        return io.NodeOutput(frames, fps, int(frames.shape[0]))


NODES: list[type[io.ComfyNode]] = [DrivingVideoFrames]
