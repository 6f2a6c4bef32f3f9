"""RefCOCODataModule on a hand-written fixture in the real refer layout (see refer_fixtures.py)."""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mit_lightning.data.refer import PAPER_TEMPLATE, RefCOCODataModule, decode_mask, segmentation_to_rle
from mit_lightning.errors import UserError
from mit_lightning.safe_pickle import UnsafePickleError
from helpers.refer_fixtures import (ANNOTATIONS, AREAS, IMAGES, REFS, image_file_name, rectangle_polygon, rectangles_mask,
                            refs_records, samples_by_split, write_refer_fixture)

IMAGE_SIZE = 16


@pytest.fixture
def fixture(tmp_path):
    return write_refer_fixture(tmp_path / "data")


def make(root, **kwargs) -> RefCOCODataModule:
    kwargs = {"image_size": IMAGE_SIZE, "mask_size": 24, "num_workers": 0, **kwargs}
    return RefCOCODataModule(root=str(root), **kwargs)


def items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def ann_of_ref(ref_id: int) -> int:
    return REFS[ref_id][0]


# --- samples ----------------------------------------------------------------------------------
def test_evaluation_serves_every_sentence_of_every_ref(fixture):
    data = make(fixture.root)
    data.setup("test")
    expected = samples_by_split()
    for split in ("val", "testA", "testB"):
        served = items(data.datasets[split])
        assert sorted((item["ref_id"], item["sent_id"]) for item in served) == sorted(expected[split])
        assert [item["index"] for item in served] == list(range(len(served)))


def test_training_one_per_ref_draws_a_random_sentence_of_that_ref(fixture):
    data = make(fixture.root)
    data.setup("fit")
    train = data.train_dataset
    train_refs = [record for record in refs_records() if record["split"] == "train"]
    assert len(train) == len(train_refs)
    loader = data.train_dataloader()
    drawn: dict[int, set[int]] = {}
    epochs: list[list[tuple[int, int]]] = []
    for epoch in range(40):
        loader.sampler.set_epoch(epoch)
        epochs.append([(int(r), int(s)) for batch in loader for r, s in zip(batch["ref_id"], batch["sent_id"])])
        assert sorted(ref for ref, _ in epochs[-1]) == sorted(record["ref_id"] for record in train_refs)
        for ref_id, sent_id in epochs[-1]:
            drawn.setdefault(ref_id, set()).add(sent_id)
    assert drawn == {record["ref_id"]: set(record["sent_ids"]) for record in train_refs}
    loader.sampler.set_epoch(3)
    assert [(int(r), int(s)) for batch in loader for r, s in zip(batch["ref_id"], batch["sent_id"])] == epochs[3]


def test_training_all_serves_every_sentence(fixture):
    data = make(fixture.root, train_sentences="all")
    data.setup("fit")
    served = items(data.train_dataset)
    assert sorted((item["ref_id"], item["sent_id"]) for item in served) == sorted(samples_by_split()["train"])


