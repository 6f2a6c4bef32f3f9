"""Every data module checks what it reads so that no sample silently means something else: a file that is
wrong as a whole stops setup in one line naming it; records that cannot be right are excluded (or repaired)
and counted in one warning per split. Fixtures are the real formats (refer_fixtures, classification_fixtures,
mmsa_fixtures), damaged the way files get damaged or crafted."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refer_fixtures import ReferFixture, instances_record, refs_records, write_refer_fixture
from mit_lightning.data.refer import RefCOCODataModule
from mit_lightning.errors import UserError


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# === RefCOCO ========================================================================================
@pytest.fixture
def refer(tmp_path) -> ReferFixture:
    return write_refer_fixture(tmp_path / "data")


def refer_samples(fixture: ReferFixture, stage: str = "test") -> dict[str, list[dict]]:
    module = RefCOCODataModule(root=str(fixture.root), image_size=16, mask_size=24, num_workers=0,
                               test_splits=["val", "testA", "testB"])
    module.setup(stage)
    return {split: [dataset[i] for i in range(len(dataset))] for split, dataset in module.datasets.items()}


def edit_refs(fixture: ReferFixture, edit: Callable[[list[dict]], None]) -> None:
    records = refs_records()
    edit(records)
    fixture.refs.write_bytes(pickle.dumps(records, protocol=2))


def edit_instances(fixture: ReferFixture, edit: Callable[[dict], None]) -> None:
    record = instances_record()
    edit(record)
    fixture.instances.write_text(json.dumps(record), encoding="utf-8")


def segmentation_of(ann_id: int, value: Any) -> Callable[[dict], None]:
    def edit(record: dict) -> None:
        next(a for a in record["annotations"] if a["id"] == ann_id)["segmentation"] = value
    return edit


def _rle(height: int, width: int, counts: Any) -> dict:
    return {"size": [height, width], "counts": counts}


VAL = 201  # annotation of refs 2 (two sentences) in 'val', a 48×32 image (width × height)
#: a segmentation that encloses nothing: the ref is excluded from its split and counted
EMPTY_SEGMENTATIONS = {
    "no-parts": [],
    "an-empty-part": [[]],
    "two-points": [[4.0, 4.0, 20.0, 20.0]],
    "one-point": [[4.0, 4.0]],
    "odd-coordinates": [[4.0, 4.0, 20.0, 4.0, 20.0]],
    "not-finite": [[4.0, 4.0, 20.0, float("nan"), 20.0, 20.0]],
    "text-coordinates": [["4", "4", "20", "4", "20", "20"]],
    "all-zero-rle": _rle(32, 48, [32 * 48]),
    "all-zero-compressed-rle": mask_utils.encode(np.zeros((32, 48), np.uint8, order="F")),
}


@pytest.mark.parametrize("segmentation", EMPTY_SEGMENTATIONS.values(), ids=EMPTY_SEGMENTATIONS.keys())
def test_refcoco_a_ref_whose_segmentation_encloses_nothing_is_excluded_and_counted(refer, caplog, segmentation):
    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], bytes):
        segmentation = {**segmentation, "counts": segmentation["counts"].decode("ascii")}
    edit_instances(refer, segmentation_of(VAL, segmentation))
    samples = refer_samples(refer)
    assert {sample["ref_id"] for sample in samples["val"]} == {3}
    assert any("refs whose segmentation is empty" in message and "ref 2" in message for message in warnings_of(caplog))


def test_refcoco_polygon_parts_of_fewer_than_three_points_are_left_out_and_counted(refer, caplog):
    good = [4.0, 4.0, 16.0, 4.0, 16.0, 16.0, 4.0, 16.0]
    edit_instances(refer, segmentation_of(VAL, [good, [30.0, 20.0, 40.0, 28.0], [1.0, 1.0, 2.0]]))
    sample = next(sample for sample in refer_samples(refer)["val"] if sample["ref_id"] == 2)
    assert 0 < sample["mask"].float().mean() < 0.2  # the 12×12 square alone, not a "box" read from 4 numbers
    assert any("polygon parts of fewer than 3 points" in message and "annotation 201" in message
               for message in warnings_of(caplog))


#: a segmentation that cannot be right for its image: setup stops naming the ref
WRONG_SEGMENTATIONS = {
    "none": (None, "not a NoneType"),
    "a-number": (3, "not a int"),
    "rle-of-another-size": (_rle(10, 10, [100]), "RLE of size"),
    "rle-runs-past-the-image": (_rle(32, 48, [10, 32 * 48]), "do not cover"),
    "rle-runs-short": (_rle(32, 48, [10, 20]), "do not cover"),
    "rle-negative-run": (_rle(32, 48, [-5, 32 * 48 + 5]), "do not cover"),
    "compressed-rle-past-the-image": ({"size": [32, 48], "counts": "0" + "k" * 30}, "do not cover"),
    "compressed-rle-cut-short": ({"size": [32, 48], "counts": "P"}, "do not cover"),
}


@pytest.mark.parametrize("segmentation, message", WRONG_SEGMENTATIONS.values(), ids=WRONG_SEGMENTATIONS.keys())
def test_refcoco_a_segmentation_that_cannot_fit_its_image_stops_setup_naming_it(refer, segmentation, message):
    edit_instances(refer, segmentation_of(VAL, segmentation))
    with pytest.raises(UserError, match=message) as error:
        refer_samples(refer)
    assert "annotation 201" in str(error.value) and "\n" not in str(error.value)


def _repeat_ref(records: list[dict]) -> None:
    records.append(dict(records[2]))


def _repeat_ref_in_another_split(records: list[dict]) -> None:
    records.append({**records[2], "split": "testA"})


def _repeat_sentence(records: list[dict]) -> None:
    records[2]["sentences"].append(dict(records[2]["sentences"][0]))


def test_refcoco_a_repeated_ref_is_kept_once_and_counted(refer, caplog):
    edit_refs(refer, _repeat_ref)
    samples = refer_samples(refer)["val"]
    assert [sample["ref_id"] for sample in samples].count(2) == 2  # its two sentences, once each
    assert any("refs listed again" in message for message in warnings_of(caplog))


def test_refcoco_a_repeated_sentence_is_kept_once_and_counted(refer, caplog):
    edit_refs(refer, _repeat_sentence)
    samples = refer_samples(refer)["val"]
    assert [sample["sent_id"] for sample in samples].count(20) == 1
    assert any("sentences listed again" in message for message in warnings_of(caplog))


@pytest.mark.parametrize("edit, message", [
    (_repeat_ref_in_another_split, "is in split 'val' and again in 'testA'"),
    (lambda records: records[2].update(ref_id=[2]), "ref_id of type list"),
    (lambda records: records[2].update(ref_id="2"), "ref_id of type str"),
    (lambda records: records[2].update(split=1), "split of type int"),
    (lambda records: records[2].update(image_id=None), "image_id of type NoneType"),
    (lambda records: records[2]["sentences"][0].update(sent_id="20"), "not dicts with a sent_id"),
], ids=["repeated-in-another-split", "ref-id-list", "ref-id-text", "split-number", "image-id-none", "sent-id-text"])
def test_refcoco_refs_that_cannot_be_right_stop_setup_naming_them(refer, edit, message):
    edit_refs(refer, edit)
    with pytest.raises(UserError, match=message):
        refer_samples(refer)


def _annotation_of_another_image(record: dict) -> None:
    next(a for a in record["annotations"] if a["id"] == VAL)["image_id"] = 1


def _repeated_image(record: dict) -> None:
    record["images"].append({**record["images"][1], "height": 99})


def _repeated_annotation(record: dict) -> None:
    record["annotations"].append(dict(record["annotations"][0]))


@pytest.mark.parametrize("edit, message", [
    (_annotation_of_another_image, "belongs to image 1"),
    (_repeated_image, "image ids more than once"),
    (_repeated_annotation, "annotation ids more than once"),
], ids=["annotation-of-another-image", "repeated-image", "repeated-annotation"])
def test_refcoco_instances_that_make_a_mask_ambiguous_stop_setup(refer, edit, message):
    edit_instances(refer, edit)
    with pytest.raises(UserError, match=message):
        refer_samples(refer)


def test_refcoco_instances_that_are_not_utf8_are_one_line(refer):
    refer.instances.write_bytes(b'{"images": [{"file_name": "caf\xe9"}]}')
    with pytest.raises(UserError, match="not a COCO-style instances file"):
        refer_samples(refer)
