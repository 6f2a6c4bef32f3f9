"""MMSADataModule reads MMSA pickles as distributed: splits, dims, cleaning, masks, errors, safety."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch

import mit_lightning.data.mmsa as mmsa
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.errors import UserError
from mit_lightning.safe_pickle import UnsafePickleError
from helpers.mmsa_fixtures import SIZES, UNALIGNED_STEPS, make_mmsa, write_mmsa, write_pickle


def build(root, stage: str | None = "fit", **kwargs) -> MMSADataModule:
    """A data module on `root` with `stage` set up (None: constructed only)."""
    kwargs.setdefault("num_workers", 0)
    module = MMSADataModule(root=str(root), **kwargs)
    if stage is not None:
        module.setup(stage)
    return module


def test_aligned_items_follow_the_batch_contract(tmp_path):
    data = write_mmsa(tmp_path)
    module = build(tmp_path)
    module.setup("test")
    served = {"train": len(module.train_dataset), **{split: len(module.datasets[split]) for split in ("valid", "test")}}
    assert served == SIZES
    assert module.spec.sequence_dims == {"audio": 5, "facial": 20}

    item = module.datasets["valid"][1]
    raw = data["valid"]
    assert set(item) == {"prompt", "index", "label", "text", "id", "audio", "audio_mask", "facial", "facial_mask"}
    assert item["text"] == raw["raw_text"][1]
    assert item["prompt"] == f"Predict the sentiment of the following text: {raw['raw_text'][1]}. #Sentiment:"
    assert item["id"] == raw["id"][1] and "$_$" in item["id"]
    assert item["index"] == 1
    assert isinstance(item["label"], float) and item["label"] == pytest.approx(float(raw["regression_labels"][1]))
    assert item["audio"].dtype == torch.float32 and item["audio"].shape == (50, 5)
    assert item["facial"].shape == (50, 20)
    assert torch.equal(item["facial"], torch.from_numpy(raw["vision"][1]))
    assert item["audio_mask"].dtype == torch.bool and bool(item["audio_mask"].all())  # aligned: all real


def test_feature_dims_are_read_from_the_file(tmp_path):
    write_mmsa(tmp_path, "MOSEI", audio_dim=74, vision_dim=35)
    module = build(tmp_path, "test", dataset="MOSEI")
    assert module.spec.sequence_dims == {"audio": 74, "facial": 35}
    assert module.datasets["test"][0]["audio"].shape == (50, 74)


def test_non_finite_features_are_zeroed_and_counted(tmp_path, caplog):
    data = write_mmsa(tmp_path)
    data["train"]["audio"][1, 2, 3] = np.inf
    write_pickle(tmp_path / "MOSI" / "Processed" / "aligned_50.pkl", data)
    with caplog.at_level(logging.INFO, logger="mit_lightning.data.mmsa"):
        module = build(tmp_path)
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    for expected in ("train audio: 4 non-finite feature values replaced by 0 (3 -inf, 1 +inf)",
                     "train facial: 1 non-finite feature values replaced by 0 (1 NaN)"):
        assert any(expected in line for line in lines), lines
    assert len([line for line in lines if "non-finite" in line]) == 3 * 2  # one per split and modality
    train = module.train_dataset
    assert all(torch.isfinite(train[i][name]).all() for i in range(len(train)) for name in ("audio", "facial"))
    assert train[0]["audio"][0, :2].tolist() == [0.0, 0.0]
    assert train[0]["facial"][0, 0].item() == 0.0
    assert train[0]["audio"][0, 2].item() == pytest.approx(float(data["train"]["audio"][0, 0, 2]))  # the rest kept


def test_unaligned_masks_come_from_lengths(tmp_path, caplog):
    data = write_mmsa(tmp_path, aligned=False)
    data["test"]["vision_lengths"][0] = 10_000  # longer than T: clipped
    write_pickle(tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl", data)
    with caplog.at_level(logging.INFO, logger="mit_lightning.data.mmsa"):
        module = build(tmp_path, "test", aligned=False)
    test = module.datasets["test"]
    raw = data["test"]
    for i in range(len(test)):
        item = test[i]
        assert item["audio"].shape == (UNALIGNED_STEPS["audio"], 5)
        assert item["facial"].shape == (UNALIGNED_STEPS["vision"], 20)
        expected_audio = max(raw["audio_lengths"][i], 1)
        assert item["audio_mask"].tolist() == [t < expected_audio for t in range(UNALIGNED_STEPS["audio"])]
        expected_facial = min(raw["vision_lengths"][i], UNALIGNED_STEPS["vision"])
        assert int(item["facial_mask"].sum()) == expected_facial
    assert raw["audio_lengths"][-1] == 0 and test[len(test) - 1]["audio_mask"].tolist()[:2] == [True, False]
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("test audio" in line and "clips without frames, served as one zero step: 1" in line for line in lines)
    assert any("test facial" in line and "clips longer than the 15 steps stored, read as 15: 1" in line
               for line in lines), lines


def test_truncation_keeps_the_first_steps(tmp_path):
    data = write_mmsa(tmp_path, aligned=False)
    module = build(tmp_path, "test", aligned=False, max_sequence_length=4)
    for i in range(SIZES["test"]):
        item = module.datasets["test"][i]
        assert item["audio"].shape == (4, 5) and item["facial"].shape == (4, 20)
        assert int(item["facial_mask"].sum()) == min(max(data["test"]["vision_lengths"][i], 1), 4)
        assert torch.equal(item["facial"][1:], torch.from_numpy(data["test"]["vision"][i, 1:4]))


@pytest.mark.parametrize(
    "modalities, keys, dims",
    [
        (["facial"], {"facial", "facial_mask"}, {"facial": 20}),
        (["audio"], {"audio", "audio_mask"}, {"audio": 5}),
        ([], set(), {}),
    ],
)
def test_modality_selection(tmp_path, modalities, keys, dims):
    write_mmsa(tmp_path)
    module = build(tmp_path, "test", modalities=modalities)
    assert set(module.datasets["test"][0]) == {"prompt", "index", "label", "text", "id"} | keys
    assert module.spec.sequence_dims == dims


def test_custom_prompt_template(tmp_path):
    data = make_mmsa()
    data["test"]["raw_text"] = data["test"]["raw_text"].astype(object)
    data["test"]["raw_text"][2] = " so good "
    write_pickle(tmp_path / "MOSI" / "Processed" / "aligned_50.pkl", data)
    module = build(tmp_path, "test", prompt_template="Review: {text} | sentiment (-3..3) as {json}:")
    item = module.datasets["test"][2]
    assert item["prompt"] == "Review: so good | sentiment (-3..3) as {json}:"  # other braces kept, text stripped
    assert item["text"] == " so good "


def test_file_override_and_spec_after_test_setup_only(tmp_path, monkeypatch):
    write_pickle(tmp_path / "elsewhere.pkl", make_mmsa(aligned=False, audio_dim=7, vision_dim=3))
    calls = []
    real_load = mmsa.load_data_pickle
    monkeypatch.setattr(mmsa, "load_data_pickle", lambda *args, **kw: calls.append(args) or real_load(*args, **kw))
    module = build(tmp_path / "absent", None, file=str(tmp_path / "elsewhere.pkl"), aligned=False)
    assert calls == []  # nothing is read before setup
    module.setup("test")
    assert set(module.datasets) == {"test"}
    assert module.spec.sequence_dims == {"audio": 7, "facial": 3}
    module.setup("fit")
    assert module.spec.sequence_dims == {"audio": 7, "facial": 3}
    assert len(calls) == 1  # parsed once per data module


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_through_dataloaders(tmp_path, workers):
    write_mmsa(tmp_path, aligned=False)
    module = build(tmp_path, "fit", aligned=False, batch_size=4, eval_batch_size=2, num_workers=workers)
    batch = next(iter(module.train_dataloader()))
    assert batch["audio"].shape == (4, UNALIGNED_STEPS["audio"], 5) and batch["audio"].dtype == torch.float32
    assert batch["facial_mask"].shape == (4, UNALIGNED_STEPS["vision"]) and batch["facial_mask"].dtype == torch.bool
    assert batch["label"].dtype == torch.float32 and batch["index"].dtype == torch.long
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 4
    [loader] = module.val_dataloader()
    indices = torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(indices) == list(range(SIZES["valid"]))


def test_unaligned_file_read_as_aligned_warns_and_serves_every_step(tmp_path, caplog):
    write_pickle(tmp_path / "unaligned.pkl", make_mmsa(aligned=False))
    with caplog.at_level(logging.WARNING, logger="mit_lightning.data.mmsa"):
        module = build("unused", "test", file=str(tmp_path / "unaligned.pkl"))
    assert "has sequence lengths but data.aligned=true" in caplog.text
    assert bool(module.datasets["test"][3]["audio_mask"].all())


def test_missing_file_names_where_it_is_expected(tmp_path):
    expected = r"MOSEI feature file not found.*MOSEI/Processed/unaligned_50\.pkl.*data/README\.md"
    with pytest.raises(UserError, match=expected):
        MMSADataModule(root=str(tmp_path), dataset="MOSEI", aligned=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modalities": ["vision"]}, "audio, facial"),
        ({"prompt_template": "Predict the sentiment:"}, r"\{text\}"),
        ({"max_sequence_length": 0}, "at least 1"),
    ],
)
def test_bad_settings_are_user_errors(tmp_path, kwargs, message):
    write_mmsa(tmp_path)
    with pytest.raises(UserError, match=message):
        MMSADataModule(root=str(tmp_path), **kwargs)


def _without(split: str, key: str):
    def corrupt(data):
        del data[split][key]
        return data

    return corrupt


def _replace(key: str, make):
    def corrupt(data):
        data["test"][key] = make(data["test"][key])
        return data

    return corrupt


@pytest.mark.parametrize(
    "corrupt, aligned, message",
    [
        (lambda data: list(data.values()), True, "holds a list"),
        (lambda data: {"train": data["train"], "test": data["test"]}, True,
         r"no split \['valid'\].*\['test', 'train'\]"),
        (_without("test", "regression_labels"), True, r"split 'test' lacks \['regression_labels'\]"),
        (_replace("regression_labels", lambda labels: labels[:-1]), True, "regression_labels has 3 values for 4 texts"),
        (_replace("regression_labels", lambda labels: labels * np.nan), True, "non-finite"),
        (_replace("audio", lambda audio: audio[:, :, 0]), True, r"'audio' has shape \(4, 50\)"),
        (_replace("audio", lambda audio: np.full(len(audio), "loud")), True, "'audio' is not numeric"),
        (_replace("id", lambda ids: ids[:2]), True, r"'id' has shape \(2,\); expected \(4,\)"),
        (_without("valid", "vision_lengths"), False, r"lacks \['vision_lengths'\].*aligned"),
    ],
    ids=["not-a-dict", "missing-split", "missing-key", "short-labels", "nan-labels", "2d-audio", "text-audio",
         "short-ids", "unaligned-without-lengths"],
)
def test_malformed_pickles_are_user_errors(tmp_path, corrupt, aligned, message):
    write_pickle(tmp_path / "bad.pkl", corrupt(make_mmsa(aligned=aligned)))
    module = MMSADataModule(root="unused", file=str(tmp_path / "bad.pkl"), aligned=aligned, num_workers=0)
    with pytest.raises(UserError, match=message):
        module.setup("fit")


def test_inconsistent_dims_across_splits_are_user_errors(tmp_path):
    data = make_mmsa()
    data["test"] = make_mmsa(audio_dim=6)["test"]
    write_pickle(tmp_path / "mixed.pkl", data)
    module = MMSADataModule(root="unused", file=str(tmp_path / "mixed.pkl"), num_workers=0)
    module.setup("fit")
    with pytest.raises(UserError, match="'audio' features have 5 dims in one split and 6 in 'test'"):
        module.spec


class _Sneaky:
    """Unpickling this opens (creates) a file: the side effect a safe loader must never allow."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = make_mmsa()
    data["train"]["annotations"] = _Sneaky(marker)
    write_pickle(tmp_path / "MOSI" / "Processed" / "aligned_50.pkl", data)
    module = MMSADataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(UnsafePickleError, match=r"asks for '(builtins|io)\.open'"):
        module.setup("fit")
    assert not marker.exists()
    live = pickle.loads((tmp_path / "MOSI" / "Processed" / "aligned_50.pkl").read_bytes())  # the payload is real
    live["train"]["annotations"].close()
    assert marker.exists()
