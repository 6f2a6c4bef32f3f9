"""Referring-segmentation metrics: overall IoU, mean IoU and precision@IoU.

Per sample, with binary prediction P and ground truth G: I = |P ∧ G|, U = |P ∨ G|.
- oIoU = ΣI / ΣU over the split (the number the RefCOCO literature reports);
- mIoU = mean of I/U, where a sample with an empty union (nothing predicted, nothing to find)
  counts as IoU 1 — the prediction is exactly right (the authors' release counts it as 0,
  `empty_union=0`; RefCOCO has no empty targets, so the published numbers are unaffected);
- prec@t = fraction of samples with IoU ≥ t.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mit_lightning.metrics.base import PerSampleMetric

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_and_union(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) binary masks → (B, 4) rows of [I, U, |G|, H·W] in exact integer counts."""
    prediction = prediction.bool().flatten(1)
    target = target.bool().flatten(1)
    intersection = (prediction & target).sum(1)
    union = (prediction | target).sum(1)
    area = torch.full_like(intersection, prediction.shape[1])
    return torch.stack([intersection, union, target.sum(1), area], dim=1)


def mask_statistics(prediction: torch.Tensor | Sequence[torch.Tensor],
                    target: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """`intersection_and_union` of binary masks (B, H, W), or of lists of (H_i, W_i) masks of varying size."""
    if isinstance(prediction, torch.Tensor) and isinstance(target, torch.Tensor):
        return intersection_and_union(prediction, target)
    return torch.cat([intersection_and_union(p[None], t[None]) for p, t in zip(prediction, target)])


def per_sample_iou(rows: torch.Tensor, empty_union: float = 1.0) -> torch.Tensor:
    """Each sample's IoU from its statistics rows; an empty prediction of an empty target scores `empty_union`
    (1: exactly right; the authors' release: 0)."""
    intersection, union = rows[:, 0], rows[:, 1]
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, empty_union, dtype=torch.float))


class _IoUStatistics(PerSampleMetric):
    higher_is_better = True

    def update(self, prediction: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor],
               sample_ids: torch.Tensor) -> None:
        """`prediction`/`target`: binary masks (B, H, W), or lists of (H_i, W_i) masks of varying size."""
        self._append(sample_ids, mask_statistics(prediction, target))


class OverallIoU(_IoUStatistics):
    """Cumulative intersection over cumulative union (oIoU)."""

    def compute(self) -> torch.Tensor:
        rows = self.unique_rows()
        union = rows[:, 1].sum()
        return (rows[:, 0].sum() / union).float() if union > 0 else torch.tensor(1.0, device=self.device)


class MeanIoU(_IoUStatistics):
    """Mean of per-sample IoU (mIoU); `empty_union`: the IoU of a sample with nothing predicted and nothing to
    find (1, exactly right; 0 in the authors' release)."""

    def __init__(self, empty_union: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty_union = float(empty_union)

    def compute(self) -> torch.Tensor:
        return per_sample_iou(self.unique_rows(), self.empty_union).mean().float()


class PrecisionAtIoU(_IoUStatistics):
    """Fraction of samples whose IoU reaches each threshold; returns {"prec@0.5": ..., ...}."""

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)

    def compute(self) -> dict[str, torch.Tensor]:
        iou = per_sample_iou(self.unique_rows())
        # a small tolerance so that an IoU of exactly t (e.g. 1/2) is not lost to float rounding
        return {f"prec@{t:g}": (iou >= t - 1e-9).double().mean().float() for t in self.thresholds}


class WholeImageIoU(_IoUStatistics):
    """oIoU of the trivial prediction "every pixel": the floor a model must beat (Σ|G| / Σ H·W)."""

    higher_is_better = None

    def compute(self) -> torch.Tensor:
        rows = self.unique_rows()
        return (rows[:, 2].sum() / rows[:, 3].sum()).float()
