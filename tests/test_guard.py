"""The checks every node gets from its schema (nodes/_common.guard), in process, for every node of every topic module
in nodes/ — also the nodes added after these tests were written."""
from __future__ import annotations

import inspect
import pkgutil

import pytest

from devtools.server import PACK_DIR
from devtools.tiny import pack_nodes

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def common():
    return pack_nodes("_common")


@pytest.fixture(scope="module")
def io(common):
    """ComfyUI's V3 ``io`` module (importable once ``common`` is)."""
    from comfy_api.latest import io

    return io


@pytest.fixture(scope="module")
def nodes(common):
    topics = [pack_nodes(m.name) for m in pkgutil.iter_modules([str(PACK_DIR / "nodes")]) if not m.name.startswith("_")]
    found = [common.guard(node) for topic in topics for node in getattr(topic, "NODES", [])]
    assert len(found) >= 12
    return found


def inputs_of(nodes, *kinds):
    return [(node, inp) for node in nodes for inp in node.define_schema().inputs if isinstance(inp, kinds)]


def display(node) -> str:
    schema = node.define_schema()
    return schema.display_name or schema.node_id


def test_every_float_of_every_node_refuses_nan_and_infinities_when_queued(nodes, io):
    floats = inputs_of(nodes, io.Float.Input)
    assert len(floats) >= 11
    for node, inp in floats:
        for value in (NAN, INF, -INF):
            message = node.validate_inputs(**{inp.id: value})
            assert isinstance(message, str) and message.startswith(f"{display(node)}: {inp.id} is {value}"), message
        assert node.validate_inputs(**{inp.id: inp.default if inp.default is not None else inp.min or 0.0}) is True


def test_every_float_range_is_checked_because_comfyui_leaves_it_to_us(nodes, io):
    for node, inp in inputs_of(nodes, io.Float.Input):
        assert inp.id in inspect.getfullargspec(node.validate_inputs).args  # ComfyUI then skips its own min/max
        if inp.max is not None:
            assert "above its maximum" in node.validate_inputs(**{inp.id: inp.max + 1})
        if inp.min is not None:
            assert "below its minimum" in node.validate_inputs(**{inp.id: inp.min - 1})


def test_every_start_end_pair_refuses_an_inverted_range_the_same_way(nodes, common):
    pairs = [(node, pair) for node in nodes for pair in common._range_pairs(node.define_schema().inputs)]
    assert {n.define_schema().node_id for n, _ in pairs} >= {
        "DreaMovingApplyVideoControlNet", "DreaMovingContentGuiderFace", "DreaMovingContentGuiderCloth"}
    for node, (start, end) in pairs:
        message = node.validate_inputs(**{start: 0.9, end: 0.1})
        assert message == f"{display(node)}: {start} (0.9) is after {end} (0.1); {start} must not be larger than {end}"
        assert node.validate_inputs(**{start: 0.1, end: 0.9}) is True


def test_every_model_name_input_refuses_names_that_leave_its_folders(nodes, common):
    models = inputs_of(nodes, common.ModelCombo)
    assert len(models) >= 8
    for node, inp in models:
        for name in ("../../../etc/passwd", "/etc/passwd", "..\\..\\secret.ckpt", "C:\\models\\x.ckpt", "a/../b"):
            message = node.validate_inputs(**{inp.id: name})
            assert message.startswith(f"{display(node)}: {inp.id}: '{name}' is not a model name"), message
        assert "is not in" in node.validate_inputs(**{inp.id: "no_such_model_file.safetensors"})


def test_every_other_dropdown_refuses_a_value_not_among_its_options(nodes, common, io):
    combos = [(n, i) for n, i in inputs_of(nodes, io.Combo.Input) if not isinstance(i, common.ModelCombo)]
    assert combos
    for node, inp in combos:
        assert "not one of its options" in node.validate_inputs(**{inp.id: "surely-not-an-option"})
        assert node.validate_inputs(**{inp.id: inp.options[0]}) is True


def test_every_connection_input_refuses_a_raw_value_before_the_node_runs(nodes, common, io):
    links = [(n, i) for n, i in inputs_of(nodes, io.Input) if not isinstance(i, io.WidgetInput)]
    assert len(links) >= 15
    for node, inp in links:
        with pytest.raises(common.NodeError) as refused:
            node.execute(**{inp.id: "a string from the prompt"})
        assert str(refused.value).startswith(f"{display(node)}: {inp.id} must be connected to the ")


def test_the_pack_s_own_types_refuse_a_value_of_another_kind(nodes, common, io):
    custom = [(n, i) for n, i in inputs_of(nodes, io.Input)
              if str(i.get_io_type()) in common.CUSTOM_TYPES]
    assert {str(i.get_io_type()) for _, i in custom} >= {
        "MOTION_MODULE", "VIDEO_CONTROLNET", "DREAMOVING_CONTENT_GUIDER", "DREAMOVING_INSIGHTFACE", "POSE_KEYPOINT"}
    for node, inp in custom:
        with pytest.raises(common.NodeError, match=f"{inp.id} must be connected to the {inp.get_io_type()} output"):
            node.execute(**{inp.id: {"not": "it"}})


def test_images_are_converted_or_refused_with_the_input_named():
    import torch

    from dreamoving_core.errors import InputMismatchError
    from dreamoving_core.images import rgb_frames

    rgb = torch.rand(2, 16, 16, 3)
    assert rgb_frames(rgb, "images") is rgb
    assert torch.equal(rgb_frames(torch.cat([rgb, torch.ones(2, 16, 16, 1)], -1), "images"), rgb)
    assert torch.equal(rgb_frames(rgb[..., :1], "images"), rgb[..., :1].expand(2, 16, 16, 3))
    for bad, words in ((torch.rand(1, 1, 1, 3), "1×1 pixels"), (torch.rand(16, 16, 3), "image batch"),
                       (torch.rand(1, 16, 16, 2), "image batch"), (torch.zeros(0, 16, 16, 3), "holds no image"),
                       (torch.full((1, 16, 16, 3), float("nan")), "NaN"),
                       (torch.zeros(1, 16, 16, 3, dtype=torch.uint8), "uint8")):
        with pytest.raises(InputMismatchError, match=words):
            rgb_frames(bad, "face_image")
