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

from helpers.classification_fixtures import write_food101, write_snli_ve
from mit_lightning.data.food101 import Food101DataModule
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.data.refer import RefCOCODataModule
from mit_lightning.data.snli_ve import SNLIVEDataModule
from mit_lightning.data.synthetic import MARKER, SyntheticRefCOCODataModule, write_synthetic_refer
from helpers.mmsa_fixtures import make_mmsa, write_pickle
from helpers.refer_fixtures import ReferFixture, instances_record, refs_records, write_refer_fixture
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


# === CMU-MOSI / CMU-MOSEI ===========================================================================


def mmsa_setup(tmp_path: Path, edit: Callable[[dict], None], aligned: bool = False) -> MMSADataModule:
    data = make_mmsa(aligned=aligned)
    edit(data)
    path = write_pickle(tmp_path / "mosi.pkl", data)
    module = MMSADataModule(root="unused", file=str(path), aligned=aligned, num_workers=0)
    module.setup("fit")
    return module


def _no_steps(key: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["train"][key] = data["train"][key][:, :0]
    return edit


def _no_features(data: dict) -> None:
    data["train"]["audio"] = data["train"]["audio"][:, :, :0]


def _lengths(key: str, value: float) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["train"][key] = [value] + list(data["train"][key][1:])
    return edit


@pytest.mark.parametrize("edit, aligned, message", [
    (_no_steps("audio"), False, "'audio' has shape (6, 0, 5)"),
    (_no_steps("vision"), True, "'vision' has shape (6, 0, 20)"),
    (_no_features, True, "'audio' has shape (6, 50, 0)"),
    (_lengths("audio_lengths", float("nan")), False, "NaN or infinite lengths"),
    (_lengths("vision_lengths", float("inf")), False, "NaN or infinite lengths"),
], ids=["no-audio-steps", "no-vision-steps", "no-features", "nan-length", "infinite-length"])
def test_mmsa_sequences_without_steps_stop_setup_naming_the_file(tmp_path, edit, aligned, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        mmsa_setup(tmp_path, edit, aligned)
    assert "mosi.pkl' split 'train'" in str(error.value)


def _all_non_finite(value: float) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["train"]["audio"][2] = value
    return edit


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")], ids=["nan", "-inf", "+inf"])
def test_mmsa_a_clip_without_any_finite_feature_is_counted_by_id(tmp_path, caplog, value):
    module = mmsa_setup(tmp_path, _all_non_finite(value), aligned=True)
    messages = warnings_of(caplog)
    assert any("MOSI train audio: clips with no finite feature at all, served as zeros: 1 repaired (first: id "
               "trainvideo01$_$1)" in message for message in messages), messages
    assert any("MOSI train audio" in message and "non-finite feature values replaced by 0" in message
               for message in messages)
    assert module.train_dataset[2]["audio"].abs().sum() == 0


@pytest.mark.parametrize("length, message", [(-3, "clips without frames, served as one zero step"),
                                             (0, "clips without frames, served as one zero step"),
                                             (10_000, "clips longer than the 12 steps stored, read as 12")],
                         ids=["negative", "zero", "beyond-the-steps"])
def test_mmsa_lengths_outside_the_steps_are_clipped_and_counted(tmp_path, caplog, length, message):
    module = mmsa_setup(tmp_path, _lengths("audio_lengths", length))
    assert 1 <= int(module.train_dataset[0]["audio_mask"].sum()) <= 12
    assert any("MOSI train audio" in line and message in line and "trainvideo00$_$1" in line
               for line in warnings_of(caplog))


def _repeat_id_in_split(data: dict) -> None:
    data["train"]["id"][1] = data["train"]["id"][0]


def _id_in_two_splits(data: dict) -> None:
    data["test"]["id"] = np.array([data["train"]["id"][0], *data["test"]["id"][1:]])


@pytest.mark.parametrize("edit, message", [(_repeat_id_in_split, "clips listed more than once in split 'train'"),
                                           (_id_in_two_splits, "clips in more than one split")],
                         ids=["repeated-in-split", "in-two-splits"])
def test_mmsa_repeated_clip_ids_are_counted(tmp_path, caplog, edit, message):
    mmsa_setup(tmp_path, edit)
    assert any(message in line and "trainvideo00$_$1" in line for line in warnings_of(caplog))


# === UPMC-Food101 and SNLI-VE ======================================================================


def food_setup(tmp_path: Path, first_lines: list[str] = (), last_lines: list[str] = ()) -> Food101DataModule:
    root = tmp_path / "food101"
    write_food101(root)
    titles = root / "texts" / "train_titles.csv"
    titles.write_text("".join(f"{line}\n" for line in first_lines) + titles.read_text() +
                      "".join(f"{line}\n" for line in last_lines))
    module = Food101DataModule(root=str(root), image_size=16, val_size=0.25, num_workers=0)
    module.setup("fit")
    return module


@pytest.mark.parametrize("header", ["image_filename,title,class", "filename,text,label", "Image,Title,Class",
                                    "# image_filename,title,class", '"image_filename","title","class"',
                                    "\ufeffimage_filename,title,class", "id,title,category"])
def test_food101_a_header_line_is_skipped_and_said_not_made_a_class(tmp_path, caplog, header):
    module = food_setup(tmp_path, first_lines=[header])
    assert module.class_names == ["apple_pie", "beignets", "churros"]
    assert any("is a header" in message for message in warnings_of(caplog))


def test_food101_a_first_row_that_is_a_sample_is_kept(tmp_path, caplog):
    module = food_setup(tmp_path, first_lines=["image.jpg,title,churros"])
    assert module.class_names == ["apple_pie", "beignets", "churros"]
    assert not any("is a header" in message for message in warnings_of(caplog))


@pytest.mark.parametrize("line", ["apple_pie_1.jpg,,apple_pie", "apple_pie_1.jpg,   ,apple_pie"], ids=["empty", "blank"])
def test_food101_a_row_without_a_title_is_excluded_and_counted(tmp_path, caplog, line):
    food_setup(tmp_path, last_lines=[line])
    assert any("rows with an empty title" in message for message in warnings_of(caplog))


@pytest.mark.parametrize("line", ["../../etc/passwd,title,apple_pie", "a.jpg,title,../apple_pie", ",title,apple_pie",
                                  "a.jpg,title,", "..,title,apple_pie"],
                         ids=["file-outside", "class-outside", "no-file", "no-class", "dot-dot"])
def test_food101_a_row_naming_no_plain_file_stops_setup_naming_the_line(tmp_path, line):
    with pytest.raises(UserError, match="must be plain names"):
        food_setup(tmp_path, last_lines=[line])


def test_food101_a_class_without_training_images_is_said(tmp_path, caplog):
    food_setup(tmp_path, last_lines=["missing_0.jpg,A lost dish,durian_cake"])
    assert any("1 of the 4 classes have no training sample (first: durian_cake)" in message
               for message in warnings_of(caplog))


def snli_setup(tmp_path: Path, pair: dict) -> SNLIVEDataModule:
    root = tmp_path / "snli_ve"
    write_snli_ve(root)
    train = root / "snli_ve_train.jsonl"
    base = {"gold_label": "entailment", "sentence2": "Dogs run.", "Flickr30K_ID": "1000092795"}
    train.write_text(train.read_text() + json.dumps({**base, **pair}) + "\n")
    module = SNLIVEDataModule(root=str(root), image_size=16, num_workers=0)
    module.setup("fit")
    return module


@pytest.mark.parametrize("image_id", [None, [1], True, "", "../../etc/passwd", "a/b", 1.5, {"id": 1}],
                         ids=["none", "list", "bool", "empty", "outside", "subfolder", "float", "dict"])
def test_snli_ve_an_image_id_naming_no_plain_file_stops_setup_naming_the_line(tmp_path, image_id):
    with pytest.raises(UserError, match="snli_ve_train.jsonl, line 5: Flickr30K_ID"):
        snli_setup(tmp_path, {"Flickr30K_ID": image_id})


def test_snli_ve_a_numeric_image_id_names_its_file(tmp_path):
    module = snli_setup(tmp_path, {"Flickr30K_ID": 1000092795})
    assert len(module.train_dataset) == 5


@pytest.mark.parametrize("hypothesis", ["", "   ", "\n\t"], ids=["empty", "spaces", "whitespace"])
def test_snli_ve_an_empty_hypothesis_is_excluded_and_counted(tmp_path, caplog, hypothesis):
    module = snli_setup(tmp_path, {"sentence2": hypothesis})
    assert len(module.train_dataset) == 4
    assert any("pairs without hypothesis text" in message for message in warnings_of(caplog))


@pytest.mark.parametrize("sentence", ["", "  "], ids=["empty", "blank"])
def test_refcoco_an_empty_sentence_is_excluded_and_counted(refer, caplog, sentence):
    edit_refs(refer, lambda records: records[2]["sentences"][0].update(sent=sentence))
    samples = refer_samples(refer)["val"]
    assert 20 not in [sample["sent_id"] for sample in samples]
    assert any("sentences without 'sent' text" in message for message in warnings_of(caplog))


@pytest.mark.parametrize("text", ["", "   "], ids=["empty", "blank"])
def test_mmsa_an_empty_raw_text_is_excluded_and_counted(tmp_path, caplog, text):
    def edit(data: dict) -> None:
        data["train"]["raw_text"] = np.array([text, *data["train"]["raw_text"][1:]], dtype=object)
    module = mmsa_setup(tmp_path, edit, aligned=True)
    assert len(module.train_dataset) == 5
    assert any("raw_text is not text" in message for message in warnings_of(caplog))


# === the synthetic demo dataset =====================================================================

SMALL = {"train_images": 2, "val_images": 1, "test_images": 1}


def _parent_is_a_file(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    (root.parent / "notes").write_text("x")
    return root.parent / "notes" / "demo"


def _marker_not_json(root: Path) -> Path:
    write_synthetic_refer(root, **SMALL)
    (root / MARKER).write_text("{not json")
    return root


def _other_settings(root: Path) -> Path:
    write_synthetic_refer(root, **SMALL)
    return write_synthetic_refer(root, **{**SMALL, "train_images": 3}) and root


def _root_is_a_file(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("x")
    return root


@pytest.mark.parametrize("make, message", [
    (_parent_is_a_file, "is a file, not a folder"),
    (_marker_not_json, "generated with other settings"),
    (_other_settings, "generated with other settings"),
    (_root_is_a_file, "is not a complete synthetic dataset"),
], ids=["parent-is-a-file", "marker-not-json", "other-settings", "root-is-a-file"])
def test_synthetic_a_root_that_cannot_hold_the_dataset_is_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        write_synthetic_refer(make(tmp_path / "data" / "demo"), **SMALL)


def test_synthetic_images_removed_after_generation_stop_setup_naming_them(tmp_path):
    module = SyntheticRefCOCODataModule(root=str(tmp_path / "demo"), image_size=16, num_workers=0, **SMALL)
    module.prepare_data()
    next((tmp_path / "demo" / "images" / "train2014").iterdir()).unlink()
    with pytest.raises(UserError, match="missing from"):
        module.setup("fit")


# === JSON and text files nested or encoded beyond reading ==========================================
DEEP = "[" * 200_000 + "]" * 200_000


def test_refcoco_instances_nested_beyond_reading_are_one_line(refer):
    refer.instances.write_text(DEEP)
    with pytest.raises(UserError, match="not a COCO-style instances file"):
        refer_samples(refer)


def test_snli_ve_a_line_nested_beyond_reading_is_one_line(tmp_path):
    root = tmp_path / "snli_ve"
    write_snli_ve(root)
    (root / "snli_ve_train.jsonl").write_text(DEEP + "\n")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        SNLIVEDataModule(root=str(root), image_size=16, num_workers=0).setup("fit")


def test_food101_a_validation_split_file_that_is_not_utf8_is_one_line(tmp_path):
    root = tmp_path / "food101"
    write_food101(root)
    (root / "splits").mkdir()
    (root / "splits" / "food101_val_ids_seed0_4.txt").write_bytes(b"caf\xe9.jpg\n")
    with pytest.raises(UserError, match="Cannot read the validation split file"):
        Food101DataModule(root=str(root), image_size=16, val_size=0.25, num_workers=0).setup("fit")
