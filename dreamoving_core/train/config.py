"""Training configuration: one typed config per run, layered from the stage's shipped YAML, the user's YAML and
``key.sub=value`` overrides from the command line.

The shipped files (``configs/<stage>.yaml``) hold the paper's recipe; a user file needs only the values it changes
(typically ``models.*`` and ``data.root``). Paths are taken as written (relative ones from the working directory).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import DreaMovingError

STAGES = ("content_guider", "long_frame", "video_controlnet", "expression")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
NOISE_SCHEDULES = ("linear", "scaled_linear")
PRECISIONS = ("no", "fp16", "bf16")
HINTS = ("pose", "depth")


class ConfigError(DreaMovingError):
    """A training config value that is missing, unknown or out of range."""


@dataclass
class ModelPaths:
    """Model files. ``checkpoint``: the SD1.5 single file users keep in ``models/checkpoints`` (frozen base).
    ``components``: diffusers component configs + CLIP tokenizer for it (default: the shipped SD1.5 ones).
    ``motion_module``: the U-Net's motion blocks: initial weights (long_frame: AnimateDiff ``mm_sd_v15.ckpt``;
    expression: the long_frame result), frozen in video_controlnet. ``controlnet``: an image ControlNet to start the
    Video ControlNet from (video_controlnet), the trained Video ControlNet (expression, frozen).
    ``controlnet_motion``: a motion module whose down/middle blocks start the Video ControlNet's motion blocks
    (default: a Video ControlNet file's own blocks, else ``motion_module``'s).
    ``content_guider``: optional starting guider (ours: face and cloth; an IP-Adapter: the face).
    ``clip_vision``: OpenCLIP ViT-H/14 image tower (content_guider)."""

    checkpoint: str | None = None
    components: str | None = None
    motion_module: str | None = None
    controlnet: str | None = None
    controlnet_motion: str | None = None
    content_guider: str | None = None
    clip_vision: str | None = None


@dataclass
class DataConfig:
    """A prepared data folder (``clips.jsonl`` / ``faces.jsonl``, see ``dreamoving_core.data.manifest``).

    Video stages take ``frames`` frames ``frame_stride`` apart from a random start in a clip, resized (shorter side)
    and centre-cropped to ``resolution``² (a multiple of 8; sizes that do not halve evenly down the U-Net, like the
    paper's 352, run as in diffusers and ComfyUI, with each upsampling matched to its skip connection). ``hint``: the Video ControlNet's input, ``"pose"`` (the clip's pose JSON
    drawn as OpenPose pictures) or ``"depth"``. ``drop_*``: probability that a sample's text, image condition or both
    are replaced by the empty prompt / blank image (classifier-free guidance)."""

    root: str | None = None
    manifest: str | None = None
    resolution: int = 512
    frames: int = 16
    frame_stride: int = 1
    hint: str = "pose"
    drop_text: float = 0.0
    drop_image: float = 0.0
    drop_both: float = 0.0
    workers: int = 2


@dataclass
class GuiderConfig:
    """Shape of a Content Guider trained from scratch (``models.content_guider`` unset): a FaceID-Plus face
    projection (ArcFace → ``face_tokens`` tokens refined by a perceiver over CLIP hidden states of the face crop) and,
    with ``cloth``, a plus resampler of ``cloth_tokens`` learned queries over the cloth crop. Both perceivers have
    ``perceiver_depth`` blocks; the cloth one is ``perceiver_dim`` wide (a multiple of 64), the face one works at
    the token width (768), as FaceID-Plus does."""

    face_tokens: int = 4
    cloth: bool = True
    cloth_tokens: int = 16
    perceiver_depth: int = 4
    perceiver_dim: int = 768


@dataclass
class OptimizerConfig:
    """AdamW (``adam_8bit``: bitsandbytes' 8-bit AdamW, CUDA only), constant learning rate after
    ``warmup_steps`` of linear warm-up, gradients clipped to ``max_grad_norm``."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    adam_8bit: bool = False
    warmup_steps: int = 0


@dataclass
class EmaConfig:
    """An exponential moving average of the trained weights (exported instead of the raw weights when enabled)."""

    enabled: bool = False
    decay: float = 0.9999


@dataclass
class ValidationConfig:
    """Every ``every`` steps (0: never), sample manifest row ``index`` with ``steps`` DDIM steps at guidance
    ``cfg`` (``frames`` frames, default ``data.frames``; ``prompt`` replaces the caption), write the frames and log
    what the optional ``scorer`` (``"package.module:callable"``, see :class:`dreamoving_core.train.validate.Scorer`)
    returns. ``face``: a reference face image passed to the scorer (default: the face stage's own face crop)."""

    every: int = 1000
    index: int = 0
    prompt: str | None = None
    frames: int | None = None
    steps: int = 25
    cfg: float = 7.5
    seed: int = 0
    scorer: str | None = None
    face: str | None = None


@dataclass
class TrainConfig:
    """One training run of one stage. ``steps`` counts optimizer steps of ``batch_size`` samples per process
    (× ``gradient_accumulation``). ``noise_schedule``: the DDPM β schedule of the initial weights (diffusers names:
    ``linear`` = AnimateDiff's, ``scaled_linear`` = SD1.5's), β from 0.00085 to 0.012 over 1000 steps.
    ``cpu``: force the CPU (and gloo between processes) even where CUDA exists."""

    stage: str = "long_frame"
    models: ModelPaths = field(default_factory=ModelPaths)
    data: DataConfig = field(default_factory=DataConfig)
    guider: GuiderConfig = field(default_factory=GuiderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = "runs/dreamoving"
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_schedule: str = "linear"
    positional_length: int = 64
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    export_dtype: str = "fp16"
    cpu: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """``value`` (from YAML) checked against the annotation ``kind``; ints and numeric strings are accepted for
    floats."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, kind)):
        raise ConfigError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _apply(target, values: dict[str, Any], where: str) -> None:
    """Set the fields of dataclass instance ``target`` from a (nested) mapping."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of settings, got {values!r}")
    hints = _field_types(type(target))
    names = [f.name for f in fields(target)]
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown setting '{path}'; known settings{' of ' + where if where else ''}: "
                              f"{', '.join(names)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path)
        else:
            setattr(target, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> dict[str, Any]:
    """``"data.root=/x"`` → ``{"data": {"root": "/x"}}`` (the value read as YAML: numbers, true/false, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optimizer.lr=5e-5)")
    value = yaml.safe_load(raw) if raw.strip() else None
    tree: dict[str, Any] = {}
    node = tree
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
    return loaded or {}


def load_config(stage: str, path: str | Path | None = None, overrides: Iterable[str | dict] = ()) -> TrainConfig:
    """The config of a ``stage`` run: the shipped ``configs/<stage>.yaml``, then the file at ``path`` (only the
    values it sets), then each override (``"key.sub=value"`` or a nested dict), then :func:`check_config`."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; the stages are {', '.join(STAGES)}")
    config = TrainConfig()
    _apply(config, read_yaml(CONFIG_DIR / f"{stage}.yaml"), "")
    layers = [read_yaml(path)] if path is not None else []
    layers += [parse_override(o) if isinstance(o, str) else o for o in overrides]
    for layer in layers:
        if layer.get("stage", stage) != stage:
            raise ConfigError(f"the config is for stage '{layer['stage']}' but stage '{stage}' was asked for")
        _apply(config, layer, "")
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Raise ``ConfigError`` for values no run could use (checked before any model is loaded)."""
    data = config.data
    if config.stage not in STAGES:
        raise ConfigError(f"unknown stage '{config.stage}'; the stages are {', '.join(STAGES)}")
    if data.resolution <= 0 or data.resolution % 8:
        raise ConfigError(f"data.resolution must be a positive multiple of 8 (the VAE's latent is 1/8 of the frame), "
                          f"got {data.resolution}; the paper trains at 256, 352 and 512")
    if data.frames < 1 or data.frame_stride < 1:
        raise ConfigError(f"data.frames and data.frame_stride must be at least 1, got {data.frames} and "
                          f"{data.frame_stride}")
    if config.stage != "content_guider" and data.frames > config.positional_length:
        raise ConfigError(f"data.frames ({data.frames}) is more than the motion blocks' positional_length "
                          f"({config.positional_length})")
    if data.hint not in HINTS:
        raise ConfigError(f"data.hint must be one of {', '.join(HINTS)}, got '{data.hint}'")
    for name in ("drop_text", "drop_image", "drop_both"):
        if not 0.0 <= getattr(data, name) <= 1.0:
            raise ConfigError(f"data.{name} is a probability, got {getattr(data, name)}")
    if data.drop_text + data.drop_image + data.drop_both > 1.0:
        raise ConfigError("data.drop_text + drop_image + drop_both must not exceed 1")
    if config.noise_schedule not in NOISE_SCHEDULES:
        raise ConfigError(f"noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got "
                          f"'{config.noise_schedule}'")
    if config.mixed_precision not in PRECISIONS:
        raise ConfigError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got '{config.mixed_precision}'")
    if config.export_dtype not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"export_dtype must be fp16, bf16 or fp32, got '{config.export_dtype}'")
    for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {config.optimizer.lr}")
    if config.guider.perceiver_dim % 64 or config.guider.perceiver_dim <= 0:
        raise ConfigError(f"guider.perceiver_dim must be a multiple of 64 (64-wide heads), got "
                          f"{config.guider.perceiver_dim}")
    if config.validation.scorer is not None and ":" not in config.validation.scorer:
        raise ConfigError(f"validation.scorer must be 'package.module:callable', got '{config.validation.scorer}'")
