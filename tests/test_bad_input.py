"""Bad input on the data side, as a new user meets it: each case ends in a clear error at setup,
or in a reported skip — never a crash mid-epoch, a traceback at start-up or a silently wrong number.

Every fixture is written in the dataset's real format (refer_fixtures, classification_fixtures,
mmsa_fixtures) and then damaged the way real files get damaged.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path
from typing import Callable, get_args

import numpy as np
import pytest
import torch

from helpers.classification_fixtures import write_food101, write_snli_ve
from helpers.cli_helpers import TINY_LLM_AND_CLIP, fails_at_once
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, LLMShape
from mit_lightning.backbones.presets import preset_llm_config, tiny_tokenizer
from mit_lightning.cli import cli_main
from mit_lightning.data.food101 import Food101DataModule
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.data.refer import PAPER_TEMPLATE, RefCOCODataModule
from mit_lightning.data.snli_ve import SNLIVEDataModule
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import ModelDims
from mit_lightning.heads.segmentation import Loss, ReferringSegmentation
from mit_lightning.safe_pickle import UnsafePickleError, load_data_pickle
from helpers.mmsa_fixtures import make_mmsa, write_pickle
from helpers.refer_fixtures import IMAGES, ReferFixture, image_file_name, refs_records, write_refer_fixture

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tokenizes(tokenizer, prompts: list[str]) -> bool:
    """What the model does with a batch's prompts: the fast tokenizer takes only valid str."""
    return len(tokenizer(prompts)["input_ids"]) == len(prompts)


# --- fixtures, damaged --------------------------------------------------------------------------
@pytest.fixture
def refer(tmp_path) -> ReferFixture:
    return write_refer_fixture(tmp_path / "data")


def refer_module(fixture: ReferFixture, **kwargs) -> RefCOCODataModule:
    kwargs = {"image_size": IMAGE_SIZE, "mask_size": 24, "num_workers": 0, **kwargs}
    return RefCOCODataModule(root=str(fixture.root), **kwargs)


def rewrite_refs(fixture: ReferFixture, edit: Callable[[list[dict]], None]) -> None:
    records = refs_records()
    edit(records)
    fixture.refs.write_bytes(pickle.dumps(records, protocol=2))


def ref(records: list[dict], ref_id: int) -> dict:
    return next(record for record in records if record["ref_id"] == ref_id)


