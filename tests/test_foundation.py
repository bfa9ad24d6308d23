"""Foundation: the pack loads in a real ComfyUI, the demo graph runs over HTTP, bad input is refused cleanly."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from devtools.client import PromptRejected
from devtools.demo import add_side_by_side, install_tiny_models, load_graph, substitute
from devtools.server import PACK_DIR
from tests.graphs import base_graph, read_video


def test_server_imports_the_pack_without_failure(comfy):
    assert comfy.server.import_failures() == []
    assert comfy.server.import_seconds() is not None, "ComfyUI did not report importing the pack"


def test_demo_writes_a_visible_video_and_a_side_by_side_of_driving_pose_and_generated_frames(comfy, comfy_base):
    graph = substitute(install_tiny_models(load_graph(), comfy_base), {("KSampler", "steps"): 2})
    side_by_side = add_side_by_side(graph)
    result = comfy.run(graph)
    save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveVideo")
    videos = result.files(save_id)
    assert len(videos) == 1 and videos[0].suffix == ".mp4"
    frames, fps = read_video(videos[0])
    assert len(frames) == 16 and fps == 8.0 and frames[0].shape == (64, 64, 3)  # 16 frames, every 2nd of 16 fps
    stack = np.stack(frames).astype(np.int16)
    assert stack.std() > 8 and 40 < stack.mean() < 215, "the tiny models' frames are visible, not black"
    assert np.abs(np.diff(stack, axis=0)).mean() > 0.5, "the frames change over time"
    both, _ = read_video(result.files(side_by_side)[0])
    driving = 384  # the sample dance video's height: the stitched panels are scaled to it
    assert len(both) == 16 and both[0].shape == (driving, 3 * driving + 2 * 4, 3)
    pose_panel = np.stack(both)[:, :, driving + 4:2 * driving + 4].astype(int)
    assert (pose_panel.max(axis=-1) - pose_panel.min(axis=-1) > 100).any(), "the pose panel shows coloured limbs"
    assert any(e["type"] == "progress" for e in result.events), "no progress reached the websocket"


def test_unknown_checkpoint_is_a_400_with_node_errors_and_the_server_keeps_serving(comfy, tiny_checkpoint):
    g, refs = base_graph("no_such_model.safetensors", frames=2, steps=1)
    with pytest.raises(PromptRejected) as rejected:
        comfy.queue(g.to_api())
    errors = rejected.value.node_errors
    assert list(errors) == ["1"]
    assert "ckpt_name" in json.dumps(errors["1"]) and "no_such_model.safetensors" in json.dumps(errors["1"])
    g, refs = base_graph(tiny_checkpoint, frames=2, steps=1)
    latent = comfy.run(g.to_api())
    assert latent.files(refs["save"].id)


IMPORT_PROBE = textwrap.dedent("""
    import importlib.util, socket, sys
    from devtools.tiny import comfy_importable
    comfy_importable()
    import torch, safetensors.torch, comfy.utils, folder_paths
    import nodes, comfy_api.latest, comfy.controlnet, comfy.context_windows  # loaded by ComfyUI before custom nodes
    def refuse(what):
        def trap(*a, **k):
            raise AssertionError(f"importing the pack called {what}")
        return trap
    torch.load = refuse("torch.load")
    safetensors.torch.load_file = refuse("safetensors.torch.load_file")
    comfy.utils.load_torch_file = refuse("comfy.utils.load_torch_file")
    socket.socket.connect = refuse("socket.connect")
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("comfyui_dreamoving", sys.argv[1],
                                                  submodule_search_locations=[sys.argv[2]])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_dreamoving"] = module
    spec.loader.exec_module(module)
    print(",".join(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
    print(module.WEB_DIRECTORY, callable(module.comfy_entrypoint))
""")


def test_importing_the_pack_loads_no_weights_and_no_heavy_libraries(comfy_dir):
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(PACK_DIR / "__init__.py"), str(PACK_DIR)],
                         cwd=PACK_DIR, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "COMFYUI_DIR": str(comfy_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    new_modules, web = out.stdout.strip().splitlines()[-2:]
    heavy = {"open_clip", "insightface", "onnxruntime", "cv2", "onnx"} & set(new_modules.split(","))
    assert not heavy, f"importing the pack imported {heavy}; import them lazily inside the nodes"
    assert web == "./web/js True"


def test_shipped_api_workflows_use_only_known_nodes(comfy):
    known = set(comfy.object_info())
    for path in sorted((PACK_DIR / "workflows" / "api").glob("*.json")):
        graph = json.loads(path.read_text())
        unknown = {n["class_type"] for n in graph.values()} - known
        assert not unknown, f"{path.name} uses unknown node types {unknown}"


def test_frontend_extension_is_served(comfy):
    status, listed = comfy._request("GET", "/extensions")
    assert status == 200
    ours = [p for p in listed if "comfyui-dreamoving" in p]
    assert ours == ["/extensions/comfyui-dreamoving/dreamoving.js"]
    status, body = comfy._request("GET", ours[0])
    assert status == 200 and "DreaMoving.NodeStyle" in body and "DreaMoving.FrameScrubber" in body


def test_every_core_module_imports_without_comfyui():
    code = ("import importlib, pkgutil, sys, dreamoving_core\n"
            "for m in pkgutil.walk_packages(dreamoving_core.__path__, 'dreamoving_core.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'comfy', 'comfy_api', 'folder_paths', 'server', "
            "'nodes', 'execution'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PACK_DIR)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_published_flat_module_paths_are_the_moved_modules():
    import importlib

    from dreamoving_core._compat import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"dreamoving_core.{old}") is importlib.import_module(f"dreamoving_core.{new}")
    from dreamoving_core.motion import MotionBlock
    from dreamoving_core.motion.model import MotionBlock as moved

    assert MotionBlock is moved
    from dreamoving_core.content_guider import decoupled_cross_attention  # noqa: F401  (a published import line)
