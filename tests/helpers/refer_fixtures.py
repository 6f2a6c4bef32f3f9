"""A tiny RefCOCO written by hand in the real refer layout, for any test that needs one.

    <root>/images/train2014/COCO_train2014_<id:012d>.jpg
    <root>/refcoco/instances.json
    <root>/refcoco/refs(unc).p          (pickle protocol 2; optionally byte for byte as Python 2 wrote it)

Every segmentation is made of axis-aligned rectangles with integer corners: pycocotools fills
exactly the pixels x0 <= x < x1, y0 <= y < y1 of such a polygon, so expected masks are computed
independently with array slicing (`rectangles_mask`) and their areas are written out by hand.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Rectangle = tuple[int, int, int, int]  # x0, y0, x1, y1

#: image id -> (split, width, height); RefCOCO splits by image, so every ref of an image shares its split
IMAGES: dict[int, tuple[str, int, int]] = {
    1: ("train", 40, 40),
    2: ("val", 48, 32),
    3: ("testA", 32, 32),
    4: ("testB", 32, 32),
}

#: annotation id -> (image id, rectangles); 201 has two overlapping parts (overlap 6×6 = 36 px)
ANNOTATIONS: dict[int, tuple[int, list[Rectangle]]] = {
    101: (1, [(4, 4, 14, 14)]),
    102: (1, [(20, 20, 36, 36)]),
    201: (2, [(4, 4, 16, 16), (10, 10, 24, 28)]),
    202: (2, [(30, 4, 46, 14)]),
    301: (3, [(8, 8, 24, 24)]),
    401: (4, [(0, 0, 16, 32)]),
}

#: counted by hand: 201 is 12·12 + 14·18 − 6·6 (the union; summing parts and keeping ==1 would give 324)
AREAS = {101: 100, 102: 256, 201: 360, 202: 160, 301: 256, 401: 512}

#: ref id -> (annotation id, raw sentences); `sent` is derived like the dataset authors did (lower-cased tokens)
REFS: dict[int, tuple[int, list[str]]] = {
    0: (101, ["The man on the LEFT.", "left guy"]),
    1: (102, ["Right Person", "the one on the right", "guy at right"]),
    2: (201, ["The café sign", "sign"]),
    3: (202, ["Top right box"]),
    4: (301, ["middle thing", "The centre"]),
    5: (401, ["left half"]),
}


@dataclass(frozen=True)
class ReferFixture:
    root: Path
    image_dir: Path
    instances: Path
    refs: Path


def rectangle_polygon(rectangle: Rectangle) -> list[float]:
    x0, y0, x1, y1 = rectangle
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def rectangles_mask(rectangles: list[Rectangle], height: int, width: int) -> np.ndarray:
    """The union of the rectangles by slicing: independent of pycocotools."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in rectangles:
        mask[y0:y1, x0:x1] = 1
    return mask


def image_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def sentence_record(raw: str, sent_id: int) -> dict[str, Any]:
    tokens = "".join(c if c.isalnum() else " " for c in raw.lower()).split()
    return {"tokens": tokens, "raw": raw, "sent_id": sent_id, "sent": " ".join(tokens)}


def refs_records() -> list[dict[str, Any]]:
    """REFS as the refs pickle holds them; sent ids are ref_id·10 + position."""
    records = []
    for ref_id, (ann_id, raws) in REFS.items():
        image_id = ANNOTATIONS[ann_id][0]
        sentences = [sentence_record(raw, ref_id * 10 + i) for i, raw in enumerate(raws)]
        records.append({
            "image_id": image_id, "split": IMAGES[image_id][0], "sentences": sentences,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",  # the misleading suffixed name
            "category_id": 1, "ann_id": ann_id, "sent_ids": [s["sent_id"] for s in sentences], "ref_id": ref_id,
        })
    return records


def instances_record() -> dict[str, Any]:
    images = [{"id": image_id, "file_name": image_file_name(image_id), "height": height, "width": width}
              for image_id, (_, width, height) in IMAGES.items()]
    annotations = []
    for ann_id, (image_id, rectangles) in ANNOTATIONS.items():
        x0, y0 = min(r[0] for r in rectangles), min(r[1] for r in rectangles)
        x1, y1 = max(r[2] for r in rectangles), max(r[3] for r in rectangles)
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "area": float(AREAS[ann_id]), "bbox": [float(v) for v in (x0, y0, x1 - x0, y1 - y0)],
                            "segmentation": [rectangle_polygon(r) for r in rectangles]})
    return {"info": {}, "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}


def python2_pickle(obj: Any) -> bytes:
    """Protocol-2 bytes as Python 2's cPickle wrote them: `str` as SHORT_BINSTRING/BINSTRING raw
    (here latin-1) bytes, containers memoised with BINPUT. Python 3 reads such strings as ASCII by
    default, so a non-ASCII byte fails unless the reader falls back to latin-1."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    memo = 0

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]) if memo < 256 else b"r" + struct.pack("<I", memo))
        memo += 1

    def dump(value: Any) -> None:
        if value is None:
            out.extend(b"N")
        elif isinstance(value, bool):
            out.extend(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            out.extend(b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value))
        elif isinstance(value, float):
            out.extend(b"G" + struct.pack(">d", value))
        elif isinstance(value, str):
            data = value.encode("latin-1")
            out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data)
            put()
        elif isinstance(value, list):
            out.extend(b"]")
            put()
            if value:
                out.extend(b"(")
                for item in value:
                    dump(item)
                out.extend(b"e")  # APPENDS
        elif isinstance(value, dict):
            out.extend(b"}")
            put()
            if value:
                out.extend(b"(")
                for key, item in value.items():
                    dump(key)
                    dump(item)
                out.extend(b"u")  # SETITEMS
        else:
            raise TypeError(f"python2_pickle does not write {type(value).__name__}")

    dump(obj)
    out.extend(b".")
    return bytes(out)


def write_refer_fixture(root: Path, *, dataset: str = "refcoco", split_by: str = "unc",
                        image_folder: str = "images/train2014", python2: bool = False) -> ReferFixture:
    """Write the fixture under `root`; `python2=True` writes the refs pickle as Python 2 did."""
    image_dir = root / image_folder
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id, (_, width, height) in IMAGES.items():
        pixels = np.full((height, width, 3), 90, dtype=np.uint8)
        for ann_image, rectangles in ANNOTATIONS.values():
            if ann_image == image_id:
                pixels[rectangles_mask(rectangles, height, width).astype(bool)] = (200, 40, 40)
        Image.fromarray(pixels).save(image_dir / image_file_name(image_id), quality=95)
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    instances = folder / "instances.json"
    instances.write_text(json.dumps(instances_record()), encoding="utf-8")
    refs = folder / f"refs({split_by}).p"
    records = refs_records()
    refs.write_bytes(python2_pickle(records) if python2 else pickle.dumps(records, protocol=2))
    return ReferFixture(root=root, image_dir=image_dir, instances=instances, refs=refs)


def samples_by_split() -> dict[str, list[tuple[int, int]]]:
    """(ref_id, sent_id) of every sentence, by split: what evaluation must serve."""
    grouped: dict[str, list[tuple[int, int]]] = {}
    for record in refs_records():
        grouped.setdefault(record["split"], []).extend((record["ref_id"], sent_id) for sent_id in record["sent_ids"])
    return grouped
