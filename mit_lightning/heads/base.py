"""The interface of a task head."""

from __future__ import annotations

from typing import Any, Literal, Sequence, get_args

import torch
from torch import nn
from torchmetrics import MetricCollection

from mit_lightning.batch import Batch
from mit_lightning.fusion.base import FusionInputs


#: what a trained model answers on new inputs (`TaskHead.answers`), and the serving endpoint that asks it
Task = Literal["segmentation", "classification", "sentiment"]


class TaskHead(nn.Module):
    """Predictions from the fused text feature (B, d_T) and, where needed, the encoders' outputs.

    `vision_blocks` lists the CLIP blocks whose patch tokens the head reads. `task` names what a trained
    model answers when used on new inputs (`mit_lightning.inference`): segmentation, classification or
    sentiment; None for a head that has no such use yet. `summary_metrics` are the test metrics a
    comparison of fusion strategies shows (`mit compare`). (Which validation metric picks the best
    checkpoint is the config's ModelCheckpoint setting.)
    """

    task: Task | None = None
    vision_blocks: tuple[int, ...] = ()
    summary_metrics: tuple[str, ...] = ("loss",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task is not None and cls.task not in get_args(Task):
            raise TypeError(f"{cls.__name__}.task is {cls.task!r}; a head's task is one of {get_args(Task)} or None.")

    def forward(self, text: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def make_metrics(self) -> MetricCollection:
        """A fresh metric collection for one evaluation split."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Batch) -> None:
        raise NotImplementedError

    def predict(self, output: torch.Tensor, batch: Batch) -> dict[str, Any]:
        """The head's outputs per sample for `mit predict` (CPU tensors, or lists of per-sample values), under the
        names its rows give them; a 2-D value per sample (a mask) is written as PNG files (`PredictionWriter`).

        The sample's ids, text and known label are added by the module (`PREDICTION_PASSTHROUGH`).
        """
        raise NotImplementedError

    def answers(self, output: torch.Tensor, *, image_sizes: Sequence[tuple[int, int]] | None = None,
                class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """What a trained model answers for new inputs (`load_model`, `mit serve`), one dict per sample; the
        images' (H, W) and the class names are given where the task has them."""
        raise NotImplementedError
