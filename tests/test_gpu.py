"""On a GPU: the demo trains in bf16 through SDPA with the real `mit` command, and its test scores are usable.

Skipped without CUDA (run where a GPU is lent: ``pytest -m gpu``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_the_demo_fits_and_tests_in_bf16_through_sdpa_on_a_gpu(tmp_path):
    runs = str(tmp_path / "runs")
    command = [
        sys.executable, "-m", "mit_lightning", "fit", "--config", str(CONFIGS / "demo.yaml"),
        "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
        "--model.llm.attention", "sdpa", "--trainer.max_epochs", "3",
        "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
        "--data.root", str(tmp_path / "data"), "--data.num_workers", "2", "--test_after_fit", "true",
    ]
    subprocess.run(command, check=True, timeout=900)
    results = json.loads(next(Path(runs).rglob("test_metrics.json")).read_text())
    oiou = next(value for name, value in results.items() if name.endswith("oIoU"))
    assert 0.2 < oiou <= 1.0  # three epochs learn well past predicting the whole image (0.11)
