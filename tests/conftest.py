"""Session fixtures: a real ComfyUI server with this pack in custom_nodes, its client, tiny models."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from devtools.server import ComfyServer, link
from devtools.host import COMFYUI_VERSION, cache_dir


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    path = Path(os.environ.get("COMFYUI_DIR") or cache_dir() / f"comfyui-{COMFYUI_VERSION}")
    if not (path / "main.py").exists():
        pytest.fail(f"no ComfyUI at {path}: run the tests through `python dev.py test`, or set COMFYUI_DIR")
    return path


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, tmp_path_factory) -> ComfyServer:
    server = ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_base")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy(comfy_server):
    """The running server's client (``comfy.run(graph)``); fails loudly if our pack did not import."""
    failures = comfy_server.import_failures()
    if failures:
        pytest.fail("the pack failed to import in ComfyUI:\n" + "\n".join(failures) + "\n\n" + comfy_server.log()[-6000:])
    client = comfy_server.client
    client.server = comfy_server
    return client


@pytest.fixture(scope="session")
def comfy_base(comfy_server) -> Path:
    return comfy_server.base


@pytest.fixture(scope="session")
def install_model(comfy_base):
    """``install_model(src, folder, name) -> name``: link a (tiny) model file or folder into ``models/<folder>``."""

    def install(src: Path, folder: str, name: str | None = None) -> str:
        name = name or Path(src).name
        link(Path(src), comfy_base / "models" / folder / name)
        return name

    return install


@pytest.fixture(scope="session")
def tiny_checkpoint(install_model) -> str:
    from devtools.tiny.checkpoint import sd15_checkpoint

    return install_model(sd15_checkpoint(), "checkpoints")


@pytest.fixture(scope="session")
def hide_models(comfy_base):
    """``with hide_models(("dreamoving/preprocess", "yolox_l.onnx"), ...):`` makes those model files absent for the
    block (other tests may have installed a tiny file under a real name) and puts them back afterwards."""

    @contextlib.contextmanager
    def hide(*entries: tuple[str, str]):
        moved = []
        try:
            for folder, name in entries:
                path = comfy_base / "models" / folder / name
                if path.exists() or path.is_symlink():
                    aside = path.with_name(f".hidden-{name}")
                    path.rename(aside)
                    moved.append((aside, path))
            yield
        finally:
            for aside, path in moved:
                aside.rename(path)

    return hide
