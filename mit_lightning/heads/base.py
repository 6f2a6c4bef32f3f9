"""The interface of a task head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from mit_lightning.fusion.base import FusionInputs


class TaskHead(nn.Module):
    """Predictions from the fused text feature (B, d_T) and, where needed, the encoders' outputs.

    `vision_blocks` lists the CLIP blocks whose patch tokens the head reads; `selection_metric`
    and `selection_mode` say how to pick the best checkpoint on the validation split;
    `summary_metrics` are the test metrics a comparison of fusion strategies shows (`mit compare`).
    """

    vision_blocks: tuple[int, ...] = ()
    selection_metric: str = "loss"
    selection_mode: str = "min"
    summary_metrics: tuple[str, ...] = ("loss",)

    def forward(self, text: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def make_metrics(self) -> MetricCollection:
        """A fresh metric collection for one evaluation split."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def predict(self, output: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
        """What `mit predict` returns per batch (CPU tensors and plain values)."""
        raise NotImplementedError
