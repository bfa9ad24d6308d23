"""The real ComfyUI frontend in headless Chromium, one browser session per host: every template opens from the template
browser without missing nodes, bad widget values, overlapping nodes (also with previews shown) or console errors from
the pack, readable at fit-to-screen; the frontend's own prompt is the API twin; the missing-models dialog names what
to download; the frame scrubber of web/ steps through a real run's previews. Screenshots are kept as artifacts
(``$DREAMOVING_ARTIFACTS``, default ``<pack>/.artifacts``): look at them."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from devtools.browser import BrowserUnavailable, ComfyPage, ensure_chromium
from devtools.demo import install_tiny_models, load_graph
from devtools.server import PACK_DIR, PACK_NAME
from devtools.workflow_ui import API_DIR, MIN_FIT_SCALE, UI_DIR, api_twin, layout_problems

UI_GRAPHS = sorted(UI_DIR.glob("*.json"))
PREVIEW_FRAMES = 12
PREVIEWS = "dreamoving_previews"  # sub-folder of the input folder holding the frames previews are simulated with


@pytest.fixture(scope="module")
def page(comfy, comfy_base):
    try:
        chromium, driver = ensure_chromium()
    except BrowserUnavailable as why:
        pytest.skip(f"BROWSER TESTS SKIPPED: {why}")
    for api_path in sorted(API_DIR.glob("*.json")):  # every loader finds its file: no missing-models dialog
        install_tiny_models(load_graph(api_path), comfy_base)
    write_preview_frames(comfy_base / "input" / PREVIEWS)
    browser = ComfyPage(comfy.base_url, chromium, driver)
    _, stats = comfy._request("GET", "/system_stats")
    browser.host = stats["system"].get("comfyui_version", "unknown")
    browser.artifacts = Path(os.environ.get("DREAMOVING_ARTIFACTS", PACK_DIR / ".artifacts")) / "browser" / \
        f"comfyui-{browser.host}"
    yield browser
    browser.close()


def write_preview_frames(folder: Path) -> None:
    """The first frames of the sample pose and depth videos as PNGs: what DWPose and ZoeDepth show after a run."""
    from PIL import Image

    from tests.graphs import read_video_frames

    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("pose", "depth"):
        for i, frame in enumerate(read_video_frames(PACK_DIR / "inputs" / f"dreamoving_{kind}.mp4")[:PREVIEW_FRAMES]):
            Image.fromarray(frame).save(folder / f"{kind}_{i:02d}.png")


def pack_errors(entries: list[dict], server: str) -> list[str]:
    """Console errors caused by the pack: anything naming it (our extension's script, a template, a thumbnail, a
    sample input) on this server. Requests to other hosts fail offline by design and are not ours."""
    errors = []
    for entry in entries:
        text = entry["message"]
        external = text.startswith("http") and not text.startswith(server)
        if entry["level"] == "SEVERE" and "dreamoving" in text.lower() and not external:
            errors.append(text[:500])
    return errors


def simulate_previews(browser: ComfyPage) -> None:
    """Give every node that previews frames or a video what a run gives it, through the frontend's own
    ``executed`` event: a dozen pose / depth frames for DWPose / ZoeDepth, a video for Save Video."""
    browser.js("""
      const frames = kind => [...Array(arguments[0]).keys()].map(i => ({
        filename: `${kind}_${String(i).padStart(2, '0')}.png`, subfolder: arguments[1], type: 'input'}));
      for (const n of app.graph._nodes) {
        let output = null;
        if (n.type === 'DreaMovingDWPose') output = {images: frames('pose')};
        if (n.type === 'DreaMovingZoeDepth') output = {images: frames('depth')};
        if (n.type === 'SaveVideo') output = {images: [{filename: 'dreamoving_pose.mp4', subfolder: '', type: 'input'}],
                                              animated: [true]};
        if (output) app.api.dispatchCustomEvent('executed', {node: String(n.id), display_node: String(n.id), output,
                                                             prompt_id: 'dreamoving-preview-check'});
      }
      app.graph.setDirtyCanvas(true, true);""", PREVIEW_FRAMES, PREVIEWS)
    browser.wait("app.graph._nodes.filter(n => ['DreaMovingDWPose', 'DreaMovingZoeDepth'].includes(n.type))"
                 ".every(n => (n.imgs || []).length === arguments[0])", 30, PREVIEW_FRAMES)
    time.sleep(1.0)


def canvas_problems(browser: ComfyPage, ui: dict) -> list[str]:
    boxes = {b[0]: tuple(b[1:]) for b in browser.js("return dm.boxes()")}
    return layout_problems(ui, boxes)


@pytest.mark.parametrize("ui_path", UI_GRAPHS, ids=[p.stem for p in UI_GRAPHS])
def test_template_opens_from_the_template_browser_readable_and_clean(page, comfy, ui_path):
    ui = json.loads(ui_path.read_text())
    page.read_console()
    description = ui.get("extra", {}).get("dreamoving", {}).get("description")
    card = page.open_template(PACK_NAME, ui_path.stem, shows=description)
    assert card["text"].splitlines()[0] == ui_path.stem, card
    if description:  # the frontend extension's line, not the file name the frontend repeats
        assert card["text"].splitlines()[-1] == description, card
    assert card["thumbnail"] == 400, f"the card's thumbnail did not load: {card}"
    state = page.state()
    assert state["dialogs"] == [], f"a dialog opened with the workflow: {state['dialogs']}"
    assert all(n["registered"] for n in state["nodes"]), [n["type"] for n in state["nodes"] if not n["registered"]]
    for node in state["nodes"]:
        for w in node["widgets"]:
            if w["options"] is not None:
                assert w["value"] in w["options"], f"{node['title']}.{w['name']} = {w['value']!r}"
            if isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool) and w["min"] is not None:
                assert w["min"] <= w["value"] <= w["max"], f"{node['title']}.{w['name']} = {w['value']}"
    assert canvas_problems(page, ui) == []
    fit = page.fit()
    assert fit["scale"] >= MIN_FIT_SCALE and not fit["lowQuality"], fit
    prompt = page.js("return app.graphToPrompt().then(p => p.output)")
    twin = json.loads(api_twin(ui_path).read_text())
    info = comfy.object_info()
    known = {k: {i for s in ("required", "optional") for i in info[v["class_type"]]["input"].get(s, {})}
             for k, v in twin.items()}
    assert {k: {**v, "inputs": {i: x for i, x in v["inputs"].items() if i in known[k]}} for k, v in prompt.items()} \
        == twin, "the frontend queues exactly the API twin"
    page.screenshot(page.artifacts / f"{ui_path.stem}.png")
    simulate_previews(page)
    assert canvas_problems(page, ui) == [], "previews must not push nodes onto each other"
    page.fit()
    page.screenshot(page.artifacts / f"{ui_path.stem} (previews).png")
    assert pack_errors(page.read_console(), comfy.base_url) == []


def test_missing_models_dialog_names_what_to_download(page, hide_models):
    with hide_models(("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"),
                     ("animatediff_models", "mm_sd_v15_v2.ckpt")):
        page.open_page()  # the frontend caches model listings for the page's life
        page.open_template(PACK_NAME, "DreaMoving 1. Text prompt + pose video")
        page.wait("dm.dialogs().length > 0", 30)
        text = "\n".join(page.js("return dm.dialogs()"))
        page.screenshot(page.artifacts / "missing models dialog.png")
        page.js("dm.closeDialogs()")
    assert "checkpoints / v1-5-pruned-emaonly-fp16.safetensors" in text
    assert "animatediff_models / mm_sd_v15_v2.ckpt" in text
    assert "controlnet /" not in text, "only the missing files are listed"
    page.open_page()  # the models are back: a fresh page sees them


def test_frame_scrubber_steps_through_the_previews_of_a_run_queued_from_the_page(page):
    page.open_template(PACK_NAME, "DreaMoving 7. Dance video to pose + depth")
    page.set_widgets({("DreaMovingVideoFrames", "frame_cap"): 6, ("DreaMovingDWPose", "detect_resolution"): 64})
    page.queue(timeout=900)
    dwpose = "app.graph._nodes.find(n => n.type === 'DreaMovingDWPose')"
    page.wait(f"({dwpose}.imgs || []).length === 6", 60)
    scrubber = page.js(f"const n = {dwpose}; return {{max: n.dreamovingScrubber.slider.options.max, "
                       "index: n.imageIndex}")
    assert scrubber == {"max": 5, "index": 0}, "one frame shown, the slider spans the run's frames"
    page.js(f"const s = {dwpose}.dreamovingScrubber.slider; s.value = 3; s.callback(3);")
    assert page.js(f"return {dwpose}.imageIndex") == 3
    page.js(f"{dwpose}.dreamovingScrubber.button.callback()")
    time.sleep(0.5)
    assert page.js(f"return {dwpose}.imageIndex") != 3, "play advances the frames"
    page.js(f"{dwpose}.dreamovingScrubber.button.callback()")
    saved = page.js(f"return app.graph.serialize().nodes.find(n => n.type === 'DreaMovingDWPose').widgets_values")
    prompt = page.js("return app.graphToPrompt().then(p => p.output)")
    pose_inputs = next(v["inputs"] for v in prompt.values() if v["class_type"] == "DreaMovingDWPose")
    assert "frame" not in pose_inputs and len([v for v in saved if v is not None]) == 8, \
        "the scrubber is neither saved with the workflow nor sent with the prompt"
    page.fit()
    page.screenshot(page.artifacts / "frame scrubber.png")
