"""The canvas (UI-format) workflows in ``workflows/``: laid out here by hand, one :class:`Layout` per API twin.

A shipped workflow is three files: the API graph ``workflows/api/<name>.json`` (what tests and scripts queue), the
canvas graph ``workflows/<Title>.json`` (what users open; its file name is the title the template browser shows)
and its thumbnail ``workflows/<Title>.jpg``. The canvas graph names its twin in ``extra.dreamoving.api``. A test
converts every canvas graph back to API form (:func:`ui_to_api`, as the frontend does when queueing) and compares it
with the twin, and checks the layout (:func:`layout_problems`) of every workflow, laid out here or not.

Conventions: groups left to right (models, driving video, pose / depth, appearance, prompt and control, sampling,
output), each a few columns of nodes stacked top to bottom; a note node says what to swap; loader nodes carry the
model metadata the frontend's missing-models dialog reads (``properties.models``, from ``dreamoving_core.catalog``);
everything fits a 1920x1080 canvas at the frontend's fit-to-screen zoom with text still drawn (``MIN_FIT_SCALE``).
``python dev.py workflows`` rewrites the canvas graphs and thumbnails from this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devtools.server import PACK_DIR
from dreamoving_core.catalog import BY_NAME, LOADER_INPUTS

API_DIR = PACK_DIR / "workflows" / "api"
UI_DIR = PACK_DIR / "workflows"
DESCRIPTIONS = PACK_DIR / "web" / "js" / "templates.json"
NOTE_TYPES = ("Note", "MarkdownNote")  # frontend-only nodes: never part of the API graph
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# The frontend's geometry (litegraph as ComfyUI's frontend ships it): a node's title bar sits above ``pos``.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
# fit-to-screen (``fitView``) zooms to 75 % of the scale that fits the nodes' bounds; below 0.6 the canvas stops
# drawing text ("low quality" rendering), so a graph must be small enough to stay above that.
CANVAS = (1920, 1080)
FIT_ZOOM = 0.75
MIN_FIT_SCALE = 0.6
GAP = 30  # between nodes of a column, and between columns
GROUP_PAD = 14
GROUP_TITLE = 40
NODE_WIDTH = 270
WIDE = {"CLIPTextEncode": 300, "Note": 320, "LoadVideo": 360}
TEXT_HEIGHT = 124  # a multiline text widget


@dataclass(frozen=True)
class Group:
    """A titled box of ``columns``, each a list of node titles from top to bottom (``NOTE`` is the note node)."""

    title: str
    color: str
    columns: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Layout:
    """How one API graph is shown: its template title (the canvas file's name), a one-line description, the note
    text and the groups from left to right."""

    api: str
    title: str
    description: str
    note: str
    groups: tuple[Group, ...]


NOTE = "Note"
MODELS, VIDEO, POSE, LOOK, PROMPT, SAMPLE = "#3f5159", "#385544", "#62533b", "#5a3e59", "#3f4a63", "#57463b"
# Nodes that show pictures: room (px) kept below their widgets so previews never cover a neighbour. Load Video's
# player is as high as the node is wide (a square video) plus its upload button: the frontend grows the node to
# that when the video loads.
PREVIEW_HEIGHT = {"LoadImage": 260, "LoadVideo": WIDE["LoadVideo"] + 50, "SaveVideo": 300, "PreviewImage": 260,
                  "DreaMovingDWPose": 260, "DreaMovingZoeDepth": 260}

SWAP_DANCE = ("Your dance video: pick it in Driving Video (drop a file on the node to upload). Driving Video Frames "
              "takes frame_cap frames, every every_nth-th (2 halves the rate); the latent's frame count and the "
              "output frame rate follow.")
SWAP_POSE = ("Your pose video: pick it in Driving Video; any OpenPose-style video works (the template 'DreaMoving 7. "
             "Dance video to pose + depth' makes one from a dance video).")
MODELS_NOTE = "Models: the loaders name the files to download (python dev.py models fetches them; README)."


def _note(*lines: str) -> str:
    return "\n\n".join(lines)


def _dance_layout(api: str, title: str, description: str, purpose: str, look: tuple[tuple[str, ...], ...],
                  depth: bool = False, context: bool = False) -> Layout:
    """The dance-video workflows share one arrangement; ``look`` holds their appearance columns."""
    models = ("Load Checkpoint (SD1.5)", "Load Motion Module", *(("Motion Context Options",) if context else ()),
              "Apply Motion Module", "Load Video ControlNet (Pose)",
              *(("Load Video ControlNet (Depth)",) if depth else ()))
    pose = ("DWPose Estimator", *(("ZoeDepth Estimator",) if depth else ()))
    control = ("Prompt", "Negative Prompt", "Apply Video ControlNet (Pose)",
               *(("Apply Video ControlNet (Depth)",) if depth else ()))
    groups = [Group("Models", MODELS, (models,)),
              Group("Driving video", VIDEO, (("Driving Video", "Driving Video Frames", NOTE),)),
              Group("Pose and depth" if depth else "Pose", POSE, (pose,))]
    if look:
        groups.append(Group("Appearance", LOOK, look))
    groups += [Group("Prompt and control", PROMPT, (control,)),
               Group("Sampling and output", SAMPLE, (("Empty Latent (one per frame)", "KSampler", "VAE Decode",
                                                      "Create Video", "Save Video"),))]
    return Layout(api, title, description, _note(purpose, SWAP_DANCE, MODELS_NOTE), tuple(groups))


LAYOUTS: tuple[Layout, ...] = (
    Layout("dreamoving_pose.json", "DreaMoving 1. Text prompt + pose video",
           "A dancer described by the prompt, moving like the pose video (paper Fig. 2).",
           _note("Text + pose video (DreaMoving Fig. 2): the prompt says who dances where; the pose video says how.",
                 SWAP_POSE, MODELS_NOTE),
           (Group("Models", MODELS, (("Load Checkpoint (SD1.5)", "Load Motion Module", "Apply Motion Module",
                                      "Load Video ControlNet (Pose)"),)),
            Group("Pose video", VIDEO, (("Driving Video", "Driving Video Frames", NOTE),)),
            Group("Prompt and control", PROMPT, (("Prompt", "Negative Prompt", "Apply Video ControlNet (Pose)"),)),
            Group("Sampling and output", SAMPLE, (("Empty Latent (one per frame)", "KSampler", "VAE Decode",
                                                   "Create Video", "Save Video"),)))),
    _dance_layout("dreamoving_demo.json", "DreaMoving 2. Face photo + dance video",
                  "A person with the face of a photo, dancing like the video (paper Fig. 3).",
                  "Text + face image (DreaMoving Fig. 3): the Content Guider keeps the face of Face Image; the "
                  "prompt sets clothes and scene. Use your own photo of a face.",
                  (("Load Content Guider (face)", "Load CLIP Vision (OpenCLIP)", "Load InsightFace", "Face Image",
                    "Content Guider (Face)"),)),
    _dance_layout("dreamoving_face_cloth.json", "DreaMoving 3. Face + cloth images",
                  "Face from one image, clothes from another, motion from the video (paper Fig. 4).",
                  "Face + cloth (DreaMoving Fig. 4): one Content Guider term per image, weighted by alpha_face and "
                  "alpha_cloth.",
                  (("Load Content Guider (face)", "Load CLIP Vision (OpenCLIP)", "Load InsightFace", "Face Image",
                    "Content Guider (Face)"),
                   ("Load Content Guider (cloth)", "Cloth Image", "Content Guider (Cloth)"))),
    _dance_layout("dreamoving_style.json", "DreaMoving 4. Stylized reference image",
                  "A stylized character from a reference image, dancing like the video (paper Fig. 5).",
                  "Stylized image (DreaMoving Fig. 5): the reference image's look and style carry over; describe "
                  "the style in the prompt too.",
                  (("Load Content Guider (cloth)", "Load CLIP Vision (OpenCLIP)", "Style Image",
                    "Content Guider (reference)"),)),
    _dance_layout("dreamoving_pose_depth.json", "DreaMoving 5. Pose + depth control",
                  "Two Video ControlNets, DWPose pose and ZoeDepth depth of one dance video.",
                  "Pose + depth: two Video ControlNets chained on the same prompt; lower the depth strength to "
                  "leave the body shape freer.", (), depth=True),
    _dance_layout("dreamoving_motion_long.json", "DreaMoving 6. Long video, context windows",
                  "All 160 frames of the dance at once, in overlapping windows of 16 frames.",
                  "Long video: Motion Context Options runs the motion blocks on windows of 16 frames that overlap "
                  "by 4, so any length fits in memory. frame_cap 0 takes the whole video.", (), context=True),
    Layout("dreamoving_video_to_pose.json", "DreaMoving 7. Dance video to pose + depth",
           "DWPose and ZoeDepth previews of a dance video, saved as pose and depth videos.",
           _note("Preprocessing only: the pose and depth the Video ControlNets would see, previewed on the nodes "
                 "(the slider under a preview steps through the frames).", SWAP_DANCE.split(". Driving")[0] + ".",
                 MODELS_NOTE),
           (Group("Dance video", VIDEO, (("Dance Video", "Driving Video Frames", NOTE),)),
            Group("Pose", POSE, (("DWPose Estimator",), ("Pose Video", "Save Pose Video"))),
            Group("Depth", POSE, (("ZoeDepth Estimator",), ("Depth Video", "Save Depth Video"))))),
    Layout("dreamoving_score.json", "DreaMoving 8. Score a take",
           "Scores of a generated video: identity, pose fidelity, temporal consistency (the report and its plot).",
           _note("Scoring: pick the video you generated in Generated Video, the dance that drove it in Driving Dance "
                 "Video and the face you used in Reference Face. Score Video previews its per-frame curves; the "
                 "report lists every score, unavailable ones with the reason.",
                 "Connect a ground-truth video to Score Video's truth input for PSNR / SSIM / LPIPS / FID / FVD.",
                 MODELS_NOTE),
           (Group("Generated video", VIDEO, (("Generated Video (pick your take)", "Generated Frames", NOTE),)),
            Group("Driving video", POSE, (("Driving Dance Video", "Driving Frames"), ("DWPose (driving keypoints)",))),
            Group("Identity models", LOOK, (("Reference Face", "Load InsightFace", "Load CLIP Vision (OpenCLIP)"),)),
            Group("Scores", SAMPLE, (("DreaMoving Score Video",), ("Report (JSON)",))))),
    Layout("dreamoving_motion.json", "DreaMoving 0. Text to video, motion only",
           "AnimateDiff-style text-to-video with the motion module alone, no pose.",
           _note("Motion module only: 16 frames from the prompt, to try a motion module or a checkpoint.",
                 MODELS_NOTE),
           (Group("Models", MODELS, (("Load Checkpoint (SD1.5)", "Load Motion Module", "Apply Motion Module", NOTE),)),
            Group("Prompt", PROMPT, (("Prompt", "Negative Prompt"),)),
            Group("Sampling and output", SAMPLE, (("Empty Latent (frames)", "KSampler"),
                                                  ("VAE Decode", "Create Video", "Save Video"))))),
)


# ------------------------------------------------------------------------------------------ API <-> canvas graphs


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    return [(name, info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def _slot_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def _widget_values(spec: list, value) -> list:
    """The ``widgets_values`` entries of one widget input: its value, plus the seed's 'control after generate'."""
    return [value, "fixed"] if len(spec) > 1 and spec[1].get("control_after_generate") else [value]


# The frontend finds a model only in ComfyUI's model listing, which holds these extensions (folder_paths'
# supported_pt_extensions); it would report any other file (DWPose's .onnx) missing even when present.
LISTED_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


def _models_metadata(class_type: str, inputs: dict) -> list[dict]:
    """``properties.models`` of a loader node: the catalogue's download entries for the single files it names."""
    out = []
    for name, value in inputs.items():
        folder = LOADER_INPUTS.get((class_type, name))
        model = BY_NAME.get((folder, value)) if folder and isinstance(value, str) else None
        if model is not None and model.is_single_file and model.name.endswith(LISTED_EXTENSIONS):
            out.append({"name": model.name, "url": model.url, "directory": model.folder})
    return out


def node_height(class_type: str, info: dict | None, inputs: int, widgets: int, texts: int) -> int:
    """The body height (title excluded) the frontend gives a node with ``inputs`` slots and ``widgets`` widgets
    (``texts`` of them multiline; a linked widget still takes its row), plus room for its preview if it has one."""
    outputs = len(info["output"]) if info else 0
    height = max(inputs, outputs) * SLOT_HEIGHT + (widgets - texts) * WIDGET_HEIGHT + texts * TEXT_HEIGHT + 16
    return height + PREVIEW_HEIGHT.get(class_type, 0)


def _ui_node(node_id: int, node: dict, info: dict, links: list) -> dict:
    """One canvas node for API node ``node`` (links it consumes are appended to ``links``)."""
    inputs, widgets, texts = [], [], 0
    for name, spec in _ordered_inputs(info):
        value = node["inputs"].get(name)
        slot_type = _slot_type(spec)
        is_widget = slot_type in WIDGET_TYPES
        if _is_link(value):
            links.append([len(links) + 1, int(value[0]), value[1], node_id, len(inputs), slot_type])
            inputs.append({"name": name, "type": slot_type, "link": len(links),
                           **({"widget": {"name": name}} if is_widget else {})})
            if is_widget:  # a linked widget keeps a value (its default) in widgets_values
                widgets += _widget_values(spec, spec[1].get("default") if len(spec) > 1 else None)
        elif is_widget:
            if name in node["inputs"]:
                widgets += _widget_values(spec, value)
                texts += slot_type == "STRING" and spec[1].get("multiline", False)
        else:
            inputs.append({"name": name, "type": slot_type, "link": None})
    properties = {"Node name for S&R": node["class_type"]}
    models = _models_metadata(node["class_type"], node["inputs"])
    if models:
        properties["models"] = models
    slots = sum(1 for i in inputs if "widget" not in i)
    return {"id": node_id, "type": node["class_type"], "pos": [0, 0],
            "size": [WIDE.get(node["class_type"], NODE_WIDTH),
                     node_height(node["class_type"], info, slots, len(widgets), texts)],
            "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": typ, "links": [], "slot_index": i}
                        for i, (name, typ) in enumerate(zip(info["output_name"], info["output"]))],
            "title": node["_meta"]["title"], "properties": properties, "widgets_values": widgets}


