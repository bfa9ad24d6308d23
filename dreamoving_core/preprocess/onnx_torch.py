"""ONNX graphs run as torch modules: DWPose's YOLOX detector and RTMPose estimator on the GPU without onnxruntime-gpu.

:func:`load_onnx_module` reads an ``.onnx`` file with the ``onnx`` package (protobuf: weights and operators, never
code) and returns an :class:`OnnxModule` that executes the graph node by node with torch operators, on any device
and dtype, for any batch size. Only the operators these two model families are exported with are mapped (YOLOX:
Focus slices, convolutions, SiLU as ``Sigmoid``·``Mul``, SPP max pools, nearest ``Resize``, the head's ``Reshape`` /
``Transpose`` / ``Concat``; RTMPose: CSPNeXt convolutions, channel attention's ``GlobalAveragePool`` and
``HardSigmoid``, the SimCC head's ScaleNorm (``ReduceL2``, ``Clip``, ``Div``), gated attention (``MatMul``,
``Split``, ``Relu``, ``Pow``), plus the shape arithmetic exporters emit); any other raises ``ModelFormatError``
naming it, and the caller keeps onnxruntime.

The files are exported for one image: a ``Reshape`` to a constant shape whose first entry is that batch size keeps
the batch of its input instead, so frames run together.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFormatError


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(attrs: dict, inputs: list, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input ``index`` (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    return _ints(inputs[index]) if len(inputs) > index and inputs[index] is not None else None


def _pads(attrs: dict, dims: int) -> list[int]:
    return list(attrs.get("pads", [0] * 2 * dims))


def _conv(x, w, b=None, *, attrs):
    dims = w.ndim - 2
    pads = _pads(attrs, dims)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelFormatError(f"Conv with auto_pad {attrs['auto_pad']!r} is not supported")
    begin, end = pads[:dims], pads[dims:]
    if begin != end:
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
        begin = [0] * dims
    return F.conv2d(x, w, b, stride=attrs.get("strides", 1), padding=begin, dilation=attrs.get("dilations", 1),
                    groups=attrs.get("group", 1))


def _max_pool(x, *, attrs):
    pads = _pads(attrs, 2)
    begin, end = pads[:2], pads[2:]
    if begin != end:
        x = F.pad(x, [begin[1], end[1], begin[0], end[0]], value=-math.inf)
        begin = [0, 0]
    return F.max_pool2d(x, attrs["kernel_shape"], attrs.get("strides", 1), begin, attrs.get("dilations", 1),
                        ceil_mode=bool(attrs.get("ceil_mode", 0)))


def _resize(x, roi=None, scales=None, sizes=None, *, attrs):
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":
        raise ModelFormatError(f"Resize mode '{mode}' is not supported (nearest only)")
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=_ints(sizes)[2:], mode="nearest")
    factors = [float(s) for s in scales.reshape(-1).tolist()][2:]
    return F.interpolate(x, scale_factor=factors, mode="nearest")


def _slice(x, starts, ends, axes=None, steps=None, *, attrs):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 0:
            raise ModelFormatError("Slice with a negative step is not supported")
        size = x.shape[axis]
        index[axis] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
    return x[tuple(index)]


def _split(x, split=None, *, attrs, outputs: int):
    axis = attrs.get("axis", 0)
    sizes = list(attrs["split"]) if "split" in attrs else _ints(split)
    if sizes is None:
        sizes = [x.shape[axis] // outputs] * outputs
    return tuple(torch.split(x, sizes, dim=axis))


def _reduce(fn: Callable) -> Callable:
    def run(x, axes=None, *, attrs):
        dims = _axes(attrs, [x, axes], 1)
        keep = bool(attrs.get("keepdims", 1))
        if dims is None:
            dims = list(range(x.ndim))
        return fn(x, dims, keep)

    return run


def _gemm(a, b, c=None, *, attrs):
    a = a.transpose(-1, -2) if attrs.get("transA", 0) else a
    b = b.transpose(-1, -2) if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + attrs.get("beta", 1.0) * c


def _clip(x, low=None, high=None, *, attrs):
    low = attrs.get("min", low)
    high = attrs.get("max", high)
    low = low.item() if isinstance(low, torch.Tensor) else low
    high = high.item() if isinstance(high, torch.Tensor) else high
    return torch.clamp(x, low, high)


def _squeeze(x, axes=None, *, attrs):
    dims = _axes(attrs, [x, axes], 1)
    return x.squeeze() if dims is None else x.squeeze(tuple(d % x.ndim for d in dims))


def _unsqueeze(x, axes=None, *, attrs):
    dims = _axes(attrs, [x, axes], 1)
    for d in sorted(d % (x.ndim + len(dims)) for d in dims):
        x = x.unsqueeze(d)
    return x


def _gather(x, index, *, attrs):
    axis = attrs.get("axis", 0) % x.ndim
    picked = torch.index_select(x, axis, index.reshape(-1).long().to(x.device) % x.shape[axis])
    return picked.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1:])


def _constant(*, attrs):
    from onnx import numpy_helper

    if "value" not in attrs:
        raise ModelFormatError(f"Constant with {', '.join(attrs)} is not supported")
    return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())


def _cast(x, *, attrs):
    from onnx import helper

    return x.to(torch.from_numpy(helper.tensor_dtype_to_np_dtype(attrs["to"])(0).reshape(1)).dtype)


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Relu": lambda x, *, attrs: F.relu(x),
    "Sigmoid": lambda x, *, attrs: torch.sigmoid(x),
    "HardSigmoid": lambda x, *, attrs: torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1),
    "Mul": lambda a, b, *, attrs: a * b,
    "Add": lambda a, b, *, attrs: a + b,
    "Sub": lambda a, b, *, attrs: a - b,
    "Div": lambda a, b, *, attrs: a / b,
    "Pow": lambda a, b, *, attrs: a * a if b.numel() == 1 and float(b) == 2.0 else torch.pow(a, b),
    "Sqrt": lambda x, *, attrs: torch.sqrt(x),
    "Neg": lambda x, *, attrs: -x,
    "Exp": lambda x, *, attrs: torch.exp(x),
    "Max": lambda *xs, attrs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "Min": lambda *xs, attrs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Clip": _clip,
    "Concat": lambda *xs, attrs: torch.cat(xs, dim=attrs["axis"]),
    "Slice": _slice,
    "Split": _split,
    "MaxPool": _max_pool,
    "GlobalAveragePool": lambda x, *, attrs: x.mean(dim=(2, 3), keepdim=True),
    "Resize": _resize,
    "Flatten": lambda x, *, attrs: x.flatten(attrs.get("axis", 1)) if attrs.get("axis", 1) > 0 else x.reshape(1, -1),
    "Transpose": lambda x, *, attrs: x.permute(*attrs["perm"]) if "perm" in attrs else x.permute(*reversed(range(x.ndim))),
    "MatMul": lambda a, b, *, attrs: a @ b,
    "Gemm": _gemm,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Gather": _gather,
    "Shape": lambda x, *, attrs: torch.tensor(x.shape, dtype=torch.int64, device=x.device),
    "Constant": _constant,
    "Identity": lambda x, *, attrs: x,
    "Cast": _cast,
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.linalg.vector_norm(x, dim=d, keepdim=k)),
    "Softmax": lambda x, *, attrs: torch.softmax(x, dim=attrs.get("axis", -1)),
}
MULTI_OUTPUT = {"Split"}


def _shape(value_info) -> list:
    """A graph input's or output's shape: ints, ``None`` for dynamic axes."""
    return [d.dim_value if d.dim_value > 0 else None for d in value_info.type.tensor_type.shape.dim]


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module: ``forward(*inputs)`` returns the graph's outputs (a tuple, in its order).

    ``input_names`` / ``output_names`` are the graph's; ``batch``: the batch size the file was exported with.
    """

    def __init__(self, graph, name: str):
        super().__init__()
        from onnx import numpy_helper

        self.name = name
        initial = {init.name for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initial]
        self.output_names = [o.name for o in graph.output]
        self.output_shapes = [_shape(o) for o in graph.output]
        self.input_shapes = [_shape(i) for i in graph.input if i.name not in initial]
        self.input_shape = self.input_shapes[0] if self.input_shapes else []
        self.batch = self.input_shape[0] if self.input_shape and isinstance(self.input_shape[0], int) else None
        self._tensors: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            array = numpy_helper.to_array(init)
            tensor = torch.from_numpy(array.copy()) if array.dtype.kind != "U" else None
            self.register_buffer(f"t{i}", tensor)
            self._tensors[init.name] = f"t{i}"
        missing = sorted({n.op_type for n in graph.node
                          if n.op_type not in OPS and n.op_type != "Reshape" or n.domain not in ("", "ai.onnx")})
        if missing:
            raise ModelFormatError(f"'{name}' uses ONNX operators the torch backend does not map: {', '.join(missing)}")
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: dict[str, torch.Tensor | None] = {"": None}
        values.update(zip(self.input_names, inputs))
        batch = inputs[0].shape[0]
        for op, names, outs, attrs in self.nodes:
            args = [values[n] if n in values else getattr(self, self._tensors[n]) for n in names]
            if op == "Reshape":
                result = self._reshape(args[0], args[1], batch, attrs)
            elif op == "Constant":  # made on the CPU in the file's dtype: follow the input
                result = _constant(attrs=attrs).to(inputs[0].device)
                result = result.to(inputs[0].dtype) if result.is_floating_point() else result
            elif op in MULTI_OUTPUT:
                result = OPS[op](*args, attrs=attrs, outputs=len(outs))
            else:
                result = OPS[op](*args, attrs=attrs)
            values.update(zip(outs, result if isinstance(result, tuple) else (result,)))
        return tuple(values[n] for n in self.output_names)

    def _reshape(self, x: torch.Tensor, shape: torch.Tensor, batch: int, attrs: dict) -> torch.Tensor:
        target = _ints(shape)
        if not attrs.get("allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        if self.batch is not None and target and target[0] == self.batch and x.shape[0] == batch != self.batch:
            target[0] = batch  # a shape constant of the exported batch: keep the input's batch
        return x.reshape(target)


def load_onnx_module(path: str | os.PathLike) -> OnnxModule:
    """The ONNX file at ``path`` as an :class:`OnnxModule` (float32, CPU). ``ModelFormatError`` for a file that is
    not ONNX or uses an operator outside the mapped set."""
    import onnx

    name = os.path.basename(os.fspath(path))
    try:
        model = onnx.load(os.fspath(path))
    except Exception as err:  # onnx raises DecodeError and friends
        raise ModelFormatError(f"'{name}' is not a readable ONNX model: {str(err).splitlines()[0]}") from err
    return OnnxModule(model.graph, name).eval()
