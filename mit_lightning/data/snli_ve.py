"""SNLI-VE: does a Flickr30K image entail, contradict or stay neutral to a hypothesis sentence?

Layout under the data root (see data/README.md)::

    snli_ve_{train,dev,test}.jsonl    # SNLI fields + Flickr30K_ID, one JSON object per line
    flickr30k_images/<Flickr30K_ID>.jpg

The image plays the premise: the text input is the hypothesis ``sentence2`` (``sentence1``, the
caption the hypothesis was written for, is not used). Lines whose ``gold_label`` is not one of
the three classes (SNLI marks pairs without annotator consensus with "-") are skipped and
counted in the log. Bad input follows `mit_lightning.data.records`: a pair whose hypothesis is
null, missing or not a string is excluded and reported; bytes that are not UTF-8 and lone
surrogates become U+FFFD and are reported; a line that is not a JSON object, or lacks
``gold_label`` or ``Flickr30K_ID``, is an error naming the line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from mit_lightning.data.classification import ImageTextClassificationDataModule, ImageTextRecord
from mit_lightning.data.records import SetupReport, as_text, decoded_lines, plain_file_name
from mit_lightning.errors import UserError

log = logging.getLogger(__name__)

#: class ids are positions in this tuple
LABELS = ("entailment", "neutral", "contradiction")
DEFAULT_PROMPT = ("Decide whether the image entails, is neutral to, or contradicts the hypothesis: {text} "
                  "#Classification:")


def read_snli_ve(path: Path, image_dir: Path, report: SetupReport) -> tuple[list[ImageTextRecord], int]:
    """Records of one jsonl file, and the number of lines skipped for a label outside `LABELS`."""
    class_ids = {name: position for position, name in enumerate(LABELS)}
    records, skipped = [], 0
    for line_number, line in enumerate(decoded_lines(path, report), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            pair = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            raise UserError(f"{where}: not valid JSON ({getattr(error, 'msg', 'it nests too deeply')}).") from None
        if not isinstance(pair, dict):
            raise UserError(f"{where}: expected a JSON object with the SNLI-VE fields, got {type(pair).__name__}.")
        missing = [name for name in ("gold_label", "Flickr30K_ID") if name not in pair]
        if missing:
            raise UserError(f"{where}: field '{missing[0]}' is missing; expected the SNLI-VE fields "
                            "gold_label, sentence2 and Flickr30K_ID.")
        image_id = pair["Flickr30K_ID"]
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or not plain_file_name(str(image_id)):
            raise UserError(f"{where}: Flickr30K_ID {image_id!r:.60} names no image file (expected the image's id, "
                            "e.g. \"2248275918\").")
        if not isinstance(pair["gold_label"], str) or pair["gold_label"] not in class_ids:
            skipped += 1
            continue
        record = f"{path.name} line {line_number}"
        hypothesis = as_text(pair.get("sentence2"), record, report)
        if hypothesis is None:
            report.exclude(record, "pairs without hypothesis text (sentence2 null, empty, missing or not a string)")
            continue
        records.append(ImageTextRecord(str(image_dir / f"{image_id}.jpg"), hypothesis,
                                       class_ids[pair["gold_label"]]))
    return records, skipped


class SNLIVEDataModule(ImageTextClassificationDataModule):
    """SNLI-VE visual entailment, 3 classes (entailment=0, neutral=1, contradiction=2; metric: accuracy).

    Args:
        root: Folder holding the ``snli_ve_<split>.jsonl`` files and ``flickr30k_images/``
            (default ``$MIT_DATA_ROOT/snli_ve``, or ``data/snli_ve`` when the variable is unset).
        prompt_template: LLM prompt; ``{text}`` is replaced by the hypothesis.
        image_size: Side of the square image given to the vision tower; None asks the model.
        train_split: Split to train on; a split ``<name>`` is read from ``snli_ve_<name>.jsonl``.
        val_splits: Splits to validate on.
        test_splits: Splits to test on.
        predict_splits: Splits to predict on (default: the test splits).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation/test/predict (default: ``batch_size``).
        num_workers: Dataloader worker processes.
        pin_memory: Pin host memory when a GPU is used.
    """

    dataset_name = "SNLI-VE"
    layout_hint = ("SNLI-VE expects snli_ve_{train,dev,test}.jsonl and flickr30k_images/<Flickr30K_ID>.jpg under the "
                   "data root; see data/README.md.")

    def __init__(
        self,
        root: str = "${MIT_DATA_ROOT:-data}/snli_ve",
        prompt_template: str = DEFAULT_PROMPT,
        image_size: int | None = None,
        train_split: str = "train",
        val_splits: Sequence[str] = ("dev",),
        test_splits: Sequence[str] = ("test",),
        predict_splits: Sequence[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(root, prompt_template, image_size, train_split=train_split, val_splits=val_splits,
                         test_splits=test_splits, predict_splits=predict_splits, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory)

    def _required_paths(self, split: str) -> dict[Path, str]:
        return {
            self.root / f"snli_ve_{split}.jsonl": f"{split} pairs, one JSON object per line",
            self.root / "flickr30k_images": "Flickr30K images named <Flickr30K_ID>.jpg",
        }

    @property
    def class_names(self) -> list[str]:
        return list(LABELS)

    def _read_records(self, split: str, report: SetupReport) -> list[ImageTextRecord]:
        path = self.root / f"snli_ve_{split}.jsonl"
        records, skipped = read_snli_ve(path, self.root / "flickr30k_images", report)
        log.log(logging.WARNING if skipped else logging.INFO,
                "%s %s: %d pairs read; skipped %d lines whose gold_label is not one of %s.",
                self.dataset_name, split, len(records), skipped, "/".join(LABELS))
        return records
