"""The model files the shipped workflows use: where each goes in a ComfyUI ``models`` folder, where to get it, and
a check with our own loaders that a file found there is the kind of model its loader expects.

One :class:`ModelFile` per file (or folder) a loader widget names. :data:`LOADER_INPUTS` says which node input loads
from which folder, so :func:`required_models` reads the set a workflow needs off its API graph. :func:`download`
fetches over HTTP(S) with resume (a ``.partial`` file continued with a ``Range`` request); archives are unpacked.
Only the standard library and the pack's loaders are used.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DreaMovingError, ModelFormatError

HF = "https://huggingface.co"

# ComfyUI folder name -> sub-folders of ``models/`` its loaders search (the first is where downloads go).
FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "animatediff_models": ("animatediff_models", "dreamoving/motion"),
    "controlnet": ("controlnet", "dreamoving/video_controlnet"),
    "ipadapter": ("ipadapter", "dreamoving/content_guider"),
    "clip_vision": ("clip_vision",),
    "insightface": ("insightface/models", "insightface"),
    "dreamoving_preprocess": ("dreamoving/preprocess",),
}

# (node class, input) -> the ComfyUI folder the widget's file comes from.
LOADER_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("DreaMovingLoadMotionModule", "model_name"): "animatediff_models",
    ("DreaMovingLoadVideoControlNet", "controlnet_name"): "controlnet",
    ("DreaMovingLoadVideoControlNet", "motion_module"): "animatediff_models",
    ("DreaMovingLoadContentGuider", "guider_name"): "ipadapter",
    ("DreaMovingLoadOpenClipVision", "clip_name"): "clip_vision",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("DreaMovingLoadInsightFace", "pack"): "insightface",
    ("DreaMovingDWPose", "detector"): "dreamoving_preprocess",
    ("DreaMovingDWPose", "estimator"): "dreamoving_preprocess",
    ("DreaMovingScoreVideo", "detector"): "dreamoving_preprocess",
    ("DreaMovingScoreVideo", "estimator"): "dreamoving_preprocess",
    ("DreaMovingZoeDepth", "model"): "dreamoving_preprocess",
}


@dataclass(frozen=True)
class ModelFile:
    """A model a workflow names: ``name`` in ComfyUI folder ``folder``, of ``kind`` (see :data:`CHECKS`).

    ``files``: ``(path inside the model, URL)`` pairs; a single file has one pair with path ``""``, a folder model
    one pair per file, an archive (``.zip`` URL) one pair unpacked into the model's folder."""

    name: str
    folder: str
    kind: str
    files: tuple[tuple[str, str], ...]
    about: str
    page: str

    @property
    def url(self) -> str:
        """The download URL of a single-file model (the one the ComfyUI frontend's missing-models dialog shows)."""
        return self.files[0][1]

    @property
    def is_single_file(self) -> bool:
        return len(self.files) == 1 and not self.files[0][0] and not self.url.endswith(".zip")

    def target(self, models_dir: str | os.PathLike) -> Path:
        """Where a download of this model goes under ``models_dir``."""
        return Path(models_dir) / FOLDERS[self.folder][0] / self.name

    def find(self, models_dir: str | os.PathLike) -> Path | None:
        """The copy of this model under ``models_dir`` its loader would use, if any."""
        for sub in FOLDERS[self.folder]:
            path = Path(models_dir) / sub / self.name
            if path.exists():
                return path
        return None


def _single(name: str, folder: str, kind: str, url: str, about: str, page: str) -> ModelFile:
    return ModelFile(name, folder, kind, (("", url),), about, page)


