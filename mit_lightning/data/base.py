"""What every MiT data module shares: the batch contract, the data spec and the dataloaders.

Batch contract (a dict, produced by `collate`):
- ``prompt``: list[str] — the task prompt with the sample's text filled in (tokenised by the model,
  so data modules stay independent of the LLM).
- ``index``: LongTensor (B,) — the sample's position in its split; metrics use it to count every
  evaluation sample exactly once under DDP.
- ``image``: uint8 (B, 3, S, S) — resized to the vision tower's input size; normalised on device.
- task targets: ``mask`` (segmentation), ``label`` (classification: long, sentiment: float).
- sequence modalities: ``<name>`` float (B, T, D) and ``<name>_mask`` bool (B, T), True = real step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mit_lightning.data.sampling import EpochShuffle, ResumableLoader
from mit_lightning.errors import UserError, existing_path

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """What the model needs to know about the data to size its trainable parts."""

    sequence_dims: dict[str, int] = field(default_factory=dict)  # modality -> feature size, read from the files
    num_classes: int | None = None
    class_names: list[str] | None = None
    eval_splits: dict[str, list[str]] = field(default_factory=dict)  # "validate"/"test"/"predict" -> split names


#: the placeholder of the sample's text in classification and sentiment prompt templates
TEXT_PLACEHOLDER = "{text}"


def check_template(template: str, placeholder: str) -> str:
    """Fail at construction, not in a worker, when a prompt template has nowhere to put the text."""
    if placeholder not in template:
        raise UserError(f"data.prompt_template must contain {placeholder} where the sample's text goes; got {template!r}.")
    return template


def fill_template(template: str, placeholder: str, text: str) -> str:
    """Plain substitution, not str.format: other braces in the template or the text stay as they are."""
    return template.replace(placeholder, text)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack what has one shape, keep lists of the rest (strings, masks at their original sizes)."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            same_shape = all(value.shape == first.shape for value in values)
            batch[key] = torch.stack(values) if same_shape else values
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


class MiTDataModule(L.LightningDataModule):
    """Base class: holds one dataset per split and serves them with the shared collate.

    Subclasses implement `_build_datasets(splits)` returning {split name: Dataset} and, where the
    model needs it, `_build_spec()`. Several validation/test splits become several dataloaders,
    each with its own metrics (e.g. RefCOCO val, testA, testB).
    """

    #: shown in the error when the data root is missing
    layout_hint = "See data/README.md for the expected layout."

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_splits: Sequence[str] = ("val",),
        test_splits: Sequence[str] = ("test",),
        predict_splits: Sequence[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        check_root: bool = True,
    ) -> None:
        super().__init__()
        self.root_setting = root
        self.root = existing_path(root, "Data root", self.layout_hint, is_dir=True) if check_root else None
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_split = train_split
        self.val_splits = list(val_splits)
        self.test_splits = list(test_splits)
        self.predict_splits = list(predict_splits) if predict_splits is not None else list(self.test_splits)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.datasets: dict[str, Dataset] = {}
        self._spec: DataSpec | None = None

    # --- to implement -----------------------------------------------------------------------
    def _build_datasets(self, splits: list[str]) -> dict[str, Dataset]:
        raise NotImplementedError

    def _build_spec(self) -> DataSpec:
        return DataSpec()

    # --- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        wanted = {
            "fit": [self.train_split, *self.val_splits],
            "validate": self.val_splits,
            "test": self.test_splits,
            "predict": self.predict_splits,
        }[stage]
        missing = [split for split in wanted if split not in self.datasets]
        self.datasets.update(self._build_datasets(missing) if missing else {})
        self._spec = None

    @property
    def spec(self) -> DataSpec:
        if self._spec is None:
            spec = self._build_spec()
            spec.eval_splits = {
                "validate": list(self.val_splits),
                "test": list(self.test_splits),
                "predict": list(self.predict_splits),
            }
            self._spec = spec
        return self._spec

    def model_image_size(self) -> int:
        """The vision tower's input size, asked of the model this data module is trained with."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        size = getattr(module, "image_size", None)
        if size is None:
            raise UserError("data.image_size is not set and no model is attached to tell it; set --data.image_size.")
        return int(size)

    def _training_order(self, dataset: Dataset) -> EpochShuffle:
        """The epoch's order from (seed, epoch); a run resumed mid-epoch continues after the batches it trained on."""
        sampler = EpochShuffle(len(dataset), seed=int(os.environ.get("PL_GLOBAL_SEED", "0")),
                               with_draws=getattr(dataset, "takes_draws", False))
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.fit_loop.restarting:
            # the checkpoint's epoch, restored before the dataloader is built (Lightning sets it only later)
            sampler.set_epoch(trainer.current_epoch)
            sampler.resume_at(trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.batch_size)
        return sampler

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._training_order(dataset) if train else None,
            # the workers' seeds come from here, not from the global RNG, whose stream a resumed run restores
            generator=torch.Generator().manual_seed(0),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(split, train=False) for split in self.val_splits]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(split, train=False) for split in self.test_splits]

    def predict_dataloader(self) -> list[DataLoader]:
        return [self._loader(split, train=False) for split in self.predict_splits]
