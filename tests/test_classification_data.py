"""UPMC-Food101 and SNLI-VE data modules on tiny fixtures in the real formats."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers.classification_fixtures import (
    FOOD101_TRAIN_COUNTS,
    FOOD101_TRICKY_TITLES,
    Fixture,
    write_food101,
    write_snli_ve,
)
from mit_lightning.data.base import collate
from mit_lightning.data.images import UnreadableImage
from mit_lightning.data.food101 import Food101DataModule, read_titles_csv, stratified_sample
from mit_lightning.data.snli_ve import LABELS, SNLIVEDataModule
from mit_lightning.errors import UserError

IMAGE_SIZE = 16


@pytest.fixture
def food(tmp_path: Path) -> Fixture:
    return write_food101(tmp_path / "food101")


@pytest.fixture
def snli(tmp_path: Path) -> Fixture:
    return write_snli_ve(tmp_path / "snli_ve")


def food_module(fixture: Fixture, **kwargs) -> Food101DataModule:
    settings = dict(root=str(fixture.root), image_size=IMAGE_SIZE, val_size=0.25, num_workers=0, batch_size=4)
    return Food101DataModule(**{**settings, **kwargs})


def split_file(fixture: Fixture, seed: int = 0, count: int = 4) -> Path:
    return fixture.root / "splits" / f"food101_val_ids_seed{seed}_{count}.txt"


def epoch(module, loader) -> tuple[list[int], list[str], list[dict]]:
    """Indices and skipped paths of one pass over `loader`, and its batches."""
    batches = list(loader)
    indices = [int(i) for batch in batches for i in batch["index"]]
    skipped = [path for batch in batches for path in batch["skipped"]]
    return indices, skipped, batches


# --- UPMC-Food101 -----------------------------------------------------------------------------
def test_titles_csv_keeps_quoted_commas_and_quotes(food: Fixture) -> None:
    rows = {filename: (title, class_name) for filename, title, class_name in
            read_titles_csv(food.root / "texts" / "train_titles.csv")}
    assert len(rows) == sum(FOOD101_TRAIN_COUNTS.values())
    for filename, (_, title) in FOOD101_TRICKY_TITLES.items():
        assert rows[filename] == (title, filename.rsplit("_", 1)[0])


def test_titles_csv_with_wrong_column_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train_titles.csv"
    path.write_text("a_1.jpg,A title,a\nb_1.jpg,Unquoted, comma,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: expected 3 columns"):
        read_titles_csv(path)


def test_food101_items_class_ids_and_spec(food: Fixture) -> None:
    module = food_module(food)
    module.setup("fit")
    assert module.spec.class_names == ["apple_pie", "beignets", "churros"]  # sorted, from train
    assert module.spec.num_classes == 3
    items = [module.train_dataset[i] for i in range(len(module.train_dataset))]
    assert [item["index"] for item in items] == list(range(len(items)))
    for item in items:
        assert set(item) == {"prompt", "index", "image", "label", "text", "image_path"}
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        class_name = Path(item["image_path"]).parent.name
        assert item["label"] == module.spec.class_names.index(class_name)
        assert item["prompt"] == (f"Classify the food in the image from its recipe title: {item['text']}. "
                                  "#Classification:")


def test_stratified_sample_is_proportional_exact_and_order_free() -> None:
    ids = {name: [f"{name}_{n}" for n in range(size)] for name, size in {"a": 10, "b": 6, "c": 4}.items()}
    chosen = stratified_sample(ids, 5, seed=0)
    # quotas 2.5 / 1.5 / 1.0: floors 2/1/1, the one left over goes to the largest remainder, ties by name
    assert Counter(name.split("_")[0] for name in chosen) == {"a": 3, "b": 1, "c": 1}
    reversed_ids = {name: list(reversed(members)) for name, members in reversed(ids.items())}
    assert stratified_sample(reversed_ids, 5, seed=0) == chosen
    assert stratified_sample(ids, 5, seed=0) == chosen


def test_food101_val_split_is_stratified_saved_and_reused(food: Fixture) -> None:
    module = food_module(food)
    module.prepare_data()
    path = split_file(food)
    assert path.is_file()
    first = path.read_text()
    module.setup("fit")
    train, val = module.train_dataset, module.datasets["val"]
    val_classes = Counter(Path(record.image_path).parent.name for record in val.records)
    assert val_classes == {"apple_pie": 2, "beignets": 1, "churros": 1}  # a quarter of 8/4/4
    train_files = {Path(record.image_path).name for record in train.records}
    val_files = {Path(record.image_path).name for record in val.records}
    assert not train_files & val_files and len(train_files | val_files) == sum(FOOD101_TRAIN_COUNTS.values())
    # drawn again from scratch: the same split; the existing file is reused untouched
    path.unlink()
    food_module(food).setup("fit")
    assert path.read_text() == first
    modified_time = path.stat().st_mtime_ns
    food_module(food).setup("fit")
    assert path.stat().st_mtime_ns == modified_time
    # an integer count names the same file when it means the same size
    assert food_module(food, val_size=4).val_ids() == val_files


def test_food101_conflicting_split_file_is_an_error(food: Fixture) -> None:
    path = split_file(food)
    path.parent.mkdir(parents=True)
    path.write_text("apple_pie_0.jpg\napple_pie_1.jpg\nbeignets_0.jpg\nsomeone_elses_image.jpg\n")
    with pytest.raises(UserError, match=r"does not match.*someone_elses_image\.jpg.*delete it"):
        food_module(food).setup("fit")
    assert "someone_elses_image" in path.read_text()  # never overwritten


def test_food101_split_file_falls_back_to_the_run_folder(food: Fixture, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (food.root / "splits").write_text("a file where the split folder would go: the root is not writable here")
    monkeypatch.chdir(tmp_path)
    food_module(food).prepare_data()
    assert (tmp_path / "splits" / split_file(food).name).is_file()


def test_food101_val_size_must_leave_a_train_split(food: Fixture) -> None:
    with pytest.raises(UserError, match="val_size"):
        food_module(food, val_size=16).setup("fit")
    with pytest.raises(UserError, match="fraction"):
        food_module(food, val_size=1.5)


def test_food101_missing_image_is_excluded_and_logged_once(food: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    module = food_module(food)
    with caplog.at_level(logging.WARNING):
        module.setup("test")
    lines = [record.getMessage() for record in caplog.records if "missing" in record.getMessage()]
    assert len(lines) == 1
    assert "UPMC-Food101 test: samples whose image file is missing: 1 excluded" in lines[0]
    assert str(food.missing[0]) in lines[0]
    paths = [record.image_path for record in module.datasets["test"].records]
    assert str(food.missing[0]) not in paths and str(food.corrupt[0]) in paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_dropped_by_collate_without_stopping_the_epoch(food: Fixture, num_workers: int) -> None:
    module = food_module(food, num_workers=num_workers, eval_batch_size=4)  # the corrupt one shares a batch
    module.setup("test")
    dataset = module.datasets["test"]
    indices, skipped, batches = epoch(module, module.test_dataloader()[0])
    corrupt_index = [record.image_path for record in dataset.records].index(str(food.corrupt[0]))
    assert skipped == [str(food.corrupt[0])]
    assert sorted(indices) == [i for i in range(len(dataset)) if i != corrupt_index]
    for batch in batches:
        assert batch["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert len(batch["prompt"]) == len(batch["index"]) == len(batch["label"]) == batch["image"].shape[0]


def test_a_batch_of_only_unreadable_images_is_empty_but_reports_them(food: Fixture) -> None:
    module = food_module(food, eval_batch_size=1)
    module.setup("test")
    batches = list(module.test_dataloader()[0])
    empty = [batch for batch in batches if batch["index"].numel() == 0]
    assert len(empty) == 1
    assert empty[0]["prompt"] == [] and empty[0]["skipped"] == [str(food.corrupt[0])]
    assert empty[0]["index"].dtype == torch.long
    assert all(batch["skipped"] == [] for batch in batches if batch["index"].numel())
    assert collate([UnreadableImage("a.jpg"), UnreadableImage("b.jpg")])["skipped"] == ["a.jpg", "b.jpg"]


def test_food101_missing_files_are_each_named(food: Fixture) -> None:
    (food.root / "texts" / "test_titles.csv").unlink()
    for path in sorted((food.root / "images" / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (food.root / "images" / "test").rmdir()
    with pytest.raises(UserError) as error:
        food_module(food)
    message = str(error.value)
    assert str(food.root / "texts" / "test_titles.csv") in message
    assert str(food.root / "images" / "test") in message
    assert "data/README.md" in message
    food_module(food, test_splits=(), predict_splits=())  # a run without test needs no test files


def test_missing_root_unknown_split_and_bad_template_are_user_errors(food: Fixture, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found.*data/README.md"):
        Food101DataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="UPMC-Food101 split must be one of train, val, test; got 'dev'"):
        food_module(food, val_splits=("dev",))
    with pytest.raises(UserError, match=r"must contain \{text\}"):
        food_module(food, prompt_template="Classify the food. #Classification:")
    braces = food_module(food, prompt_template="{kind}: {text}", test_splits=())
    braces.setup("fit")
    assert braces.train_dataset[0]["prompt"] == f"{{kind}}: {braces.train_dataset[0]['text']}"


def test_image_size_comes_from_the_model_when_unset(food: Fixture) -> None:
    with pytest.raises(UserError, match="image_size"):
        food_module(food, image_size=None).setup("test")


# --- SNLI-VE ----------------------------------------------------------------------------------
def test_snli_ve_labels_text_and_images(snli: Fixture) -> None:
    module = SNLIVEDataModule(root=str(snli.root), image_size=IMAGE_SIZE, num_workers=0)
    module.setup("fit")
    assert module.spec.class_names == ["entailment", "neutral", "contradiction"] == list(LABELS)
    assert module.spec.num_classes == 3
    train = module.train_dataset
    items = [train[i] for i in range(len(train))]
    assert [(Path(item["image_path"]).stem, item["text"], LABELS[item["label"]]) for item in items] == \
        snli.rows["train"]
    assert [item["label"] for item in items] == [0, 1, 2, 0]
    assert items[0]["prompt"].endswith("hypothesis: Animals are outside. #Classification:")
    assert items[0]["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_snli_ve_skipped_labels_are_counted_once_per_split(snli: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    module = SNLIVEDataModule(root=str(snli.root), image_size=IMAGE_SIZE, num_workers=0)
    with caplog.at_level(logging.INFO):
        module.setup("fit")
    lines = {split: [record for record in caplog.records if record.getMessage().startswith(f"SNLI-VE {split}: ")]
             for split in ("train", "dev")}
    assert [record.getMessage() for record in lines["dev"]] == [
        "SNLI-VE dev: 3 pairs read; skipped 1 lines whose gold_label is not one of "
        "entailment/neutral/contradiction."]
    assert lines["dev"][0].levelno == logging.WARNING
    assert len(lines["train"]) == 1 and "skipped 0 lines" in lines["train"][0].getMessage()
    assert len(module.datasets["dev"]) == 3


def test_snli_ve_missing_and_corrupt_images(snli: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    module = SNLIVEDataModule(root=str(snli.root), image_size=IMAGE_SIZE, num_workers=2, eval_batch_size=2)
    with caplog.at_level(logging.WARNING):
        module.setup("test")
    assert any("SNLI-VE test: samples whose image file is missing: 1 excluded" in record.getMessage() and str(snli.missing[0])
               in record.getMessage() for record in caplog.records)
    indices, skipped, _ = epoch(module, module.test_dataloader()[0])
    assert skipped == [str(snli.corrupt[0])] and sorted(indices) == [0, 1]


def test_snli_ve_missing_files_and_bad_lines(snli: Fixture) -> None:
    (snli.root / "snli_ve_dev.jsonl").unlink()
    with pytest.raises(UserError, match=r"(?s)snli_ve_dev\.jsonl.*data/README\.md"):
        SNLIVEDataModule(root=str(snli.root), image_size=IMAGE_SIZE)
    with (snli.root / "snli_ve_train.jsonl").open("a") as file:
        file.write('{"gold_label": "neutral", "sentence2": "no image id"}\n')
    module = SNLIVEDataModule(root=str(snli.root), image_size=IMAGE_SIZE, val_splits=("test",))
    with pytest.raises(UserError, match=r"line 5: field 'Flickr30K_ID' is missing"):
        module.setup("fit")
