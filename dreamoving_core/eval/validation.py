"""The scores of :func:`~dreamoving_core.eval.score_video` as a training-validation scorer
(``dreamoving_core.train.Scorer``): ``validation.scorer: dreamoving_core.eval:validation_scorer`` in a training
config logs them as ``val/<score>`` beside the loss."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .models import EvalModels
from .score import score_video

MODELS_ENV = "DREAMOVING_EVAL_MODELS"


class ValidationScorer:
    """``scorer(frames (F, H, W, 3) in [0, 1], *, driving, face) -> {score: value}`` (the finite scores).

    The models come from ``models_dir`` (a folder laid out like ComfyUI's ``models``; None: ``$DREAMOVING_EVAL_MODELS``,
    and with neither only the model-free scores run), loaded at the first call and kept for the run."""

    def __init__(self, models_dir: str | os.PathLike | None = None):
        self.models_dir = models_dir
        self.models: EvalModels | None = None

    def __call__(self, frames: torch.Tensor, *, driving: Sequence[dict] | None,
                 face: torch.Tensor | None) -> dict[str, float]:
        if self.models is None:
            self.models = EvalModels.from_models_dir(self.models_dir or os.environ.get(MODELS_ENV))
        return score_video(frames, driving=driving, face=face, models=self.models).flat()


validation_scorer = ValidationScorer()
