"""Captions of keyframes with any local transformers image-text-to-text model, cached per image.

The captioner is a model folder saved with ``save_pretrained`` (``config.json``, weights, processor and tokenizer
files), loaded with ``AutoProcessor`` / ``AutoModelForImageTextToText`` from disk only (``local_files_only``, the
hub switched off, no remote code). A processor with a chat template gets the prompt as a user turn holding the image
and the text (instruction models: LLaVA, Qwen2-VL, Idefics, …); one without gets it as a plain text prompt (BLIP,
GIT, Florence-2: give ``prompt=""`` for unconditional captions). Decoding is greedy, so a caption is reproducible.

The default prompt is the paper's MiniGPT-v2 instruction. A caption is cached beside its image in
``<stem>.captions.json`` under a key made of the model's fingerprint (its config and, for every file of the folder,
its name, size and first and last MiB), the prompt and the token budget: a changed model or prompt captions again,
and switching back finds the earlier captions.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFormatError
from .store import beside, write_text

DEFAULT_PROMPT = "[grounding] describe this frame in a detailed manner"
FINGERPRINT_BYTES = 1 << 20
CACHE_SUFFIX = ".captions.json"


def fingerprint(folder: str | os.PathLike) -> str:
    """A hash identifying the model in ``folder`` without reading all of its weights: the same for a copy of the
    folder elsewhere, different when a file changes size or its first or last MiB changes. Hidden files and folders
    (a download tool's ``.cache``) do not count."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = (p for p in folder.rglob("*") if p.is_file())
    for path in sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))  # the last MiB (all of a small file)
            digest.update(f.read())
    return digest.hexdigest()


@dataclass
class Captioner:
    """The model in ``folder`` captioning images with ``prompt``; loaded on the first :meth:`caption` call."""

    folder: Path
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 77
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    _model: object = field(default=None, init=False, repr=False)
    _processor: object = field(default=None, init=False, repr=False)
    _key: str | None = field(default=None, init=False, repr=False)

    @property
    def key(self) -> str:
        """The cache key of this model, prompt and token budget."""
        if self._key is None:
            text = json.dumps({"model": fingerprint(self.folder), "prompt": self.prompt,
                               "max_new_tokens": self.max_new_tokens})
            self._key = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._key

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(self.folder, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as err:
            raise ModelFormatError(f"captioner '{self.folder}' is not a loadable transformers image-text-to-text "
                                   f"model folder ({str(err).splitlines()[0]})") from err
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only models continue every prompt from its last token
        self._processor, self._model = processor, model.to(self.device).eval()

    def _text(self) -> str | None:
        if getattr(self._processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.prompt or None

    @torch.no_grad()
    def caption(self, images: list[np.ndarray]) -> list[str]:
        """Captions of ``images`` (each ``(H, W, 3)`` uint8 RGB), one batch."""
        from PIL import Image

        if not self.loaded:
            self._load()
        text = self._text()
        kwargs = {"text": [text] * len(images), "padding": True} if text else {}
        inputs = self._processor(images=[Image.fromarray(i) for i in images], return_tensors="pt", **kwargs)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt = inputs.get("input_ids")
        if prompt is not None and out.shape[1] >= prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt):
            out = out[:, prompt.shape[1]:]  # decoder-only models return the prompt first
        return [t.strip() for t in self._processor.batch_decode(out, skip_special_tokens=True)]


def cached_caption(stem: Path, key: str) -> str | None:
    """The caption cached for the image ``stem`` under ``key``, or ``None``."""
    path = beside(stem, CACHE_SUFFIX)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get(key)


def store_caption(stem: Path, key: str, caption: str) -> None:
    path = beside(stem, CACHE_SUFFIX)
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    cache[key] = caption
    write_text(path, json.dumps(cache, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
