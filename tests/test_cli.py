"""The `mit` command end to end on the tiny backbones and a small synthetic refer dataset."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers.cli_helpers import DEMO, fails_at_once, small_run
from mit_lightning.cli import cli_main, main
from mit_lightning.module import is_trainable_key

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fit + test run shared by the round-trip tests."""
    tmp_path = tmp_path_factory.mktemp("fit")
    cli = cli_main(["fit", *small_run(tmp_path, "--test_after_fit", "true")])
    checkpoint = Path(cli.trainer.checkpoint_callback.best_model_path)
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    return tmp_path, cli, checkpoint, metrics


def test_fit_writes_config_checkpoint_and_tensorboard_curves(trained):
    tmp_path, cli, checkpoint, metrics = trained
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert checkpoint.is_file() and (checkpoint.parent / "last.ckpt").is_file()
    assert {"test/oIoU", "test/mIoU", "test/prec@0.5", "test/oIoU_whole_image"} <= set(metrics)


def test_checkpoint_holds_exactly_the_trainable_weights_and_the_run_config(trained):
    _, cli, checkpoint, _ = trained
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    trainable = {name for name, parameter in cli.model.named_parameters() if parameter.requires_grad}
    assert set(saved["state_dict"]) == trainable
    assert all(is_trainable_key(name) for name in saved["state_dict"])
    assert not any(name.startswith(("llm.", "vision.")) for name in saved["state_dict"])
    assert saved["mit_config"]["model"]["llm"]["path"] == "tiny"
    assert saved["mit_config"]["data"]["class_path"].endswith("SyntheticRefCOCODataModule")


def test_mit_test_with_only_a_checkpoint_restores_the_run_exactly(trained):
    _, fitted, checkpoint, fit_metrics = trained
    cli = cli_main(["test", "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false"])
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    restored = cli.model.state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0)
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert metrics == pytest.approx(fit_metrics, abs=1e-6)
    assert Path(cli.trainer.log_dir) != Path(fitted.trainer.log_dir)  # a new run directory, nothing overwritten


def test_overrides_after_the_checkpoint_still_apply(trained):
    _, _, checkpoint, _ = trained
    cli = cli_main(
        ["test", "--ckpt_path", str(checkpoint), "--data.test_splits", "[val]", "--trainer.enable_progress_bar", "false"]
    )
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert "test/val/oIoU" in metrics and "test/oIoU" not in metrics


def test_a_checkpoint_of_another_model_is_refused_clearly(trained, capsys, monkeypatch):
    _, _, checkpoint, _ = trained
    monkeypatch.setattr(sys, "argv", ["mit", "test", "--ckpt_path", str(checkpoint), "--model.head.init_args.width", "32"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "does not fit this model" in capsys.readouterr().err


def test_a_checkpoint_records_its_backbones_and_refuses_others_unless_told(trained, capsys, monkeypatch):
    _, _, checkpoint, _ = trained
    recorded = torch.load(checkpoint, map_location="cpu", weights_only=True)["mit_backbones"]
    assert recorded["llm"] == {"path": "tiny", "fingerprint": {"preset": "tiny", "seed": 0}}
    assert recorded["vision"]["fingerprint"] == {"name": "tiny", "random_seed": 0}
    other_llm = ["--ckpt_path", str(checkpoint), "--model.llm.seed", "1", "--trainer.enable_progress_bar", "false"]
    error = fails_at_once(monkeypatch, capsys, "test", *other_llm)
    assert "trained on other frozen backbones" in error and "LLM: trained on tiny" in error
    assert "vision tower" not in error  # only what differs is named
    cli = cli_main(["test", *other_llm, "--model.allow_other_backbones", "true"])
    assert (Path(cli.trainer.log_dir) / "test_metrics.json").is_file()


def test_missing_data_root_is_one_clear_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(
        monkeypatch, capsys, "fit", "--config", str(Path(DEMO).parent / "refcoco.yaml"),
        "--model.llm.path", "tiny", "--data.root", str(tmp_path / "nowhere"),
    )
    assert "Data root not found" in error and "nowhere" in error and "data/README.md" in error


def test_missing_llm_weights_are_one_clear_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, "--model.llm.path", str(tmp_path / "llama")))
    assert "LLM weights not found" in error and str(tmp_path / "llama") in error


def test_missing_clip_weights_are_one_clear_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(
        monkeypatch, capsys, "fit", *small_run(tmp_path, "--model.vision.name", "ViT-B-16",
                                               "--model.vision.weights", str(tmp_path / "clip.pt")),
    )
    assert "CLIP weights not found" in error and "clip.pt" in error


def test_bad_layer_index_is_one_clear_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, "--model.fusion.init_args.layers", "[2, 9]"))
    assert "[9]" in error and "outside the LLM's 4 layers" in error


def test_missing_checkpoint_is_one_clear_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "test", "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert "Checkpoint not found" in error


