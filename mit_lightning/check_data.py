"""`mit check-data --config X`: a look at the data before training, without building the model.

Per split (training, validation and test splits of the config) it prints the counts and the labels' distribution
(segmentation: refs, sentences, images; classification: samples per class; sentiment: the scores' spread and
their 7 rounded classes), lists what setting up the data excluded or repaired (the warnings a run would log),
and writes `<split>.png`: a montage of random samples as the model reads them (segmentation: the image with the
mask and its outline, and the expression; classification: the image, its text and label; sentiment: the
feature sequences of each clip, its text and score).
"""

from __future__ import annotations

import argparse
import logging
import random
import textwrap
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from mit_lightning.data.classification import ImageTextDataset
from mit_lightning.data.configured import build_datamodule
from mit_lightning.data.images import UnreadableImage, contrasting_colour, overlay
from mit_lightning.data.mmsa import MMSASplit
from mit_lightning.data.refer import ReferringSegmentationDataset
from mit_lightning.errors import make_folder
from mit_lightning.experiments import config_args
from mit_lightning.tensorboard import close_figure, grid


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="mit check-data",
        description="Read the data a config trains on (no model is built): print each split's counts, label "
                    "distribution and what was excluded at setup, and write a PNG montage of random samples per "
                    "split. Options after the known ones override the config (e.g. --data.root DIR).",
    )
    result.add_argument("--config", action="append", required=True,
                        help="the run's config file (a task config, then overlays); repeatable")
    result.add_argument("--output", default=None,
                        help="folder for the montages (default: check-data/ in the config's run folder)")
    result.add_argument("--samples", type=int, default=8, help="samples drawn per split (default 8)")
    result.add_argument("--seed", type=int, default=0, help="which random samples are drawn")
    return result


def main(args: Sequence[str]) -> None:
    from mit_lightning.cli import parse_run_config  # the CLI module imports this one's siblings

    options, overrides = parser().parse_known_args(args)
    if options.samples < 1:
        parser().error("--samples must be at least 1")
    config = parse_run_config([*config_args(options.config), *overrides])
    with setup_warnings() as notes:
        datamodule = build_datamodule(config.data.as_dict(), vision_image_size(config.model.get("vision")))
        splits = set_up(datamodule)
    output = make_folder(options.output or Path(config.trainer.get("default_root_dir") or ".") / "check-data",
                         "The output folder", "Choose another with --output.")
    class_names = datamodule.spec.class_names
    rng = random.Random(options.seed)
    for split, dataset in splits.items():
        print(f"{split}: {describe(dataset, class_names)}")
        figure, unreadable = montage(dataset, rng.sample(range(len(dataset)), min(options.samples, len(dataset))),
                                     class_names)
        path = output / f"{split}.png"
        figure.savefig(path, dpi=100)
        close_figure(figure)
        undecoded = f" ({unreadable} drawn samples skipped: their image does not decode)" if unreadable else ""
        print(f"  montage: {path}{undecoded}")
    print("Excluded or repaired at setup:" if notes else "Nothing was excluded or repaired at setup.")
    for note in notes:
        print(f"  {note}")


def vision_image_size(vision: Any) -> int | None:
    """The vision tower's input size, read from its architecture (no weights loaded); None without a tower."""
    if not vision:
        return None
    from mit_lightning.backbones.vision import VisionConfig, VisionShape

    settings = vision.as_dict() if hasattr(vision, "as_dict") else dict(vision)
    return VisionShape.from_architecture(VisionConfig(**settings).architecture()).image_size


def set_up(datamodule) -> dict[str, Any]:
    """Split name → its dataset: the training split as training reads it, then the validation and test splits."""
    datamodule.prepare_data()  # as a run does first (the synthetic data is written there)
    datamodule.setup("fit")
    datamodule.setup("test")
    splits = {datamodule.train_split: datamodule.train_dataset}
    for split in [*datamodule.val_splits, *datamodule.test_splits]:
        splits.setdefault(split, datamodule.datasets[split])
    return splits


@contextmanager
def setup_warnings() -> Iterator[list[str]]:
    """The warnings the project's modules log within the block (what setup excluded or repaired), collected
    instead of printed."""
    notes: list[str] = []
    handler = _Collect(notes)
    logger = logging.getLogger("mit_lightning")
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield notes
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _Collect(logging.Handler):
    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(record.getMessage())