def _place(layout: Layout, nodes_by_title: dict[str, dict]) -> list[dict]:
    """Give every node its position, column by column and group by group; returns the groups."""
    groups, x = [], 0
    for group in layout.groups:
        left, top, bottom = x, 0, 0
        x += GROUP_PAD
        for column in group.columns:
            y = top + GROUP_TITLE + TITLE_HEIGHT
            width = max(nodes_by_title[t]["size"][0] for t in column)
            for title in column:
                node = nodes_by_title[title]
                node["pos"] = [x, y]
                node["size"][0] = width
                y += node["size"][1] + TITLE_HEIGHT + GAP
            bottom = max(bottom, y - GAP + GROUP_PAD)
            x += width + GAP
        x += GROUP_PAD - GAP
        groups.append({"id": len(groups) + 1, "title": group.title, "bounding": [left, top, x - left, bottom - top],
                       "color": group.color, "font_size": 24, "flags": {}})
        x += GAP
    height = max(g["bounding"][3] for g in groups)  # one band of equal boxes reads better than ragged ones
    for g in groups:
        g["bounding"][3] = height
    return groups


def api_to_ui(api: dict, object_info: dict, layout: Layout) -> dict:
    """The canvas graph (LiteGraph version 0.4) of ``api`` laid out as ``layout``: same nodes, links and widget
    values, plus the note node and the groups."""
    links: list = []
    nodes = {int(k): _ui_node(int(k), v, object_info[v["class_type"]], links) for k, v in api.items()}
    for link_id, src, slot, *_ in links:
        nodes[src]["outputs"][slot]["links"].append(link_id)
    note_id = max(nodes) + 1
    note = {"id": note_id, "type": "Note", "pos": [0, 0], "size": [WIDE["Note"], 250], "flags": {}, "order": 0,
            "mode": 0, "inputs": [], "outputs": [], "title": "What to swap", "properties": {},
            "widgets_values": [layout.note], "color": "#432", "bgcolor": "#653"}
    by_title = {n["title"]: n for n in nodes.values()} | {NOTE: note}
    placed = [t for g in layout.groups for c in g.columns for t in c]
    if sorted(placed) != sorted(by_title):
        raise ValueError(f"layout of {layout.api} places {sorted(set(placed) ^ set(by_title))} wrongly "
                         "(every node exactly once, titles unique)")
    groups = _place(layout, by_title)
    ordered = sorted(nodes.values(), key=lambda n: n["id"]) + [note]
    for order, node in enumerate(ordered):
        node["order"] = order
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": ordered, "links": links, "groups": groups,
            "config": {}, "extra": {"dreamoving": {"api": layout.api, "description": layout.description}},
            "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API graph the frontend queues for canvas graph ``ui``: notes dropped, each input from its link or its
    widget value (by the node's widget order), titles in ``_meta``."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, spec in _ordered_inputs(info):
            widget = _slot_type(spec) in WIDGET_TYPES
            value = next(values) if widget else None
            if widget and len(spec) > 1 and spec[1].get("control_after_generate"):
                next(values)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif widget:
                inputs[name] = value
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or info["display_name"]}}
    return api