ZOEDEPTH_REPO = f"{HF}/Intel/zoedepth-nyu-kitti"
CATALOG: tuple[ModelFile, ...] = (
    _single("v1-5-pruned-emaonly-fp16.safetensors", "checkpoints", "sd15_checkpoint",
            f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
            "Stable Diffusion 1.5 (any SD1.5 checkpoint can take its place)",
            f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive"),
    _single("mm_sd_v15_v2.ckpt", "animatediff_models", "motion_module",
            f"{HF}/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
            "AnimateDiff v2 motion module: the motion blocks of the U-Net and of the Video ControlNet",
            f"{HF}/guoyww/animatediff"),
    _single("control_v11p_sd15_openpose_fp16.safetensors", "controlnet", "controlnet",
            f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
            "control_v11p_sd15_openpose_fp16.safetensors",
            "OpenPose ControlNet 1.1: the Video ControlNet's pose branch",
            f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors"),
    _single("control_v11f1p_sd15_depth_fp16.safetensors", "controlnet", "controlnet",
            f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
            "control_v11f1p_sd15_depth_fp16.safetensors",
            "Depth ControlNet 1.1: the Video ControlNet's depth branch",
            f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors"),
    _single("ip-adapter-faceid-plusv2_sd15.bin", "ipadapter", "content_guider",
            f"{HF}/h94/IP-Adapter-FaceID/resolve/main/ip-adapter-faceid-plusv2_sd15.bin",
            "IP-Adapter FaceID Plus v2: the Content Guider's face branch (ArcFace + CLIP)",
            f"{HF}/h94/IP-Adapter-FaceID"),
    _single("ip-adapter-plus_sd15.safetensors", "ipadapter", "content_guider",
            f"{HF}/h94/IP-Adapter/resolve/main/models/ip-adapter-plus_sd15.safetensors",
            "IP-Adapter Plus: the Content Guider's cloth / reference-image branch",
            f"{HF}/h94/IP-Adapter"),
    _single("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision", "clip_vision",
            f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
            "OpenCLIP ViT-H/14 image encoder of the Content Guider (IP-Adapter's image_encoder, renamed)",
            f"{HF}/h94/IP-Adapter"),
    ModelFile("buffalo_l", "insightface", "insightface",
              (("", "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"),),
              "InsightFace buffalo_l pack: face detector + ArcFace identity for the face branch",
              "https://github.com/deepinsight/insightface/tree/master/python-package"),
    _single("yolox_l.onnx", "dreamoving_preprocess", "yolox", f"{HF}/yzd-v/DWPose/resolve/main/yolox_l.onnx",
            "DWPose stage 1: YOLOX person detector", f"{HF}/yzd-v/DWPose"),
    _single("dw-ll_ucoco_384.onnx", "dreamoving_preprocess", "dwpose",
            f"{HF}/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx",
            "DWPose stage 2: whole-body keypoints", f"{HF}/yzd-v/DWPose"),
    ModelFile("zoedepth-nyu-kitti", "dreamoving_preprocess", "zoedepth",
              tuple((f, f"{ZOEDEPTH_REPO}/resolve/main/{f}")
                    for f in ("config.json", "model.safetensors", "preprocessor_config.json")),
              "ZoeDepth (NYU + KITTI) depth estimator, a transformers folder", ZOEDEPTH_REPO),
)
BY_NAME: dict[tuple[str, str], ModelFile] = {(m.folder, m.name): m for m in CATALOG}


def required_models(graph: dict) -> list[tuple[str, str]]:
    """``(folder, name)`` of every model the API-format ``graph`` loads, in node order, without repeats."""
    needed: list[tuple[str, str]] = []
    for node in graph.values():
        for name, value in node.get("inputs", {}).items():
            folder = LOADER_INPUTS.get((node.get("class_type"), name))
            if folder and isinstance(value, str) and (folder, value) not in needed:
                needed.append((folder, value))
    return needed


# ------------------------------------------------------------------------------------------------- the checks


def _check_checkpoint(path: Path) -> str:
    """An SD1.x checkpoint: a U-Net under ``model.diffusion_model.`` whose cross-attention reads 768-wide text."""
    from .io import load_state_dict

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
                to_k = next((k for k in keys if k.startswith("model.diffusion_model.") and "attn2.to_k.weight" in k),
                            None)
                width = f.get_slice(to_k).get_shape()[-1] if to_k else None
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise ModelFormatError(f"'{path.name}' is not a readable safetensors file ({err})") from err
    else:
        sd = load_state_dict(path)
        to_k = next((k for k in sd if k.startswith("model.diffusion_model.") and "attn2.to_k.weight" in k), None)
        width = sd[to_k].shape[-1] if to_k else None
    if width is None:
        raise ModelFormatError(f"'{path.name}' is not a Stable Diffusion checkpoint (no model.diffusion_model U-Net "
                               "with cross-attention)")
    family = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}.get(width, f"{width}-wide text")
    if width != 768:
        raise ModelFormatError(f"'{path.name}' is an {family} checkpoint; DreaMoving needs an SD1.5 checkpoint")
    return "SD1.5 checkpoint"


def _check_motion(path: Path) -> str:
    from .motion.format import load_motion_module

    module = load_motion_module(path)
    return f"motion module ({len(module.down_blocks)} levels, {module.config.positional_length} positions)"


def _check_controlnet(path: Path) -> str:
    from .control.format import load_video_controlnet

    load_video_controlnet(path)
    return "SD1.5 ControlNet"


def _check_guider(path: Path) -> str:
    from .guider.model import load_content_guider

    guider = load_content_guider(path)
    return f"{guider.format} ({', '.join(guider.sources)})"


def _check_clip_vision(path: Path) -> str:
    from .guider.clip_image import vision_state_dict
    from .io import load_state_dict

    _, config = vision_state_dict(load_state_dict(path), path.name)
    return f"CLIP vision {config.name}"


def _check_onnx(stage: str) -> Callable[[Path], str]:
    def check(path: Path) -> str:
        from .preprocess.dwpose import DWPose

        model = DWPose(path, path, device="cpu")
        getattr(model, stage)  # opening the session checks its inputs and outputs
        return "DWPose " + ("YOLOX detector" if stage == "detector" else "whole-body estimator")

    return check


def _check_zoedepth(path: Path) -> str:
    from .preprocess.zoedepth import load_zoedepth

    load_zoedepth(path)
    return "ZoeDepth model folder"


def _check_insightface(path: Path) -> str:
    from .guider.face_id import FaceAnalyzer

    FaceAnalyzer(path, "CPU")
    return "InsightFace pack (detector + ArcFace)"


CHECKS: dict[str, Callable[[Path], str]] = {
    "sd15_checkpoint": _check_checkpoint, "motion_module": _check_motion, "controlnet": _check_controlnet,
    "content_guider": _check_guider, "clip_vision": _check_clip_vision, "yolox": _check_onnx("detector"),
    "dwpose": _check_onnx("estimator"), "zoedepth": _check_zoedepth, "insightface": _check_insightface,
}


def check_model(model: ModelFile, path: str | os.PathLike) -> str:
    """A short description of the model at ``path`` when it is the kind ``model`` needs; ``ModelFormatError`` (or
    another ``DreaMovingError``) with the loader's own message when it is not."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"'{path}' does not exist")
    try:
        return CHECKS[model.kind](path)
    except DreaMovingError:
        raise
    except Exception as err:  # a library below our loaders failing on a damaged file
        raise ModelFormatError(f"'{path.name}' could not be read as a {model.kind}: {err}") from err


# ------------------------------------------------------------------------------------------------ downloading


Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def download_file(url: str, dest: str | os.PathLike, progress: Progress | None = None, chunk: int = 1 << 20,
                  timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.partial`` when a previous attempt left one. The file appears
    at ``dest`` only when complete."""
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "comfyui-dreamoving",
                                                   **({"Range": f"bytes={done}-"} if done else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and done:  # the partial file is already whole
            os.replace(partial, dest)
            return dest
        raise DreaMovingError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from err
    except OSError as err:
        raise DreaMovingError(f"downloading {url} failed: {err}") from err
    with response:
        resumed = response.status == 206
        if not resumed:
            done = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as out:
            while block := response.read(chunk):
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    if total is not None and done != total:
        raise DreaMovingError(f"downloading {url} stopped at {done} of {total} bytes; run again to resume")
    os.replace(partial, dest)
    return dest


def _unpack(archive: Path, folder: Path) -> None:
    """Unzip ``archive`` into ``folder``; a single top-level folder named like ``folder`` is flattened."""
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        top = {n.split("/", 1)[0] for n in names}
        strip = f"{folder.name}/" if top == {folder.name} and all("/" in n for n in names) else ""
        for name in names:
            relative = name[len(strip):]
            target = (folder / relative).resolve()
            if folder.resolve() not in target.parents:
                raise DreaMovingError(f"'{archive.name}' holds a path outside its folder: {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def download(model: ModelFile, models_dir: str | os.PathLike, progress: Callable[[str], Progress] | None = None,
             url_for: Callable[[str], str] = lambda url: url) -> Path:
    """Fetch ``model`` into its folder under ``models_dir`` and check it (a download that fails the check is removed);
    returns where it is.

    ``progress(label)`` makes a progress callback per file; ``url_for`` maps each URL (e.g. to a mirror)."""
    target = model.target(models_dir)
    for relative, url in model.files:
        label = f"{model.name}/{relative}" if relative else model.name
        callback = progress(label) if progress else None
        if url.endswith(".zip"):
            archive = target.with_name(target.name + ".zip")
            download_file(url_for(url), archive, callback)
            _unpack(archive, target)
            archive.unlink()
        else:
            download_file(url_for(url), target / relative if relative else target, callback)
    try:
        check_model(model, target)
    except DreaMovingError as err:  # what we fetched is not the model: take it away again, it is not the user's
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        raise DreaMovingError(f"the download of {model.name} is not a {model.kind} ({err}); it was removed") from err
    return target

