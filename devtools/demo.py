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
from dreamoving_core.catalog import FOLDERS, LOADER_INPUTS

DEMO_GRAPH = PACK_DIR / "workflows" / "api" / "dreamoving_demo.json"


def _tiny(module: str, function: str, *args,
          by_name: Callable[[str], tuple] = lambda name: ()) -> Callable[[str], Path]:
    """A deferred call of a tiny-model builder in ``devtools.tiny.<module>`` (imported only when needed), given the
    file name the graph uses; ``by_name(name)`` adds arguments that depend on it (file format, pose or depth)."""

    def build(name: str) -> Path:
        return getattr(importlib.import_module(f"devtools.tiny.{module}"), function)(*args, *by_name(name))

    return build


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# (node class, input) -> builder of the tiny file for the name the graph uses: what the demo and the tests put in
# place of the real models. Every loader input of dreamoving_core.catalog.LOADER_INPUTS has an entry; the file is
# linked under the graph's own name in that input's folder, so a shipped graph is queued unchanged but for its size.
TINY_MODELS: dict[tuple[str, str], Callable[[str], Path]] = {
    ("CheckpointLoaderSimple", "ckpt_name"): _tiny("checkpoint", "sd15_checkpoint"),
    ("DreaMovingLoadMotionModule", "model_name"): _tiny("motion", "motion_module", "v2",
                                                        by_name=lambda n: (_suffix(n),)),
    ("DreaMovingLoadVideoControlNet", "controlnet_name"): _tiny(
        "controlnet", "sd15_controlnet", by_name=lambda n: ("pth" if n.endswith(".pth") else "safetensors",
                                                            1 if "depth" in n else 0)),
    ("DreaMovingLoadVideoControlNet", "motion_module"): _tiny("motion", "motion_module", "v2",
                                                              by_name=lambda n: (_suffix(n),)),
    ("DreaMovingLoadContentGuider", "guider_name"): _tiny(
        "content_guider", "ip_adapter_file", by_name=lambda n: ("faceid-plusv2" if "faceid" in n else "plus",
                                                                _suffix(n))),
    ("DreaMovingLoadOpenClipVision", "clip_name"): _tiny("content_guider", "clip_vision_file"),
    ("DreaMovingLoadInsightFace", "pack"): lambda name: _tiny("content_guider", "insightface_root")(name) / "models"
    / "buffalo_l",
    ("DreaMovingDWPose", "detector"): _tiny("preprocess", "yolox_onnx"),
    ("DreaMovingDWPose", "estimator"): _tiny("preprocess", "dwpose_onnx"),
    ("DreaMovingScoreVideo", "detector"): _tiny("preprocess", "yolox_onnx"),
    ("DreaMovingScoreVideo", "estimator"): _tiny("preprocess", "dwpose_onnx"),
    ("DreaMovingZoeDepth", "model"): _tiny("preprocess", "zoedepth_dir"),
}
# The user's own inputs for a run with real models: (node class, input) -> environment variable with a file path.
USER_INPUTS = {("LoadVideo", "file"): "DREAMOVING_VIDEO", ("LoadImage", "image"): "DREAMOVING_FACE"}
# Tiny random models are only worth a tiny canvas and a short clip.
TINY_SIZE = {("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64,
             ("DreaMovingDWPose", "detect_resolution"): 64, ("DreaMovingVideoFrames", "frame_cap"): 16}


def load_graph(path: Path = DEMO_GRAPH) -> dict:
    """The API-format graph (node titles stay in ``_meta``, as the frontend sends them)."""
    return json.loads(path.read_text())


def substitute(graph: dict, values: dict[tuple[str, str], object]) -> dict:
    """Set ``inputs[name] = value`` on every node whose class matches a ``(class_type, name)`` key."""
    for node in graph.values():
        for (class_type, name), value in values.items():
            if node["class_type"] == class_type and name in node["inputs"]:
                node["inputs"][name] = value
    return graph


def install_tiny_models(graph: dict, base: Path) -> dict:
    """Link a tiny model under the name ``graph`` uses for every model it loads, into the folder its loader reads
    in the ComfyUI base directory ``base``; returns ``graph`` shrunk to ``TINY_SIZE``."""
    for node in graph.values():
        for name, value in node["inputs"].items():
            key = (node["class_type"], name)
            if key in TINY_MODELS and isinstance(value, str):
                link(TINY_MODELS[key](value), base / "models" / FOLDERS[LOADER_INPUTS[key]][0] / value)
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
    """A websocket event handler that prints which node runs (by its title) and its steps on one updating line."""

    def title(node_id) -> str:
        node = graph.get(str(node_id), {})
        return node.get("_meta", {}).get("title") or node.get("class_type") or str(node_id)

    def show(event: dict) -> None:
        data = event.get("data", {})
        if event.get("type") == "progress":
            print(f"\r[dreamoving] {title(data.get('node'))}: step {data.get('value')}/{data.get('max')}", end="",
                  flush=True)
        elif event.get("type") == "executing" and data.get("node"):
            print(f"\n[dreamoving] {title(data.get('node'))}", end="", flush=True)

    return show


def add_side_by_side(graph: dict) -> str:
    """Append to ``graph`` a second video, frame by frame: the driving video | the pose DWPose extracted | the
    generated frames (core Image Stitch, scaled to the driving video's height); returns its Save Video node id."""
    ids = {v["class_type"]: k for k, v in graph.items()}
    frames, pose, decoded = ids["DreaMovingVideoFrames"], ids["DreaMovingDWPose"], ids["VAEDecode"]
    next_id = max(int(k) for k in graph) + 1

    def add(class_type: str, title: str, **inputs) -> list:
        nonlocal next_id
        graph[str(next_id)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        next_id += 1
        return [str(next_id - 1), 0]

    stitch = dict(direction="right", match_image_size=True, spacing_width=4, spacing_color="white")
    with_pose = add("ImageStitch", "Driving | pose", image1=[frames, 0], image2=[pose, 0], **stitch)
    all_three = add("ImageStitch", "Driving | pose | generated", image1=with_pose, image2=[decoded, 0], **stitch)
    video = add("CreateVideo", "Side-by-side video", images=all_three, fps=[frames, 1])
    return add("SaveVideo", "Save side-by-side video", video=video, filename_prefix="video/dreamoving_side_by_side",
               format="mp4", codec="h264")[0]


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
                print(f"[dreamoving] {env} not set: using the pack's sample {name}")
    else:
        base.mkdir(parents=True, exist_ok=True)
        graph = install_tiny_models(graph, base)
        print("[dreamoving] no DREAMOVING_MODELS set: using tiny RANDOM weights, so the video shows coloured noise")
    side_by_side = add_side_by_side(graph)
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
        videos, both = result.files(save_id), result.files(side_by_side)
        if not videos or not both:
            print(f"\n[dreamoving] no video was written: {result.outputs}", file=sys.stderr)
            return 1
        print(f"\n[dreamoving] video: {videos[0]}")
        print(f"[dreamoving] side by side (driving | pose | generated): {both[0]}")
        return 0
    finally:
        server.stop()
