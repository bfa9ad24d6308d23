"""``python dev.py demo``: start ComfyUI with the pack, queue the shipped demo graph over HTTP, print the video path."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

from devtools.client import ExecutionFailed, PromptRejected
from devtools.host import cache_dir
from devtools.server import PACK_DIR, ComfyServer, link

DEMO_GRAPH = PACK_DIR / "workflows" / "api" / "dreamoving_demo.json"


def _tiny(module: str, function: str, *args) -> Callable[[], Path]:
    """A deferred call of a tiny-model builder in ``devtools.tiny.<module>`` (imported only when needed)."""

    def build() -> Path:
        return getattr(importlib.import_module(f"devtools.tiny.{module}"), function)(*args)

    return build


def _tiny_face_png() -> Path:
    from devtools.tiny import cached
    from devtools.tiny.content_guider import face_image

    def write(path: Path) -> None:
        from PIL import Image

        Image.fromarray((face_image(64)[0].numpy() * 255).astype("uint8")).save(path, format="PNG")

    return cached("input/v1/dreamoving_face.png", write)


def _tiny_dance_video() -> Path:
    from devtools.tiny import cached
    from devtools.tiny.preprocess import synthetic_dance_video

    return cached("input/v1/dreamoving_dance.mp4", synthetic_dance_video)


# (node class, input) -> (folder under the ComfyUI base directory, builder of the tiny file): what the demo puts in
# place when no real models are configured. Every loader and input file of the shipped graphs has an entry; the file
# is linked under the name the graph already uses, so the graph itself is queued unchanged but for its size.
TINY_MODELS: dict[tuple[str, str], tuple[str, Callable[[], Path]]] = {
    ("CheckpointLoaderSimple", "ckpt_name"): ("models/checkpoints", _tiny("checkpoint", "sd15_checkpoint")),
    ("DreaMovingLoadMotionModule", "model_name"): ("models/animatediff_models", _tiny("motion", "motion_module", "v2", "ckpt")),
    ("DreaMovingLoadVideoControlNet", "controlnet_name"): ("models/controlnet", _tiny("controlnet", "sd15_controlnet", "pth")),
    ("DreaMovingLoadVideoControlNet", "motion_module"): ("models/animatediff_models", _tiny("motion", "motion_module", "v2", "ckpt")),
    ("DreaMovingLoadContentGuider", "guider_name"): ("models/ipadapter", _tiny("content_guider", "ip_adapter_file", "faceid-plusv2", "bin")),
    ("DreaMovingLoadOpenClipVision", "clip_name"): ("models/clip_vision", _tiny("content_guider", "clip_vision_file")),
    ("DreaMovingLoadInsightFace", "pack"): ("models/insightface/models", lambda: _tiny("content_guider", "insightface_root")() / "models" / "buffalo_l"),
    ("DreaMovingDWPose", "detector"): ("models/dreamoving/preprocess", _tiny("preprocess", "yolox_onnx")),
    ("DreaMovingDWPose", "estimator"): ("models/dreamoving/preprocess", _tiny("preprocess", "dwpose_onnx")),
    ("DreaMovingScoreVideo", "detector"): ("models/dreamoving/preprocess", _tiny("preprocess", "yolox_onnx")),
    ("DreaMovingScoreVideo", "estimator"): ("models/dreamoving/preprocess", _tiny("preprocess", "dwpose_onnx")),
    ("DreaMovingZoeDepth", "model"): ("models/dreamoving/preprocess", _tiny("preprocess", "zoedepth_dir")),
    ("LoadVideo", "file"): ("input", _tiny_dance_video),
    ("LoadImage", "image"): ("input", _tiny_face_png),
}
# The user's own inputs for a run with real models: (node class, input) -> environment variable with a file path.
USER_INPUTS = {("LoadVideo", "file"): "DREAMOVING_VIDEO", ("LoadImage", "image"): "DREAMOVING_FACE"}
# Tiny random models are only worth a tiny canvas.
TINY_SIZE = {("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64}


def load_graph(path: Path = DEMO_GRAPH) -> dict:
    """The API-format graph without the UI-only ``_meta`` entries."""
    graph = json.loads(path.read_text())
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


def substitute(graph: dict, values: dict[tuple[str, str], object]) -> dict:
    """Set ``inputs[name] = value`` on every node whose class matches a ``(class_type, name)`` key."""
    for node in graph.values():
        for (class_type, name), value in values.items():
            if node["class_type"] == class_type and name in node["inputs"]:
                node["inputs"][name] = value
    return graph


def install_tiny_models(graph: dict, base: Path) -> dict:
    """Link a tiny model (or input file) under the name ``graph`` uses for every loader it has, into the ComfyUI
    base directory ``base``; returns ``graph`` shrunk to ``TINY_SIZE``."""
    for (class_type, name), (folder, build) in TINY_MODELS.items():
        for node in graph.values():
            if node["class_type"] == class_type and isinstance(node["inputs"].get(name), str):
                link(build(), base / folder / node["inputs"][name])
    return substitute(graph, dict(TINY_SIZE))


def link_input(src: Path, base: Path) -> str:
    """Link ``src`` into the server's input folder; returns the name a loader node takes."""
    link(src.expanduser().resolve(), base / "input" / src.name)
    return src.name


