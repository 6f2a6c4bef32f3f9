"""What `mit predict` writes: one JSON line per sample, and mask overlays for segmentation.

Written batch by batch, so predicting a whole split never holds its outputs in memory. A
segmentation mask is saved exactly as the test scores it, and drawn over the original image
(prediction in red). A folder that already holds predictions is never appended to.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from mit_lightning.data.images import load_rgb, overlay
from mit_lightning.errors import UserError, make_folder

#: what a prediction folder holds once written
OUTPUTS = ("predictions.rank*.jsonl", "masks", "overlays")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "sample"


def _plain(value: Any) -> Any:
    """One sample's value as JSON: tensors become numbers or lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else [round(v, 6) for v in value.float().tolist()]
    return value


class PredictionWriter(BasePredictionWriter):
    """Writes `predictions.rank<N>.jsonl` (and `masks/`, `overlays/` for segmentation) into `output_dir`.

    Each row carries what joins it back to the data (split, index, ref_id/sent_id or id, image path),
    the prompt the model read, the true label where known, and the prediction. Segmentation masks
    are saved exactly as the test scores them (same size, same decision rule); the overlay shows the
    mask over the original image.

    Args:
        output_dir: where to write; the run directory's `predictions/` when left unset by the CLI.
        class_names: names for classification outputs (from the data module when available).
        overwrite: replace predictions already in `output_dir`; otherwise such a folder is refused.
    """

    def __init__(self, output_dir: str, class_names: list[str] | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.class_names = class_names
        self.overwrite = overwrite
        self.not_finite: list[str] = []  # samples whose prediction was NaN or infinite

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        hint = "Write the predictions elsewhere (the writer's output_dir, or the run folder: --trainer.default_root_dir)."
        if trainer.is_global_zero:
            make_folder(self.output_dir, "The predictions folder", hint)
        earlier = [path for pattern in OUTPUTS for path in self.output_dir.glob(pattern)]
        if earlier and trainer.is_global_zero:
            if not self.overwrite:
                raise UserError(f"'{self.output_dir}' already holds predictions ({earlier[0].name}, ...). Write them "
                                "elsewhere, or set the writer's overwrite: true to replace them.")
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        trainer.strategy.barrier("PredictionWriter.setup")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.class_names is None:
            spec = getattr(trainer.datamodule, "spec", None)
            self.class_names = getattr(spec, "class_names", None)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if prediction is None:
            return
        splits = getattr(trainer.datamodule, "predict_splits", None) or [str(dataloader_idx)]
        split = splits[dataloader_idx] if dataloader_idx < len(splits) else str(dataloader_idx)
        rows = [self._row(prediction, position, split) for position in range(len(prediction["index"]))]
        with (self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl").open("a") as file:
            for row in rows:
                file.write(json.dumps(self._finite(row)) + "\n")

    def _finite(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row whose prediction is NaN or infinite says so (null and ``"error"``): JSON has no NaN, and a number
        there would be taken for an answer. They are counted and reported at the end."""
        values = [row.get("prediction"), *(row.get("probabilities") or [])]
        if all(not isinstance(value, float) or math.isfinite(value) for value in values):
            return row
        self.not_finite.append(f"{row['split']} #{row['index']}")
        return {**row, "prediction": None, "probabilities": None, "error": "the model's output is not finite"}

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.not_finite:
            rank_zero_warn(f"{len(self.not_finite)} predictions were not finite numbers (first: "
                           f"{', '.join(self.not_finite[:3])}); their rows in {self.output_dir} hold null and an "
                           "'error'.")

    def _row(self, prediction: dict[str, Any], position: int, split: str) -> dict[str, Any]:
        """One sample's row: its values as the head names them; a 2-D one (a mask) written as PNG files instead."""
        row: dict[str, Any] = {"split": split}
        images = {key: values[position] for key, values in prediction.items()
                  if isinstance(values[position], torch.Tensor) and values[position].dim() == 2}
        for key, values in prediction.items():
            if key not in images:
                row[key] = _plain(values[position])
        for key, image in images.items():
            row.update(self._write_mask(key, image.numpy(), row, split))
        if self.class_names:
            for key in ("prediction", "label"):
                if isinstance(row.get(key), int):
                    row[f"{key}_name"] = self.class_names[row[key]]
        return row

    def _write_mask(self, key: str, mask: np.ndarray, row: dict[str, Any], split: str) -> dict[str, str]:
        """`key` (mask) as a black-and-white PNG in <key>s/ and drawn over the sample's image in overlays/."""
        name = f"{split}_{row['index']:06d}_{_slug(row.get('sentence', ''))}.png"
        mask_path = self.output_dir / f"{key}s" / name
        overlay_path = self.output_dir / "overlays" / name
        mask_path.parent.mkdir(exist_ok=True)
        overlay_path.parent.mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        overlay(load_rgb(row["image_path"], upright=False), mask).save(overlay_path)  # the mask's (dataset's) frame
        return {key: str(mask_path), "overlay": str(overlay_path)}
