"""Session fixtures: a real ComfyUI server with this pack in custom_nodes, its client, tiny models.

The session's host is ``COMFYUI_DIR`` (``python dev.py test`` sets it for each host it tests), else the cached pinned
ComfyUI; the pytest header names it.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

from devtools.host import comfyui_version, current_comfy_dir, python_for
from devtools.server import ComfyServer, link


def _claim_tests_package() -> None:
    """Make ``tests`` this folder: some wheels (torch-fidelity) install a top-level ``tests`` package into
    site-packages, which would otherwise shadow it (this folder has no ``__init__.py``, see pytest.ini)."""
    here = str(Path(__file__).resolve().parent)
    if here not in list(getattr(sys.modules.get("tests"), "__path__", [])):
        spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
        spec.submodule_search_locations = [here]
        sys.modules["tests"] = importlib.util.module_from_spec(spec)


_claim_tests_package()


def _host_line() -> str:
    path = current_comfy_dir()
    server = python_for(path)
    where = f"python {sys.executable}" + ("" if Path(sys.executable) == server else f", server python {server}")
    return f"ComfyUI host: {comfyui_version(path) or 'unknown version'} at {path} ({where})"


def pytest_report_header(config) -> str:
    return _host_line()


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(_host_line())


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    path = current_comfy_dir()
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