def served(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def set_up(module, stage: str):
    module.setup(stage)
    return module


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def mmsa_file(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    data = make_mmsa()
    edit(data)
    return write_pickle(tmp_path / "mosi.pkl", data)


def mmsa_module(path: Path, **kwargs) -> MMSADataModule:
    return MMSADataModule(root="unused", file=str(path), num_workers=0, **kwargs)


# === 4. silent wrong results ====================================================================
@pytest.mark.parametrize("stated", [(32, 48), (24, 16)], ids=["width-height-swapped", "downscaled-entry"])
def test_refcoco_image_size_disagreeing_with_instances_json_fails_naming_image_and_sizes(refer, stated):
    instances = json.loads(refer.instances.read_text())
    entry = next(image for image in instances["images"] if image["id"] == 2)  # really 48×32
    entry["width"], entry["height"] = stated
    refer.instances.write_text(json.dumps(instances))
    data = refer_module(refer)
    with pytest.raises(UserError) as error:
        data.setup("validate")
    message = str(error.value)
    assert image_file_name(2) in message and "48×32" in message and f"{stated[0]}×{stated[1]}" in message
    assert "split 'val'" in message


def test_refcoco_images_of_the_annotated_size_pass_the_check(refer):
    data = refer_module(refer)
    data.setup("fit")  # reads every header once: sizes agree with instances.json
    assert len(data.datasets["val"]) == 3


@pytest.mark.parametrize("damage, shown", [
    (lambda labels: labels * 100, r"outside \[-3, 3\]"),
    (lambda labels: np.where(np.arange(len(labels)) == 2, np.nan, labels), "non-finite"),
    (lambda labels: np.where(np.arange(len(labels)) == 2, np.inf, labels), "non-finite"),
], ids=["scaled-x100", "nan", "inf"])
def test_mmsa_labels_outside_their_range_or_not_finite_fail_naming_split_and_id(tmp_path, damage, shown):
    data = make_mmsa()
    data["valid"]["regression_labels"] = damage(data["valid"]["regression_labels"]).astype(np.float32)
    path = write_pickle(tmp_path / "mosi.pkl", data)
    bad = int(np.flatnonzero(~np.isfinite(data["valid"]["regression_labels"])
                             | (np.abs(data["valid"]["regression_labels"]) > 3))[0])
    with pytest.raises(UserError, match=shown) as error:
        mmsa_module(path).setup("fit")
    assert "split 'valid'" in str(error.value) and str(data["valid"]["id"][bad]) in str(error.value)


def _empty_food101_test(root: Path):
    write_food101(root)
    (root / "texts" / "test_titles.csv").write_text("")
    return Food101DataModule(root=str(root), image_size=IMAGE_SIZE, val_size=0.25, num_workers=0), "test", "test"


def _empty_snli_ve_dev(root: Path):
    write_snli_ve(root)
    (root / "snli_ve_dev.jsonl").write_text("")
    return SNLIVEDataModule(root=str(root), image_size=IMAGE_SIZE, num_workers=0), "fit", "dev"


def _snli_ve_train_without_labels(root: Path):
    write_snli_ve(root)
    lines = (root / "snli_ve_train.jsonl").read_text().splitlines()
    (root / "snli_ve_train.jsonl").write_text("".join(line.replace('"gold_label": "', '"gold_label": "-') + "\n"
                                                      for line in lines))
    return SNLIVEDataModule(root=str(root), image_size=IMAGE_SIZE, num_workers=0), "fit", "train"


def _empty_mmsa(split: str, stage: str, **kwargs):
    def build(root: Path):
        data = make_mmsa()
        data[split] = {key: value[:0] for key, value in data[split].items()}
        return mmsa_module(write_pickle(root / "mosi.pkl", data), **kwargs), stage, split
    return build


def _refcoco_test_split_of_refs_without_sentences(root: Path):
    fixture = write_refer_fixture(root)
    rewrite_refs(fixture, lambda records: ref(records, 5).update(sentences=[], sent_ids=[]))  # testB's only ref
    return refer_module(fixture), "test", "testB"


@pytest.mark.parametrize("build", [
    _empty_food101_test, _empty_snli_ve_dev, _snli_ve_train_without_labels,
    _empty_mmsa("valid", "validate"), _empty_mmsa("test", "predict"), _empty_mmsa("train", "fit"),
    _refcoco_test_split_of_refs_without_sentences,
], ids=["food101-test", "snli-ve-dev", "snli-ve-train", "mmsa-valid", "mmsa-predict", "mmsa-train", "refcoco-testB"])
def test_a_split_without_samples_fails_at_setup(tmp_path, build):
    module, stage, split = build(tmp_path / "data")
    with pytest.raises(UserError, match=rf"split '{split}' \(data\.\w+\) has no samples"):
        module.setup(stage)


def test_mit_fit_with_an_empty_validation_split_stops_with_one_message(tmp_path, monkeypatch, capsys):
    fixture = write_snli_ve(tmp_path / "data")
    (fixture.root / "snli_ve_dev.jsonl").write_text("")
    runs = str(tmp_path / "runs")
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "snli_ve.yaml"), *TINY_LLM_AND_CLIP,
                          "--data.root", str(fixture.root), "--trainer.default_root_dir", runs,
                          "--trainer.logger.init_args.save_dir", runs)
    assert "split 'dev' (data.val_splits) has no samples" in error


@pytest.mark.parametrize("setting", ["val_splits", "test_splits"])
def test_evaluating_on_the_training_split_serves_every_sentence(refer, setting):
    data = refer_module(refer, **{setting: ("train",)})
    data.setup("fit")
    data.setup("test")
    every = [(record["ref_id"], sent_id) for record in refs_records() if record["split"] == "train"
             for sent_id in record["sent_ids"]]
    assert sorted((item["ref_id"], item["sent_id"]) for item in served(data.datasets["train"])) == sorted(every)
    assert len(data.train_dataset) == 2  # training still draws one sentence per ref
    assert data.train_dataset is not data.datasets["train"]


