"""Tiny UPMC-Food101 and SNLI-VE datasets in their real on-disk formats, for any test to use.

Each writer returns a description of what it wrote (which rows, which image is missing, which
one is corrupt) so tests can check the loaders against it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

FOOD101_TRAIN_COUNTS = {"apple_pie": 8, "beignets": 4, "churros": 4}
FOOD101_TEST_COUNTS = {"apple_pie": 2, "beignets": 2, "churros": 2}
# Titles as they appear in the scraped CSV: quoted when they hold commas, quotes doubled inside.
FOOD101_TRICKY_TITLES = {
    "apple_pie_0.jpg": ('"My ""Best"" Apple Pie, Ever"', 'My "Best" Apple Pie, Ever'),
    "beignets_0.jpg": ('"Beignets, New Orleans style"', "Beignets, New Orleans style"),
    "churros_0.jpg": ('"Churros (crispy, with ""chocolate"" dip), 2 ways"',
                      'Churros (crispy, with "chocolate" dip), 2 ways'),
}


@dataclass
class Fixture:
    """What a writer put on disk."""

    root: Path
    rows: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # split -> (image id, text, class)
    missing: list[Path] = field(default_factory=list)  # listed in the annotations, no file
    corrupt: list[Path] = field(default_factory=list)  # a file that does not decode


def jpeg_bytes(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    """A small solid-colour JPEG, different per seed."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed))


def write_truncated_jpeg(path: Path) -> None:
    """The first half of a JPEG: the header opens, decoding fails (as with an interrupted download)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(0, size=(32, 24))
    path.write_bytes(data[: len(data) // 2])


def write_food101(root: Path) -> Fixture:
    """`images/{train,test}/<class>/<class>_<n>.jpg` + `texts/{train,test}_titles.csv` (no header).

    Train: 8/4/4 images of three classes, three titles quoted with commas and quotes inside.
    Test: 2 per class plus `apple_pie_9.jpg` (listed, no file) and `beignets_9.jpg` (truncated).
    """
    fixture = Fixture(root)
    seed = 0
    for split, counts in (("train", FOOD101_TRAIN_COUNTS), ("test", FOOD101_TEST_COUNTS)):
        lines, rows = [], []
        for class_name, count in counts.items():
            for n in range(count):
                filename = f"{class_name}_{n}.jpg" if split == "train" else f"{class_name}_{n + 100}.jpg"
                raw, title = FOOD101_TRICKY_TITLES.get(filename, (f"{class_name.replace('_', ' ')} recipe {n}",) * 2)
                lines.append(f"{filename},{raw},{class_name}")
                rows.append((filename, title, class_name))
                seed += 1
                write_jpeg(root / "images" / split / class_name / filename, seed)
        if split == "test":
            lines += ["apple_pie_9.jpg,Lost pie,apple_pie", "beignets_9.jpg,\"Broken, truncated beignets\",beignets"]
            rows += [("apple_pie_9.jpg", "Lost pie", "apple_pie"),
                     ("beignets_9.jpg", "Broken, truncated beignets", "beignets")]
            fixture.missing.append(root / "images" / "test" / "apple_pie" / "apple_pie_9.jpg")
            fixture.corrupt.append(root / "images" / "test" / "beignets" / "beignets_9.jpg")
            write_truncated_jpeg(fixture.corrupt[0])
        (root / "texts").mkdir(parents=True, exist_ok=True)
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        fixture.rows[split] = rows
    return fixture


def snli_pair(gold_label: str, image_id: str, hypothesis: str, n: int) -> dict:
    """One SNLI-VE line with the fields of the original release."""
    return {
        "annotator_labels": [gold_label],
        "captionID": f"{image_id}.jpg#{n % 5}",
        "gold_label": gold_label,
        "pairID": f"{image_id}.jpg#{n % 5}r1{gold_label[:1]}",
        "sentence1": "Two dogs run across a field.",
        "sentence1_binary_parse": "( ( Two dogs ) ( run ( across ( a field ) ) ) )",
        "sentence1_parse": "(ROOT (S (NP (CD Two) (NNS dogs)) (VP (VBP run)) (. .)))",
        "sentence2": hypothesis,
        "sentence2_binary_parse": "( ( Animals ) ( are outside ) )",
        "sentence2_parse": "(ROOT (S (NP (NNS Animals)) (VP (VBP are) (ADVP (RB outside))) (. .)))",
        "Flickr30K_ID": image_id,
    }


SNLI_VE_PAIRS = {
    "train": [("entailment", "1000092795", "Animals are outside."),
              ("neutral", "1000092795", "The dogs are racing for a prize."),
              ("contradiction", "10002456", "The dogs sleep on a sofa."),
              ("entailment", "10002456", "Dogs are running.")],
    "dev": [("contradiction", "1000268201", "A cat sits indoors."),
            ("-", "1000268201", "No annotator agreed on this one."),
            ("neutral", "1000344755", "The dogs are brothers."),
            ("entailment", "1000344755", "There are two animals.")],
    "test": [("entailment", "1000366164", "Two animals run."),
             ("neutral", "1000366164", "The field is in France."),
             ("contradiction", "999999999", "The image of this pair is missing."),
             ("entailment", "1000523639", "The image of this pair is corrupt.")],
}


def write_snli_ve(root: Path) -> Fixture:
    """`snli_ve_{train,dev,test}.jsonl` + `flickr30k_images/<Flickr30K_ID>.jpg`.

    Dev holds one line with gold_label "-" (no annotator consensus, as in SNLI). Test refers to
    one image that does not exist (999999999) and one that is not an image at all (1000523639).
    """
    fixture = Fixture(root)
    images = root / "flickr30k_images"
    missing, corrupt = "999999999", "1000523639"
    for split, pairs in SNLI_VE_PAIRS.items():
        lines = [json.dumps(snli_pair(label, image_id, text, n)) for n, (label, image_id, text) in enumerate(pairs)]
        root.mkdir(parents=True, exist_ok=True)
        (root / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        fixture.rows[split] = [(image_id, text, label) for label, image_id, text in pairs]
        for seed, image_id in enumerate(sorted({image_id for _, image_id, _ in pairs})):
            if image_id not in (missing, corrupt):
                write_jpeg(images / f"{image_id}.jpg", seed)
    fixture.missing.append(images / f"{missing}.jpg")
    fixture.corrupt.append(images / f"{corrupt}.jpg")
    fixture.corrupt[0].write_bytes(b"this is not a JPEG file")
    return fixture
