"""oIoU, mIoU, prec@t and the whole-image floor against masks drawn and counted by hand."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from mit_lightning.metrics.segmentation import MeanIoU, OverallIoU, PrecisionAtIoU, WholeImageIoU


def mask(*rows: str) -> torch.Tensor:
    return torch.tensor([[int(pixel) for pixel in row] for row in rows], dtype=torch.uint8)


# (prediction, ground truth, I, U) — every count checked by eye on the drawing.
SAMPLES = [
    (mask("1100", "1100", "0000", "0000"), mask("1000", "1000", "1000", "0000"), 2, 5),   # IoU 0.4
    (mask("1111", "0000", "0000", "0000"), mask("1100", "0000", "0000", "0000"), 2, 4),   # IoU 0.5 exactly
    (mask("1111", "1111", "1100", "0000"), mask("1111", "1110", "0000", "0000"), 7, 10),  # IoU 0.7 exactly
    (mask("0000", "0000", "0000", "0000"), mask("0000", "0000", "0000", "0000"), 0, 0),   # empty union
]
PREDICTION = torch.stack([p for p, _, _, _ in SAMPLES])
TARGET = torch.stack([g for _, g, _, _ in SAMPLES])
IDS = torch.arange(len(SAMPLES))
ALL_METRICS = [OverallIoU, MeanIoU, PrecisionAtIoU, WholeImageIoU]


def test_hand_drawn_masks_have_the_counted_intersection_and_union() -> None:
    for prediction, target, intersection, union in SAMPLES:
        assert int((prediction & target).sum()) == intersection and int((prediction | target).sum()) == union


def as_floats(result: torch.Tensor | dict[str, torch.Tensor]) -> float | dict[str, float]:
    return {name: value.item() for name, value in result.items()} if isinstance(result, dict) else result.item()


def computed(metric, prediction=PREDICTION, target=TARGET, ids=IDS, batch: int = 2):
    for start in range(0, len(ids), batch):
        metric.update(prediction[start:start + batch], target[start:start + batch], ids[start:start + batch])
    return metric.compute()


def test_overall_iou_is_cumulative_intersection_over_cumulative_union() -> None:
    assert computed(OverallIoU()).item() == pytest.approx((2 + 2 + 7) / (5 + 4 + 10))


def test_mean_iou_counts_an_empty_union_as_a_perfect_sample() -> None:
    # the module's rule: nothing predicted and nothing to find is IoU 1 (the release would say 0)
    assert computed(MeanIoU()).item() == pytest.approx((0.4 + 0.5 + 0.7 + 1.0) / 4)


def test_the_release_mean_iou_counts_an_empty_union_as_zero() -> None:
    from mit_lightning.metrics.segmentation import mask_statistics
    from mit_lightning.release_evaluation import release_scores

    assert computed(MeanIoU(empty_union=0.0)).item() == pytest.approx((0.4 + 0.5 + 0.7 + 0.0) / 4)
    scores = release_scores(mask_statistics(PREDICTION, TARGET))
    assert scores == pytest.approx({"oIoU": (2 + 2 + 7) / (5 + 4 + 10), "mIoU": (0.4 + 0.5 + 0.7 + 0.0) / 4})


def test_precision_counts_an_iou_exactly_at_the_threshold() -> None:
    assert as_floats(computed(PrecisionAtIoU())) == pytest.approx({
        "prec@0.5": 3 / 4,  # 0.5 (exactly), 0.7, empty
        "prec@0.6": 2 / 4,
        "prec@0.7": 2 / 4,  # 7/10 exactly
        "prec@0.8": 1 / 4,
        "prec@0.9": 1 / 4,
    })
    assert computed(PrecisionAtIoU(thresholds=(0.4,)))["prec@0.4"].item() == 1.0  # 2/5 exactly


def test_whole_image_iou_is_ground_truth_area_over_image_area() -> None:
    assert computed(WholeImageIoU()).item() == pytest.approx((3 + 2 + 7 + 0) / (4 * 16))


def test_overall_iou_of_only_empty_unions_is_one() -> None:
    empty = torch.zeros(2, 4, 4, dtype=torch.uint8)
    assert computed(OverallIoU(), empty, empty, torch.arange(2)).item() == 1.0


def test_lists_of_masks_of_different_sizes() -> None:
    small_prediction, small_target = mask("110", "000"), mask("100", "010")  # I 1, U 3
    predictions = [SAMPLES[0][0], small_prediction]
    targets = [SAMPLES[0][1], small_target]
    ids = torch.tensor([10, 11])

    def run(metric_class):
        metric = metric_class()
        metric.update(predictions, targets, ids)
        return metric.compute()
    assert run(OverallIoU).item() == pytest.approx((2 + 1) / (5 + 3))
    assert run(MeanIoU).item() == pytest.approx((2 / 5 + 1 / 3) / 2)
    assert run(WholeImageIoU).item() == pytest.approx((3 + 2) / (16 + 6))
    assert run(PrecisionAtIoU)["prec@0.5"].item() == 0.0


@pytest.mark.parametrize("metric_class", ALL_METRICS)
def test_repeated_samples_count_once(metric_class) -> None:
    once = computed(metric_class())
    order = torch.tensor([0, 1, 2, 3, 0, 0, 3])  # sample 0 (the worst) three times
    repeated = computed(metric_class(), PREDICTION[order], TARGET[order], order)
    assert as_floats(repeated) == pytest.approx(as_floats(once))


# 5 samples (the 4 above plus a perfect one) over 3 ranks: 6 slots, so sample 0 is served twice.
FIVE_PREDICTION = torch.cat([PREDICTION, TARGET[2:3]])
FIVE_TARGET = torch.cat([TARGET, TARGET[2:3]])


def rank_metric(metric, ids: torch.Tensor):
    metric.update(FIVE_PREDICTION[ids], FIVE_TARGET[ids], ids)
    return metric


@pytest.mark.parametrize("metric_class", ALL_METRICS)
@pytest.mark.parametrize("merge", ["merge_state", "gathered_state"])
def test_ddp_padding_counts_each_sample_once(metric_class, merge: str) -> None:
    rank_ids = [torch.tensor(list(DistributedSampler(range(5), num_replicas=3, rank=rank, shuffle=False)))
                for rank in range(3)]
    assert sorted(torch.cat(rank_ids).tolist()) == [0, 0, 1, 2, 3, 4]  # the padding this test is about
    ranks = [rank_metric(metric_class(), ids) for ids in rank_ids]
    merged = ranks[0]
    if merge == "merge_state":
        for other in ranks[1:]:
            merged.merge_state(other)
    else:  # what the all-gather leaves: every rank's rows concatenated, in rank order
        merged.sample_ids = [torch.cat([ids for rank in ranks for ids in rank.sample_ids])]
        merged.rows = [torch.cat([rows for rank in ranks for rows in rank.rows])]
    single = computed(metric_class(), FIVE_PREDICTION, FIVE_TARGET, torch.arange(5))
    assert as_floats(merged.compute()) == pytest.approx(as_floats(single))
    # the same stream with the repeat taken as a new sample gives another score: the check has teeth
    padded = torch.tensor([0, 1, 2, 3, 4, 0])
    padded_as_new = computed(metric_class(), FIVE_PREDICTION[padded], FIVE_TARGET[padded], torch.arange(6))
    assert as_floats(padded_as_new) != pytest.approx(as_floats(single))

