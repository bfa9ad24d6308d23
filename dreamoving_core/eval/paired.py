"""Scores against a ground-truth video (the TikTok self-reconstruction protocol): per-frame L1, PSNR and SSIM
(torchmetrics), LPIPS (torchmetrics' LPIPS on the user's backbone weights), and the Fréchet distance of frame (FID)
and clip (FID-VID, FVD) features."""
from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def pixel_metrics(frames: torch.Tensor, truth: torch.Tensor, batch: int = 16) -> dict[str, torch.Tensor]:
    """Per-frame ``paired/l1``, ``paired/psnr`` (dB, data range 1) and ``paired/ssim`` (Gaussian 11×11, σ 1.5) of
    ``frames`` against ``truth``, both ``(F, H, W, 3)`` in 0 … 1; each ``(F,)``."""
    out: dict[str, list[torch.Tensor]] = {"paired/l1": [], "paired/psnr": [], "paired/ssim": []}
    for x, y in zip(frames.split(batch), truth.split(batch)):
        x, y = x.movedim(-1, 1).float(), y.movedim(-1, 1).float()  # float64 convolutions are ~30x slower on CPUs
        out["paired/l1"].append((x - y).abs().flatten(1).mean(1))
        out["paired/psnr"].append(peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        out["paired/ssim"].append(structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"))
    return {k: torch.cat(v) for k, v in out.items()}


def lpips(net: nn.Module, frames: torch.Tensor, truth: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Per-frame LPIPS ``(F,)`` of ``frames`` against ``truth`` (``(F, H, W, 3)`` in 0 … 1) with a
    :class:`~dreamoving_core.eval.networks.Lpips`."""
    return torch.cat([net(x, y) for x, y in zip(frames.split(batch), truth.split(batch))])


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)`` (N, M ≥ 2):
    ``‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½`` (FID's formula; float64, clamped at 0 against round-off).

    With fewer samples than dimensions (one video's frames against 2048-d Inception features) the root's trace is
    taken in sample space: Σ₁Σ₂ = A₁A₁ᵀA₂A₂ᵀ / c shares its non-zero eigenvalues with BBᵀ / c, B = A₁ᵀA₂ (A = the
    centred features, c = (N − 1)(M − 1)), so tr (Σ₁Σ₂)^½ = ‖B‖_* / √c, an N × M problem instead of D × D."""
    x, y = features.double(), reference.double()
    ax, ay = x - x.mean(0), y - y.mean(0)
    n, m, d = len(x), len(y), x.shape[1]
    if min(n, m) <= d:
        root = torch.linalg.svdvals(ax @ ay.T).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        root = torch.linalg.eigvals((ax.T @ ax / (n - 1)) @ (ay.T @ ay / (m - 1))).sqrt().real.sum()
    distance = (x.mean(0) - y.mean(0)).square().sum() + ax.square().sum() / (n - 1) + ay.square().sum() / (m - 1)
    return max(0.0, float(distance - 2 * root))
