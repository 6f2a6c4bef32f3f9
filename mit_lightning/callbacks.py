"""What `mit predict` writes: one JSON line per sample, and mask overlays for segmentation.

Written batch by batch, so predicting a whole split never holds its outputs in memory.
Masks are drawn at the original image size over the original image (prediction in red),
with the binary mask saved beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from mit_lightning.data.images import load_rgb

OVERLAY_COLOUR = np.array([230, 25, 25], dtype=np.float32)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "sample"


def mask_at_size(probability: torch.Tensor, height: int, width: int) -> np.ndarray:
    """uint8 probability (h, w) → boolean mask (H, W), bilinear like the evaluation."""
    resized = torch.nn.functional.interpolate(
        probability[None, None].float() / 255.0, size=(height, width), mode="bilinear", align_corners=False
    )
    return (resized[0, 0] > 0.5).numpy()


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * OVERLAY_COLOUR
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


class PredictionWriter(BasePredictionWriter):
    """Writes `predictions.jsonl` (and `masks/`, `overlays/` for segmentation) into `output_dir`.

    Args:
        output_dir: where to write; the run directory's `predictions/` when left unset by the CLI.
        class_names: names for classification outputs (from the data module when available).
    """

    def __init__(self, output_dir: str, class_names: list[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.class_names = class_names

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
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
                file.write(json.dumps(row) + "\n")

    def _row(self, prediction: dict[str, Any], position: int, split: str) -> dict[str, Any]:
        row: dict[str, Any] = {"split": split, "index": int(prediction["index"][position])}
        for key in ("image_path", "sentence", "text", "id"):
            values = prediction.get(key)
            if values is not None:
                row[key] = values[position]
        if "mask_probability" in prediction:
            row.update(self._write_mask(prediction["mask_probability"][position], row, split))
        if "prediction" in prediction:
            value = prediction["prediction"][position].item()
            row["prediction"] = value
            if self.class_names and isinstance(value, int):
                row["class_name"] = self.class_names[value]
        if "probability" in prediction:
            row["probabilities"] = [round(p, 6) for p in prediction["probability"][position].tolist()]
        return row

    def _write_mask(self, probability: torch.Tensor, row: dict[str, Any], split: str) -> dict[str, str]:
        image = load_rgb(row["image_path"])
        mask = mask_at_size(probability, image.height, image.width)
        name = f"{split}_{row['index']:06d}_{_slug(row.get('sentence', ''))}.png"
        mask_path = self.output_dir / "masks" / name
        overlay_path = self.output_dir / "overlays" / name
        mask_path.parent.mkdir(exist_ok=True)
        overlay_path.parent.mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        overlay(image, mask).save(overlay_path)
        return {"mask": str(mask_path), "overlay": str(overlay_path)}
