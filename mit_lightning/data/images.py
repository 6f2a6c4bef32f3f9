"""Image decoding shared by the data modules: RGB, square-resized, uint8 CHW.

Normalisation (the vision tower's mean/std) happens on the device inside the model, so workers
ship compact uint8 tensors and every data module works with any vision tower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; raises OSError (missing/unreadable) for the caller to count."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def to_square_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to size×size (no crop: a referring expression may point at the border) → uint8 (3, S, S)."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of a binary (H, W) mask to size×size → uint8 tensor."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(resized) > 127).astype(np.uint8))
