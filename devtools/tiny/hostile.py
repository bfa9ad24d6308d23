"""Bad model files and folders for the hostile-input tests, each in the format a user meets it in.

``bad_model(kind)`` builds one of ``BAD_KINDS`` (a file, or a folder for the folder-shaped models), derived from the
tiny good models so everything but the defect is real: random bytes in a ``.ckpt``, an empty file, a wrong-rank
tensor, a truncated download, a pickle that would run code (it would create ``unsafe_marker()``), ONNX models whose
input is not an image, damaged ZoeDepth folders. ``training_checkpoint()`` is a good motion module saved the way a
training loop saves it (weights + optimizer state + step + epoch + learning rate).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from devtools.tiny import cached, tiny_dir

VERSION = "v1"
BAD_KINDS = {
    # kind: what it is (file name suffixes in SUFFIXES; the others are folders)
    "random_ckpt": "random bytes named .ckpt",
    "empty_safetensors": "a 0-byte .safetensors",
    "wrong_rank_motion": "a motion module whose positional table is 1-D",
    "truncated_controlnet": "the first half of a ControlNet .pth",
    "wrong_rank_controlnet": "a ControlNet whose first convolution is 1-D",
    "unsafe_guider": "an IP-Adapter .bin whose pickle would run code",
    "random_clip": "random bytes named .safetensors",
    "rank3_insightface": "an InsightFace pack whose ArcFace takes (N, 112, 112)",
    "rank3_detector": "a DWPose detector whose input is (1, 8400, 85)",
    "random_onnx": "random bytes named .onnx",
    "truncated_zoedepth": "a ZoeDepth folder whose model.safetensors is cut in half",
    "unsafe_zoedepth": "a ZoeDepth folder whose only weights are a pickle that would run code",
    "broken_config_zoedepth": "a ZoeDepth folder whose config.json is not JSON",
}
SUFFIXES = {"random_ckpt": ".ckpt", "empty_safetensors": ".safetensors", "wrong_rank_motion": ".safetensors",
            "truncated_controlnet": ".pth", "wrong_rank_controlnet": ".safetensors", "unsafe_guider": ".bin",
            "random_clip": ".safetensors", "rank3_detector": ".onnx", "random_onnx": ".onnx"}


def unsafe_marker() -> Path:
    """The file the unsafe pickles would create if they ran; it must never exist."""
    return tiny_dir() / "hostile" / "UNSAFE_PICKLE_RAN"


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _random_bytes(path: Path, size: int = 4096) -> None:
    path.write_bytes(random.Random(path.name).randbytes(size))


def _export(module, example, path: Path, input_name: str, output_names: list[str]) -> None:
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name], output_names=output_names,
                          dynamo=False, opset_version=17)


def _build(kind: str, path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from devtools.tiny import content_guider, controlnet, motion, preprocess

    if kind in ("random_ckpt", "random_clip", "random_onnx"):
        _random_bytes(path)
    elif kind == "empty_safetensors":
        path.write_bytes(b"")
    elif kind == "wrong_rank_motion":
        weights = load_file(str(motion.motion_module("v2", "safetensors")))
        key = next(k for k in weights if k.endswith(".pos_encoder.pe"))
        weights[key] = weights[key].flatten()
        save_file(weights, str(path))
    elif kind == "truncated_controlnet":
        data = controlnet.sd15_controlnet("pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "wrong_rank_controlnet":
        weights = load_file(str(controlnet.sd15_controlnet("safetensors")))
        weights["control_model.input_blocks.0.0.weight"] = weights["control_model.input_blocks.0.0.weight"].flatten()
        save_file(weights, str(path))
    elif kind == "unsafe_guider":
        weights = content_guider.ip_adapter_weights("plus")
        weights["ip_adapter"]["payload"] = _Payload(str(unsafe_marker()))
        torch.save(weights, str(path))
    elif kind == "rank3_insightface":
        pack = content_guider.insightface_root() / "models" / "buffalo_l"
        path.mkdir()
        shutil.copy2(pack / "det_10g.onnx", path / "det_10g.onnx")
        _export(torch.nn.Flatten(), torch.zeros(1, 112, 112), path / "w600k_r50.onnx", "input.1", ["embedding"])
    elif kind == "rank3_detector":
        _export(torch.nn.Identity(), torch.zeros(1, 8400, 85), path, "images", ["output"])
    elif kind.endswith("_zoedepth"):
        shutil.copytree(preprocess.zoedepth_dir(), path)
        weights = path / "model.safetensors"
        if kind == "truncated_zoedepth":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif kind == "unsafe_zoedepth":
            state = load_file(str(weights))
            weights.unlink()
            torch.save({**state, "payload": _Payload(str(unsafe_marker()))}, str(path / "pytorch_model.bin"))
        else:
            (path / "config.json").write_text('{"model_type": "zoedepth", ')
    else:
        raise ValueError(f"kind must be one of {sorted(BAD_KINDS)}")


def bad_model(kind: str) -> Path:
    """The bad file or folder ``kind`` (``BAD_KINDS``), named ``hostile_<kind><suffix>``."""
    return cached(f"hostile/{VERSION}/hostile_{kind}{SUFFIXES.get(kind, '')}", lambda path: _build(kind, path))


def training_checkpoint() -> Path:
    """The tiny v2 motion module as a training loop saves it: ``{"state_dict", "optimizer", "global_step", "epoch",
    "lr"}``, the optimizer holding tensors of its own (AdamW moments)."""

    def build(path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        from devtools.tiny.motion import motion_module

        weights = load_file(str(motion_module("v2", "safetensors")))
        moments = {i: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v), "step": torch.tensor(3.0)}
                   for i, v in enumerate(list(weights.values())[:4])}
        torch.save({"state_dict": weights, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4}]},
                    "global_step": 3, "epoch": 0, "lr": 1e-4}, str(path))

    return cached(f"hostile/{VERSION}/training_checkpoint_mm.ckpt", build)
