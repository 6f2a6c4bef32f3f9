"""The authors' evaluation protocol during training, a labelled option beside this project's own.

The release scores, after every training epoch, each of val, testA and testB with ONE randomly drawn
sentence per ref (not every sentence, as this project's validation and `mit test` do), computes mIoU with
an empty union counting 0, and keeps for each split the epoch where that split's own score was best
(so each reported split may come from another epoch: a test split then chooses its own checkpoint).
`ReleaseEvaluation` reproduces that beside the normal validation, logging `release_eval/<split>/oIoU`
and `.../mIoU` and writing `release_evaluation.json` (every epoch's scores and each split's best) into
the run's log folder. `configs/ablations/release_evaluation.yaml` adds it; checkpoints are still chosen
by the project's validation, and `mit test` still scores every sentence.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from mit_lightning.data.base import collate
from mit_lightning.errors import UserError
from mit_lightning.metrics.segmentation import mask_statistics, per_sample_iou

RESULTS_FILE = "release_evaluation.json"
Monitor = Literal["oIoU", "mIoU"]


def release_scores(rows: torch.Tensor) -> dict[str, float]:
    """oIoU (ΣI / ΣU) and the release's mIoU (a sample with an empty union scores 0) of statistics rows."""
    union = rows[:, 1].sum()
    return {"oIoU": float(rows[:, 0].sum() / union) if union > 0 else 0.0,
            "mIoU": float(per_sample_iou(rows, empty_union=0.0).mean())}


def sentence_draws(count: int, seed: int, epoch: int, split: str) -> list[int]:
    """One draw per ref, a function of (seed, epoch, split) only: the same in every process and on resuming."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{epoch}/{split}".encode()))
    return torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()


class ReleaseEvaluation(Callback):
    """After each validation, scores `splits` as the authors' release does (see the module docstring).

    Args:
        splits: the splits scored (the release: val, testA, testB of RefCOCO).
        monitor: the score that picks each split's best epoch (the release: oIoU).
        seed: seeds the sentence drawn per ref (with the epoch and the split).
    """

    def __init__(self, splits: Sequence[str] = ("val", "testA", "testB"), monitor: Monitor = "oIoU",
                 seed: int = 0) -> None:
        if monitor not in ("oIoU", "mIoU"):
            raise UserError(f"ReleaseEvaluation monitor must be oIoU or mIoU, got {monitor!r}.")
        self.splits, self.monitor, self.seed = list(splits), monitor, seed
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "one_sentence_per_ref"):
            raise UserError("ReleaseEvaluation scores referring segmentation (a RefCOCO-format data module); "
                            f"{type(datamodule).__name__} is not one. Remove the callback for this task.")
        self._datasets = {split: datamodule.one_sentence_per_ref(split) for split in self.splits}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._datasets:
            return
        epoch = trainer.current_epoch
        scores = {split: self.score(trainer, pl_module, split, epoch) for split in self.splits}
        for split, values in scores.items():
            for name, value in values.items():
                pl_module.log(f"release_eval/{split}/{name}", value, add_dataloader_idx=False)
            if split not in self.best or values[self.monitor] > self.best[split][self.monitor]:
                self.best[split] = {"epoch": epoch, **values}
        self.history.append({"epoch": epoch, **scores})
        if trainer.is_global_zero and trainer.log_dir:
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.log_dir) / RESULTS_FILE).write_text(json.dumps(
                {"protocol": "one random sentence per ref; mIoU with an empty union as 0; best epoch per split by "
                             f"its own {self.monitor}", "best": self.best, "epochs": self.history}, indent=2) + "\n")

    @torch.no_grad()
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, epoch: int) -> dict[str, float]:
        dataset = self._datasets[split]
        keys = list(zip(range(len(dataset)), sentence_draws(len(dataset), self.seed, epoch, split)))
        loader = DataLoader(dataset, batch_size=trainer.datamodule.eval_batch_size, sampler=keys, collate_fn=collate)
        rows = []
        for batch in loader:
            if not batch["prompt"]:
                continue
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            with trainer.precision_plugin.forward_context():
                output = pl_module(batch)
            rows.append(mask_statistics(pl_module.head.masks(output, batch["mask"]), batch["mask"]).cpu())
        return release_scores(torch.cat(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self.best = state_dict["history"], state_dict["best"]