def test_the_training_role_keeps_square_masks_when_evaluation_uses_original_sizes(refer):
    data = refer_module(refer, train_split="val", val_splits=("val",), eval_at_original_size=True)
    data.setup("fit")
    assert {tuple(item["mask"].shape) for item in served(data.train_dataset)} == {(24, 24)}
    assert {tuple(item["mask"].shape) for item in served(data.datasets["val"])} == {(32, 48)}


@pytest.mark.parametrize("loss", get_args(Loss))
def test_segmentation_loss_on_masks_of_different_sizes_is_the_mean_of_per_sample_losses(loss):
    torch.manual_seed(0)
    shape = LLMShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, intermediate_size=16)
    head = ReferringSegmentation(ModelDims(llm=shape, vision_width=8, vision_depth=2, vision_grid=2),
                                 vision_blocks=(2, 1), width=16, loss=loss)
    logits = torch.randn(3, 2 if loss == "ce" else 1, 8, 8)
    same = (torch.rand(3, 12, 12) > 0.5).to(torch.uint8)
    # a list of masks of one size gives exactly what the stacked tensor gives
    torch.testing.assert_close(head.loss(logits, {"mask": list(same)}), head.loss(logits, {"mask": same}))
    mixed = [(torch.rand(size) > 0.5).to(torch.uint8) for size in ((12, 12), (9, 15), (16, 7))]
    per_sample = [head.loss(logits[i:i + 1], {"mask": mask[None]}) for i, mask in enumerate(mixed)]
    torch.testing.assert_close(head.loss(logits, {"mask": mixed}), torch.stack(per_sample).mean())


def test_fit_and_test_at_original_size_with_mixed_image_sizes_and_an_unreadable_image(tmp_path, capsys):
    """End to end: evaluation batches mix 40×40 and 48×32 images; one test image is truncated."""
    fixture = write_refer_fixture(tmp_path / "data")
    splits = {0: "val", 1: "val", 2: "val", 3: "val", 4: "testA", 5: "testA"}  # images 1, 2 | 3, 4
    rewrite_refs(fixture, lambda records: [record.update(split=splits[record["ref_id"]]) for record in records])
    truncated = fixture.image_dir / image_file_name(4)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    runs = str(tmp_path / "runs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main([
            "fit", "--config", str(CONFIGS / "refcoco.yaml"), *TINY_LLM_AND_CLIP,
            "--model.head.init_args.vision_blocks", "[4, 3, 2]", "--model.head.init_args.width", "32",
            "--data.root", str(fixture.root), "--data.mask_size", "32", "--data.eval_at_original_size", "true",
            "--data.train_split", "val", "--data.val_splits", "[val]", "--data.test_splits", "[val, testA]",
            "--data.batch_size", "4", "--data.eval_batch_size", "8",
            "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs, "--test_after_fit", "true",
        ])
    assert {tuple(item["mask"].shape) for item in served(cli.datamodule.datasets["val"])} == \
        {(IMAGES[1][2], IMAGES[1][1]), (IMAGES[2][2], IMAGES[2][1])}
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert {"test/val/oIoU", "test/val/loss", "test/testA/oIoU"} <= set(metrics)
    assert all(np.isfinite(value) for value in metrics.values())
    reports = [str(w.message) for w in caught if "skipped because their image could not be read" in str(w.message)]
    assert reports == [f"1 test samples were skipped because their image could not be read (first: {truncated}). "
                       "Re-extract or remove those files."]
    # two test splits: one line of results each, not Lightning's table, which repeats every split's metrics per column
    printed = capsys.readouterr().out
    assert "Test results:\n  testA: " in printed and "\n  val: " in printed and "DataLoader 1" not in printed


