"""Image-text classification metrics (UPMC-Food101, SNLI-VE): accuracy, macro-F1, confusion matrix.

Each sample is stored once as a row ``[predicted class, true class]`` keyed by its dataset index
(`PerSampleMetric`), so samples repeated by DDP padding count once; the scores are the
torchmetrics functional ones computed on the deduplicated rows.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from mit_lightning.metrics.base import PerSampleMetric

#: heat-map colours of a row fraction of 0 and of 1 (white → dark blue)
_LOW_COLOUR = (255, 255, 255)
_HIGH_COLOUR = (8, 48, 107)


class _PredictionRows(PerSampleMetric):
    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        self.num_classes = num_classes

    def update(self, preds: torch.Tensor, target: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """`preds`: logits or probabilities (B, C), or class ids (B,); `target`: class ids (B,)."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=-1)
        target = torch.as_tensor(target).reshape(-1)
        if preds.ndim != 1 or preds.shape[0] != target.shape[0]:
            raise ValueError(f"Expected preds of shape (B, {self.num_classes}) or (B,) for {target.shape[0]} targets, "
                             f"got {tuple(preds.shape)}.")
        self._append(sample_ids, torch.stack([preds.long().to(target.device), target.long()], dim=1))

    def _preds_and_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.unique_rows().long()
        return rows[:, 0], rows[:, 1]


class Accuracy(_PredictionRows):
    """Top-1 accuracy over distinct samples."""

    higher_is_better = True

    def compute(self) -> torch.Tensor:
        preds, target = self._preds_and_target()
        return multiclass_accuracy(preds, target, num_classes=self.num_classes, average="micro")


class MacroF1(_PredictionRows):
    """Unweighted mean of the per-class F1 scores.

    A class that occurs in the targets but is never predicted (or the reverse) scores 0; a class
    that occurs in neither is left out of the mean (torchmetrics' rule), so a small evaluation set
    is not penalised for classes it does not contain.
    """

    higher_is_better = True

    def compute(self) -> torch.Tensor:
        preds, target = self._preds_and_target()
        return multiclass_f1_score(preds, target, num_classes=self.num_classes, average="macro")


class ConfusionMatrix(_PredictionRows):
    """(C, C) counts of distinct samples: row = true class, column = predicted class."""

    higher_is_better = None

    def compute(self) -> torch.Tensor:
        preds, target = self._preds_and_target()
        return multiclass_confusion_matrix(preds, target, num_classes=self.num_classes)


def confusion_matrix_image(matrix: torch.Tensor, max_side: int = 512) -> torch.Tensor:
    """Render a (C, C) count matrix as a uint8 (3, H, W) heat map for TensorBoard's ``add_image``.

    Rows are normalised to fractions of their true class, so rare classes are as readable as
    frequent ones; the diagonal is the per-class recall. Each cell is a square block of
    ``max(1, max_side // C)`` pixels (5 px for Food101's 101 classes), row i from the top and
    column j from the left being class i / j. Drawn without a plotting library on purpose: it
    needs no extra dependency and has no labels (the class order is the data spec's).
    """
    counts = matrix.detach().to("cpu", torch.float64)
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    low, high = torch.tensor(_LOW_COLOUR, dtype=torch.float64), torch.tensor(_HIGH_COLOUR, dtype=torch.float64)
    colours = low + fractions[..., None] * (high - low)  # (C, C, 3)
    cell = max(1, max_side // counts.shape[0])
    image = colours.round().to(torch.uint8).permute(2, 0, 1)
    return image.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).contiguous()