# --- counts ---------------------------------------------------------------------------------------
def describe(dataset, class_names: list[str] | None) -> str:
    if isinstance(dataset, ReferringSegmentationDataset):
        objects = dataset.objects
        sentences = sum(len(obj.sentences) for obj in objects)
        images = len({obj.image_path for obj in objects})
        return f"{len(dataset)} samples; {len(objects)} refs, {sentences} sentences, {images} images"
    if isinstance(dataset, ImageTextDataset):
        counts = Counter(record.label for record in dataset.records)
        name = (lambda label: class_names[label]) if class_names else str
        shown = ", ".join(f"{name(label)} {count}" for label, count in sorted(counts.items()))
        return f"{len(dataset)} samples in {len(counts)} classes: {shown}"
    if isinstance(dataset, MMSASplit):
        return f"{len(dataset)} clips; {score_summary(dataset.arrays.labels)}"
    return f"{len(dataset)} samples"


def score_summary(scores: np.ndarray) -> str:
    """Mean, spread and range of sentiment scores, and how many fall in each of the 7 rounded classes (-3..3)."""
    classes = Counter(np.clip(np.round(scores), -3, 3).astype(int).tolist())
    histogram = " ".join(f"{value:+d}:{classes.get(value, 0)}" for value in range(-3, 4))
    return (f"scores mean {scores.mean():.2f} ± {scores.std():.2f}, from {scores.min():.2f} to {scores.max():.2f}; "
            f"negative {int((scores < 0).sum())}, neutral {int((scores == 0).sum())}, positive "
            f"{int((scores > 0).sum())}; rounded {histogram}")


# --- montage --------------------------------------------------------------------------------------
def montage(dataset, indices: Sequence[int], class_names: list[str] | None):
    """The samples at `indices` drawn in a grid, and how many were skipped for an image that does not decode."""
    items = [dataset[index] for index in indices]
    readable = [item for item in items if not isinstance(item, UnreadableImage)]
    figure, axes = grid(max(len(readable), 1))
    for axis, item in zip(axes, readable):
        if "mask" in item:
            _draw_referring(axis, item)
        elif "image" in item:
            _draw_labelled(axis, item, class_names)
        else:
            _draw_features(axis, item)
    figure.tight_layout()
    return figure, len(items) - len(readable)


def _pixels(item: dict[str, Any]) -> Image.Image:
    return Image.fromarray(item["image"].permute(1, 2, 0).numpy())


def _draw_referring(axis, item: dict[str, Any]) -> None:
    image, mask = _pixels(item), item["mask"].numpy().astype(bool)
    drawn = overlay(image, mask, alpha=0.35, colour=contrasting_colour(image, mask))
    axis.imshow(drawn, extent=(0, mask.shape[1], mask.shape[0], 0))  # the mask's frame, whatever the image size
    axis.contour(mask, levels=[0.5], colors=["#00e676"], linewidths=1.5)
    axis.set_title(textwrap.fill(textwrap.shorten(item["sentence"], 70), 34), fontsize=9)


def _draw_labelled(axis, item: dict[str, Any], class_names: list[str] | None) -> None:
    axis.imshow(_pixels(item))
    label = class_names[item["label"]] if class_names else str(item["label"])
    axis.set_title(f"{textwrap.fill(textwrap.shorten(item['text'], 70), 34)}\nlabel: {label}", fontsize=9)


def _draw_features(axis, item: dict[str, Any]) -> None:
    """Each modality's feature size (L2 norm) per real step: where the clip has signal, and how strong."""
    axis.axis("on")
    for name in sorted(key for key in item if f"{key}_mask" in item):
        features = item[name][item[f"{name}_mask"]].float()
        axis.plot(features.norm(dim=-1).numpy(), marker=".", label=f"{name} ({features.shape[0]}×{features.shape[1]})")
    axis.set_xlabel("step", fontsize=8)
    axis.set_ylabel("|features|", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7)
    axis.set_title(f"{textwrap.fill(textwrap.shorten(item['text'], 70), 34)}\nscore {item['label']:+.1f}", fontsize=9)