def test_prompt_reads_sent_lower_cased_and_raw_as_typed(refer, tokenizer):
    rewrite_refs(refer, lambda records: ref(records, 2)["sentences"][0].update(sent="The CAFÉ Sign"))
    prompts = {item["sent_id"]: item for item in served(set_up(refer_module(refer), "validate").datasets["val"])}
    assert prompts[20]["prompt"] == PAPER_TEMPLATE.replace("{description}", "the café sign")
    assert prompts[20]["sentence"] == "The café sign"
    raw = {item["sent_id"]: item["prompt"] for item in
           served(set_up(refer_module(refer, sentence_field="raw"), "validate").datasets["val"])}
    assert raw[20] == PAPER_TEMPLATE.replace("{description}", "The café sign")


# === 5. crashes mid-epoch → skip and report, or a clear error at setup ========================
def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads: only decoding fails


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _not_an_image(path: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>")


@pytest.mark.parametrize("damage", [_truncated, _zero_bytes, _not_an_image], ids=["truncated", "zero-byte", "html"])
@pytest.mark.parametrize("workers", [0, 2])
def test_refcoco_unreadable_image_is_skipped_and_listed_like_every_data_module(refer, damage, workers):
    damaged = refer.image_dir / image_file_name(1)  # the train image: refs 0 and 1
    damage(damaged)
    data = refer_module(refer, batch_size=2, eval_batch_size=2, num_workers=workers, val_splits=("train", "val"))
    data.setup("fit")
    batches = list(data.val_dataloader()[0])  # train split, every sentence: all 5 from the damaged image
    assert sum(len(batch["prompt"]) for batch in batches) == 0
    assert [path for batch in batches for path in batch["skipped"]] == [str(damaged)] * 5
    assert all(batch["index"].dtype == torch.long and batch["index"].numel() == 0 for batch in batches)
    (val,) = [list(loader) for loader in data.val_dataloader()[1:]]
    assert sum(len(batch["prompt"]) for batch in val) == 3 and all(batch["skipped"] == [] for batch in val)


def test_mmsa_batches_carry_the_same_skipped_key(tmp_path):
    module = mmsa_module(mmsa_file(tmp_path, lambda data: None), batch_size=4)
    module.setup("fit")
    assert all(batch["skipped"] == [] for batch in module.train_dataloader())


def _sentence_without(field: str):
    def edit(records):
        del ref(records, 2)["sentences"][0][field]
    return edit


@pytest.mark.parametrize("edit, field, excluded", [
    (_sentence_without("raw"), "raw", "ref 2 sentence 20"),
    (_sentence_without("sent"), "sent", "ref 2 sentence 20"),
    (lambda records: ref(records, 2)["sentences"][0].update(raw=None, sent=None), "sent", "ref 2 sentence 20"),
    (lambda records: ref(records, 2)["sentences"][0].update(sent=20), "sent", "ref 2 sentence 20"),
    (lambda records: ref(records, 3).update(sentences=[]), "sent", "ref 3"),
    (lambda records: ref(records, 3).pop("sentences"), "sent", "ref 3"),
], ids=["no-raw-read-raw", "no-sent", "null-texts", "number-text", "no-sentences", "sentences-key-missing"])
def test_refcoco_records_without_text_are_excluded_at_setup_and_named_once(refer, caplog, tokenizer, edit, field,
                                                                             excluded):
    rewrite_refs(refer, edit)
    data = refer_module(refer, sentence_field=field)
    with caplog.at_level(logging.WARNING):
        data.setup("validate")
    messages = [message for message in warnings_of(caplog) if "refcoco unc/val" in message]
    assert len(messages) == 1 and f"1 excluded (first: {excluded})" in messages[0]
    items = served(data.datasets["val"])
    assert len(items) == 2  # of 20, 21 (ref 2) and 30 (ref 3)
    assert tokenizes(tokenizer, [item["prompt"] for item in items])


def test_refcoco_sentence_without_raw_shows_its_sent(refer):
    rewrite_refs(refer, _sentence_without("raw"))
    items = {item["sent_id"]: item for item in served(set_up(refer_module(refer), "validate").datasets["val"])}
    assert items[20]["sentence"] == "the café sign" and items[20]["prompt"].startswith("Segment the the café sign")


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_refcoco_bytes_sentences_are_decoded(refer, tokenizer, encoding):
    def to_bytes(records):
        sentence = ref(records, 2)["sentences"][0]
        sentence.update(raw=sentence["raw"].encode(encoding), sent=sentence["sent"].encode(encoding))
    rewrite_refs(refer, to_bytes)
    items = {item["sent_id"]: item for item in served(set_up(refer_module(refer), "validate").datasets["val"])}
    assert items[20]["sentence"] == "The café sign"
    assert items[20]["prompt"] == PAPER_TEMPLATE.replace("{description}", "the café sign")
    assert tokenizes(tokenizer, [item["prompt"] for item in items.values()])


@pytest.mark.parametrize("edit, message", [
    (lambda records: ref(records, 2).pop("split"), r"Ref #2 \(ref_id 2\).*lacks split"),
    (lambda records: ref(records, 2).pop("ann_id"), "lacks ann_id"),
    (lambda records: ref(records, 2)["sentences"].append("a bare string"), "sentences that are not dicts"),
    (lambda records: ref(records, 2)["sentences"][0].pop("sent_id"), "Ref 2 .*sent_id"),
], ids=["no-split", "no-ann-id", "sentence-not-a-dict", "no-sent-id"])
def test_refcoco_refs_without_their_identifiers_are_an_error_naming_the_ref(refer, edit, message):
    rewrite_refs(refer, edit)
    with pytest.raises(UserError, match=message):
        refer_module(refer).setup("validate")


def _snli_line(**fields) -> str:
    pair = {"gold_label": "entailment", "sentence2": "Dogs run.", "Flickr30K_ID": "1000092795", **fields}
    return json.dumps(pair)


@pytest.mark.parametrize("line, kind, expected_text", [
    (_snli_line(sentence2=None).encode(), "pairs without hypothesis text", None),
    (_snli_line(sentence2=17).encode(), "pairs without hypothesis text", None),
    (json.dumps({"gold_label": "neutral", "Flickr30K_ID": "1000092795"}).encode(), "pairs without hypothesis text",
     None),
    (_snli_line(sentence2="Caf\udcff dogs").encode("utf-8", "surrogatepass").replace(b"\\udcff", b"\xff"),
     "lines with bytes that are not UTF-8", "Caf\ufffd dogs"),
    (_snli_line(sentence2="A dog \ud800 runs.").encode(), "texts with lone surrogates", "A dog \ufffd runs."),
], ids=["null-hypothesis", "number-hypothesis", "no-hypothesis", "non-utf8-byte", "lone-surrogate"])
def test_snli_ve_bad_text_is_excluded_or_repaired_and_reported(tmp_path, caplog, tokenizer, line, kind,
                                                               expected_text):
    fixture = write_snli_ve(tmp_path / "snli_ve")
    path = fixture.root / "snli_ve_train.jsonl"
    path.write_bytes(path.read_bytes() + line + b"\n")
    module = SNLIVEDataModule(root=str(fixture.root), image_size=IMAGE_SIZE, num_workers=0)
    with caplog.at_level(logging.WARNING):
        module.setup("fit")
    reports = [message for message in warnings_of(caplog) if kind in message]
    assert len(reports) == 1 and "snli_ve_train.jsonl line 5" in reports[0]
    texts = [record.text for record in module.train_dataset.records]
    assert len(texts) == (4 if expected_text is None else 5)
    if expected_text is not None:
        assert texts[-1] == expected_text
    assert tokenizes(tokenizer, [item["prompt"] for item in served(module.train_dataset)])


def test_food101_titles_with_bytes_that_are_not_utf8_are_repaired_and_reported(tmp_path, caplog):
    fixture = write_food101(tmp_path / "food101")
    titles = fixture.root / "texts" / "test_titles.csv"
    titles.write_bytes(titles.read_bytes().replace(b"apple pie recipe 1", b"apple pie \xe9t\xe9"))
    module = Food101DataModule(root=str(fixture.root), image_size=IMAGE_SIZE, val_size=0.25, num_workers=0)
    with caplog.at_level(logging.WARNING):
        module.setup("test")
    assert any("test_titles.csv" in message and "not UTF-8" in message and "1 repaired (first: test_titles.csv line 2)"
               in message for message in warnings_of(caplog))
    assert "apple pie \ufffdt\ufffd" in {record.text for record in module.datasets["test"].records}


@pytest.mark.parametrize("texts, expected, excluded", [
    (lambda raw: np.array([text.encode() for text in raw]), None, 0),
    (lambda raw: [raw[0].encode("latin-1") + b" caf\xe9", *raw[1:]], "caf\u00e9", 0),
    (lambda raw: np.array([None, *raw[1:]], dtype=object), None, 1),
    (lambda raw: [float("nan"), *raw[1:]], None, 1),
], ids=["bytes-array", "latin1-bytes", "null-text", "nan-text"])
def test_mmsa_raw_text_is_decoded_or_the_clip_excluded(tmp_path, caplog, tokenizer, texts, expected, excluded):
    original = make_mmsa()["train"]["raw_text"]
    path = mmsa_file(tmp_path, lambda data: data["train"].update(raw_text=texts(list(data["train"]["raw_text"]))))
    module = mmsa_module(path)
    with caplog.at_level(logging.WARNING):
        module.setup("fit")
    items = served(module.train_dataset)
    assert len(items) == len(original) - excluded
    assert [item["text"] for item in items][-3:] == list(original[-3:])
    assert all(type(item["text"]) is str for item in items)
    if expected is not None:
        assert items[0]["text"].endswith(expected)
    elif not excluded:
        assert [item["text"] for item in items] == list(original)
    if excluded:
        reports = [message for message in warnings_of(caplog) if "raw_text is not text" in message]
        assert len(reports) == 1 and "MOSI train" in reports[0] and "id trainvideo00$_$1" in reports[0]
        assert items[0]["id"] == "trainvideo00$_$2"  # every array stays aligned with the texts
        assert items[0]["label"] == pytest.approx(float(make_mmsa()["train"]["regression_labels"][1]))
    assert tokenizes(tokenizer, [item["prompt"] for item in items])


# === 2. data pickles cannot make us allocate ====================================================
class _Call:
    """Pickles as ``func(*args)`` (then ``__setstate__(state)``): how a crafted data file asks for objects."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


_RECONSTRUCT = np.empty(0).__reduce__()[0]
_BIG = 2**28  # 256 MiB of bytes, 2 GiB of object pointers


@pytest.mark.parametrize("payload", [
    _Call(bytearray, _BIG),
    _Call(bytes, _BIG),
    _Call(_RECONSTRUCT, np.ndarray, (_BIG,), np.dtype(object)),
    _Call(_RECONSTRUCT, np.ndarray, (_BIG,), b"b"),
    _Call(np.ndarray, (_BIG,), np.dtype(object)),
    _Call(_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (_BIG,), np.dtype("f4"), False, b"1234")),
    _Call(_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (1,), np.dtype(("f4", (2**14, 2**14))), False, b"1234")),
    _Call(_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (2,), np.dtype([("a", "O")]), False, [None, None])),
], ids=["bytearray", "bytes", "reconstruct-object-shape", "reconstruct-shape", "ndarray-call", "short-bytes", "subarray-dtype",
        "structured-object-dtype"])
def test_a_data_pickle_cannot_make_us_allocate_beyond_its_size(tmp_path, payload):
    path = tmp_path / "features.pkl"
    path.write_bytes(pickle.dumps({"train": {"audio": payload}}, protocol=4))
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=str(path)):
            load_data_pickle(path, allow_numpy=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_an_object_array_state_shorter_than_its_shape_is_refused_before_numpy_reads_past_it(tmp_path):
    """numpy's own `__setstate__` reads past a short list (a crash or garbage): run where a crash cannot stop the suite."""
    path = tmp_path / "features.pkl"
    payload = _Call(_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (2**20,), np.dtype(object), False, [None]))
    path.write_bytes(pickle.dumps({"train": {"raw_text": payload}}, protocol=4))
    code = ("import sys\nfrom mit_lightning.safe_pickle import UnsafePickleError, load_data_pickle\n"
            "try:\n    load_data_pickle(sys.argv[1], allow_numpy=True)\nexcept UnsafePickleError as error:\n"
            "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "object array of shape (1048576,)" in result.stdout and str(path) in result.stdout


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickles_as_numpy_writes_them_still_load_as_plain_arrays(tmp_path, protocol):
    data = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "u": np.array(["a dog", "café"]),
            "o": np.array(["text", None, np.arange(3)], dtype=object), "scalar": np.float32(2.5),
            "nested": [np.int64(3), (np.zeros((2, 0)),)]}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_data_pickle(path, allow_numpy=True)
    for key in ("f", "u", "o"):
        assert type(loaded[key]) is np.ndarray and loaded[key].dtype == data[key].dtype
    np.testing.assert_array_equal(loaded["f"], data["f"])
    np.testing.assert_array_equal(loaded["u"], data["u"])
    assert loaded["o"][0] == "text" and loaded["o"][1] is None and type(loaded["o"][2]) is np.ndarray
    assert loaded["scalar"] == np.float32(2.5) and type(loaded["nested"][1][0]) is np.ndarray


