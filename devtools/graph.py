"""Build ComfyUI API-format graphs in Python: ``g.node("KSampler", model=ckpt[0], ...)``."""
from __future__ import annotations

from typing import Any


class NodeRef:
    def __init__(self, node_id: str):
        self.id = node_id

    def __getitem__(self, output: int) -> list:
        return [self.id, output]


class Graph:
    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def node(self, class_type: str, **inputs: Any) -> NodeRef:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        return NodeRef(node_id)

    def set(self, ref: NodeRef, **inputs: Any) -> None:
        self.nodes[ref.id]["inputs"].update(inputs)

    def to_api(self) -> dict[str, dict[str, Any]]:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}
