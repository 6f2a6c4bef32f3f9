"""CMU-MOSI / CMU-MOSEI sentiment metrics, in the convention every paper on these datasets reports.

With predictions p and labels t in [-3, 3] (flattened floats):
- ``MAE`` = mean |p − t| and ``Corr`` = Pearson(p, t), both on the unclipped values;
- ``Acc7`` = mean(round(clip(p, −3, 3)) == round(clip(t, −3, 3))); ``Acc5`` the same with clip to
  [−2, 2]; rounding is half to even (2.5 → 2, −0.5 → 0), as numpy's and torch's round do;
- two binary conventions, both reported because papers mix them:
  ``Acc2_has0`` / ``F1_has0``: every sample, classes t ≥ 0 vs p ≥ 0 (a neutral 0 counts as positive);
  ``Acc2_non0`` / ``F1_non0``: samples with t == 0 dropped, then t > 0 vs p > 0;
  F1 is the support-weighted mean of the two classes' F1 (sklearn's ``average="weighted"``).

Undefined values are NaN, never a made-up number: ``Corr`` when p or t has zero variance (or a
single sample), and both non0 scores when every label is exactly 0.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import multiclass_f1_score

from mit_lightning.metrics.base import PerSampleMetric

SENTIMENT_METRIC_NAMES = ("MAE", "Corr", "Acc7", "Acc5", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0")


def _pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """torchmetrics' Pearson; NaN where it is undefined (documented above), without its warning each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The variance of predictions or target is close to zero")
        return pearson_corrcoef(pred, target)


def _rounded_accuracy(pred: torch.Tensor, target: torch.Tensor, bound: float) -> torch.Tensor:
    # torch.round rounds half to even, the convention of the reference (numpy) implementations
    rounded_pred = torch.round(pred.clamp(-bound, bound))
    rounded_target = torch.round(target.clamp(-bound, bound))
    return (rounded_pred == rounded_target).double().mean()


def _binary_scores(positive_pred: torch.Tensor, positive_true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if positive_true.numel() == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=positive_true.device)
        return nan, nan
    accuracy = (positive_pred == positive_true).double().mean()
    f1 = multiclass_f1_score(positive_pred.long(), positive_true.long(), num_classes=2, average="weighted")
    return accuracy, f1.double()


def sentiment_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """All sentiment scores of flattened predictions and labels, keyed by `SENTIMENT_METRIC_NAMES`."""
    pred, target = pred.reshape(-1).double(), target.reshape(-1).double()
    if pred.numel() != target.numel():
        raise ValueError(f"{pred.numel()} predictions for {target.numel()} labels.")
    non_zero = target != 0
    acc2_has0, f1_has0 = _binary_scores(pred >= 0, target >= 0)
    acc2_non0, f1_non0 = _binary_scores(pred[non_zero] > 0, target[non_zero] > 0)
    scores = {
        "MAE": (pred - target).abs().mean(),
        "Corr": _pearson(pred, target),
        "Acc7": _rounded_accuracy(pred, target, 3.0),
        "Acc5": _rounded_accuracy(pred, target, 2.0),
        "Acc2_has0": acc2_has0,
        "F1_has0": f1_has0,
        "Acc2_non0": acc2_non0,
        "F1_non0": f1_non0,
    }
    return {name: value.float() for name, value in scores.items()}


class SentimentMetrics(PerSampleMetric):
    """Every sentiment score at once, each sample counted once (see the module docstring).

    `compute()` returns a dict keyed by `SENTIMENT_METRIC_NAMES`; MAE is lower-is-better, the rest
    higher-is-better.
    """

    higher_is_better = None

    def update(self, preds: torch.Tensor, target: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """`preds`, `target`: one float per sample (any shape that flattens to B); `sample_ids`: (B,)."""
        preds, target = preds.detach().reshape(-1), target.detach().reshape(-1)
        if preds.numel() != target.numel():
            raise ValueError(f"{preds.numel()} predictions for {target.numel()} labels.")
        self._append(sample_ids, torch.stack([preds.double(), target.to(preds.device).double()], dim=1))

    def compute(self) -> dict[str, torch.Tensor]:
        rows = self.unique_rows()
        return sentiment_scores(rows[:, 0], rows[:, 1])
