"""What every MiT data module shares: the batch contract, the data spec and the dataloaders.

The batch contract is `mit_lightning.batch.Batch`, produced by `collate` below. What happens with bad input is the
same for every data module: see `mit_lightning.data.records`.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import lightning as L
from lightning.fabric.utilities.seed import pl_worker_init_function
import torch
from torch.utils.data import DataLoader, Dataset

from mit_lightning.batch import Batch
from mit_lightning.data.images import UnreadableImage
from mit_lightning.data.sampling import EpochShuffle, ResumableLoader
from mit_lightning.errors import UserError, existing_path

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PromptFormat:
    """How a sample's text becomes the LLM prompt: the one rule shared by the datasets and by inference.

    Args:
        template: the prompt, with `placeholder` where the text goes.
        placeholder: ``{text}``, or ``{description}`` for referring expressions.
        lowercase: the text is lower-cased first (RefCOCO's ``sent`` field, the form models read, is lower-cased;
            its authors also tokenised it, which new text is not).
        strip: surrounding whitespace is dropped first (MMSA's raw texts carry some).
    """

    template: str
    placeholder: str = TEXT_PLACEHOLDER
    lowercase: bool = False
    strip: bool = False

    def __post_init__(self) -> None:
        check_template(self.template, self.placeholder)

    def fill(self, text: str) -> str:
        text = text.strip() if self.strip else text
        return fill_template(self.template, self.placeholder, text.lower() if self.lowercase else text)


@dataclass
class DataSpec:
    """What the model needs to know about the data: sizes of its trainable parts, and how to read new inputs.

    Checkpoints record it (`to_record`), so a trained model can be used on new inputs without its dataset.
    """

    sequence_dims: dict[str, int] = field(default_factory=dict)  # modality -> feature size, read from the files
    num_classes: int | None = None
    class_names: list[str] | None = None
    eval_splits: dict[str, list[str]] = field(default_factory=dict)  # "validate"/"test"/"predict" -> split names
    prompt: PromptFormat | None = None

    def to_record(self) -> dict[str, Any]:
        """Plain data (a checkpoint entry, an export's JSON); the evaluation splits belong to a run, not a model."""
        return {
            "sequence_dims": dict(self.sequence_dims),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "prompt": asdict(self.prompt) if self.prompt is not None else None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "DataSpec":
        prompt = record.get("prompt")
        return cls(
            sequence_dims={str(name): int(size) for name, size in (record.get("sequence_dims") or {}).items()},
            num_classes=record.get("num_classes"),
            class_names=record.get("class_names"),
            prompt=PromptFormat(**prompt) if prompt else None,
        )


def collate(samples: Sequence[dict[str, Any] | UnreadableImage]) -> Batch:
    """Stack what has one shape, keep lists of the rest (strings, masks at their original sizes).

    `UnreadableImage` markers are dropped and their paths listed in ``skipped``.
    """
    kept = [sample for sample in samples if not isinstance(sample, UnreadableImage)]
    skipped = [sample.path for sample in samples if isinstance(sample, UnreadableImage)]
    if not kept:
        return Batch(index=torch.empty(0, dtype=torch.long), prompt=[], skipped=skipped)
    batch: dict[str, Any] = {}
    for key in kept[0]:
        values = [sample[key] for sample in kept]
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
    batch["skipped"] = skipped
    return Batch(**batch)


def _start_worker(worker_id: int) -> None:
    """A pre-emption's SIGTERM, like a terminal's Ctrl-C, reaches the whole process group: workers leave both
    to the main process, which finishes the batch, saves the latest checkpoint and then stops them (`interrupt.py`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pl_worker_init_function(worker_id)


class MiTDataModule(L.LightningDataModule):
    """Base class: reads each split once and serves it in its role, with the shared collate.

    A split has two roles. The *training* dataset (``train_dataset``) is what the training
    dataloader serves, e.g. one random sentence per ref; the *evaluation* datasets (``datasets``,
    by split name) are what validation, test and predict serve, e.g. every sentence. Evaluating on
    the training split (``--data.val_splits '[train]'``) therefore serves it whole, like any other.

    Subclasses implement `_read_splits(splits)` → {split name: records}, checked at setup and shared
    by both roles, and `_make_dataset(split, records, training=...)`; where the model needs it,
    `_build_spec()`. Several validation/test splits become several dataloaders, each with its own
    metrics (e.g. RefCOCO val, testA, testB). A split without samples is an error at setup.
    """

    #: shown in the error when the data root is missing
    layout_hint = "See data/README.md for the expected layout."
    #: how errors and log lines name the data
    dataset_name = "dataset"
    #: how the sample's text becomes the prompt (set by each subclass from its prompt_template)
    prompt_format: PromptFormat | None = None

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
        if eval_batch_size is not None and eval_batch_size < 1:
            raise UserError(f"data.eval_batch_size must be at least 1, got {eval_batch_size}; "
                            "leave it unset (null) to evaluate with data.batch_size.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.train_split = train_split
        self.val_splits = list(val_splits)
        self.test_splits = list(test_splits)
        self.predict_splits = list(predict_splits) if predict_splits is not None else list(self.test_splits)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_dataset: Dataset | None = None
        self.datasets: dict[str, Dataset] = {}  # evaluation role, by split name
        self._records: dict[str, Any] = {}
        self._spec: DataSpec | None = None

    # --- to implement -----------------------------------------------------------------------
    def _read_splits(self, splits: list[str]) -> dict[str, Any]:
        """{split: its records}, read and checked once whatever the roles the split is used in."""
        raise NotImplementedError

    def _make_dataset(self, split: str, records: Any, *, training: bool) -> Dataset:
        raise NotImplementedError

    def _build_spec(self) -> DataSpec:
        return DataSpec()

    # --- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        setting, evaluated = {
            "fit": ("data.val_splits", self.val_splits),
            "validate": ("data.val_splits", self.val_splits),
            "test": ("data.test_splits", self.test_splits),
            "predict": ("data.predict_splits", self.predict_splits),
        }[stage]
        training = [self.train_split] if stage == "fit" and self.train_dataset is None else []
        evaluation = [split for split in dict.fromkeys(evaluated) if split not in self.datasets]
        unread = [split for split in dict.fromkeys([*training, *evaluation]) if split not in self._records]
        if unread:
            self._records.update(self._read_splits(unread))
        if training:
            self.train_dataset = self._checked_dataset(self.train_split, "data.train_split", training=True)
        for split in evaluation:
            self.datasets[split] = self._checked_dataset(split, setting, training=False)
        self._spec = None

    def _checked_dataset(self, split: str, setting: str, *, training: bool) -> Dataset:
        """A split without samples fails here: it would otherwise train or evaluate on nothing and exit 0."""
        dataset = self._make_dataset(split, self._records[split], training=training)
        if len(dataset) == 0:
            raise UserError(
                f"The {self.dataset_name} split '{split}' ({setting}) has no samples, so there is nothing to "
                f"{'train' if training else 'evaluate'} on. Check {setting} and the data files (samples excluded at "
                f"setup are listed in the warnings above). {self.layout_hint}"
            )
        return dataset

    @property
    def spec(self) -> DataSpec:
        if self._spec is None:
            spec = self._build_spec()
            spec.prompt = self.prompt_format
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

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
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
            collate_fn=collate,
            worker_init_fn=_start_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[split], train=False) for split in self.val_splits]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[split], train=False) for split in self.test_splits]

    def predict_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[split], train=False) for split in self.predict_splits]