# === 6. tracebacks at start-up → one line ======================================================
@pytest.mark.parametrize("value", [0, -4])
def test_eval_batch_size_below_one_is_refused(refer, value):
    with pytest.raises(UserError, match=rf"data.eval_batch_size must be at least 1, got {value}"):
        refer_module(refer, eval_batch_size=value)


def test_unset_eval_batch_size_follows_batch_size(refer):
    assert refer_module(refer, batch_size=3).eval_batch_size == 3
    assert refer_module(refer, batch_size=3, eval_batch_size=5).eval_batch_size == 5


def test_mit_fit_with_eval_batch_size_zero_is_one_message(tmp_path, monkeypatch, capsys):
    fixture = write_snli_ve(tmp_path / "data")
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "snli_ve.yaml"), *TINY_LLM_AND_CLIP,
                          "--data.root", str(fixture.root), "--data.eval_batch_size", "0")
    assert "data.eval_batch_size must be at least 1, got 0" in error


def _llm_folder(root: Path) -> Path:
    """config.json and tokenizer files of the tiny LLaMA (no weights: start-up reads none)."""
    preset_llm_config("tiny", len(tiny_tokenizer())).save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return root


def _invalid_json(folder: Path) -> None:
    (folder / "config.json").write_text((folder / "config.json").read_text()[:-20])


