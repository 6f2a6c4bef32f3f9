"""A small synthetic referring-segmentation dataset, written in the real refer layout.

It lets the demo and the tests run the RefCOCO loader end to end without COCO. Each image holds
2–4 flat-coloured shapes (circle, square, triangle, diamond) on a noisy grey background; within an
image every object has its own colour and its own shape, so every sentence ("the red circle",
"the circle that is red", "the red one", ...) names exactly one object. About a quarter of the
shapes are cut in two by a thin gap, so masks made of two polygons are exercised. Splits:
train / val / test (images are split, as in RefCOCO; there is no testA/testB), and optionally
test_unseen: new images whose expressions use words and sentence shapes never seen in training
("the crimson disc", "find the box in azure"), which a pretrained LLM may still understand.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mit_lightning.data.refer import COLLECTIONS, RefCOCODataModule, dataset_split_by, decode_mask, segmentation_to_rle
from mit_lightning.errors import UserError, expand_env, make_folder

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (150, 60, 195),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")  # category ids 1..4
EXPRESSIONS = ("the {colour} {shape}", "{colour} {shape}", "the {shape} that is {colour}", "the {colour} one",
               "the {shape}")
#: the test_unseen split's wording: synonyms of every colour and shape, and sentence shapes of its own
UNSEEN_COLOURS = {"red": ("crimson", "scarlet"), "green": ("emerald", "lime"), "blue": ("azure", "navy"),
                  "yellow": ("golden", "lemon"), "purple": ("violet", "lilac"), "orange": ("amber", "tangerine")}
UNSEEN_SHAPES = {"circle": ("disc", "round shape"), "square": ("box", "block"), "triangle": ("wedge", "pyramid"),
                 "diamond": ("rhombus", "lozenge")}
UNSEEN_EXPRESSIONS = ("find the {colour} {shape}", "the {shape} in {colour}", "pick the {shape} coloured {colour}",
                      "a {colour} {shape}")
SPLITS = ("train", "val", "test", "test_unseen")
MARKER = "synthetic_refer.json"  # written last: its presence means the dataset is complete
GENERATOR_VERSION = 1
CUT_PROBABILITY = 0.25


# --- one image --------------------------------------------------------------------------------
def shape_polygon(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Convex outline (N, 2) filling the box of half-size `half`, in COCO pixel coordinates (pixel i spans [i, i+1))."""
    if shape == "circle":
        angles = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
        return np.stack([cx + half * np.cos(angles), cy + half * np.sin(angles)], axis=1)
    corners = {
        "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "triangle": [(0, -1), (1, 1), (-1, 1)],
        "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    }[shape]
    return np.array([(cx + half * dx, cy + half * dy) for dx, dy in corners], dtype=float)


def clip_half_plane(polygon: np.ndarray, axis: int, bound: float, keep_below: bool) -> np.ndarray:
    """Sutherland–Hodgman against one axis-aligned line: the part of a convex polygon on one side."""
    inside = (polygon[:, axis] <= bound) if keep_below else (polygon[:, axis] >= bound)
    kept = []
    for i in range(len(polygon)):
        a, b = polygon[i], polygon[(i + 1) % len(polygon)]
        if inside[i]:
            kept.append(a)
        if inside[i] != inside[(i + 1) % len(polygon)]:
            t = (bound - a[axis]) / (b[axis] - a[axis])
            kept.append(a + t * (b - a))
    return np.array(kept, dtype=float).reshape(-1, 2)


def object_parts(shape: str, cx: float, cy: float, half: float, cut: bool, gap: float,
                 rng: np.random.Generator) -> list[list[float]]:
    """COCO polygon list of a shape; a cut shape is two polygons either side of a thin gap."""
    outline = shape_polygon(shape, cx, cy, half)
    if not cut:
        parts = [outline]
    else:
        axis = int(rng.integers(2))
        centre = (cx, cy)[axis] + rng.uniform(-0.25, 0.25) * half
        parts = [clip_half_plane(outline, axis, centre - gap / 2, keep_below=True),
                 clip_half_plane(outline, axis, centre + gap / 2, keep_below=False)]
    return [[round(float(v), 2) for v in part.reshape(-1)] for part in parts if len(part) >= 3]


def place_objects(count: int, size: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """`count` objects with distinct colours and shapes, each in its own randomly chosen quadrant.

    Quadrants keep objects apart (at least 2 px) without rejection sampling, so generation stays
    fast; each object's box spans 66–92% of its quadrant's side, jittered inside it, which makes
    an object cover about 5–20% of the image depending on its shape.
    """
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count, replace=False)
    cell = size / 2
    objects = []
    for colour, shape, quadrant in zip(colours, shapes, rng.choice(4, size=count, replace=False)):
        half = rng.uniform(0.33, 0.46) * cell
        centre = np.array([quadrant % 2, quadrant // 2]) * cell + rng.uniform(half + 1, cell - half - 1, size=2)
        parts = object_parts(str(shape), centre[0], centre[1], half, bool(rng.random() < CUT_PROBABILITY),
                             gap=max(2.0, size / 24), rng=rng)
        mask = decode_mask(segmentation_to_rle(parts, size, size)).astype(bool)
        objects.append({"colour": str(colour), "shape": str(shape), "parts": parts, "mask": mask})
    return objects


def render(objects: Sequence[dict[str, Any]], size: int, rng: np.random.Generator) -> Image.Image:
    """Paint each object exactly on its decoded mask, so image and annotation agree pixel for pixel."""
    background = rng.uniform(90, 160) + rng.uniform(-10, 10, size=3)
    pixels = np.broadcast_to(background, (size, size, 3)).copy()
    for obj in objects:
        pixels[obj["mask"]] = COLOURS[obj["colour"]]
    pixels += rng.normal(0.0, 6.0, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def describe(colour: str, shape: str, rng: np.random.Generator, sent_id: int,
             unseen: bool = False) -> list[dict[str, Any]]:
    """2–3 distinct referring expressions in the refs format: `raw` as typed, `sent` lower-cased tokens.

    `unseen`: in the test_unseen split's words (a synonym of the colour and of the shape) and sentence shapes."""
    templates = UNSEEN_EXPRESSIONS if unseen else EXPRESSIONS
    chosen = rng.choice(len(templates), size=int(rng.integers(2, 4)), replace=False)
    sentences = []
    for offset, choice in enumerate(chosen):
        words = (rng.choice(UNSEEN_COLOURS[colour]), rng.choice(UNSEEN_SHAPES[shape])) if unseen else (colour, shape)
        raw = templates[choice].format(colour=words[0], shape=words[1])
        if rng.random() < 0.5:
            raw = raw[0].upper() + raw[1:]
        if rng.random() < 0.3:
            raw += "."
        tokens = re.findall(r"[a-z]+", raw.lower())
        sentences.append({"tokens": tokens, "raw": raw, "sent_id": sent_id + offset, "sent": " ".join(tokens)})
    return sentences


# --- the whole dataset ------------------------------------------------------------------------
def _settings(*, dataset: str, split_by: str | None, train_images: int, val_images: int, test_images: int,
              test_unseen_images: int = 0, image_size: int, seed: int) -> dict[str, Any]:
    """Validated generator settings; the same dict is stored in the marker to recognise the dataset.

    Without a test_unseen split the dict is the one written before that split existed, so datasets
    generated then are still recognised (their other splits are the same images either way)."""
    split_by = dataset_split_by(dataset, split_by)
    for name, value in (("train_images", train_images), ("val_images", val_images), ("test_images", test_images)):
        if value < 1:
            raise UserError(f"The synthetic dataset needs at least one image per split; {name} is {value}.")
    if test_unseen_images < 0:
        raise UserError(f"test_unseen_images is {test_unseen_images}; give 0 (no test_unseen split) or more.")
    if image_size < 32:
        raise UserError(f"Synthetic images need at least 32 pixels to hold their shapes; image_size is {image_size}.")
    unseen = {"test_unseen_images": test_unseen_images} if test_unseen_images else {}
    return {"generator": __name__, "version": GENERATOR_VERSION, "dataset": dataset, "split_by": split_by,
            "train_images": train_images, "val_images": val_images, "test_images": test_images, **unseen,
            "image_size": image_size, "seed": seed}


def _write_files(folder: Path, settings: dict[str, Any]) -> None:
    """Images, instances.json and refs(<split_by>).p (pickle protocol 2, like the originals), marker last."""
    size, dataset = settings["image_size"], settings["dataset"]
    image_dir = folder / COLLECTIONS[dataset].image_dirs[0]
    image_dir.mkdir(parents=True)
    splits = [split for split in SPLITS for _ in range(settings.get(f"{split}_images", 0))]
    images, annotations, refs = [], [], []
    next_sent_id = 0
    for image_id, split in enumerate(splits, start=1):
        rng = np.random.default_rng([settings["seed"], image_id])
        objects = place_objects(int(rng.integers(2, 5)), size, rng)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        render(objects, size, rng).save(image_dir / file_name, quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for obj in objects:
            ann_id, ref_id = len(annotations) + 1, len(refs)
            category_id = SHAPES.index(obj["shape"]) + 1
            rle = segmentation_to_rle(obj["parts"], size, size)
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
                                "segmentation": obj["parts"], "area": float(mask_utils.area(rle)),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
            sentences = describe(obj["colour"], obj["shape"], rng, sent_id=next_sent_id, unseen=split == "test_unseen")
            next_sent_id += len(sentences)
            refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                         "category_id": category_id, "sent_ids": [s["sent_id"] for s in sentences],
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sentences": sentences})
    categories = [{"id": i, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES, start=1)]
    (folder / dataset).mkdir()
    instances = {"images": images, "annotations": annotations, "categories": categories}
    (folder / dataset / "instances.json").write_text(json.dumps(instances), encoding="utf-8")  # dumps: the C encoder
    with open(folder / dataset / f"refs({settings['split_by']}).p", "wb") as file:
        pickle.dump(refs, file, protocol=2)
    (folder / MARKER).write_text(json.dumps(settings, indent=2) + "\n")


def _holds(root: Path, settings: dict[str, Any]) -> bool:
    """True if `root` is a complete synthetic dataset made with these settings; an error if made with others."""
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):
        found = None
    if found == settings:
        return True
    raise UserError(f"'{root}' holds a synthetic dataset generated with other settings ({marker} says {found}, "
                    f"wanted {settings}). Delete '{root}' to generate it again, or choose another root.")


def _not_ours(root: Path) -> UserError:
    return UserError(f"'{root}' already exists and is not a complete synthetic dataset (it has no '{MARKER}'), "
                     "so nothing is written there. Choose another root, or delete that folder if it only holds "
                     "the remains of an earlier generation.")


def write_synthetic_refer(root: str | os.PathLike, *, dataset: str = "refcoco", split_by: str | None = None,
                          train_images: int = 600, val_images: int = 60, test_images: int = 100,
                          test_unseen_images: int = 0, image_size: int = 64, seed: int = 0) -> Path:
    """Write the synthetic dataset at `root` in the refer layout, or reuse it if already there; returns the root.

    Nothing existing is overwritten or deleted: the files are written into a fresh sibling folder
    that is renamed to `root` when complete, so only a missing or empty `root` is ever filled.
    Deterministic for given settings.
    """
    root = Path(expand_env(str(root)))
    settings = _settings(dataset=dataset, split_by=split_by, train_images=train_images, val_images=val_images,
                         test_images=test_images, test_unseen_images=test_unseen_images, image_size=image_size,
                         seed=seed)
    if _holds(root, settings):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise _not_ours(root)
    make_folder(root.parent, "The folder of the synthetic dataset", "Choose another data.root.")
    staging = root.parent / f".{root.name}-partial-{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir()
        _write_files(staging, settings)
        try:
            os.rename(staging, root)  # atomic; fails if another process filled `root` meanwhile
        except OSError:
            if not _holds(root, settings):
                raise _not_ours(root) from None
    except OSError as error:
        raise UserError(f"Cannot write the synthetic dataset beside '{root}' ({error.strerror or error}). Choose "
                        "another data.root.") from None
    finally:
        if staging.exists():  # only ever our own staging folder
            shutil.rmtree(staging)
    return root


class SyntheticRefCOCODataModule(RefCOCODataModule):
    """`RefCOCODataModule` on the synthetic dataset, which `prepare_data` generates when absent.

    Args:
        root: Where the synthetic dataset is (or will be) written.
        train_images: Number of training images (2–4 refs each).
        val_images: Number of validation images.
        test_images: Number of test images.
        test_unseen_images: Number of images of the test_unseen split, described in words and sentence shapes never
            seen in training (0: no such split).
        generated_image_size: Side of the generated square images in pixels.
        seed: Generator seed; the dataset is the same for the same settings.
        test_splits: Splits tested on (the synthetic splits are train, val, test and, with test_unseen_images,
            test_unseen).
        mask_size: Side of the square target masks.
        **kwargs: Any other `RefCOCODataModule` argument.
    """

    files_exist_at_init = False

    def __init__(
        self,
        root: str = "data/demo",
        train_images: int = 600,
        val_images: int = 60,
        test_images: int = 100,
        test_unseen_images: int = 0,
        generated_image_size: int = 64,
        seed: int = 0,
        test_splits: Sequence[str] = ("test",),
        mask_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, test_splits=test_splits, mask_size=mask_size, **kwargs)
        self.generator_args = dict(dataset=self.dataset, split_by=self.split_by, train_images=train_images,
                                   val_images=val_images, test_images=test_images,
                                   test_unseen_images=test_unseen_images, image_size=generated_image_size, seed=seed)
        _settings(**self.generator_args)  # bad sizes fail now, not in prepare_data

    def prepare_data(self) -> None:
        write_synthetic_refer(self.root_setting, **self.generator_args)
