"""Image-text classification (UPMC-Food101, SNLI-VE): [global image feature ; infused text feature] → classes.

Loss: cross-entropy (Eq. 9). Metrics: top-1 accuracy, macro-F1 and, at test time, a confusion matrix.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection

from mit_lightning.batch import Batch
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.heads.base import TaskHead
from mit_lightning.metrics.classification import Accuracy, ConfusionMatrix, MacroF1


class ImageTextClassification(TaskHead):
    """A two-layer classifier over the concatenated image and text features.

    Args:
        hidden: width of the hidden layer.
        dropout: dropout before the output layer.
        num_classes: class count; None = read from the data (101 for Food101, 3 for SNLI-VE).
    """

    task = "classification"
    summary_metrics = ("accuracy", "macro_f1")

    def __init__(self, dims: ModelDims, hidden: int = 1024, dropout: float = 0.1, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes or dims.num_classes
        if not self.num_classes:
            raise UserError("ImageTextClassification needs the number of classes: from the data module or head.num_classes.")
        if "image" not in dims.vectors:
            raise UserError("ImageTextClassification needs a vision tower (model.vision).")
        self.classifier = nn.Sequential(
            nn.Linear(dims.vectors["image"] + dims.llm.hidden_size, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, self.num_classes),
        )

    def forward(self, text: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        image = inputs.vectors["image"].to(text.dtype)
        return self.classifier(torch.cat([image, text], dim=-1))

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output.float(), batch["label"])

    def make_metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "accuracy": Accuracy(num_classes=self.num_classes),
                "macro_f1": MacroF1(num_classes=self.num_classes),
                "confusion_matrix": ConfusionMatrix(num_classes=self.num_classes),
            },
            compute_groups=False,
        )

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Batch) -> None:
        metrics.update(output.float(), batch["label"], batch["index"])

    def predict(self, output: torch.Tensor, batch: Batch) -> dict[str, Any]:
        probability = output.float().softmax(dim=-1)
        return {"probabilities": probability.cpu(), "prediction": probability.argmax(dim=-1).cpu()}

    def answers(self, output: torch.Tensor, *, image_sizes: Sequence[tuple[int, int]] | None = None,
                class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The most probable class by name and index, and every class's probability."""
        names = list(class_names) if class_names is not None else [str(index) for index in range(output.shape[-1])]
        return [
            {"label": names[int(row.argmax())], "label_index": int(row.argmax()),
             "probabilities": {name: float(value) for name, value in zip(names, row)}}
            for row in output.float().softmax(dim=-1).cpu()
        ]
