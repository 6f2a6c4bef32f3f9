"""Sentiment metrics against hand-computed values, in the MOSI/MOSEI convention."""

from __future__ import annotations

import math

import pytest
import torch

from mit_lightning.metrics.sentiment import (
    SENTIMENT_METRIC_NAMES,
    SentimentMetrics,
    sentiment_scores,
)


def scores(preds, target) -> dict[str, float]:
    metric = SentimentMetrics()
    metric.update(torch.tensor(preds), torch.tensor(target), torch.arange(len(preds)))
    return {name: value.item() for name, value in metric.compute().items()}


def test_torch_round_is_half_to_even():
    values = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert torch.round(values).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]


def test_mae_and_corr_by_hand():
    # p = [1, 2, 3], t = [1, 3, 2]: |p - t| = [0, 1, 1]; centred p = [-1, 0, 1], t = [-1, 1, 0]
    # Corr = (1 + 0 + 0) / sqrt(2 * 2) = 0.5
    result = scores([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert result["MAE"] == pytest.approx(2 / 3)
    assert result["Corr"] == pytest.approx(0.5)
    assert list(result) == list(SENTIMENT_METRIC_NAMES)


def test_mae_and_corr_are_unclipped():
    # clipping p to [-3, 3] would give MAE 0 and an undefined Corr
    result = scores([4.0, 5.0, -3.0], [3.0, 3.0, -3.0])
    assert result["MAE"] == pytest.approx((1 + 2 + 0) / 3)
    assert result["Corr"] == pytest.approx(0.9934, abs=1e-4)  # Pearson([4, 5, -3], [3, 3, -3])


def test_acc7_and_acc5_round_half_to_even_after_clipping():
    preds = [2.5, -0.5, 1.5, 3.7, -3.2, 0.5, -2.5]
    target = [2.0, 0.0, 2.0, 3.0, -3.0, 0.0, -2.0]
    # half to even: 2.5 → 2, -0.5 → 0, 1.5 → 2, 0.5 → 0, -2.5 → -2; 3.7 → 3 and -3.2 → -3 by clipping
    assert scores(preds, target)["Acc7"] == 1.0
    # away-from-zero rounding would score 2.5, -0.5, 0.5 and -2.5 wrong
    assert scores([2.5], [3.0])["Acc7"] == 0.0
    preds, target = [2.5, 3.7, -3.2, 1.6, 0.4], [2.9, 2.0, -2.0, 2.0, 1.0]
    result = scores(preds, target)
    # Acc-5 clips to [-2, 2]: p → [2, 2, -2, 2, 0], t → [2, 2, -2, 2, 1]
    assert result["Acc5"] == pytest.approx(4 / 5)
    # Acc-7 clips to [-3, 3]: p → [2, 3, -3, 2, 0], t → [3, 2, -2, 2, 1]
    assert result["Acc7"] == pytest.approx(1 / 5)


def test_binary_conventions_split_on_neutral_labels():
    preds = [0.0, -0.5, 0.2, 0.0, 0.3, -0.1, 0.0]
    target = [0.0, 0.0, 1.0, -1.0, -1.5, -2.0, 0.5]
    result = scores(preds, target)
    # has0: t >= 0 → [T, T, T, F, F, F, T]; p >= 0 → [T, F, T, T, T, F, T]; right on 0, 2, 5, 6 → 4/7
    # class T: TP 3, |pred T| 5, |true T| 4 → F1 = 6/9; class F: TP 1, |pred F| 2, |true F| 3 → F1 = 2/5
    # weighted by support (4, 3): (4 * 2/3 + 3 * 2/5) / 7 = 58/105
    assert result["Acc2_has0"] == pytest.approx(4 / 7)
    assert result["F1_has0"] == pytest.approx(58 / 105)
    # non0: drop samples 0, 1 → t > 0 [T, F, F, F, T]; p > 0 [T, F, T, F, F] (p = 0 is negative here)
    # right on 3 of 5; class T: TP 1, |pred| 2, |true| 2 → 1/2; class F: TP 2, |pred| 3, |true| 3 → 2/3
    # weighted by support (2, 3): (2 * 1/2 + 3 * 2/3) / 5 = 3/5
    assert result["Acc2_non0"] == pytest.approx(3 / 5)
    assert result["F1_non0"] == pytest.approx(3 / 5)


def f1_has0(positive_pred: list[bool], positive_true: list[bool]) -> float:
    """F1_has0 of predictions and labels whose signs are the given booleans."""
    signed = lambda flags: torch.tensor([1.0 if flag else -1.0 for flag in flags])  # noqa: E731
    return sentiment_scores(signed(positive_pred), signed(positive_true))["F1_has0"].item()


def test_weighted_f1_differs_from_accuracy_by_hand():
    # class T: TP 3, |pred| 4, |true| 3 → 6/7; class F: TP 1, |pred| 1, |true| 2 → 2/3
    # weighted (3 * 6/7 + 2 * 2/3) / 5 = (18/7 + 4/3) / 5 = 82/105
    assert f1_has0([True, True, True, True, False], [True, True, True, False, False]) == pytest.approx(82 / 105)
    # a class never predicted nor present weighs 0; a class never predicted scores 0
    assert f1_has0([True, True], [True, True]) == 1.0
    assert f1_has0([True, True], [True, False]) == pytest.approx(1 / 3)


def test_duplicates_are_counted_once():
    metric = SentimentMetrics()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    metric.update(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([2, 0]))  # sample 0 repeated
    result = {name: value.item() for name, value in metric.compute().items()}
    assert result["MAE"] == pytest.approx(2 / 3)  # 0.5 if the repeat counted
    assert result["Corr"] == pytest.approx(0.5)


def test_undefined_values_are_nan():
    constant = scores([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])
    assert math.isnan(constant["Corr"])
    neutral = scores([0.5, -0.5], [0.0, 0.0])
    assert math.isnan(neutral["Acc2_non0"]) and math.isnan(neutral["F1_non0"])
    assert neutral["Acc2_has0"] == 0.5


def test_accepts_column_predictions_and_checks_sizes():
    metric = SentimentMetrics()
    metric.update(torch.tensor([[0.5], [1.5]]), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert metric.compute()["Acc7"].item() == pytest.approx(1 / 2)  # 0.5 → 0 ≠ 1; 1.5 → 2 = 2
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        metric.update(torch.zeros(3), torch.zeros(2), torch.arange(3))
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        sentiment_scores(torch.zeros(3), torch.zeros(2))