# --- items ------------------------------------------------------------------------------------
def test_item_contract(fixture):
    data = make(fixture.root)
    data.setup("fit")
    item = data.datasets["val"][0]
    assert set(item) == {"prompt", "index", "image", "mask", "ref_id", "sent_id", "image_path", "sentence"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (24, 24)
    assert set(item["mask"].unique().tolist()) == {0, 1}
    # the image comes from instances.json, not from the ref's suffixed file_name
    assert item["image_path"] == str(fixture.image_dir / image_file_name(2))
    assert os.path.isfile(item["image_path"])


def test_prompt_uses_lower_cased_sent_and_item_keeps_raw_sentence(fixture):
    data = make(fixture.root)
    data.setup("fit")
    by_sentence = {item["sent_id"]: item for item in items(data.datasets["val"])}
    item = by_sentence[20]  # raw "The café sign"
    assert item["prompt"] == PAPER_TEMPLATE.replace("{description}", "the café sign")
    assert item["sentence"] == "The café sign"


def test_custom_template_and_raw_sentences(fixture):
    data = make(fixture.root, prompt_template="Find {description} {not a field}", sentence_field="raw")
    data.setup("fit")
    prompts = {item["sent_id"]: item["prompt"] for item in items(data.datasets["val"])}
    assert prompts[20] == "Find The café sign {not a field}"


def test_template_without_description_is_refused(fixture):
    with pytest.raises(UserError, match=r"\{description\}"):
        make(fixture.root, prompt_template="Segment it. #Segmentation:")


# --- masks ------------------------------------------------------------------------------------
def test_mask_is_the_union_of_overlapping_parts_at_original_size(fixture):
    data = make(fixture.root, eval_at_original_size=True)
    data.setup("fit")
    _, width, height = IMAGES[2]
    for item in items(data.datasets["val"]):
        rectangles = ANNOTATIONS[ann_of_ref(item["ref_id"])][1]
        assert item["mask"].shape == (height, width)
        np.testing.assert_array_equal(item["mask"].numpy(), rectangles_mask(rectangles, height, width))
        assert int(item["mask"].sum()) == AREAS[ann_of_ref(item["ref_id"])]
    # training targets stay square even when evaluation uses original sizes
    assert data.train_dataset[0]["mask"].shape == (24, 24)


def test_masks_are_resized_nearest_neighbour(fixture):
    # val image is 48×32: 96 px is an exact 2× / 3× nearest-neighbour enlargement
    data = make(fixture.root, mask_size=96)
    data.setup("validate")
    _, width, height = IMAGES[2]
    for item in items(data.datasets["val"]):
        expected = rectangles_mask(ANNOTATIONS[ann_of_ref(item["ref_id"])][1], height, width)
        np.testing.assert_array_equal(item["mask"].numpy(), np.kron(expected, np.ones((3, 2), dtype=np.uint8)))


def test_rle_segmentations_compressed_uncompressed_and_lists():
    height, width = 20, 30
    first = rectangles_mask([(2, 3, 12, 15)], height, width)
    second = rectangles_mask([(8, 10, 25, 18)], height, width)
    compressed = mask_utils.encode(np.asfortranarray(first))
    as_json = {"size": compressed["size"], "counts": compressed["counts"].decode()}  # how JSON stores it
    # uncompressed RLE by hand: alternating run lengths of 0s and 1s in column-major order
    flat = second.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [height, width], "counts": runs if flat[0] == 0 else [0, *runs]}
    union = first | second
    np.testing.assert_array_equal(decode_mask(segmentation_to_rle(as_json, height, width)), first)
    np.testing.assert_array_equal(decode_mask(segmentation_to_rle(uncompressed, height, width)), second)
    np.testing.assert_array_equal(decode_mask(segmentation_to_rle([as_json, uncompressed], height, width)), union)


def test_polygon_parts_without_area_are_ignored():
    # 4 numbers would be read as a box by pycocotools; a 2-point "polygon" encloses nothing
    mask = decode_mask(segmentation_to_rle([rectangle_polygon((1, 1, 5, 5)), [0.0, 0.0, 9.0, 9.0]], 10, 10))
    np.testing.assert_array_equal(mask, rectangles_mask([(1, 1, 5, 5)], 10, 10))


# --- pickles ----------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_malicious_refs_pickle_is_refused_before_it_runs(fixture, tmp_path, how):
    witness = tmp_path / "pwned"
    exploit = (_Exploit(os.system, f"touch '{witness}'") if how == "os.system"
               else _Exploit(builtins.exec, f"open({str(witness)!r}, 'w').write('x')"))
    fixture.refs.write_bytes(pickle.dumps([{"ref_id": 0, "sentences": exploit}], protocol=2))
    data = make(fixture.root)
    with pytest.raises(UnsafePickleError, match="not plain data"):
        data.setup("fit")
    assert not witness.exists()


def test_python2_refs_pickle_is_read_as_latin1(tmp_path):
    fixture = write_refer_fixture(tmp_path / "data", python2=True)
    payload = fixture.refs.read_bytes()
    assert "SHORT_BINSTRING" in {op.name for op, _, _ in pickletools.genops(payload)}
    with pytest.raises(UnicodeDecodeError):  # what a plain Python 3 load does with it
        pickle.loads(payload)
    data = make(fixture.root)
    data.setup("fit")
    sentences = {item["sent_id"]: item["sentence"] for item in items(data.datasets["val"])}
    assert sentences[20] == "The café sign"


