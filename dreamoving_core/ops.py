"""The layer classes every DreaMoving model is built from (an injectable ops namespace), and how a model a library
built is given them.

``ops`` is any namespace with ``Linear``, ``Conv2d``, ``ConvTranspose2d``, ``GroupNorm`` and ``LayerNorm`` classes
taking torch's constructor arguments. :data:`TORCH_OPS` is ``torch.nn`` itself. A host passes its own: ComfyUI's
``comfy.ops`` layers cast their weights to the input's device and dtype on the fly, which its partial (low-VRAM)
loading relies on for every layer it leaves on the offload device.

Our own models take ``ops`` when they are built. A model a library builds (transformers' ZoeDepth) is given them
afterwards by :func:`adopt_ops`; what no layer holds, :func:`stray_tensors` lists (a host moves those with the model
itself, as no layer casts them).
"""
from __future__ import annotations

from types import SimpleNamespace

from torch import nn

LAYER_NAMES = ("Linear", "Conv2d", "ConvTranspose2d", "GroupNorm", "LayerNorm")

TORCH_OPS = SimpleNamespace(**{name: getattr(nn, name) for name in LAYER_NAMES})
"""The plain ``torch.nn`` layers (what models use outside a host)."""


def _layer_classes(ops) -> dict[str, type]:
    """``{name: ops class}`` for the layers ``ops`` provides; ``TypeError`` for one that is not a torch subclass."""
    classes = {}
    for name in LAYER_NAMES:
        cls = getattr(ops, name, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, getattr(nn, name))):
            raise TypeError(f"ops.{name} must be a subclass of torch.nn.{name}, got {cls!r}")
        classes[name] = cls
    return classes


def adopt_ops(module: nn.Module, ops) -> nn.Module:
    """Turn every plain ``torch.nn`` layer of ``module`` into the ``ops`` class of the same name, in place.

    Only layers whose class is exactly ``torch.nn.<name>`` change class (to ``ops.<name>``, a subclass with the same
    state, as ComfyUI's layers are: parameters, buffers and hooks stay as they are); a library's own subclasses
    (e.g. a LayerNorm that computes in fp32) keep their behaviour. Returns ``module``.
    """
    swaps = {getattr(nn, name): cls for name, cls in _layer_classes(ops).items() if cls is not getattr(nn, name)}
    for layer in module.modules():
        target = swaps.get(type(layer))
        if target is not None:
            layer.__class__ = target
    return module


def stray_tensors(module: nn.Module, ops) -> list[str]:
    """Names (as in ``module.state_dict()``) of the parameters and buffers no ``ops`` layer holds (a class token,
    layer scales, position tables, constant index buffers): a host that casts layer weights on the fly and moves
    only the layers that fit has to move these with the model."""
    layers = tuple(_layer_classes(ops).values())
    return [name for layer_name, layer in module.named_modules() if not isinstance(layer, layers)
            for tensors in (layer.named_parameters, layer.named_buffers)
            for name, _ in tensors(prefix=layer_name, recurse=False)]
