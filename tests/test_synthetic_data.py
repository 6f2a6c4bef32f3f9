"""The synthetic refer-format dataset: content, safety of the generator, and its data module."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from jsonargparse import ArgumentParser
from PIL import Image

from mit_lightning.data import synthetic
from mit_lightning.data.refer import RefCOCODataModule
from mit_lightning.data.synthetic import COLOURS, MARKER, SHAPES, SyntheticRefCOCODataModule, write_synthetic_refer
from mit_lightning.errors import UserError

SIZES = {"train_images": 6, "val_images": 3, "test_images": 4}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return write_synthetic_refer(tmp_path_factory.mktemp("synthetic") / "demo", **SIZES, seed=3)


def test_layout_is_the_refer_layout(generated):
    assert (generated / "refcoco" / "instances.json").is_file()
    with open(generated / "refcoco" / "refs(unc).p", "rb") as file:
        assert file.read(2) == b"\x80\x02"  # protocol 2, like the originals
        file.seek(0)
        refs = pickle.load(file)
    instances = json.loads((generated / "refcoco" / "instances.json").read_text())
    assert len(instances["images"]) == sum(SIZES.values())
    for image in instances["images"]:
        assert (generated / "images" / "train2014" / image["file_name"]).is_file()
    assert {ref["split"] for ref in refs} == {"train", "val", "test"}
    assert all(2 <= len(ref["sentences"]) <= 3 and ref["file_name"].endswith(f"_{ref['ann_id']}.jpg") for ref in refs)
    assert any(len(ann["segmentation"]) == 2 for ann in instances["annotations"])  # two-part masks exist


def test_loads_through_refcoco_module_with_masks_on_the_named_objects(generated):
    data = RefCOCODataModule(root=str(generated), test_splits=("val", "test"), image_size=32,
                             eval_at_original_size=True, num_workers=0)
    data.setup("fit")
    data.setup("test")
    refs = pickle.loads((generated / "refcoco" / "refs(unc).p").read_bytes())
    assert len(data.train_dataset) == sum(r["split"] == "train" for r in refs)
    for split in ("val", "test"):
        assert len(data.datasets[split]) == sum(len(r["sentences"]) for r in refs if r["split"] == split)
    sentences_by_image: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for split in ("val", "test"):
        dataset = data.datasets[split]
        for item in (dataset[i] for i in range(len(dataset))):
            mask = item["mask"].numpy().astype(bool)
            assert mask.shape == (64, 64) and mask.any()
            words = item["prompt"].split()
            named_colour = [c for c in COLOURS if c in words]
            named_shape = [s for s in SHAPES if s in words]
            assert named_colour or named_shape
            if named_colour:  # the pixels under the mask have the colour the sentence names
                pixels = np.asarray(Image.open(item["image_path"]), dtype=float)[mask]
                assert np.abs(pixels.mean(axis=0) - COLOURS[named_colour[0]]).max() < 12
            sentences_by_image[item["image_path"]][item["ref_id"]].add(item["sentence"].lower().rstrip("."))
    for objects in sentences_by_image.values():
        assert 2 <= len(objects) <= 4
        all_sentences = [s for sentences in objects.values() for s in sentences]
        assert len(all_sentences) == len(set(all_sentences))  # no sentence fits two objects of one image


def test_generation_is_deterministic(tmp_path, generated):
    again = write_synthetic_refer(tmp_path / "again", **SIZES, seed=3)
    assert files_of(again) == files_of(generated)
    other = write_synthetic_refer(tmp_path / "other", **SIZES, seed=4)
    assert files_of(other)["refcoco/instances.json"] != files_of(generated)["refcoco/instances.json"]


def test_complete_dataset_is_reused_untouched(generated):
    before = {path: path.stat().st_mtime_ns for path in generated.rglob("*")}
    assert write_synthetic_refer(generated, **SIZES, seed=3) == generated
    assert {path: path.stat().st_mtime_ns for path in generated.rglob("*")} == before


def test_user_folder_is_never_written_into(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=MARKER) as error:
        write_synthetic_refer(root, **SIZES)
    assert str(root) in str(error.value)
    assert files_of(root) == {"notes.txt": b"keep me"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]  # no staging folder left behind


def test_dataset_made_with_other_settings_is_not_replaced(tmp_path):
    root = write_synthetic_refer(tmp_path / "demo", **SIZES, seed=0)
    before = files_of(root)
    with pytest.raises(UserError, match="other settings") as error:
        write_synthetic_refer(root, **SIZES, seed=1)
    assert f"Delete '{root}'" in str(error.value)
    assert files_of(root) == before


def test_interrupted_generation_leaves_no_partial_dataset(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "describe", fail)  # after the first image is written
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_refer(tmp_path / "demo", **SIZES)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (write_synthetic_refer(tmp_path / "demo", **SIZES) / MARKER).is_file()


def test_empty_target_folder_is_filled(tmp_path):
    (tmp_path / "demo").mkdir()
    assert (write_synthetic_refer(tmp_path / "demo", **SIZES) / MARKER).is_file()


def test_module_generates_in_prepare_data_and_serves_the_test_split(tmp_path):
    root = tmp_path / "demo"
    data = SyntheticRefCOCODataModule(root=str(root), **SIZES, image_size=32, batch_size=4, num_workers=0)
    assert not root.exists()  # construction must not need the data yet
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    assert data.test_splits == ["test"]
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 64, 64)
    (test_loader,) = data.test_dataloader()
    assert sum(len(batch["prompt"]) for batch in test_loader) == len(data.datasets["test"])


def test_module_rejects_bad_sizes_at_construction(tmp_path):
    with pytest.raises(UserError, match="val_images"):
        SyntheticRefCOCODataModule(root=str(tmp_path / "demo"), val_images=0)


def test_cli_sees_every_argument_with_its_help():
    parser = ArgumentParser()
    parser.add_class_arguments(SyntheticRefCOCODataModule, "data")
    config = parser.parse_args(["--data.train_images=10", "--data.batch_size=2", "--data.train_sentences=all"])
    assert (config.data.train_images, config.data.batch_size, config.data.train_sentences) == (10, 2, "all")
    assert config.data.root == "data/demo" and config.data.test_splits == ("test",)
    assert "random one of its sentences" in parser.format_help()  # inherited Args: docs reach the help


def test_the_unseen_split_uses_words_never_seen_in_training(tmp_path):
    root = write_synthetic_refer(tmp_path / "unseen", **SIZES, test_unseen_images=5, seed=3)
    with open(root / "refcoco" / "refs(unc).p", "rb") as file:
        refs = pickle.load(file)
    words = defaultdict(set)
    for ref in refs:
        for sentence in ref["sentences"]:
            words[ref["split"]].update(sentence["tokens"])
    assert words["test_unseen"] and not words["test_unseen"] & (set(COLOURS) | set(SHAPES))
    new_words = words["test_unseen"] - words["train"] - words["val"] - words["test"]
    assert {"the", "a"} & words["train"] and len(new_words) >= 8
    # the splits before it are the same images with the same refs as without it
    without = write_synthetic_refer(tmp_path / "without", **SIZES, seed=3)
    with open(without / "refcoco" / "refs(unc).p", "rb") as file:
        assert pickle.load(file) == [ref for ref in refs if ref["split"] != "test_unseen"]
    assert json.loads((without / MARKER).read_text()).keys() == {
        key for key in json.loads((root / MARKER).read_text()) if key != "test_unseen_images"}
