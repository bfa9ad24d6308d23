"""The shipped workflows: every API twin queues on tiny models and makes what it promises; every canvas graph equals
its twin, is laid out readably, names only shipped inputs and catalogued models, and has a thumbnail."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devtools.demo import install_tiny_models, load_graph, substitute
from devtools.server import PACK_DIR
from devtools.workflow_ui import API_DIR, LAYOUTS, UI_DIR, api_to_ui, api_twin, layout_problems, ui_to_api
from dreamoving_core.catalog import BY_NAME, LOADER_INPUTS, required_models
from tests.graphs import read_video, video_frames_expected

API_GRAPHS = sorted(API_DIR.glob("*.json"))
# the graphs that make videos (the score workflow makes a report: tests/test_scores_nodes.py runs it)
VIDEO_GRAPHS = [p for p in API_GRAPHS if '"SaveVideo"' in p.read_text()]
UI_GRAPHS = sorted(UI_DIR.glob("*.json"))
INPUTS = PACK_DIR / "inputs"
# Per-run sizes on tiny models: a few frames, except for the long-video workflow, which keeps more frames than one
# context window holds (its whole length runs under -m slow).
QUICK = {("KSampler", "steps"): 1, ("DreaMovingVideoFrames", "frame_cap"): 6}
LONG = "dreamoving_motion_long.json"
LONG_QUICK = {("KSampler", "steps"): 1, ("DreaMovingVideoFrames", "frame_cap"): 24}


def _visible(frames: np.ndarray, what: str, moving: bool) -> None:
    """Frames a person can see: something bright, not one flat colour, and (``moving``) changing over time."""
    assert frames.max() > 64, f"{what}: black frames (max {frames.max()})"
    assert frames.std() > 8, f"{what}: flat frames (std {frames.std():.1f})"
    if moving:
        assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 0.5, f"{what}: every frame the same"


def _generated(graph: dict, save_id: str) -> bool:
    """Whether a Save Video node saves sampled frames (Create Video fed by VAE Decode), not hints."""
    create = graph[graph[save_id]["inputs"]["video"][0]]
    return graph[create["inputs"]["images"][0]]["class_type"] == "VAEDecode"


def check_run(graph: dict, result) -> None:
    """Every video of a finished run has the frames and rate the driving video gives, and can be seen."""
    count, rate = video_frames_expected(graph, INPUTS)
    saves = [k for k, v in graph.items() if v["class_type"] == "SaveVideo"]
    assert saves, "a shipped workflow saves a video"
    for save in saves:
        videos = [p for p in result.files(save) if p.suffix == ".mp4"]
        assert len(videos) == 1, result.outputs.get(save)
        frames, fps = read_video(videos[0])
        assert len(frames) == count, f"{graph[save]['_meta']['title']}: {len(frames)} frames, expected {count}"
        assert abs(fps - rate) < 1e-3, f"{graph[save]['_meta']['title']}: {fps} fps, expected {rate}"
        _visible(np.stack(frames), graph[save]["_meta"]["title"], moving=_generated(graph, save))
    cached = {n for e in result.events if e["type"] == "execution_cached" for n in e["data"].get("nodes", [])}
    for node_id, node in graph.items():
        if node["class_type"] in ("DreaMovingDWPose", "DreaMovingZoeDepth") and node_id not in cached:
            previews = result.outputs.get(node_id, {}).get("images", [])
            assert len(previews) == count and all(p["type"] == "temp" for p in previews), \
                f"{node['_meta']['title']} previews: {previews[:2]}"


def _quick(api_path: Path) -> dict:
    return LONG_QUICK if api_path.name == LONG else QUICK


def run_shipped(comfy, comfy_base, api_path: Path, values: dict):
    graph = substitute(install_tiny_models(load_graph(api_path), comfy_base), values)
    return graph, comfy.run(graph, timeout=1800)


@pytest.mark.parametrize("api_path", VIDEO_GRAPHS, ids=[p.stem for p in VIDEO_GRAPHS])
def test_shipped_workflow_queues_on_tiny_models_and_makes_visible_videos_of_the_video_length(comfy, comfy_base,
                                                                                            api_path):
    check_run(*run_shipped(comfy, comfy_base, api_path, _quick(api_path)))


@pytest.mark.slow
def test_the_long_video_workflow_makes_all_its_frames(comfy, comfy_base):
    graph, result = run_shipped(comfy, comfy_base, API_DIR / LONG, {("KSampler", "steps"): 1,
                                                                     ("DreaMovingVideoFrames", "frame_cap"): 0})
    check_run(graph, result)


def test_the_long_video_workflow_is_long():
    count, _ = video_frames_expected(load_graph(API_DIR / LONG), INPUTS)
    windows = next(n for n in load_graph(API_DIR / LONG).values() if n["class_type"] == "DreaMovingContextOptions")
    assert count >= 128 and count > 2 * windows["inputs"]["context_length"]
    assert LONG_QUICK[("DreaMovingVideoFrames", "frame_cap")] > windows["inputs"]["context_length"], \
        "the quick run still needs several context windows"


@pytest.mark.parametrize("ui_path", UI_GRAPHS, ids=[p.stem for p in UI_GRAPHS])
def test_canvas_graph_queues_exactly_its_api_twin(comfy, ui_path):
    twin = api_twin(ui_path)
    assert twin.exists(), f"{ui_path.name} has no API twin in workflows/api (extra.dreamoving.api or same name)"
    ui = json.loads(ui_path.read_text())
    assert ui_to_api(ui, comfy.object_info()) == json.loads(twin.read_text())


@pytest.mark.parametrize("ui_path", UI_GRAPHS, ids=[p.stem for p in UI_GRAPHS])
def test_canvas_graph_is_laid_out_for_people(ui_path):
    ui = json.loads(ui_path.read_text())
    assert layout_problems(ui) == []
    titles = [n.get("title") for n in ui["nodes"]]
    assert len(set(titles)) == len(titles), "node titles are unique within a workflow"
    assert ui_path.with_suffix(".jpg").is_file(), f"{ui_path.stem} has no thumbnail {ui_path.stem}.jpg"
    assert "-" not in ui_path.stem and "_" not in ui_path.stem, \
        "the template browser shows the file name as title and (with - and _ as spaces) as description"


def test_layout_check_finds_overlaps_a_missing_note_and_a_graph_too_big_to_read():
    ui = json.loads(next(UI_DIR.glob("*.json")).read_text())
    crowded = json.loads(json.dumps(ui))
    first, second = crowded["nodes"][:2]
    second["pos"] = [first["pos"][0] + 10, first["pos"][1] + 10]
    crowded["nodes"] = [n for n in crowded["nodes"] if n["type"] != "Note"]
    crowded["nodes"][-1]["pos"] = [9000, 0]
    problems = layout_problems(crowded)
    assert f"'{first['title']}' overlaps '{second['title']}'" in problems
    assert "no note node says what to swap" in problems
    assert any("fit-to-screen zoom" in p for p in problems)
    assert any("is in no group" in p for p in problems)


def test_canvas_graphs_and_thumbnails_are_regenerated_from_the_layouts(comfy):
    from devtools.thumbnails import thumbnail

    info = comfy.object_info()
    for layout in LAYOUTS:
        api = json.loads((API_DIR / layout.api).read_text())
        path = UI_DIR / f"{layout.title}.json"
        assert path.exists(), f"{layout.title}: run `python dev.py workflows`"
        assert json.loads(path.read_text()) == api_to_ui(api, info, layout), f"{path.name} is stale: run `python " \
                                                                             "dev.py workflows`"
        from PIL import Image

        committed = np.asarray(Image.open(path.with_suffix(".jpg")).convert("RGB")).astype(int)
        assert np.abs(committed - thumbnail(api)).mean() < 3, f"{path.stem}.jpg is stale"
    assert {UI_DIR / f"{layout.title}.json" for layout in LAYOUTS} <= set(UI_GRAPHS)
    from devtools.workflow_ui import DESCRIPTIONS, descriptions

    assert json.loads(DESCRIPTIONS.read_text()) == descriptions(), "web/js/templates.json is stale"


def test_every_shipped_api_graph_has_a_canvas_graph():
    twins = {api_twin(p).name for p in UI_GRAPHS}
    assert {p.name for p in API_GRAPHS} == twins


@pytest.mark.parametrize("api_path", API_GRAPHS, ids=[p.stem for p in API_GRAPHS])
def test_workflow_names_only_shipped_inputs_and_catalogued_models(api_path):
    graph = json.loads(api_path.read_text())
    for node in graph.values():
        name = node["inputs"].get("image") if node["class_type"] == "LoadImage" else (
            node["inputs"].get("file") if node["class_type"] == "LoadVideo" else None)
        if name is not None:
            assert (INPUTS / name).is_file(), f"{api_path.name} names input '{name}', not shipped in inputs/"
    for key in required_models(graph):
        assert key in BY_NAME, f"{api_path.name} names {key}, which dreamoving_core.catalog does not know"


@pytest.mark.parametrize("ui_path", UI_GRAPHS, ids=[p.stem for p in UI_GRAPHS])
def test_loader_nodes_carry_the_model_metadata_of_the_missing_models_dialog(ui_path):
    ui = json.loads(ui_path.read_text())
    for node in ui["nodes"]:
        loads = [v for v in node.get("widgets_values", []) if isinstance(v, str)
                 and any((folder, v) in BY_NAME for (cls, _), folder in LOADER_INPUTS.items() if cls == node["type"])]
        for value in loads:
            model = next(m for (folder, name), m in BY_NAME.items() if name == value)
            listed = model.is_single_file and not value.endswith(".onnx")
            entries = node.get("properties", {}).get("models", [])
            if listed:
                assert {"name": value, "url": model.url, "directory": model.folder} in entries, (node["title"], value)
                assert model.url.startswith("https://huggingface.co/"), model.url
            else:
                assert all(e["name"] != value for e in entries), f"{value}: the frontend cannot find it; no entry"


def test_templates_and_their_thumbnails_are_served(comfy):
    status, body = comfy._request("GET", "/workflow_templates")
    assert status == 200
    assert sorted(body.get("comfyui-dreamoving", [])) == sorted(p.stem for p in UI_GRAPHS)
    import urllib.request
    from urllib.parse import quote

    for path in UI_GRAPHS:
        for suffix in (".json", ".jpg"):
            url = f"{comfy.base_url}/api/workflow_templates/comfyui-dreamoving/{quote(path.stem)}{suffix}"
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.status == 200 and response.read() == path.with_suffix(suffix).read_bytes()


def test_sample_inputs_are_in_the_input_folder_when_the_pack_loads(comfy, comfy_base):
    for path in INPUTS.iterdir():
        copied = comfy_base / "input" / path.name
        assert copied.is_file() and copied.read_bytes() == path.read_bytes(), path.name
    assert "dreamoving_dance.mp4" in json.dumps(comfy.object_info("LoadVideo"))


def test_sample_inputs_never_overwrite_the_users_files(comfy_dir, tmp_path):
    from devtools.tiny import pack_nodes

    inputs = pack_nodes("inputs")
    mine = tmp_path / "dreamoving_face.png"
    mine.write_bytes(b"my own face")
    copied = inputs.install_sample_inputs(str(tmp_path))
    assert mine.read_bytes() == b"my own face"
    assert "dreamoving_face.png" not in copied
    assert sorted(copied) == sorted(p.name for p in INPUTS.iterdir() if p.name != "dreamoving_face.png")
    assert inputs.install_sample_inputs(str(tmp_path)) == []
    assert not list(tmp_path.glob("*.partial"))


def test_an_unwritable_input_folder_is_logged_not_raised(comfy_dir, tmp_path, caplog):
    from devtools.tiny import pack_nodes

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the input folder should be")
    assert pack_nodes("inputs").install_sample_inputs(str(blocker)) == []
    assert "could not copy the sample inputs" in caplog.text


README = (PACK_DIR / "README.md").read_text()


def test_readme_model_table_names_every_catalogued_file_and_where_to_get_it():
    from dreamoving_core.catalog import CATALOG, FOLDERS

    for model in CATALOG:
        row = next((ln for ln in README.splitlines() if ln.startswith(f"| `{model.name}")), None)
        assert row is not None, f"README's model table has no row for {model.name}"
        assert f"`models/{FOLDERS[model.folder][0]}/`" in row
        assert (model.page if len(model.files) > 1 else model.url) in row, row


def test_readme_http_example_queues_a_shipped_workflow(comfy, comfy_base, tmp_path):
    import os
    import subprocess
    import sys

    code = README.split("<!-- example:http -->")[1].split("```python")[1].split("```")[0]
    pack = tmp_path / "pack"
    (pack / "workflows" / "api").mkdir(parents=True)
    shipped = substitute(install_tiny_models(load_graph(API_DIR / "dreamoving_pose.json"), comfy_base),
                         {("KSampler", "steps"): 1})  # tiny models, tiny canvas: the example itself is unchanged
    (pack / "workflows" / "api" / "dreamoving_pose.json").write_text(json.dumps(shipped))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "COMFYUI_URL": comfy.base_url, "DREAMOVING_PACK": str(pack)})
    assert out.returncode == 0, out.stderr[-3000:]
    wrote = [ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("wrote ")]
    assert wrote and all((comfy_base / "output" / sub / name).is_file() for sub, name in wrote), out.stdout
    frames, _ = read_video(comfy_base / "output" / wrote[0][0] / wrote[0][1])
    assert len(frames) == 16, "the example's frame_cap reached the graph"
