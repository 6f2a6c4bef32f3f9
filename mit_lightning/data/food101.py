"""UPMC-Food101: recipe-page images with their titles, 101 food classes.

Layout under the data root (see data/README.md)::

    images/{train,test}/<class>/<image_filename>
    texts/{train,test}_titles.csv     # no header: image_filename,title,class (titles may be quoted)

Class ids are the positions of the class names in sorted order, taken from the train CSV, so
they do not depend on the order of the rows. The dataset has no official validation split: a
stratified one is drawn from train with a fixed seed and written to a file that every later
run reuses (the remaining train images form the ``train`` split). The split is drawn over the
filenames listed in train_titles.csv, before images missing on disk are excluded, so it stays the
same when a download is incomplete.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from mit_lightning.data.classification import ImageTextClassificationDataModule, ImageTextRecord
from mit_lightning.data.records import SetupReport, decoded_lines, plain_file_name
from mit_lightning.errors import UserError, check_choice, expand_env

log = logging.getLogger(__name__)

#: the splits: the official train part less a stratified validation draw, the draw, the official test part
Split = Literal["train", "val", "test"]
#: which official part each split is read from
SOURCES: dict[Split, str] = {"train": "train", "val": "train", "test": "test"}
DEFAULT_PROMPT = "Classify the food in the image from its recipe title: {text}. #Classification:"


def read_titles_csv(path: Path) -> list[tuple[str, str, str]]:
    """Rows ``(image_filename, title, class)``; the csv module handles quoted titles with commas.

    The titles were scraped from the web: an odd byte becomes U+FFFD (reported once) rather than
    stopping training, and a byte-order mark (from a spreadsheet export) is not taken as part of
    the first filename.
    """
    rows = []
    report = SetupReport(str(path))
    reader = csv.reader(decoded_lines(path, report))
    for row in reader:
        if not row:
            continue
        if len(row) != 3:
            raise UserError(f"{path}, line {reader.line_num}: expected 3 columns (image_filename,title,class), "
                            f"got {len(row)}: {row!r}.")
        if not rows and is_header(row):
            log.warning("%s: line %d is a header (%s), not a sample: skipped. The files of the distribution have "
                        "none.", path, reader.line_num, ",".join(row))
            continue
        filename, title, class_name = row
        if not plain_file_name(filename) or not plain_file_name(class_name):
            raise UserError(f"{path}, line {reader.line_num}: the image file name and the class must be plain names "
                            f"(not empty, no '/'), got {filename!r} and {class_name!r}.")
        if not title.strip():
            report.exclude(f"line {reader.line_num}", "rows with an empty title")
            continue
        rows.append((filename, title, class_name))
    report.log()
    return rows


#: what the columns of a titles CSV get called when a header is written: never a sample's values
HEADER_NAMES = ({"image_filename", "filename", "file_name", "image", "img", "image_id", "id", "path", "file"},
                {"title", "text", "caption", "recipe", "name"},
                {"class", "label", "category", "class_name", "classname", "target"})


def is_header(row: list[str]) -> bool:
    """A first row whose cells are column names (``image_filename,title,class``): a header, not a sample.

    Image names carry an extension; a header's first column does not, and its class column is a column name.
    """
    cells = [cell.strip().lower().lstrip("#").strip() for cell in row]
    named = sum(cell in names for cell, names in zip(cells, HEADER_NAMES))
    return named >= 2 and "." not in cells[0]


def stratified_sample(ids_by_class: dict[str, list[str]], count: int, seed: int) -> list[str]:
    """`count` ids drawn class by class in proportion to class size (largest remainders), sorted.

    Exact integer arithmetic and ids sorted before the seeded permutation make the result depend
    only on the set of ids, the count and the seed — not on file order or platform.
    """
    classes = sorted(ids_by_class)
    total = sum(len(ids) for ids in ids_by_class.values())
    taken = {name: count * len(ids_by_class[name]) // total for name in classes}
    remainders = {name: count * len(ids_by_class[name]) % total for name in classes}
    for name in sorted(classes, key=lambda name: (-remainders[name], name))[:count - sum(taken.values())]:
        taken[name] += 1
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for name in classes:
        ids = sorted(ids_by_class[name])
        chosen.extend(ids[position] for position in rng.permutation(len(ids))[:taken[name]])
    return sorted(chosen)


class Food101DataModule(ImageTextClassificationDataModule):
    """UPMC-Food101 image-text classification (101 classes; metric: top-1 accuracy).

    Args:
        root: Folder holding ``images/`` and ``texts/`` (default ``$MIT_DATA_ROOT/food101``, or
            ``data/food101`` when the variable is unset).
        prompt_template: LLM prompt; ``{text}`` is replaced by the recipe title.
        image_size: Side of the square image given to the vision tower; None asks the model.
        val_size: Size of the validation split drawn from train: a count, or a fraction in (0, 1).
            6846 is the split common in the literature (61,142 images remain for training).
        split_seed: Seed of the stratified draw.
        split_dir: Folder of the validation split file. None: ``<root>/splits``, or
            ``<run folder>/splits`` when the data root cannot be written.
        train_split: Split to train on.
        val_splits: Splits to validate on (``train``, ``val`` or ``test``).
        test_splits: Splits to test on.
        predict_splits: Splits to predict on (default: the test splits).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation/test/predict (default: ``batch_size``).
        num_workers: Dataloader worker processes.
        pin_memory: Pin host memory when a GPU is used.
    """

    dataset_name = "UPMC-Food101"
    layout_hint = ("UPMC-Food101 expects images/{train,test}/<class>/<image_filename> and "
                   "texts/{train,test}_titles.csv under the data root; see data/README.md.")

    def __init__(
        self,
        root: str = "${MIT_DATA_ROOT:-data}/food101",
        prompt_template: str = DEFAULT_PROMPT,
        image_size: int | None = None,
        val_size: int | float = 6846,
        split_seed: int = 0,
        split_dir: str | None = None,
        train_split: Split = "train",
        val_splits: Sequence[Split] = ("val",),
        test_splits: Sequence[Split] = ("test",),
        predict_splits: Sequence[Split] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(root, prompt_template, image_size, train_split=train_split, val_splits=val_splits,
                         test_splits=test_splits, predict_splits=predict_splits, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if isinstance(val_size, float) and not 0 < val_size < 1:
            raise UserError(f"data.val_size must be a count of images or a fraction in (0, 1), got {val_size}.")
        if isinstance(val_size, int) and val_size < 1:
            raise UserError(f"data.val_size must be at least 1, got {val_size}.")
        self.val_size = val_size
        self.split_seed = split_seed
        self.split_dir = split_dir
        self._title_rows: dict[str, list[tuple[str, str, str]]] = {}
        self._val_ids: set[str] | None = None

    # --- files ------------------------------------------------------------------------------
    def _required_paths(self, split: str) -> dict[Path, str]:
        check_choice(f"{self.dataset_name} split", split, Split)
        source = SOURCES[split]
        return {
            self.root / "images" / source: f"{source} images, one folder per class",
            self.root / "texts" / f"{source}_titles.csv": f"{source} titles: image_filename,title,class",
        }

    def _rows(self, source: str) -> list[tuple[str, str, str]]:
        if source not in self._title_rows:
            self._title_rows[source] = read_titles_csv(self.root / "texts" / f"{source}_titles.csv")
        return self._title_rows[source]

    @property
    def class_names(self) -> list[str]:
        return sorted({class_name for _, _, class_name in self._rows("train")})

    # --- validation split -------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs once before the ranks set up: draw and write the split file so all of them read it."""
        if any(SOURCES[split] == "train" for split in self.all_splits):
            self.val_ids()

    def val_ids(self) -> set[str]:
        """Image filenames of the validation split, read from its file (drawn and written first if absent)."""
        if self._val_ids is None:
            ids_by_class: dict[str, list[str]] = {}
            train_images = {filename: class_name for filename, _, class_name in self._rows("train")}
            for filename, class_name in train_images.items():
                ids_by_class.setdefault(class_name, []).append(filename)
            total = sum(len(ids) for ids in ids_by_class.values())
            count = round(self.val_size * total) if isinstance(self.val_size, float) else self.val_size
            if not 0 < count < total:
                raise UserError(f"data.val_size={self.val_size} gives {count} validation images, but train has "
                                f"{total}; choose a smaller value.")
            name = f"food101_val_ids_seed{self.split_seed}_{count}.txt"
            existing = [folder / name for folder in self._split_dirs() if (folder / name).is_file()]
            if existing:
                self._val_ids = self._read_split_file(existing[0], count, ids_by_class)
            else:
                chosen = stratified_sample(ids_by_class, count, self.split_seed)
                self._write_split_file(name, chosen, total)
                self._val_ids = set(chosen)
        return self._val_ids

    def _split_dirs(self) -> list[Path]:
        if self.split_dir is not None:
            return [Path(expand_env(self.split_dir))]
        run_dir = self.trainer.default_root_dir if self.trainer is not None else os.getcwd()
        return [self.root / "splits", Path(run_dir) / "splits"]

    def _read_split_file(self, path: Path, count: int, ids_by_class: dict[str, list[str]]) -> set[str]:
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"Cannot read the validation split file '{path}' ({error}); delete it to draw the split "
                            "again.") from None
        ids = [line for line in lines if line and not line.startswith("#")]
        known = {filename for filenames in ids_by_class.values() for filename in filenames}
        unknown = [filename for filename in ids if filename not in known]
        problem = None
        if unknown:
            problem = f"{len(unknown)} listed images are not in train_titles.csv (first: {', '.join(unknown[:3])})"
        elif len(set(ids)) != len(ids):
            problem = f"it lists {len(ids) - len(set(ids))} images more than once"
        elif len(ids) != count:
            problem = f"it lists {len(ids)} images, but data.val_size asks for {count}"
        if problem:
            raise UserError(f"The validation split file '{path}' does not match the data under '{self.root}': "
                            f"{problem}. It was made for other data: delete it to draw the split again, or set "
                            "data.split_dir to another folder.")
        log.info("%s: validation split read from %s (%d images).", self.dataset_name, path, count)
        return set(ids)

    def _write_split_file(self, name: str, ids: list[str], total: int) -> None:
        header = (f"# {self.dataset_name} validation split: {len(ids)} of {total} train images, stratified by class, "
                  f"seed {self.split_seed}. One image_filename per line; the other train images form 'train'.\n")
        tried = []
        for folder in self._split_dirs():
            path = folder / name
            temporary = folder / f".{name}.{os.getpid()}.tmp"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                temporary.write_text(header + "".join(f"{filename}\n" for filename in ids), encoding="utf-8")
                os.replace(temporary, path)  # atomic: a reader never sees half a file
            except OSError as error:
                tried.append(f"{folder} ({error.strerror or error})")
                continue
            log.info("%s: validation split (%d images, seed %d) written to %s.", self.dataset_name, len(ids),
                     self.split_seed, path)
            return
        raise UserError(f"Cannot write the {self.dataset_name} validation split file to {', '.join(tried)}; "
                        "set data.split_dir to a writable folder.")

    # --- samples ----------------------------------------------------------------------------
    def _read_records(self, split: str, report: SetupReport) -> list[ImageTextRecord]:
        source = SOURCES[split]
        rows = self._rows(source)
        if source == "train":
            in_val = self.val_ids()
            rows = [row for row in rows if (row[0] in in_val) == (split == "val")]
        class_ids = {name: position for position, name in enumerate(self.class_names)}
        unknown = sorted({class_name for _, _, class_name in rows} - class_ids.keys())
        if unknown:
            raise UserError(f"{self.root / 'texts' / f'{source}_titles.csv'} has classes that train_titles.csv lacks: "
                            f"{', '.join(unknown[:5])}.")
        images = self.root / "images" / source
        return [ImageTextRecord(str(images / class_name / filename), title, class_ids[class_name])
                for filename, title, class_name in rows]
