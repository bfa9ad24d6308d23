"""ComfyUI glue: one module per topic, each exporting ``NODES`` (V3 node classes)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import content_guider, motion, preprocess, video, video_controlnet
from .inputs import install_sample_inputs

TOPICS = (video, motion, video_controlnet, content_guider, preprocess)


class DreaMovingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for topic in TOPICS for node in topic.NODES]


async def comfy_entrypoint() -> DreaMovingExtension:
    install_sample_inputs()
    return DreaMovingExtension()
