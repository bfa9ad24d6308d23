"""Core safety without ComfyUI: model names resolved only inside their folders, checkpoints unwrapped by content,
corrupt and unsafe files told apart."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from dreamoving_core import paths
from dreamoving_core.errors import InputMismatchError, ModelFormatError
from dreamoving_core.io import load_state_dict, unwrap_checkpoint, verify_weights_file


@pytest.fixture
def tree(tmp_path):
    """models/{a.ckpt, sub/b.onnx, pack/x.onnx, link_in -> a.ckpt, link_out -> ../secret/, dir_out -> ../secret}."""
    models, secret = tmp_path / "models", tmp_path / "secret"
    (models / "sub").mkdir(parents=True)
    (models / "pack").mkdir()
    secret.mkdir()
    for f in (models / "a.ckpt", models / "sub" / "b.onnx", models / "pack" / "x.onnx", secret / "s.ckpt",
              secret / "x.onnx"):
        f.write_bytes(b"x")
    (models / "link_in").symlink_to(models / "a.ckpt")
    (models / "link_out.ckpt").symlink_to(secret / "s.ckpt")
    (models / "dir_out").symlink_to(secret, target_is_directory=True)
    return models, secret


def test_names_inside_the_folder_resolve_and_missing_ones_are_none(tree):
    models, _ = tree
    assert paths.find("a.ckpt", [models]) == models / "a.ckpt"
    assert paths.find("sub/b.onnx", [models]) == models / "sub" / "b.onnx"
    assert paths.find("sub\\b.onnx", [models]) == models / "sub" / "b.onnx"
    assert paths.find("link_in", [models]) == models / "a.ckpt"  # a link that stays inside is fine
    assert paths.find("pack", [models], folder=True) == models / "pack"
    assert paths.find("pack", [models]) is None  # a folder is not a file
    assert paths.find("nothing.ckpt", [models]) is None


@pytest.mark.parametrize("name", ["../secret/s.ckpt", "sub/../../secret/s.ckpt", "/etc/passwd", "\\\\server\\share",
                                  "C:\\secret.ckpt", "c:secret.ckpt", "", ".", "./a.ckpt", "sub//b.onnx",
                                  "a.ckpt\x00.png", "..\\secret\\s.ckpt"])
def test_names_that_could_leave_the_folder_are_refused_before_any_lookup(tree, name):
    models, _ = tree
    with pytest.raises(InputMismatchError, match="is not a model name"):
        paths.find(name, [models])


def test_links_pointing_out_of_every_root_are_refused_but_not_into_another_root(tree):
    models, secret = tree
    for name, folder in (("link_out.ckpt", False), ("dir_out", True), ("dir_out/s.ckpt", False)):
        with pytest.raises(InputMismatchError, match="leads outside the model folders"):
            paths.find(name, [models], folder=folder)
    assert paths.find("link_out.ckpt", [models, secret]) == secret / "s.ckpt"


def test_listings_leave_out_what_resolves_outside(tree):
    models, _ = tree
    assert paths.list_folders([models], lambda p: any(p.glob("*.onnx"))) == ["pack", "sub"]
    assert paths.resolvable(["a.ckpt", "link_out.ckpt", "dir_out/s.ckpt", "../secret/s.ckpt", "sub/b.onnx"],
                            [models]) == ["a.ckpt", "sub/b.onnx"]


def test_a_training_checkpoint_is_unwrapped_by_content(tmp_path):
    weights = {"down.weight": torch.ones(2, 2), "down.bias": torch.zeros(2)}
    checkpoint = {"state_dict": weights, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}},
                                                       "param_groups": [{"lr": 1e-4}]},
                  "global_step": 10, "epoch": 1, "lr": 1e-4, "callbacks": {}}
    torch.save(checkpoint, tmp_path / "train.ckpt")
    assert load_state_dict(tmp_path / "train.ckpt").keys() == weights.keys()
    assert unwrap_checkpoint({"model": weights, "step": 3}) is weights
    assert unwrap_checkpoint({"only": weights}) is weights
    nested = {"image_proj": {"proj.weight": torch.ones(1)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(1)}}
    assert unwrap_checkpoint(nested) is nested
    assert unwrap_checkpoint(weights) is weights


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_corrupt_and_unsafe_files_get_different_words_and_nothing_runs(tmp_path):
    marker = tmp_path / "RAN"
    torch.save({"w": torch.ones(1), "p": _Payload(str(marker))}, tmp_path / "unsafe.ckpt")
    (tmp_path / "random.ckpt").write_bytes(os.urandom(2048))
    torch.save({"w": torch.ones(64)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    save_file({"w": torch.ones(64)}, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 10])
    (tmp_path / "empty.bin").write_bytes(b"")
    expected = {"unsafe.ckpt": "unsafe pickle", "random.ckpt": "truncated or corrupt",
                "truncated.pt": "truncated or corrupt", "truncated.safetensors": "truncated or corrupt",
                "empty.bin": "is empty"}
    for name, words in expected.items():
        for check in (load_state_dict, verify_weights_file):
            with pytest.raises(ModelFormatError) as err:
                check(tmp_path / name)
            assert str(err.value).startswith(f"'{name}'") and words in str(err.value), str(err.value)
            assert ("unsafe" in str(err.value)) == (name == "unsafe.ckpt")
            assert "weights_only" not in str(err.value)  # torch's advice to load the file unsafely
    assert not marker.exists()
    verify_weights_file(tmp_path / "good.safetensors")