def _extra_paths_config(models: Path, base: Path) -> Path:
    folders = ["checkpoints", "animatediff_models", "controlnet", "ipadapter", "clip_vision", "insightface",
               "dreamoving/motion", "dreamoving/video_controlnet", "dreamoving/content_guider", "dreamoving/preprocess"]
    lines = ["user_models:", f"  base_path: {json.dumps(str(models))}"]
    lines += [f"  {f.replace('dreamoving/', 'dreamoving_')}: {f}" for f in folders]
    cfg = base / "extra_model_paths.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def progress_printer(graph: dict) -> Callable[[dict], None]:
    """A websocket event handler that prints which node runs and its sampler steps on one updating line."""

    def show(event: dict) -> None:
        data = event.get("data", {})
        node = graph.get(str(data.get("node")), {}).get("class_type", data.get("node"))
        if event.get("type") == "progress":
            print(f"\r[dreamoving] {node}: step {data.get('value')}/{data.get('max')}", end="", flush=True)
        elif event.get("type") == "executing" and data.get("node"):
            print(f"\n[dreamoving] {node}", end="", flush=True)

    return show


def accelerator() -> str | None:
    """The GPU ComfyUI would run on without ``--cpu`` (CUDA/ROCm, Intel XPU or Apple MPS, as torch sees it), or
    None."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (cuda)"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "Intel GPU (xpu)"
    if torch.backends.mps.is_available():
        return "Apple GPU (mps)"
    return None


def run(comfy_dir: Path, port: int = 0, cpu: bool = False) -> int:
    """Run the demo graph on ComfyUI ``comfy_dir``: on the GPU when torch sees one, unless ``cpu``."""
    base = cache_dir() / "demo-base"
    graph = load_graph()
    extra: tuple[str, ...] = ()
    real_models = os.environ.get("DREAMOVING_MODELS")
    if real_models:
        extra = ("--extra-model-paths-config", str(_extra_paths_config(Path(real_models).expanduser(), base)))
        if os.environ.get("DREAMOVING_CHECKPOINT"):
            graph = substitute(graph, {("CheckpointLoaderSimple", "ckpt_name"): os.environ["DREAMOVING_CHECKPOINT"]})
        print(f"[dreamoving] using real models from {real_models}")
        for (class_type, name), env in USER_INPUTS.items():
            if os.environ.get(env):
                graph = substitute(graph, {(class_type, name): link_input(Path(os.environ[env]), base)})
            else:
                _, build = TINY_MODELS[(class_type, name)]
                graph = substitute(graph, {(class_type, name): link_input(build(), base)})
                print(f"[dreamoving] {env} not set: using the synthetic {name}")
    else:
        base.mkdir(parents=True, exist_ok=True)
        graph = install_tiny_models(graph, base)
        print("[dreamoving] no DREAMOVING_MODELS set: using tiny RANDOM weights, so the video will be noise")
    gpu = None if cpu else accelerator()
    server = ComfyServer(comfy_dir, base, port=port, extra_args=extra, cpu=gpu is None)
    device = f"on the GPU {gpu}" if gpu else "on the CPU" + (" (--cpu)" if cpu else " (torch sees no GPU)")
    print(f"[dreamoving] starting ComfyUI {comfy_dir} {device} on {server.url} (log: {server.log_path})", flush=True)
    server.start()
    try:
        if server.import_failures():
            print("[dreamoving] the pack failed to import:\n" + "\n".join(server.import_failures()), file=sys.stderr)
            return 1
        server.client.on_event = progress_printer(graph)
        try:
            result = server.client.run(graph, timeout=3600)
        except (PromptRejected, ExecutionFailed) as err:
            print(f"\n[dreamoving] the demo graph failed: {err}", file=sys.stderr)
            return 1
        save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveVideo")
        videos = result.files(save_id)
        if not videos:
            print(f"\n[dreamoving] no video was written: {result.outputs}", file=sys.stderr)
            return 1
        print(f"\n[dreamoving] video: {videos[0]}")
        return 0
    finally:
        server.stop()
