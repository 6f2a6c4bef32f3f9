"""Progress in a log file: with stdout a pipe, `mit fit` prints one line per epoch (and every N batches)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli_helpers import small_run

ROOT = Path(__file__).resolve().parents[1]


def fit_into_a_pipe(tmp_path: Path, *extra: str) -> str:
    """`mit fit` as `mit fit ... | tee log` runs it: stdout is a pipe, not a terminal."""
    args = [sys.executable, "-m", "mit_lightning", "fit", *small_run(
        tmp_path, "--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "1", "--test_after_fit", "true",
        "--data.train_images", "6", "--data.val_images", "2", "--data.test_images", "2", *extra)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_every_epoch_and_the_test_leave_a_line_with_speed_and_metrics(tmp_path: Path):
    output = fit_into_a_pipe(tmp_path, "--trainer.max_epochs", "2")
    epochs = re.findall(r"^epoch (\d)/2 done: (\d+) batches \(step (\d+)\), [\d.]+ it/s, [\d.]+ samples/s, .*"
                        r"train/loss [\d.]+.*val/oIoU [\d.]+", output, re.MULTILINE)
    assert [epoch for epoch, _, _ in epochs] == ["1", "2"], output[-3000:]
    (_, batches, step), (_, _, last_step) = epochs
    assert int(step) == int(batches) > 0 and int(last_step) == 2 * int(batches)
    assert re.search(r"^test done: \d+ batches in [\d.]+ s", output, re.MULTILINE)
    assert "\x1b[" not in output and "Epoch 0/" not in output  # no bar drawn into the file
    assert "💡" not in output and "LeafSpec" not in output


@pytest.mark.slow
def test_a_long_epoch_also_leaves_a_line_every_n_batches(tmp_path: Path):
    output = fit_into_a_pipe(tmp_path, "--trainer.callbacks+=mit_lightning.progress.LineProgress",
                             "--trainer.callbacks.every_n_steps", "1")
    assert re.search(r"^epoch 1/1 batch 1/\d+ \(step 1\), [\d.]+ it/s, [\d.]+ samples/s  train/loss", output, re.MULTILINE)
    assert re.search(r"^epoch 1/1 done: \d+ batches", output, re.MULTILINE)


def test_a_run_resumed_mid_epoch_measures_its_speed_from_its_own_start():
    """Resumed mid-epoch, Lightning calls no epoch start: the speed must not be measured from the clock's zero."""
    import time

    from mit_lightning.progress import LineProgress

    progress = LineProgress()
    time.sleep(0.01)
    progress.on_train_start(trainer=None, pl_module=None)
    progress._count({"prompt": ["a", "b"]})
    seconds = 2 / float(progress._speed().split(", ")[1].split()[0])
    assert seconds < 5  # measured from the fit's start, not from perf_counter's zero (hours ago)