# --- errors -----------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="Data root not found") as error:
        make(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_missing_instances(fixture):
    fixture.instances.unlink()
    with pytest.raises(UserError) as error:
        make(fixture.root)
    assert str(fixture.instances) in str(error.value) and "data/README.md" in str(error.value)


def test_missing_refs_file_of_the_chosen_split_by(fixture):
    with pytest.raises(UserError) as error:
        make(fixture.root, split_by="google")
    assert str(fixture.root / "refcoco" / "refs(google).p") in str(error.value)


def test_missing_image_folder_names_both_places(tmp_path):
    fixture = write_refer_fixture(tmp_path / "data", image_folder="elsewhere")
    with pytest.raises(UserError) as error:
        make(fixture.root)
    assert str(fixture.root / "images" / "train2014") in str(error.value)
    assert str(fixture.root / "COCOtrain2014") in str(error.value)


def test_missing_image_file_is_caught_before_serving(fixture):
    missing = fixture.image_dir / image_file_name(3)
    missing.unlink()
    data = make(fixture.root)
    with pytest.raises(UserError, match="1 of the 1 images of split 'testA'") as error:
        data.setup("test")
    assert str(missing) in str(error.value)


def test_unknown_split_lists_the_available_ones(fixture):
    data = make(fixture.root, test_splits=("val", "testC"))
    with pytest.raises(UserError, match="testC") as error:
        data.setup("test")
    assert "train, val, testA, testB" in str(error.value)


def test_a_split_scheme_the_dataset_lacks_is_refused_naming_its_schemes(fixture):
    """Plain choices are checked by the parser (tests/test_configs.py); which split_by exists depends on the dataset."""
    with pytest.raises(UserError, match="split_by for refcoco\\+ must be one of unc; got 'google'"):
        make(fixture.root, dataset="refcoco+", split_by="google")


# --- layouts ----------------------------------------------------------------------------------
def test_release_image_folder_name_and_explicit_image_dir(tmp_path, monkeypatch):
    fixture = write_refer_fixture(tmp_path / "data", image_folder="COCOtrain2014")
    monkeypatch.setenv("MIT_DATA_ROOT", str(fixture.root))
    data = RefCOCODataModule(image_size=IMAGE_SIZE, num_workers=0)  # default root reads the variable
    data.setup("test")
    assert data.datasets["testB"][0]["image_path"].startswith(str(fixture.root / "COCOtrain2014"))
    moved = tmp_path / "pictures"
    fixture.image_dir.rename(moved)
    data = make(fixture.root, image_dir=str(moved))
    data.setup("test")
    assert data.datasets["testB"][0]["image_path"].startswith(str(moved))


# --- dataloaders ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_dataloaders_batch_every_sample(fixture, workers):
    data = make(fixture.root, batch_size=2, eval_batch_size=2, num_workers=workers, eval_at_original_size=True)
    data.setup("fit")
    train_batches = list(data.train_dataloader())
    assert sum(len(batch["prompt"]) for batch in train_batches) == 2
    assert train_batches[0]["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert train_batches[0]["mask"].shape == (2, 24, 24)
    (val_loader,) = data.val_dataloader()
    val_batches = list(val_loader)
    assert torch.cat([batch["index"] for batch in val_batches]).tolist() == [0, 1, 2]
    assert all(mask.shape == (32, 48) for batch in val_batches for mask in batch["mask"])


def test_dataset_survives_pickling_for_spawned_workers(fixture):
    data = make(fixture.root)
    data.setup("test")
    dataset = data.datasets["val"]
    copy = pickle.loads(pickle.dumps(dataset))
    for original, restored in zip(items(dataset), items(copy)):
        assert original["prompt"] == restored["prompt"]
        assert torch.equal(original["mask"], restored["mask"]) and torch.equal(original["image"], restored["image"])
