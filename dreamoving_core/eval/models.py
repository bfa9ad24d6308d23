"""The models the scores run, and where their files live.

The identity, pose and consistency scores use the pack's own models (an InsightFace pack, DWPose, the OpenCLIP
ViT-H/14 image tower). The reference-based scores need feature networks the pack does not otherwise use; their files
go into one folder, ``models/dreamoving/eval/`` (:data:`FEATURE_FILES`). A ``.safetensors`` file of the same stem
is taken before the original pickle. A score whose model or file is absent is reported unavailable, naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import InputMismatchError

if TYPE_CHECKING:
    from ..guider.face_id import FaceAnalyzer
    from ..preprocess.dwpose import DWPose

EVAL_FOLDER = os.path.join("dreamoving", "eval")
# score -> the files that can serve it, best first, with the network each one is
FEATURE_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "paired/lpips": (("vgg16-397923af.pth", "vgg"), ("alexnet-owt-7be5be79.pth", "alex")),
    "distribution/fid": (("pt_inception-2015-12-05-6726825d.pth", "inception"),),
    "distribution/fid_vid": (("resnet-50-kinetics.pth", "resnet3d"),),
    "distribution/fvd": (("i3d_pretrained_400.pt", "i3d"),),
}
FEATURE_SOURCES = {
    "vgg16-397923af.pth": "download.pytorch.org/models/vgg16-397923af.pth (torchvision)",
    "alexnet-owt-7be5be79.pth": "download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision)",
    "pt_inception-2015-12-05-6726825d.pth": "github.com/mseitzer/pytorch-fid/releases (v0.3.0)",
    "resnet-50-kinetics.pth": "github.com/kenshohara/3D-ResNets-PyTorch (ResNet-50, Kinetics, shortcut B)",
    "i3d_pretrained_400.pt": "the I3D Kinetics-400 weights of DisCo / VideoGPT (piergiaj/pytorch-i3d layout)",
}
DWPOSE_FILES = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")
INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")
CLIP_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
# what each model of EvalModels is, for the 'unavailable' entries of a score whose model is absent
DEFAULT_NEEDS = {
    "faces": f"an InsightFace pack ({' or '.join(INSIGHTFACE_PACKS)}) in models/insightface/models",
    "clip": f"a CLIP ViT-H/14 image tower ({CLIP_FILE}) in models/clip_vision",
    "dwpose": f"DWPose's {' and '.join(DWPOSE_FILES)} (huggingface.co/yzd-v/DWPose) in models/dreamoving/preprocess",
}

ImageEmbedder = Callable[[torch.Tensor], torch.Tensor]
"""Images ``(B, H, W, 3)`` in 0 … 1 → embeddings ``(B, D)``."""


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def find_feature_file(folders: tuple[Path, ...], score: str) -> tuple[Path, str] | None:
    """The first file in ``folders`` that serves ``score`` (``.safetensors`` of the same stem first) and its
    network."""
    for name, net in FEATURE_FILES[score]:
        for folder in folders:
            for candidate in (folder / (Path(name).stem + ".safetensors"), folder / name):
                if candidate.is_file():
                    return candidate, net
    return None


def feature_file_hint(score: str, folders: tuple[Path, ...]) -> str:
    """What ``score`` needs, for its 'unavailable' entry."""
    names = " or ".join(f"'{name}' ({FEATURE_SOURCES[name]})" for name, _ in FEATURE_FILES[score])
    where = " or ".join(f"'{f}'" for f in folders) or f"models/{EVAL_FOLDER.replace(os.sep, '/')}"
    return f"needs {names} in {where}"


@dataclass
class EvalModels:
    """What :func:`~dreamoving_core.eval.score.score_video` runs; each model may be absent (``None``).

    ``faces``: a :class:`~dreamoving_core.guider.face_id.FaceAnalyzer`; ``clip``: an :data:`ImageEmbedder` (e.g.
    :meth:`from_clip_encoder`); ``dwpose``: a :class:`~dreamoving_core.preprocess.dwpose.DWPose`;
    ``feature_dirs``: the folders of :data:`FEATURE_FILES`. ``needs``: for each model (``"faces"``, ``"clip"``,
    ``"dwpose"``), what to provide when it is absent, as the caller words it (a node input, a folder).
    Loaded feature networks are kept, so one ``EvalModels`` scores many videos.
    """

    faces: FaceAnalyzer | None = None
    clip: ImageEmbedder | None = None
    dwpose: DWPose | None = None
    feature_dirs: tuple[Path, ...] = ()
    device: torch.device = field(default_factory=pick_device)
    detect_resolution: int = 512
    needs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NEEDS))
    _nets: dict[str, tuple] = field(default_factory=dict, repr=False)

    @staticmethod
    def from_clip_encoder(encoder) -> ImageEmbedder:
        """An :data:`ImageEmbedder` of a :class:`~dreamoving_core.guider.clip_image.ClipImageEncoder`."""
        return lambda images: encoder.encode(images).image_embeds

    @classmethod
    def from_models_dir(cls, models_dir: str | os.PathLike | None, *, insightface: str | os.PathLike | None = None,
                        clip: str | os.PathLike | None = None, dwpose: tuple[str, str] | None = None,
                        eval_dir: str | os.PathLike | None = None, device: str | torch.device = "auto",
                        detect_resolution: int = 512) -> EvalModels:
        """Models from a folder laid out like ComfyUI's ``models`` (``insightface/models/<pack>``,
        ``clip_vision/<ViT-H file>``, ``dreamoving/preprocess/{yolox_l,dw-ll_ucoco_384}.onnx``,
        ``dreamoving/eval/``); explicit paths (an InsightFace pack folder, a CLIP file, the two DWPose files, a
        feature-network folder searched before ``dreamoving/eval``) override the lookups and must exist."""
        from ..guider.clip_image import ClipImageEncoder
        from ..guider.face_id import FaceAnalyzer
        from ..preprocess.dwpose import DWPose

        root = Path(models_dir) if models_dir is not None else None
        device = pick_device(device)
        models = cls(device=device, detect_resolution=detect_resolution)
        needs = models.needs

        pack = _explicit(insightface, "insightface", is_dir=True) or _first_pack(root)
        if pack is not None:
            models.faces = FaceAnalyzer(pack, "cpu" if device.type == "cpu" else "auto")
        else:
            needs["faces"] = (f"an InsightFace pack ({' or '.join(INSIGHTFACE_PACKS)}) in "
                              f"{_under(root, 'insightface/models')}")
        clip_file = _explicit(clip, "clip") or _first_clip(root)
        if clip_file is not None:
            models.clip = cls.from_clip_encoder(ClipImageEncoder.from_file(clip_file).to(device))
        else:
            needs["clip"] = f"a CLIP ViT-H/14 image tower ({CLIP_FILE}) in {_under(root, 'clip_vision')}"
        if dwpose is not None:
            files = [_explicit(p, "dwpose") for p in dwpose]
        else:
            base = root / "dreamoving" / "preprocess" if root is not None else None
            files = [base / n if base is not None and (base / n).is_file() else None for n in DWPOSE_FILES]
        if all(files):
            models.dwpose = DWPose(files[0], files[1], device="cpu" if device.type == "cpu" else "auto")
        else:
            needs["dwpose"] = (f"DWPose's {' and '.join(DWPOSE_FILES)} (huggingface.co/yzd-v/DWPose) in "
                               f"{_under(root, 'dreamoving/preprocess')}")
        explicit_dir = _explicit(eval_dir, "eval_dir", is_dir=True)
        models.feature_dirs = ((explicit_dir,) if explicit_dir else ()) + ((root / EVAL_FOLDER,) if root else ())
        return models

    def feature_net(self, score: str) -> tuple[torch.nn.Module, str] | None:
        """The loaded network of ``score`` (see :data:`FEATURE_FILES`) and its file name; ``None`` when no file."""
        if score not in self._nets:
            from . import networks

            found = find_feature_file(self.feature_dirs, score)
            if found is None:
                return None
            path, net = found
            loaders = {"vgg": lambda p: networks.Lpips.from_file(p, "vgg"),
                       "alex": lambda p: networks.Lpips.from_file(p, "alex"),
                       "inception": networks.InceptionFeatures.from_file,
                       "i3d": networks.VideoFeatures.i3d, "resnet3d": networks.VideoFeatures.resnet3d}
            self._nets[score] = (loaders[net](path).to(self.device), path.name)
        return self._nets[score]


def _explicit(path: str | os.PathLike | None, what: str, is_dir: bool = False) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not (path.is_dir() if is_dir else path.is_file()):
        raise InputMismatchError(f"{what}: '{path}' is not {'a folder' if is_dir else 'a file'}")
    return path


def _under(root: Path | None, sub: str) -> str:
    return f"'{root / sub}'" if root is not None else f"models/{sub}"


def _first_pack(root: Path | None) -> Path | None:
    if root is None:
        return None
    from ..guider.face_id import find_pack, list_packs

    names = list_packs([root / "insightface"])
    preferred = [n for n in INSIGHTFACE_PACKS if n in names] + names
    return find_pack([root / "insightface"], preferred[0]) if preferred else None


def _first_clip(root: Path | None) -> Path | None:
    folder = root / "clip_vision" if root is not None else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    vit_h = [p for p in files if "vit-h" in p.name.lower()]
    return (vit_h or files or [None])[0]
