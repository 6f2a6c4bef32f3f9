"""Accuracy, macro-F1 and the confusion matrix against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from mit_lightning.metrics.classification import Accuracy, ConfusionMatrix, MacroF1, confusion_matrix_image

# 3 classes, 7 samples:      idx  0  1  2  3  4  5  6
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 0, 1, 1, 2, 2, 0])
# Correct: 0, 1, 3, 5 → accuracy 4/7.
# Confusion (row = true): true 0 → predicted 0,0,1; true 1 → 1,2; true 2 → 2,0.
CONFUSION = [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
# F1 = 2tp / (2tp + fp + fn): class 0: 4/6; class 1: 2/4; class 2: 2/4 → macro (2/3 + 1/2 + 1/2) / 3 = 5/9.
MACRO_F1 = 5 / 9


def fed(metric, preds: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, batch: int = 3):
    for start in range(0, len(target), batch):
        metric.update(preds[start:start + batch], target[start:start + batch], ids[start:start + batch])
    return metric.compute()


def test_hand_computed_scores() -> None:
    ids = torch.arange(7)
    assert fed(Accuracy(num_classes=3), PREDS, TARGET, ids).item() == pytest.approx(4 / 7)
    assert fed(MacroF1(num_classes=3), PREDS, TARGET, ids).item() == pytest.approx(MACRO_F1)
    assert fed(ConfusionMatrix(num_classes=3), PREDS, TARGET, ids).tolist() == CONFUSION


def test_logits_are_reduced_by_argmax() -> None:
    logits = torch.nn.functional.one_hot(PREDS, 3).float() * 2.5 - 1.0
    assert fed(Accuracy(num_classes=3), logits, TARGET, torch.arange(7)).item() == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="preds of shape"):
        Accuracy(num_classes=3).update(logits[:3], TARGET, torch.arange(7))


@pytest.mark.parametrize("metric_class", [Accuracy, MacroF1, ConfusionMatrix])
def test_a_repeated_sample_index_counts_once(metric_class) -> None:
    # DDP padding repeats samples 6 and 2 (wrong predictions both): without deduplication the
    # accuracy would be 4/9 and the confusion matrix would hold 9 samples.
    order = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 2])
    once = fed(metric_class(num_classes=3), PREDS, TARGET, torch.arange(7))
    repeated = fed(metric_class(num_classes=3), PREDS[order], TARGET[order], order)
    assert torch.equal(repeated, once)
    padded_as_new = fed(metric_class(num_classes=3), PREDS[order], TARGET[order], torch.arange(9))
    assert not torch.equal(padded_as_new, once)


def test_macro_f1_with_a_class_never_predicted_and_a_class_absent() -> None:
    target, preds, ids = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 1]), torch.arange(4)
    # class 0: F1 1; class 1: tp 1, fp 2 → 2/4; class 2 never predicted: 0 → (1 + 1/2 + 0) / 3
    assert fed(MacroF1(num_classes=3), preds, target, ids).item() == pytest.approx(0.5)
    # a 4th class in neither targets nor predictions is left out of the mean
    assert fed(MacroF1(num_classes=4), preds, target, ids).item() == pytest.approx(0.5)
    # ... but one predicted and never true scores 0 and counts. Predictions 0, 1, 3, 1:
    # class 0: 1; class 1: tp 1, fp 1 → 2/3; class 2: 0 (never predicted); class 3: 0 (never true)
    assert fed(MacroF1(num_classes=4), torch.tensor([0, 1, 3, 1]), target, ids).item() == pytest.approx(
        (1 + 2 / 3 + 0 + 0) / 4)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before any update"):
        Accuracy(num_classes=3).compute()


def test_confusion_matrix_image_is_row_normalised_blocks() -> None:
    image = confusion_matrix_image(torch.tensor([[3, 1], [0, 0]]), max_side=8)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)  # 4-pixel cells
    white, dark_blue = torch.tensor([255, 255, 255]), torch.tensor([8, 48, 107])
    three_quarters = (white + 0.75 * (dark_blue - white)).round().to(torch.uint8)
    assert torch.equal(image[:, :4, :4], three_quarters[:, None, None].expand(3, 4, 4))
    assert torch.equal(image[:, 0, 4], (white + 0.25 * (dark_blue - white)).round().to(torch.uint8))
    assert torch.equal(image[:, 4:, :], torch.full((3, 4, 8), 255, dtype=torch.uint8))  # a class with no samples
    assert confusion_matrix_image(torch.eye(101, dtype=torch.long)).shape == (3, 505, 505)
