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

from mit_lightning.data.images import load_rgb
from mit_lightning.errors import UserError, make_folder

OVERLAY_COLOUR = np.array([230, 25, 25], dtype=np.float32)
#: colours a mask can be drawn in where red would not show (a red object): red, cyan, yellow, blue
CONTRASTING_COLOURS = np.array([[230, 25, 25], [0, 210, 230], [245, 225, 0], [30, 60, 235]], dtype=np.float32)
#: what a prediction folder holds once written
OUTPUTS = ("predictions.rank*.jsonl", "masks", "overlays")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "sample"


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.5, colour: np.ndarray = OVERLAY_COLOUR) -> Image.Image:
    """The mask in `colour` (red) over the image; a mask of another size is stretched to the image (nearest neighbour)."""
    if mask.shape != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask).resize((image.width, image.height), Image.Resampling.NEAREST))
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def contrasting_colour(image: Image.Image, mask: np.ndarray, distinct: float = 150.0) -> np.ndarray:
    """Red, unless the masked pixels are close to red (mean colour within `distinct`): then the colour of
    `CONTRASTING_COLOURS` farthest from them, so the overlay always shows."""
    if not mask.any() or mask.shape != (image.height, image.width):
        return OVERLAY_COLOUR
    distances = np.linalg.norm(CONTRASTING_COLOURS - np.asarray(image, dtype=np.float32)[mask].mean(axis=0), axis=1)
    return OVERLAY_COLOUR if distances[0] >= distinct else CONTRASTING_COLOURS[distances.argmax()]


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
        row: dict[str, Any] = {"split": split}
        for key, values in prediction.items():
            if key not in ("mask", "probability"):
                row[key] = _plain(values[position])
        if "mask" in prediction:
            row.update(self._write_mask(prediction["mask"][position].numpy(), row, split))
        if "probability" in prediction:
            row["probabilities"] = _plain(prediction["probability"][position])
        if self.class_names:
            for key in ("prediction", "label"):
                if isinstance(row.get(key), int):
                    row[f"{key}_name"] = self.class_names[row[key]]
        return row

    def _write_mask(self, mask: np.ndarray, row: dict[str, Any], split: str) -> dict[str, str]:
        name = f"{split}_{row['index']:06d}_{_slug(row.get('sentence', ''))}.png"
        mask_path = self.output_dir / "masks" / name
        overlay_path = self.output_dir / "overlays" / name
        mask_path.parent.mkdir(exist_ok=True)
        overlay_path.parent.mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        overlay(load_rgb(row["image_path"], upright=False), mask).save(overlay_path)  # the mask's (dataset's) frame
        return {"mask": str(mask_path), "overlay": str(overlay_path)}
