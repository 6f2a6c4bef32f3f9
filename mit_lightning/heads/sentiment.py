"""Multimodal sentiment regression (CMU-MOSI/MOSEI): infused text feature → score in [-3, 3].

Only the text feature feeds the head: acoustic and facial information reaches it through infusion.
Loss: RMSE (Eq. 10).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection

from mit_lightning.batch import Batch
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.heads.base import TaskHead
from mit_lightning.metrics.sentiment import SentimentMetrics


class SentimentRegression(TaskHead):
    """A two-layer regressor on the infused last-token feature.

    Args:
        hidden: width of the hidden layer.
        dropout: dropout before the output layer.
    """

    task = "sentiment"
    summary_metrics = ("MAE", "Corr", "Acc2_has0", "Acc7")

    def __init__(self, dims: ModelDims, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Linear(dims.llm.hidden_size, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, text: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        return self.regressor(text).squeeze(-1)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Eq. 10; the epsilon keeps the gradient finite when a batch is predicted exactly."""
        return torch.sqrt(torch.mean((output.float() - batch["label"].float()) ** 2) + 1e-8)

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"sentiment": SentimentMetrics()}, compute_groups=False)

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Batch) -> None:
        metrics.update(output.float(), batch["label"].float(), batch["index"])

    def predict(self, output: torch.Tensor, batch: Batch) -> dict[str, Any]:
        return {"prediction": output.float().cpu()}

    def answers(self, output: torch.Tensor, *, image_sizes: Sequence[tuple[int, int]] | None = None,
                class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return [{"score": float(score)} for score in output.float().cpu()]
