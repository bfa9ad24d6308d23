"""onnxruntime sessions for the pack's ONNX models (DWPose's detector and estimator, InsightFace packs), with one
provider policy and one owner object per file.

Policy: ``"cpu"`` runs on the CPU; ``"auto"`` and ``"cuda"`` run on CUDA when onnxruntime lists the CUDA provider and
it actually starts (a listed provider can fail on a missing cuDNN or driver), else on the CPU, with a warning when
CUDA was listed or asked for but could not be used. onnxruntime is imported when the first session opens.

An :class:`OnnxModel` opens its session on first use and drops it on :meth:`OnnxModel.release`, so a host's memory
manager can free it (it opens again when next used); nothing is cached beyond the owner's lifetime.
"""
from __future__ import annotations

import logging
import os

from .errors import DreaMovingError, ModelFormatError
from .io import first_line

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def open_session(path: str | os.PathLike, device: str = "auto", label: str = "ONNX"):
    """An onnxruntime ``InferenceSession`` of ``path`` on the provider the policy picks for ``device``.

    ``label`` names the model in warnings. Raises ``DreaMovingError`` for a missing file and ``ModelFormatError`` for
    one onnxruntime cannot load."""
    path = os.fspath(path)
    name = os.path.basename(path)
    device = device.lower()
    if device not in DEVICES:
        raise DreaMovingError(f"{label}: device must be one of {', '.join(DEVICES)}, got '{device}'")
    if not os.path.isfile(path):
        raise DreaMovingError(f"ONNX model '{path}' does not exist")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. a failed CUDA init) are summarised below
    listed = CUDA in ort.get_available_providers()
    if device != "cpu" and listed:
        try:
            return ort.InferenceSession(path, options, providers=[CUDA, CPU])
        except Exception as err:  # a CUDA provider that is listed but cannot start (driver, cuDNN missing)
            log.warning("%s: the CUDA provider failed to start for '%s' (%s); using the CPU", label, name,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
    elif device == "cuda":
        log.warning("%s: CUDA was requested but onnxruntime %s offers only %s (install onnxruntime-gpu); using the CPU",
                    label, ort.__version__, ", ".join(ort.get_available_providers()))
    try:
        return ort.InferenceSession(path, options, providers=[CPU])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelFormatError(f"'{name}' is not a loadable ONNX model ({first_line(err)}); the file may be "
                               "truncated or corrupt: download it again") from err


class OnnxModel:
    """One ONNX file; ``session`` opens it (see :func:`open_session`) on first use, ``release()`` drops it."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", label: str = "ONNX"):
        self.path, self.device, self.label = os.fspath(path), device, label
        self._session = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def is_open(self) -> bool:
        return self._session is not None

    @property
    def session(self):
        if self._session is None:
            self._session = open_session(self.path, self.device, self.label)
        return self._session

    @property
    def provider(self) -> str:
        """The provider the session runs on (opens it)."""
        return self.session.get_providers()[0]

    def release(self) -> None:
        """Drop the session (its memory goes with it); the next use opens it again."""
        self._session = None


def log_providers(label: str, models: list[OnnxModel]) -> None:
    """One info line naming the provider each model runs on, e.g. ``DWPose: onnxruntime runs yolox_l.onnx on
    CUDAExecutionProvider, ...``."""
    log.info("%s: onnxruntime runs %s", label, ", ".join(f"{m.name} on {m.provider}" for m in models))