def _no_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))


def _no_tokenizer(folder: Path) -> None:
    for path in folder.glob("tokenizer*"):
        path.unlink()


@pytest.mark.parametrize("damage, message", [
    (_invalid_json, r"config\.json' is not valid JSON"),
    (_no_model_type, r"config\.json' has no model_type"),
    (_no_tokenizer, r"has no tokenizer \(none of tokenizer\.json, tokenizer\.model, vocab\.json\)"),
], ids=["invalid-json", "no-model-type", "no-tokenizer"])
def test_a_broken_llm_folder_is_one_message_naming_it(tmp_path, monkeypatch, capsys, damage, message):
    folder = _llm_folder(tmp_path / "llama")
    damage(folder)
    with pytest.raises(UserError, match=message):
        LLMConfig(path=str(folder)).hf_config()
    fixture = write_snli_ve(tmp_path / "data")
    runs = str(tmp_path / "runs")
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "snli_ve.yaml"), *TINY_LLM_AND_CLIP,
                          "--model.llm.path", str(folder), "--data.root", str(fixture.root),
                          "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs)
    (line,) = [line for line in error.splitlines() if line.startswith("error:")]
    assert str(folder) in line


def test_a_corrupt_tokenizer_file_is_one_message_naming_the_folder(tmp_path):
    folder = _llm_folder(tmp_path / "llama")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=rf"Cannot load the tokenizer of '{folder}'"):
        FrozenLLM(LLMConfig(path=str(folder), dtype="float32"))