# ------------------------------------------------------------------------------------------------- the checks


def boxes(ui: dict) -> dict[int, tuple[float, float, float, float]]:
    """``id -> (x, y, width, height)`` of every node including its title bar."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT)
            for n in ui["nodes"]}


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def fit_scale(node_boxes: list[tuple[float, float, float, float]], canvas=CANVAS) -> float:
    """The zoom the frontend's fit-to-screen picks for nodes with these boxes on a ``canvas``-sized page."""
    x0 = min(b[0] for b in node_boxes)
    y0 = min(b[1] for b in node_boxes)
    x1 = max(b[0] + b[2] for b in node_boxes)
    y1 = max(b[1] + b[3] for b in node_boxes)
    return min(FIT_ZOOM * canvas[0] / max(x1 - x0, 300), FIT_ZOOM * canvas[1] / max(y1 - y0, 300))


def layout_problems(ui: dict, node_boxes: dict | None = None) -> list[str]:
    """What is wrong with the canvas graph's layout: overlapping nodes or groups, a node outside every group, a
    fit-to-screen zoom too small to draw text, no note. ``node_boxes`` (id -> x, y, w, h) may come from a browser."""
    node_boxes = node_boxes or boxes(ui)
    titles = {n["id"]: n.get("title") or n["type"] for n in ui["nodes"]}
    problems = []
    ids = sorted(node_boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if _overlap(node_boxes[a], node_boxes[b]):
                problems.append(f"'{titles[a]}' overlaps '{titles[b]}'")
    groups = [g["bounding"] for g in ui.get("groups", [])]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if _overlap(a, b):
                problems.append(f"groups at {a} and {b} overlap")
    for node_id, box in node_boxes.items():
        inside = [g for g in groups if g[0] <= box[0] and g[1] <= box[1] and box[0] + box[2] <= g[0] + g[2]
                  and box[1] + box[3] <= g[1] + g[3]]
        if not inside:
            problems.append(f"'{titles[node_id]}' is in no group")
    scale = fit_scale(list(node_boxes.values()))
    if scale < MIN_FIT_SCALE:
        problems.append(f"fit-to-screen zoom on {CANVAS[0]}x{CANVAS[1]} is {scale:.2f}, below {MIN_FIT_SCALE} "
                        "where the canvas stops drawing text")
    if not any(n["type"] in NOTE_TYPES for n in ui["nodes"]):
        problems.append("no note node says what to swap")
    return problems


# --------------------------------------------------------------------------------------------- files on disk


def ui_path(layout: Layout) -> Path:
    return UI_DIR / f"{layout.title}.json"


def api_twin(ui_file: Path) -> Path:
    """The API twin of a canvas workflow file: ``extra.dreamoving.api``, else the same file name."""
    ui = json.loads(ui_file.read_text())
    return API_DIR / (ui.get("extra", {}).get("dreamoving", {}).get("api") or ui_file.name)


def descriptions() -> dict[str, str]:
    """Template title -> one-line description, for the frontend extension (``web/js/templates.json``), which puts
    them on the template browser's cards: the frontend itself only has file names to show there."""
    return {layout.title: layout.description for layout in LAYOUTS}


def regenerate(object_info: dict) -> list[Path]:
    """Rewrite the canvas graph and thumbnail of every :data:`LAYOUTS` entry, and the descriptions file; returns the
    written paths."""
    from devtools.thumbnails import write_thumbnail

    written = []
    for layout in LAYOUTS:
        api = json.loads((API_DIR / layout.api).read_text())
        out = ui_path(layout)
        out.write_text(json.dumps(api_to_ui(api, object_info, layout), indent=1) + "\n")
        written += [out, write_thumbnail(api, out.with_suffix(".jpg"))]
    DESCRIPTIONS.write_text(json.dumps(descriptions(), indent=1, ensure_ascii=False) + "\n")
    return written + [DESCRIPTIONS]
