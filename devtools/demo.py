"""``python dev.py demo``: start ComfyUI with the pack, queue the shipped demo graph over HTTP, print the video path."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from devtools.client import ExecutionFailed, PromptRejected
from devtools.host import cache_dir
from devtools.server import PACK_DIR, ComfyServer, link

DEMO_GRAPH = PACK_DIR / "workflows" / "api" / "dreamoving_demo.json"


def _tiny_checkpoint() -> Path:
    from devtools.tiny.checkpoint import sd15_checkpoint

    return sd15_checkpoint()


# (node class, input) -> (model folder, builder of the tiny file): what the demo installs when no real models are
# configured. Every loader of the demo graph has an entry.
TINY_MODELS: dict[tuple[str, str], tuple[str, Callable[[], Path]]] = {
    ("CheckpointLoaderSimple", "ckpt_name"): ("checkpoints", _tiny_checkpoint),
}
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


def install_tiny_models(graph: dict, models_dir: Path) -> dict:
    """Build (or reuse) the tiny model for every loader in ``graph`` and point the graph at it."""
    names = {}
    for key, (folder, build) in TINY_MODELS.items():
        if any(n["class_type"] == key[0] for n in graph.values()):
            src = build()
            link(src, models_dir / folder / src.name)
            names[key] = src.name
    return substitute(graph, {**names, **TINY_SIZE})


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


def run(comfy_dir: Path, port: int = 0, frames: int = 16) -> int:
    base = cache_dir() / "demo-base"
    graph = substitute(load_graph(), {("EmptyLatentImage", "batch_size"): frames})
    extra: tuple[str, ...] = ()
    real_models = os.environ.get("DREAMOVING_MODELS")
    if real_models:
        extra = ("--extra-model-paths-config", str(_extra_paths_config(Path(real_models).expanduser(), base)))
        if os.environ.get("DREAMOVING_CHECKPOINT"):
            graph = substitute(graph, {("CheckpointLoaderSimple", "ckpt_name"): os.environ["DREAMOVING_CHECKPOINT"]})
        print(f"[dreamoving] using real models from {real_models}")
    else:
        base.mkdir(parents=True, exist_ok=True)
        graph = install_tiny_models(graph, base / "models")
        print("[dreamoving] no DREAMOVING_MODELS set: using tiny RANDOM weights, so the video will be noise")
    server = ComfyServer(comfy_dir, base, port=port, extra_args=extra)
    print(f"[dreamoving] starting ComfyUI {comfy_dir} on {server.url} (log: {server.log_path})", flush=True)
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
