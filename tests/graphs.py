"""Graph builders shared by the HTTP tests: a plain SD1.5 text-to-video chain to splice nodes into."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from devtools.graph import Graph


def base_graph(checkpoint: str, frames: int = 16, width: int = 64, height: int = 64, steps: int = 2, seed: int = 0,
               output: str = "latent", prefix: str = "test", cfg: float = 2.0, sampler: str = "euler",
               scheduler: str = "normal") -> tuple[Graph, dict]:
    """checkpoint → CLIPTextEncode (+/-) → EmptyLatentImage(batch=frames) → KSampler → output.

    ``output``: "latent" (SaveLatent, exact), "image" (VAEDecode → SaveImage) or "video" (→ CreateVideo → SaveVideo).
    ``refs`` holds ``model``, ``clip``, ``vae``, ``positive``, ``negative``, ``latent``, ``sampler`` (node refs or
    [id, index] outputs) and ``save`` (the output node). Rewire ``g.set(refs["sampler"], model=...)`` to splice.
    """
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=checkpoint)
    pos = g.node("CLIPTextEncode", clip=ckpt[1], text="a person dancing on a beach")
    neg = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry")
    latent = g.node("EmptyLatentImage", width=width, height=height, batch_size=frames)
    ks = g.node("KSampler", model=ckpt[0], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=seed,
                steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0)
    refs = {"model": ckpt[0], "clip": ckpt[1], "vae": ckpt[2], "positive": pos[0], "negative": neg[0],
            "latent": latent[0], "sampler": ks}
    if output == "latent":
        refs["save"] = g.node("SaveLatent", samples=ks[0], filename_prefix=f"latents/{prefix}")
    else:
        decode = g.node("VAEDecode", samples=ks[0], vae=ckpt[2])
        refs["decode"] = decode
        if output == "image":
            refs["save"] = g.node("SaveImage", images=decode[0], filename_prefix=prefix)
        else:
            video = g.node("CreateVideo", images=decode[0], fps=8.0)
            refs["save"] = g.node("SaveVideo", video=video[0], filename_prefix=f"video/{prefix}", format="mp4",
                                  codec="h264")
    return g, refs


def run_latent(comfy, g: Graph, save_ref, timeout: float = 300) -> torch.Tensor:
    """Queue ``g`` and return the latent saved by the SaveLatent node ``save_ref`` as (B, 4, h, w)."""
    result = comfy.run(g.to_api(), timeout=timeout)
    files = [p for p in result.files(save_ref.id) if p.suffix == ".latent"]
    assert files, f"SaveLatent wrote nothing: {result.outputs}"
    return load_file(str(files[-1]))["latent_tensor"]


def read_video_frames(path: Path) -> list:
    """Decode a video file with PyAV; returns the frames as HxWx3 uint8 arrays."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def read_video(path: Path) -> tuple[list, float]:
    """Frames (HxWx3 uint8) and frame rate of a video file."""
    import av

    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
    return read_video_frames(path), rate


def video_frames_expected(graph: dict, inputs: Path) -> tuple[int, float]:
    """How many frames, at what rate, an API graph's videos have: what its Driving Video Frames node keeps of the
    video it loads from ``inputs``, else the latent batch and Create Video's rate."""
    frames = next((n for n in graph.values() if n["class_type"] == "DreaMovingVideoFrames"), None)
    if frames is None:
        latent = next(n for n in graph.values() if n["class_type"] == "EmptyLatentImage")
        video = next(n for n in graph.values() if n["class_type"] == "CreateVideo")
        return latent["inputs"]["batch_size"], float(video["inputs"]["fps"])
    loader = graph[frames["inputs"]["video"][0]]
    source, rate = read_video(inputs / loader["inputs"]["file"])
    cap, skip, nth = (frames["inputs"][k] for k in ("frame_cap", "skip_first", "every_nth"))
    kept = len(range(skip, len(source), nth))
    return (min(kept, cap) if cap else kept), rate / nth
