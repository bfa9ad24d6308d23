"""DWPose on torch: the ONNX graphs converted at load time give onnxruntime's outputs, batched over frames.

The tiny ONNX files (``devtools.tiny.preprocess``) use the operator sets of the real yolox_l.onnx and
dw-ll_ucoco_384.onnx (the detector exported at opset 11, the estimator at 17).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import pytest
import torch

from devtools.tiny.preprocess import TWO_PEOPLE, dwpose_onnx, synthetic_dance_frames, yolox_onnx
from dreamoving_core.errors import ModelFormatError
from dreamoving_core.preprocess.dwpose import DWPose, pick_backend
from dreamoving_core.preprocess.onnx_torch import load_onnx_module

YOLOX_OPS = {"Add", "Concat", "Conv", "MaxPool", "Mul", "Reshape", "Resize", "Sigmoid", "Slice", "Transpose"}
RTMPOSE_OPS = {"Add", "Clip", "Conv", "Div", "GlobalAveragePool", "HardSigmoid", "MatMul", "Mul", "ReduceL2", "Relu",
               "Reshape", "Sigmoid", "Split", "Transpose", "Unsqueeze"}


@pytest.mark.parametrize("path,ops,shape", [(yolox_onnx, YOLOX_OPS, (3, 640, 640)),
                                            (dwpose_onnx, RTMPOSE_OPS, (3, 384, 288))])
def test_a_converted_graph_gives_onnxruntimes_outputs_for_a_batch_of_frames(path, ops, shape):
    import onnxruntime as ort

    file = path()
    assert ops <= {n.op_type for n in onnx.load(str(file)).graph.node}, "the tiny graph lacks the real graph's ops"
    x = (np.random.default_rng(0).random((3, *shape)) * 255).astype(np.float32)
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    expected = [np.concatenate(parts) for parts in zip(*(session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})
                                                          for i in range(3)))]
    with torch.no_grad():
        got = load_onnx_module(file)(torch.from_numpy(x))
    assert [o.shape[0] for o in got] == [3] * len(expected), "the batch of three must run as one"
    for out, ref in zip(got, expected):
        assert np.abs(out.numpy() - ref).max() <= 1e-5


def test_torch_backend_keypoints_are_within_1e_3_of_onnxruntimes_over_a_video():
    frames = synthetic_dance_frames(6)
    both = {backend: DWPose(yolox_onnx(), dwpose_onnx(), device="cpu", backend=backend).video(frames)
            for backend in ("onnxruntime", "torch")}
    for ours, ref in zip(both["torch"], both["onnxruntime"]):
        assert len(ours.people) == len(ref.people) == 1
        for a, b in zip(ours.people, ref.people):
            for part in ("body", "face", "left_hand", "right_hand"):
                pa, pb = getattr(a, part), getattr(b, part)
                assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1e-3, part


def test_torch_backend_batches_people_of_many_frames_into_one_estimator_call():
    model = DWPose(yolox_onnx(TWO_PEOPLE), dwpose_onnx(), device="cpu", backend="torch")
    calls = []
    module = model.stages[1].module
    module.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    frames = synthetic_dance_frames(4)
    poses = model.video(frames)
    assert calls == [8], "4 frames x 2 people in one call"
    reference = DWPose(yolox_onnx(TWO_PEOPLE), dwpose_onnx(), device="cpu", backend="onnxruntime").video(frames)
    for ours, ref in zip(poses, reference):
        assert len(ours.people) == len(ref.people) == 2
        assert all(np.abs(a.body - b.body).max() <= 1e-3 for a, b in zip(ours.people, ref.people))


def test_auto_is_onnxruntime_on_the_cpu_and_torch_where_torch_has_cuda(monkeypatch):
    assert pick_backend("auto", "auto") in ("onnxruntime", "torch")
    assert pick_backend("auto", "cpu") == "onnxruntime"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_backend("auto", "auto") == "torch" and pick_backend("auto", "cpu") == "onnxruntime"
    assert pick_backend("onnxruntime", "cuda") == "onnxruntime"
    with pytest.raises(Exception, match="backend must be one of auto, onnxruntime, torch, got 'tensorrt'"):
        pick_backend("tensorrt", "auto")


def test_the_backend_in_use_is_logged_once(caplog):
    model = DWPose(yolox_onnx(), dwpose_onnx(), device="cpu", backend="torch")
    with caplog.at_level(logging.INFO, logger="dreamoving_core.onnx_sessions"):
        model(synthetic_dance_frames(1)[0])
        model(synthetic_dance_frames(1)[0])
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["DWPose: torch backend on cpu (yolox_l.onnx, dw-ll_ucoco_384.onnx converted from ONNX)"]
    assert model.providers == ["torch:cpu", "torch:cpu"]
    model.release()
    assert not any(stage.is_open for stage in model.stages)


def test_an_operator_outside_the_mapped_set_is_named(tmp_path):
    class Gelu(torch.nn.Module):
        def forward(self, x):
            return torch.erf(x)

    path = tmp_path / "odd.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Gelu(), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    with pytest.raises(ModelFormatError, match="'odd.onnx' uses ONNX operators the torch backend does not map: Erf"):
        load_onnx_module(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelFormatError, match="'junk.onnx' is not a readable ONNX model"):
        load_onnx_module(tmp_path / "junk.onnx")
