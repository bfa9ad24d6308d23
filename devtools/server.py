"""Start and stop a real ComfyUI server (``main.py``) with this pack linked into its ``custom_nodes``."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from devtools.client import ComfyClient
from devtools.host import python_for

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-dreamoving"
MODEL_FOLDERS = ("checkpoints", "animatediff_models", "controlnet", "ipadapter", "clip_vision", "insightface",
                 "dreamoving/motion", "dreamoving/video_controlnet", "dreamoving/content_guider",
                 "dreamoving/preprocess")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link(src: Path, dest: Path) -> None:
    """Symlink ``dest`` -> ``src`` (a copy where symlinks are not allowed, e.g. Windows without privileges)."""
    if dest.is_symlink() or dest.exists():
        if dest.resolve() == src.resolve():
            return
        dest.unlink() if dest.is_symlink() or dest.is_file() else shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.symlink_to(src, target_is_directory=src.is_dir())
    except OSError:
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)


def prepare_base(base: Path) -> Path:
    """A ComfyUI ``--base-directory`` with the pack in ``custom_nodes`` and the model folders we use."""
    for sub in ("custom_nodes", "input", "output", "user", "temp", *(f"models/{f}" for f in MODEL_FOLDERS)):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link(PACK_DIR, base / "custom_nodes" / PACK_NAME)
    return base


class ComfyServer:
    """One ComfyUI process on 127.0.0.1, run by the interpreter of that ComfyUI's environment (``python_for``);
    ``client`` talks to it; ``log()`` returns what it printed. ``cpu``: start it with ``--cpu`` (tests, for
    deterministic output); otherwise ComfyUI picks the GPU when torch sees one."""

    def __init__(self, comfy_dir: Path, base: Path, port: int = 0, extra_args: tuple[str, ...] = (),
                 cpu: bool = True):
        self.comfy_dir = Path(comfy_dir)
        self.base = prepare_base(Path(base))
        self.port = port or free_port()
        self.extra_args = (*(("--cpu",) if cpu else ()), *extra_args)
        self.python = python_for(self.comfy_dir)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.client = ComfyClient(self.url, output_dir=self.base / "output")

    def start(self, timeout: float = 240) -> "ComfyServer":
        cmd = [str(self.python), str(self.comfy_dir / "main.py"), "--base-directory", str(self.base),
               "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch", *self.extra_args]
        self._log_file = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/CheckpointLoaderSimple", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_failures(self, pack: str = PACK_NAME) -> list[str]:
        """Log lines reporting that ``pack`` (a custom node folder name) failed to import."""
        return [ln for ln in self.log().splitlines()
                if ("IMPORT FAILED" in ln or "Cannot import" in ln) and pack in ln]

    def import_seconds(self, pack: str = PACK_NAME) -> float | None:
        """The import time ComfyUI measured for ``pack`` ("   0.1 seconds: .../custom_nodes/<pack>")."""
        for ln in self.log().splitlines():
            if "seconds" in ln and ln.rstrip().endswith(os.sep + pack):
                return float(ln.split()[0])
        return None

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log_file", None):
            self._log_file.close()
