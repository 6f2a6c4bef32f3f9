"""What the image-text classification data modules (UPMC-Food101, SNLI-VE) share.

A sample is one image, one text and one class id. The text is filled into a task prompt (the
paper's Figure 3 style); the image is decoded in the worker into a square uint8 tensor. Bad
input follows `mit_lightning.data.records`; images in particular are handled in two places so
that neither stops an epoch:
- a *missing* file is found at setup (one `os.stat` per distinct path), the sample is excluded
  and the split's count and first paths are logged once;
- a file that exists but cannot be *decoded* is only found when loaded: the dataset returns an
  `UnreadableImage` marker and the shared `collate` drops it, listing its path in
  ``batch["skipped"]`` so the LightningModule can count and report it.

Batch keys (on top of the contract in `mit_lightning.batch`): ``label`` long (B,), ``text``
and ``image_path`` list[str].
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from mit_lightning.data.base import DataSpec, MiTDataModule, PromptFormat
from mit_lightning.data.images import UnreadableImage, read_rgb, to_square_tensor
from mit_lightning.data.records import SetupReport
from mit_lightning.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageTextRecord:
    """One sample as read from the annotation files, before its image is opened."""

    image_path: str
    text: str
    label: int


class ImageTextDataset(Dataset):
    """Records → items ``prompt, index, image, label, text, image_path`` (or an `UnreadableImage`)."""

    def __init__(self, records: Sequence[ImageTextRecord], prompt: PromptFormat, image_size: int) -> None:
        self.records = list(records)
        self.prompt = prompt
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | UnreadableImage:
        record = self.records[index]
        image = read_rgb(record.image_path)
        if isinstance(image, UnreadableImage):
            return image
        return {
            "prompt": self.prompt.fill(record.text),
            "index": index,
            "image": to_square_tensor(image, self.image_size),
            "label": record.label,
            "text": record.text,
            "image_path": record.image_path,
        }


def drop_missing_images(records: Sequence[ImageTextRecord], report: SetupReport) -> list[ImageTextRecord]:
    """Keep the records whose image file exists; note the excluded ones in `report`."""
    exists: dict[str, bool] = {}  # many samples share an image (SNLI-VE): stat each file once
    kept = []
    for record in records:
        if record.image_path not in exists:
            try:
                os.stat(record.image_path)
                exists[record.image_path] = True
            except OSError:
                exists[record.image_path] = False
        if exists[record.image_path]:
            kept.append(record)
        else:
            report.exclude(record.image_path, "samples whose image file is missing")
    return kept


class ImageTextClassificationDataModule(MiTDataModule):
    """Base of the image-text classification data modules.

    Subclasses name their dataset, the files each split needs (`_required_paths`), read a split's
    records (`_read_records`) and give the class names (`class_names`).
    """

    def __init__(
        self,
        root: str,
        prompt_template: str,
        image_size: int | None,
        train_split: str,
        val_splits: Sequence[str],
        test_splits: Sequence[str],
        predict_splits: Sequence[str] | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        super().__init__(root, train_split=train_split, val_splits=val_splits, test_splits=test_splits,
                         predict_splits=predict_splits, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, pin_memory=pin_memory)
        self.prompt_format = PromptFormat(prompt_template)
        if image_size is not None and image_size < 1:
            raise UserError(f"data.image_size must be a positive number of pixels, got {image_size}.")
        self.image_size = image_size
        self._check_layout()

    # --- to implement -----------------------------------------------------------------------
    def _required_paths(self, split: str) -> dict[Path, str]:
        """{path: what it is} for the files and folders `split` is read from."""
        raise NotImplementedError

    def _read_records(self, split: str, report: SetupReport) -> list[ImageTextRecord]:
        """The split's records; those without usable text are left out and noted in `report`."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    @property
    def all_splits(self) -> list[str]:
        return list(dict.fromkeys([self.train_split, *self.val_splits, *self.test_splits, *self.predict_splits]))

    def _check_layout(self) -> None:
        """One error naming every missing file or folder, instead of failing on the first one later."""
        required: dict[Path, str] = {}
        for split in self.all_splits:
            required.update(self._required_paths(split))
        missing = [f"  {path}  ({what})" for path, what in required.items() if not path.exists()]
        if missing:
            listing = "\n".join(missing)
            raise UserError(f"{self.dataset_name} data under '{self.root}' is incomplete; missing:\n{listing}\n"
                            f"{self.layout_hint}")

    def _read_splits(self, splits: list[str]) -> dict[str, list[ImageTextRecord]]:
        records = {}
        for split in splits:
            report = SetupReport(f"{self.dataset_name} {split}")
            records[split] = drop_missing_images(self._read_records(split, report), report)
            report.log()
            if split == self.train_split:
                self._report_untrained_classes(records[split])
        return records

    def _report_untrained_classes(self, records: list[ImageTextRecord]) -> None:
        """A class without a training sample is never learnt: its accuracy will be 0 without a word otherwise."""
        trained = {record.label for record in records}
        untrained = [name for index, name in enumerate(self.class_names) if index not in trained]
        if untrained:
            log.warning("%s %s: %d of the %d classes have no training sample (first: %s); the model cannot learn "
                        "them.", self.dataset_name, self.train_split, len(untrained), len(self.class_names),
                        ", ".join(untrained[:3]))

    def _make_dataset(self, split: str, records: list[ImageTextRecord], *, training: bool) -> ImageTextDataset:
        return ImageTextDataset(records, self.prompt_format, self.image_size or self.model_image_size())

    def _build_spec(self) -> DataSpec:
        return DataSpec(num_classes=len(self.class_names), class_names=list(self.class_names))
