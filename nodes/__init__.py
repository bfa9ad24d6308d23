"""ComfyUI glue: one module per topic, each exporting ``NODES`` (V3 node classes). Every node the extension lists
gets the pack's schema-derived input checks (``_common.guard``)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import _models, content_guider, eval, motion, preprocess, video, video_controlnet
from ._common import guard
from .inputs import install_sample_inputs

TOPICS = (video, motion, video_controlnet, content_guider, preprocess, eval)


class DreaMovingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        _models.register_routes()  # ComfyUI asks for the nodes once, before it adds the server's routes
        return [guard(node) for topic in TOPICS for node in topic.NODES]


async def comfy_entrypoint() -> DreaMovingExtension:
    install_sample_inputs()
    return DreaMovingExtension()
