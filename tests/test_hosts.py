"""The hosts the suite runs on: where a host archive is found (a CI clone included), what a torch pin must pair
with."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devtools import host
from devtools.server import PACK_DIR

FIND = textwrap.dedent("""
    import json, sys
    from devtools import host
    found, searched = host.find_archive("ComfyUI-0.8.0.tar.gz")
    print(json.dumps({"found": str(found) if found else None, "searched": [str(d) for d in searched]}))
""")


def fake_clone(root: Path, origin: Path | None) -> Path:
    """A checkout of this pack's devtools at ``root`` whose ``origin`` remote is the local folder ``origin``."""
    shutil.copytree(PACK_DIR / "devtools", root / "devtools", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    if origin is not None:
        subprocess.run(["git", "-C", str(root), "remote", "add", "origin", str(origin)], check=True)
    return root


def find_from(clone: Path, **env) -> dict:
    import json

    environ = {k: v for k, v in os.environ.items() if k != host.HOSTS_ENV}
    out = subprocess.run([sys.executable, "-c", FIND], cwd=clone, capture_output=True, text=True, timeout=120,
                         env={**environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def archive(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ComfyUI-0.8.0.tar.gz").write_bytes(b"")
    return folder / "ComfyUI-0.8.0.tar.gz"


def test_a_ci_clone_finds_the_archive_beside_its_origin_and_the_variable_comes_first(tmp_path):
    beside_origin = archive(tmp_path / "team" / "shared" / "hosts")
    origin = tmp_path / "team" / "main"
    origin.mkdir()
    clone = fake_clone(tmp_path / "ci" / "run1" / "clone", origin)
    result = find_from(clone)
    assert result["found"] == str(beside_origin)
    searched = [Path(d) for d in result["searched"]]
    assert searched.index(tmp_path / "ci" / "run1" / "shared" / "hosts") \
        < searched.index(tmp_path / "ci" / "shared" / "hosts") < searched.index(beside_origin.parent)

    ancestor = archive(tmp_path / "ci" / "shared" / "hosts")  # beside an ancestor of the clone: found before origin
    assert find_from(clone)["found"] == str(ancestor)
    chosen = archive(tmp_path / "elsewhere")
    assert find_from(clone, DREAMOVING_HOSTS=str(chosen.parent))["found"] == str(chosen)
    assert find_from(clone, DREAMOVING_HOSTS=str(chosen))["found"] == str(chosen)


def test_without_an_archive_the_newer_host_is_unavailable_with_the_places_searched(tmp_path):
    clone = fake_clone(tmp_path / "lonely" / "clone", origin=None)
    result = find_from(clone)
    assert result["found"] is None
    assert str(tmp_path / "lonely" / "shared" / "hosts") in result["searched"]
    code = ("from devtools import host\ntry:\n    host.ensure_host(host.NEWEST)\nexcept host.HostUnavailable as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DREAMOVING_CACHE": str(tmp_path / "cache"), "DREAMOVING_HOSTS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ComfyUI-0.8.0.tar.gz (ComfyUI 0.8.0) was not found" in out.stdout
    assert str(tmp_path / "lonely" / "shared" / "hosts") in out.stdout
    assert not (tmp_path / "cache" / "comfyui-0.8.0").exists()


@pytest.mark.parametrize("spec,problem", [
    ("torch==2.14.1 torchvision==0.29.1", None),
    ("--index-url https://download.pytorch.org/whl/cu121 torch==2.3.1+cu121 torchvision==0.18.1+cu121", None),
    ("torch==1.13.1 torchvision==0.14.1", None),
    ("torch>=2.1 torchvision", None),
    ("torch==2.14.1 torchvision==0.28.0", "torch 2.14 works only with torchvision 0.29.x"),
    ("torch==2.3.1+cu121 torchvision==0.18.1+cpu", "one build is cu121, the other cpu"),
    ("torch==2.3.1", "pins torch==2.3.1 but not torchvision"),
])
def test_torch_pins_must_pair_torch_with_its_torchvision(spec, problem):
    found = host.torch_spec_problem(spec)
    assert (found is None) if problem is None else (problem in found), found


def test_a_mismatched_torch_pin_installs_nothing(tmp_path):
    env = {**os.environ, "DREAMOVING_CACHE": str(tmp_path), "DREAMOVING_TORCH": "torch==2.14.1 torchvision==0.20.1"}
    out = subprocess.run([sys.executable, "-c", "from devtools import host; host.ensure_venv()"], cwd=PACK_DIR,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert "torch 2.14 works only with torchvision 0.29.x" in out.stderr and "Nothing was installed" in out.stderr
    assert not (tmp_path / "venv").exists()