def test_print_config_shows_the_whole_run(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["fit", *small_run(tmp_path), "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: mit_lightning.fusion.MiT" in printed and "lr: 0.001" in printed


def test_predict_writes_the_masks_the_test_scored_with_the_ids_to_join_them(trained, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    _, _, checkpoint, fit_metrics = trained
    cli = cli_main(["predict", "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false"])
    output = Path(cli.trainer.log_dir) / "predictions"
    rows = [json.loads(line) for line in (output / "predictions.rank0.jsonl").read_text().splitlines()]
    dataset = cli.datamodule.datasets["test"]
    assert sorted(row["index"] for row in rows) == list(range(len(dataset)))
    intersection = union = 0
    for row in rows:
        sample = dataset[row["index"]]
        assert (row["ref_id"], row["sent_id"], row["prompt"]) == (sample["ref_id"], sample["sent_id"], sample["prompt"])
        mask = np.asarray(Image.open(row["mask"])) > 0
        target = sample["mask"].numpy().astype(bool)
        assert mask.shape == target.shape  # saved at the size the test scores
        intersection += int((mask & target).sum())
        union += int((mask | target).sum())
        assert Image.open(row["overlay"]).size == Image.open(row["image_path"]).size
    assert intersection / union == pytest.approx(fit_metrics["test/oIoU"], abs=1e-6)  # the very masks tested
    assert np.mean([row["iou"] for row in rows]) == pytest.approx(fit_metrics["test/mIoU"], abs=1e-6)
    writer = f"--trainer.callbacks+={{class_path: mit_lightning.callbacks.PredictionWriter, init_args: {{output_dir: {output}}}}}"
    error = fails_at_once(monkeypatch, capsys, "predict", "--ckpt_path", str(checkpoint), writer)
    assert "already holds predictions" in error  # never appended to
    assert len((output / "predictions.rank0.jsonl").read_text().splitlines()) == len(rows)


def test_predict_on_a_moved_run_folder_writes_beside_the_checkpoint_as_it_is_now(trained, tmp_path):
    runs, _, checkpoint, _ = trained
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint.parents[3], moved)  # the logger's folder, with every run version in it
    before = sorted(checkpoint.parents[3].rglob("*"))
    copy = moved / checkpoint.relative_to(checkpoint.parents[3])
    cli = cli_main(["predict", "--ckpt_path", str(copy), "--trainer.enable_progress_bar", "false"])
    output = Path(cli.trainer.log_dir) / "predictions" / "predictions.rank0.jsonl"
    assert output.is_file() and output.is_relative_to(moved)
    assert sorted(checkpoint.parents[3].rglob("*")) == before  # nothing written at the place it was trained


def test_validate_evaluates_a_checkpoint_on_the_validation_split(trained):
    _, _, checkpoint, _ = trained
    cli = cli_main(["validate", "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false"])
    metrics = cli.trainer.callback_metrics
    assert {"val/oIoU", "val/mIoU", "val/loss"} <= set(metrics)
    assert 0.0 <= float(metrics["val/oIoU"]) <= 1.0


def test_help_lists_the_commands_beside_lightnings(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mit", "--help"])
    with pytest.raises(SystemExit):
        main()
    commands = capsys.readouterr().out.split("other commands:")[1]
    assert [line.split()[0] for line in commands.strip().splitlines()] == [
        "bench", "compare", "reproduce", "serve", "export", "inspect", "check-data"]


def test_an_overlay_given_without_its_task_config_says_to_give_one_first(monkeypatch, capsys):
    overlay = str(Path(DEMO).parent / "datasets" / "refcoco+.yaml")
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", overlay)
    assert "model.head" in error and "Give a task config first" in error and "configs/datasets/*.yaml" in error


def test_bitsandbytes_int8_cast_message_is_printed_once_not_at_every_layer_call(caplog):
    from mit_lightning.cli import (BITSANDBYTES_INT8_LOGGER, LIGHTNING_INFO_LOGGER, FirstOnly, _no_advertisements,
                                   _quiet_known_warnings)

    log = logging.getLogger(BITSANDBYTES_INT8_LOGGER)
    with warnings.catch_warnings():
        _quiet_known_warnings()  # as `mit` starts
    logging.getLogger(LIGHTNING_INFO_LOGGER).removeFilter(_no_advertisements)
    installed = [item for item in log.filters if isinstance(item, FirstOnly)]
    assert [item.prefix for item in installed] == ["MatMul8bitLt: inputs will be cast"]
    for item in installed:
        log.removeFilter(item)
    once = FirstOnly("MatMul8bitLt: inputs will be cast")
    log.addFilter(once)
    try:
        with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_INT8_LOGGER):
            for _ in range(3):
                log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
            log.warning("something else")
            log.warning("something else")
    finally:
        log.removeFilter(once)
    assert [record.getMessage() for record in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
        "something else", "something else"]


def test_the_command_prints_no_lightning_advertisement_nor_its_torch_deprecation(caplog):
    from lightning.pytorch.utilities import rank_zero_info

    from mit_lightning.cli import LIGHTNING_INFO_LOGGER, _no_advertisements, _quiet_known_warnings

    lightning_log = logging.getLogger(LIGHTNING_INFO_LOGGER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_known_warnings()
        try:
            with caplog.at_level(logging.INFO):
                rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/)")
                rank_zero_info("Trainable parameters: 1 of 2")
            from torch.utils._pytree import LeafSpec

            LeafSpec()  # as Lightning's _pytree does at every step
        finally:
            lightning_log.removeFilter(_no_advertisements)
    assert [record.getMessage() for record in caplog.records] == ["Trainable parameters: 1 of 2"]
    assert not [warning for warning in caught if "LeafSpec" in str(warning.message)]
