"""Generate the canvas (UI-format) workflows in ``workflows/`` from their API-format twins in ``workflows/api/``.

The API graph is the source of truth (tests queue it); the UI file is what users open in the canvas. Widget order
and slot types come from a live server's ``/object_info`` so the UI file matches the installed nodes exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

from devtools.server import PACK_DIR

API_DIR = PACK_DIR / "workflows" / "api"
UI_DIR = PACK_DIR / "workflows"
COLUMN_WIDTH, ROW_GAP, NODE_WIDTH = 380, 40, 320


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    return [(name, info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def _slot_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def _depths(api: dict) -> dict[str, int]:
    depths: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in depths:
            parents = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
            depths[node_id] = 1 + max((depth(p) for p in parents), default=-1)
        return depths[node_id]

    for node_id in api:
        depth(node_id)
    return depths


def api_to_ui(api: dict, object_info: dict) -> dict:
    """A LiteGraph workflow (version 0.4) with the same nodes, links and widget values as ``api``."""
    depths = _depths(api)
    links, nodes, column_y = [], {}, {}
    for order, node_id in enumerate(sorted(api, key=lambda k: (depths[k], int(k)))):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            value = node["inputs"].get(name)
            if _is_link(value):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), len(inputs), _slot_type(spec)])
                inputs.append({"name": name, "type": _slot_type(spec), "link": len(links)})
            elif _slot_type(spec) in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and name in node["inputs"]:
                widgets.append(value)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
            elif _slot_type(spec) not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                inputs.append({"name": name, "type": _slot_type(spec), "link": None})
        x = depths[node_id] * COLUMN_WIDTH
        y = column_y.get(x, 0)
        height = 60 + 26 * (len(inputs) + len(widgets))
        column_y[x] = y + height + ROW_GAP
        entry = {"id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [NODE_WIDTH, height],
                 "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                 "outputs": [{"name": name, "type": typ, "links": [], "slot_index": i}
                             for i, (name, typ) in enumerate(zip(info["output_name"], info["output"]))],
                 "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            entry["title"] = node["_meta"]["title"]
        nodes[int(node_id)] = entry
    for link_id, src, slot, *_ in links:
        nodes[src]["outputs"][slot]["links"].append(link_id)
    return {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": [nodes[k] for k in sorted(nodes)],
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def regenerate(object_info: dict) -> list[Path]:
    """Rewrite every ``workflows/<name>.json`` from ``workflows/api/<name>.json``; returns the written paths."""
    written = []
    for api_path in sorted(API_DIR.glob("*.json")):
        ui = api_to_ui(json.loads(api_path.read_text()), object_info)
        out = UI_DIR / api_path.name
        out.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(out)
    return written
