"""A run's evaluation bookkeeping: one metric collection per split of each evaluation stage, named as runs report
them (`metrics.names`), and the samples a stage skipped. Plain torch: the LightningModule logs what this gives."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection

from mit_lightning.batch import Batch
from mit_lightning.metrics.names import metric_name

#: the evaluation stages and the prefix of their metric names
STAGE_PREFIX = {"validate": "val", "test": "test"}


class EvaluationMetrics(nn.ModuleDict):
    """`<stage>_<index>` → a fresh collection for each evaluation split (`eval_splits`: stage → split names)."""

    def __init__(self, make_metrics: Callable[[], MetricCollection] | None = None,
                 eval_splits: Mapping[str, Sequence[str] | None] | None = None) -> None:
        self.splits = {stage: list(splits or [None]) for stage, splits in (eval_splits or {}).items()}
        super().__init__({
            self.key(stage, index): make_metrics()
            for stage in STAGE_PREFIX for index, _ in enumerate(self.splits.get(stage, [None]))
        } if make_metrics is not None else {})

    @staticmethod
    def key(stage: str, index: int) -> str:
        return f"{stage}_{index}"

    def collection(self, stage: str, index: int) -> MetricCollection:
        return self[self.key(stage, index)]

    def name(self, stage: str, index: int, metric: str) -> str:
        """val/<metric> for the first validation split, `metric_name` otherwise (test/<metric> for the "test"
        split, test/<split>/<metric> for others)."""
        splits = self.splits.get(stage) or [None]
        split = splits[index] if index < len(splits) else str(index)
        if stage == "validate" and index == 0:
            split = None
        return metric_name(STAGE_PREFIX[stage], split, metric)

    def results(self, stage: str) -> list[tuple[str, torch.Tensor]]:
        """Every split's computed metrics by their logged names, then reset; splits that saw no batch are left out."""
        results = []
        for index in range(len(self.splits.get(stage) or [None])):
            metrics = self.collection(stage, index)
            if not metrics[next(iter(metrics.keys()))].update_called:
                continue
            results += [(self.name(stage, index, name), value) for name, value in _flatten(metrics.compute()).items()]
            metrics.reset()
        return results


class SkippedSamples:
    """Samples the data modules dropped (unreadable images), reported once per stage rather than per batch."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def take(self, batch: Batch) -> bool:
        """Record what `batch` dropped; False if nothing of it is left."""
        self.paths.extend(batch.get("skipped", []))
        return len(batch["prompt"]) > 0

    def report(self, stage: str) -> str | None:
        """What to tell the user about `stage`'s skipped samples (None if none), and forget them."""
        if not self.paths:
            return None
        message = (f"{len(self.paths)} {stage} samples were skipped because their image could not be read "
                   f"(first: {', '.join(self.paths[:5])}). Re-extract or remove those files.")
        self.paths = []
        return message


def _flatten(results: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[name] = value
    return flat
