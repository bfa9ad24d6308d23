"""What a score run returns: :class:`ScoreReport`, and the catalogue of every score with its formula, range and
direction (:data:`SCORES`), which the README table, the JSON report and ``compare`` read."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

HIGHER, LOWER = "higher", "lower"
PARTS = ("body", "hands", "face")
PCK_THRESHOLDS = (0.05, 0.1)


@dataclass(frozen=True)
class ScoreInfo:
    """One score: its ``name`` in the flat view, what it means, its ``formula``, ``range`` and which direction is
    better (``better``: ``"higher"`` / ``"lower"``; ``None`` for counts that are neither)."""

    name: str
    meaning: str
    formula: str
    range: str
    better: str | None


def _pose_scores() -> list[ScoreInfo]:
    out = []
    for part in PARTS:
        out += [
            ScoreInfo(f"pose/{part}/error", f"{part} keypoint error, in person sizes",
                      "mean over frames of the mean over joints found in both of ‖p_gen − p_drv‖ / s, s = max(w, h) "
                      "of the driving person's keypoint box", "0 … ∞ (0.1 = a tenth of the person's height)", LOWER),
            *(ScoreInfo(f"pose/{part}/pck_{t}", f"share of driving {part} joints found within {t}·s",
                        f"mean over frames of #(‖p_gen − p_drv‖ < {t}·s) / #(driving joints); a lost frame counts 0",
                        "0 … 1", HIGHER) for t in PCK_THRESHOLDS),
            ScoreInfo(f"pose/{part}/oks", f"OKS similarity of the {part} (COCO-WholeBody per-joint constants)",
                      "mean over frames and driving joints of exp(−d² / (2·A·k²)), k = 2σ (COCO), A = w·h of the "
                      "driving person's keypoint box; a joint not found counts 0", "0 … 1", HIGHER),
        ]
    return out


SCORES: tuple[ScoreInfo, ...] = (
    ScoreInfo("identity/cosine_mean", "the reference face kept: ArcFace cosine, mean over frames with a face",
              "mean_f cos(e_ref, e_f), e = L2-normalised ArcFace embedding of the largest face", "−1 … 1", HIGHER),
    ScoreInfo("identity/cosine_min", "the worst frame's ArcFace cosine", "min_f cos(e_ref, e_f)", "−1 … 1", HIGHER),
    ScoreInfo("identity/no_face_share", "share of frames where no face was found", "#(frames without a face) / F",
              "0 … 1", LOWER),
    *_pose_scores(),
    ScoreInfo("pose/lost_frames", "frames where the driving video has a person and the video none",
              "#(frames with a driving person and no detected person)", "0 … F", LOWER),
    ScoreInfo("pose/lost_share", "share of the driving video's frames with a person where the person is lost",
              "lost_frames / #(frames with a driving person)", "0 … 1", LOWER),
    ScoreInfo("temporal/clip_consistency", "consecutive frames look alike to CLIP (the frame consistency of video "
              "papers)", "mean_f cos(c_f, c_f+1), c = CLIP ViT-H/14 image embedding", "−1 … 1 (1 = a still video)",
              HIGHER),
    ScoreInfo("temporal/flicker", "brightness flicker: frame-to-frame change of low-pass luminance",
              "mean_f mean |L_f+1 − L_f|, L = BT.601 luma averaged over cells of 1/16 of the shorter side",
              "0 … 1 (0 = no change; motion adds to it too)", LOWER),
    ScoreInfo("paired/l1", "mean absolute pixel difference to the ground truth", "mean |x − y|, pixels in 0 … 1",
              "0 … 1", LOWER),
    ScoreInfo("paired/psnr", "peak signal-to-noise ratio to the ground truth (torchmetrics)",
              "mean_f 10·log10(1 / MSE_f)", "0 … ∞ dB (∞ = identical)", HIGHER),
    ScoreInfo("paired/ssim", "structural similarity to the ground truth (torchmetrics; Gaussian 11×11, σ 1.5)",
              "mean_f SSIM(x_f, y_f)", "−1 … 1", HIGHER),
    ScoreInfo("paired/lpips", "learned perceptual distance to the ground truth (torchmetrics LPIPS, VGG or AlexNet)",
              "mean_f Σ_l mean_hw ‖w_l ⊙ (φ̂_l(x_f) − φ̂_l(y_f))‖²", "0 … ~1", LOWER),
    ScoreInfo("distribution/fid", "Fréchet distance of Inception-v3 pool features, frames vs ground-truth frames",
              "‖μ_x − μ_y‖² + tr(Σ_x + Σ_y − 2(Σ_x Σ_y)^½)", "0 … ∞", LOWER),
    ScoreInfo("distribution/fid_vid", "Fréchet distance of 3D ResNet-50 (Kinetics) features of 16-frame clips",
              "as FID, over clips (DisCo's FID-VID)", "0 … ∞", LOWER),
    ScoreInfo("distribution/fvd", "Fréchet video distance: I3D (Kinetics-400) logits of 16-frame clips",
              "as FID, over clips", "0 … ∞", LOWER),
)
SCORE_INFO = {s.name: s for s in SCORES}
# Per-frame series drawn by the plot, with their titles.
CURVES = {
    "identity/cosine": "Identity (ArcFace cosine to the reference face)",
    "pose/body/error": "Pose error (body, in person sizes)",
    "temporal/clip_consistency": "Consistency (CLIP cosine of frame f and f+1)",
}


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class ScoreReport:
    """The scores of one video.

    ``scores``: every computed score by name (see :data:`SCORES`); ``per_frame``: per-frame series (``identity/cosine``,
    ``pose/<part>/error``, ``temporal/clip_consistency``, ``temporal/flicker``, ``paired/<metric>``; ``None`` where a
    frame has no value, e.g. no face); ``unavailable``: score (or group) -> why it was not computed, naming the input,
    model or file it needs; ``details``: what was used (e.g. which LPIPS network).
    """

    frames: int
    scores: dict[str, float] = field(default_factory=dict)
    per_frame: dict[str, list[float | None]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """The finite scores, ``{"identity/cosine_mean": 0.71, ...}``: what a tracker logs."""
        return {k: float(v) for k, v in self.scores.items() if math.isfinite(v)}

    def to_dict(self) -> dict:
        """Plain JSON-safe data (non-finite numbers as ``None``), with each score's direction and range."""
        return {
            "frames": self.frames,
            "scores": {k: _finite_or_none(v) for k, v in self.scores.items()},
            "per_frame": {k: [_finite_or_none(v) for v in vs] for k, vs in self.per_frame.items()},
            "unavailable": dict(self.unavailable),
            "details": dict(self.details),
            "about": {k: {"better": SCORE_INFO[k].better, "range": SCORE_INFO[k].range}
                      for k in self.scores if k in SCORE_INFO},
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> ScoreReport:
        nan = float("nan")
        return cls(int(data["frames"]), {k: nan if v is None else float(v) for k, v in data["scores"].items()},
                   {k: [None if v is None else float(v) for v in vs] for k, vs in data.get("per_frame", {}).items()},
                   dict(data.get("unavailable", {})), dict(data.get("details", {})))

    @classmethod
    def mean(cls, reports: list[ScoreReport]) -> ScoreReport:
        """One report averaging ``reports`` (e.g. the takes of one checkpoint): each score over the reports that have
        it, each per-frame series frame by frame over the reports that have a value there."""
        scores: dict[str, list[float]] = {}
        series: dict[str, list[list[float]]] = {}
        for report in reports:
            for k, v in report.scores.items():
                scores.setdefault(k, []).append(v)
            for k, values in report.per_frame.items():
                columns = series.setdefault(k, [])
                columns += [[] for _ in range(len(values) - len(columns))]
                for column, v in zip(columns, values):
                    if v is not None:
                        column.append(v)
        return cls(max(r.frames for r in reports), {k: sum(v) / len(v) for k, v in scores.items()},
                   {k: [sum(c) / len(c) if c else None for c in cols] for k, cols in series.items()},
                   {k: v for r in reports for k, v in r.unavailable.items() if k not in scores},
                   {"reports": str(len(reports))})

    @classmethod
    def load(cls, path: str | Path) -> ScoreReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
