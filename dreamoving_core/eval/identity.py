"""Identity: does the person keep the reference face? ArcFace cosine between the reference face and the largest face
of every frame, through the pack's InsightFace path (:class:`~dreamoving_core.guider.face_id.FaceAnalyzer`)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import InputMismatchError
from ..guider.face_id import FaceAnalyzer, align_face


def reference_embedding(faces: FaceAnalyzer, face: torch.Tensor | np.ndarray, label: str = "the face input"
                        ) -> torch.Tensor:
    """The ArcFace embedding ``(512,)`` of ``face``: an image ``(H, W, 3)`` or ``(1, H, W, 3)`` in 0 … 1 (its
    largest face), or an embedding ``(512,)`` already (e.g. a FaceRecord's ``arcface``), returned normalised."""
    face = torch.as_tensor(face, dtype=torch.float32)
    if face.ndim == 1:
        return face / face.norm().clamp_min(1e-12)
    if face.ndim == 4:
        face = face[0]
    if face.ndim != 3 or face.shape[-1] not in (3, 4):
        raise InputMismatchError(f"{label}: expected a face image (H, W, 3) or an ArcFace embedding (512,), got "
                                 f"shape {tuple(face.shape)}")
    return torch.from_numpy(faces.identity(face[..., :3].numpy(), label).embedding)


def frame_embeddings(faces: FaceAnalyzer, frames: np.ndarray, tick: Callable[[], None] = lambda: None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ArcFace embeddings of the largest face of each frame of ``frames`` ``(F, H, W, 3)`` uint8.

    Returns ``(F, 512)`` embeddings (zeros where no face) and ``(F,)`` bool, True where a face was found.
    Detection runs frame by frame, recognition as one batch."""
    aligned, found = [], []
    for image in frames:
        detected = faces.detect(image)
        found.append(bool(detected))
        if detected:
            aligned.append(align_face(image, detected[0].kps, 112))
        tick()
    found_t = torch.tensor(found, dtype=torch.bool)
    embeddings = torch.zeros(len(frames), 512)
    if aligned:
        embeddings[found_t] = torch.from_numpy(faces.embed(np.stack(aligned)))
    return embeddings, found_t


def identity_scores(reference: torch.Tensor, embeddings: torch.Tensor, found: torch.Tensor
                    ) -> tuple[dict[str, float], list[float | None], dict[str, str]]:
    """Scores, the per-frame cosine (``None`` without a face) and what could not be computed.

    ``reference``: ``(512,)``; ``embeddings``: ``(F, 512)`` L2-normalised; ``found``: ``(F,)`` bool."""
    cosine = embeddings @ reference
    scores = {"identity/no_face_share": float((~found).float().mean())}
    unavailable = {}
    if found.any():
        scores["identity/cosine_mean"] = float(cosine[found].mean())
        scores["identity/cosine_min"] = float(cosine[found].min())
    else:
        unavailable["identity/cosine_mean"] = unavailable["identity/cosine_min"] = "no face was found in any frame"
    per_frame = [float(c) if f else None for c, f in zip(cosine, found)]
    return scores, per_frame, unavailable
