"""The model files data preparation needs: given as paths, or as names looked up in a folder laid out like
ComfyUI's ``models`` folder, and checked before any work starts (checking opens no model)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputMismatchError
from ..preprocess.dwpose import DETECTOR_FILE, ESTIMATOR_FILE

PREPROCESS_DIR = Path("dreamoving") / "preprocess"
ZOEDEPTH_NAME = "zoedepth-nyu-kitti"
INSIGHTFACE_NAME = "antelopev2"
CAPTIONER_DIR = Path("LLM")  # where ComfyUI caption nodes keep language models

# what each step needs (cloth crops: the DWPose person detector)
STEPS = ("captions", "pose", "depth", "faces", "cloth")
NEEDS = {"captions": ("captioner",), "pose": ("dwpose_detector", "dwpose_estimator"), "depth": ("zoedepth",),
         "faces": ("insightface",), "cloth": ("dwpose_detector",)}

DOWNLOADS = {
    "dwpose_detector": f"'{DETECTOR_FILE}' from huggingface.co/yzd-v/DWPose into MODELS/{PREPROCESS_DIR.as_posix()}/",
    "dwpose_estimator": f"'{ESTIMATOR_FILE}' from huggingface.co/yzd-v/DWPose into MODELS/{PREPROCESS_DIR.as_posix()}/",
    "zoedepth": "the files of huggingface.co/Intel/zoedepth-nyu-kitti (config.json, model.safetensors, "
                f"preprocessor_config.json), into MODELS/{PREPROCESS_DIR.as_posix()}/{ZOEDEPTH_NAME}/",
    "insightface": f"the .onnx files of the InsightFace pack antelopev2 (or buffalo_l), into "
                   f"MODELS/insightface/models/{INSIGHTFACE_NAME}/",
    "captioner": "any transformers image-text-to-text model folder, e.g. `huggingface-cli download "
                 f"llava-hf/llava-1.5-7b-hf --local-dir MODELS/{CAPTIONER_DIR.as_posix()}/llava-1.5-7b-hf`, then "
                 "--captioner llava-1.5-7b-hf",
}
OPTIONS = {"dwpose_detector": "--dwpose-detector", "dwpose_estimator": "--dwpose-estimator",
           "zoedepth": "--zoedepth", "insightface": "--insightface", "captioner": "--captioner"}


@dataclass(frozen=True)
class ModelPaths:
    """Resolved model locations (``None``: not found)."""

    dwpose_detector: Path | None = None
    dwpose_estimator: Path | None = None
    zoedepth: Path | None = None
    insightface: Path | None = None
    captioner: Path | None = None


def _valid(kind: str, path: Path) -> bool:
    if kind.startswith("dwpose"):
        return path.is_file()
    if kind == "insightface":
        return path.is_dir() and any(path.glob("*.onnx"))
    return (path / "config.json").is_file()


def _candidates(kind: str, value: str, models: Path | None) -> list[Path]:
    out = [Path(value).expanduser()]
    if models is not None and not Path(value).is_absolute():
        if kind == "insightface":
            out += [models / "insightface" / "models" / value, models / "insightface" / value]
        else:
            out.append(models / (CAPTIONER_DIR if kind == "captioner" else PREPROCESS_DIR) / value)
    return out


def resolve_models(models: str | Path | None = None, *, dwpose_detector: str = DETECTOR_FILE,
                   dwpose_estimator: str = ESTIMATOR_FILE, zoedepth: str = ZOEDEPTH_NAME,
                   insightface: str = INSIGHTFACE_NAME, captioner: str | None = None,
                   needed_for: tuple[str, ...] = STEPS) -> ModelPaths:
    """Find each model: a path as given, or a name in its folder under ``models`` (``dreamoving/preprocess`` for
    DWPose and ZoeDepth, ``insightface/models`` for the pack, ``LLM`` for the captioner).

    Raises one ``InputMismatchError`` listing every model the steps ``needed_for`` need but that is missing, with
    where it was looked for and what to download."""
    models = Path(models).expanduser() if models is not None else None
    values = {"dwpose_detector": dwpose_detector, "dwpose_estimator": dwpose_estimator, "zoedepth": zoedepth,
              "insightface": insightface, "captioner": captioner}
    found, problems = {}, []
    needed = {kind for step in needed_for for kind in NEEDS[step]}
    for kind, value in values.items():
        candidates = _candidates(kind, value, models) if value else []
        found[kind] = next((p for p in candidates if _valid(kind, p)), None)
        if found[kind] is None and kind in needed:
            steps = ", ".join(s for s in needed_for if kind in NEEDS[s])
            where = (f"not at {' or '.join(repr(str(p)) for p in candidates)}" if candidates
                     else f"{OPTIONS[kind]} not given")
            problems.append(f"- {kind} (for {steps}): {where}; download {DOWNLOADS[kind]}"
                            f"{'' if models else f' and pass --models MODELS (or {OPTIONS[kind]} PATH)'}")
    if problems:
        raise InputMismatchError("data preparation is missing models (nothing was done):\n" + "\n".join(problems) +
                                 "\nor leave a step out with --skip " + "/".join(STEPS))
    return ModelPaths(**found)
