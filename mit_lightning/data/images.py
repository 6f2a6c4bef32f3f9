"""Image decoding shared by the data modules: RGB, square-resized, uint8 CHW.

Normalisation (the vision tower's mean/std) happens on the device inside the model, so workers
ship compact uint8 tensors and every data module works with any vision tower.

An image file that exists but cannot be decoded (truncated, zero bytes, not an image) is only
found when a worker loads it. Every data module then returns an `UnreadableImage` marker in place
of the sample; `mit_lightning.data.base.collate` drops it from the batch and lists its path in
``batch["skipped"]``, and the model reports the skipped samples once per epoch. The epoch goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

#: what PIL raises for missing, broken, truncated or unrecognised files, and for headers declaring a decompression bomb
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
#: the EXIF tag saying how a photo is to be turned for display
EXIF_ORIENTATION = 0x0112


class UnreadableImage(NamedTuple):
    """Returned by a dataset in place of a sample whose image could not be decoded."""

    path: str


class ImageTooLarge(ValueError):
    """An image with more pixels than the caller accepts (found from the header, before decoding)."""


def load_rgb(path: str | Path | BinaryIO, max_pixels: int | None = None, *, upright: bool = True) -> Image.Image:
    """Open an image (a path or a binary file) as RGB; raises one of `DECODE_ERRORS` (missing/unreadable,
    or `ImageTooLarge`) for the caller to handle.

    `upright`: turned as its EXIF orientation says, as viewers and browsers show a photo (a phone's portrait
    photo is stored sideways). False keeps the pixels as stored: the frame annotations such as COCO's refer to.
    """
    with Image.open(path) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLarge(f"it is {image.width}×{image.height} pixels, more than the {max_pixels:,} accepted")
        image.load()
        return (ImageOps.exif_transpose(image) if upright else image).convert("RGB")


def read_rgb(path: str | Path, *, upright: bool = True) -> Image.Image | UnreadableImage:
    """The image as RGB (`load_rgb`), or an `UnreadableImage` marker for the dataset to return instead of its sample."""
    try:
        return load_rgb(path, upright=upright)
    except DECODE_ERRORS as error:
        log.debug("Cannot decode %s: %s", path, error)
        return UnreadableImage(str(path))


def header_size(path: str | Path) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) from the file's header alone (no pixel decoding; orientation 1 = as
    stored); None if the header is unreadable."""
    try:
        with Image.open(path) as image:
            return (*image.size, int(image.getexif().get(EXIF_ORIENTATION, 1) or 1))
    except (*DECODE_ERRORS, TypeError):
        return None


def to_square_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to size×size (no crop: a referring expression may point at the border) → uint8 (3, S, S)."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of a binary (H, W) mask to size×size → uint8 tensor."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(resized) > 127).astype(np.uint8))


# --- drawing masks ---------------------------------------------------------------------------------
OVERLAY_COLOUR = np.array([230, 25, 25], dtype=np.float32)
#: colours a mask can be drawn in where red would not show (a red object): red, cyan, yellow, blue
CONTRASTING_COLOURS = np.array([[230, 25, 25], [0, 210, 230], [245, 225, 0], [30, 60, 235]], dtype=np.float32)


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
