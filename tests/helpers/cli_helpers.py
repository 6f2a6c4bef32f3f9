"""Shared pieces of the end-to-end CLI tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mit_lightning.cli import main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")

#: a paper config shrunk to the tiny random LLM on CPU for one quick epoch
TINY_LLM = [
    "--model.llm.path", "tiny", "--model.llm.dtype", "float32",
    "--model.fusion.init_args.layers", "[2, 4]",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--data.num_workers", "0",
]
#: the same with the tiny random CLIP
TINY_LLM_AND_CLIP = [
    *TINY_LLM,
    "--model.vision.name", "tiny", "--model.vision.weights", "null", "--model.vision.dtype", "float32",
]


def fails_at_once(monkeypatch, capsys, *args: str) -> str:
    """`mit <args>` as a user runs it: exit code 2 and one message, no traceback."""
    monkeypatch.setattr(sys, "argv", ["mit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error


def small_run(tmp_path: Path, *extra: str) -> list[str]:
    """The demo config shrunk to seconds: a few images, one epoch, no workers."""
    return [
        "--config", DEMO,
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.root", str(tmp_path / "data"),
        "--data.train_images", "16",
        "--data.val_images", "4",
        "--data.test_images", "4",
        "--data.batch_size", "8",
        "--data.num_workers", "0",
        *extra,
    ]
