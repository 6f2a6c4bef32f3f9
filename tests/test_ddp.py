"""DDP on a CPU (2 processes, gloo) through the real `mit` command and the paper's trainer overlay:
fit, then test on a split the distributed sampler has to pad. Every evaluation sample counts once,
and the checkpoint loads back in a single process with the same scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mit_lightning.cli import cli_main
from mit_lightning.data.synthetic import SyntheticRefCOCODataModule
from mit_lightning.module import is_trainable_key

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = dict(train_images=6, val_images=2, test_images=3)  # 15 test sentences: the sampler repeats one


def data_args(root: Path) -> list[str]:
    sizes = [arg for name, value in SIZES.items() for arg in (f"--data.{name}", str(value))]
    return ["--data.root", str(root), *sizes, "--data.batch_size", "4", "--data.eval_batch_size", "1",
            "--data.num_workers", "0"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """`mit fit --test_after_fit true` with the 2-GPU DDP overlay, turned to 2 CPU processes."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    runs = str(tmp_path / "runs")
    command = [
        sys.executable, "-m", "mit_lightning", "fit",
        "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "trainer" / "ddp_2gpu_bf16.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--test_after_fit", "true", *data_args(tmp_path / "data"),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    metrics = json.loads(next(Path(runs).rglob("test_metrics.json")).read_text())
    return tmp_path, output, next(Path(runs).rglob("best-*.ckpt")), metrics


@pytest.mark.slow
def test_two_processes_trained_and_tested(ddp_run):
    _, output, checkpoint, metrics = ddp_run
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all(is_trainable_key(name) for name in saved)
    assert "test/oIoU" in metrics


@pytest.mark.slow
def test_every_test_sample_counts_once_although_the_sampler_repeats_one(ddp_run):
    tmp_path, _, _, metrics = ddp_run
    data = SyntheticRefCOCODataModule(root=str(tmp_path / "data"), image_size=64, **SIZES)
    data.setup("test")
    masks = [sample["mask"] for sample in data.datasets["test"]]
    assert len(masks) % 2 == 1  # so DistributedSampler pads the split with a repeated sample
    # the share of object pixels depends on the data alone: any sample counted twice would move it
    expected = sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)
    assert metrics["test/oIoU_whole_image"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_the_checkpoint_scores_the_same_in_one_process(ddp_run, monkeypatch):
    tmp_path, _, checkpoint, ddp_metrics = ddp_run
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each DDP process on this 2-core machine: the same arithmetic, bit for bit
    try:
        cli = cli_main(["test", "--ckpt_path", str(checkpoint), "--trainer.devices", "1", "--trainer.strategy", "auto",
                        "--trainer.enable_progress_bar", "false"])
    finally:
        torch.set_num_threads(threads)
    single = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    # the loss is a mean over the batches each process saw, the sampler's repeat included; metrics dedupe
    scores = sorted(name for name in ddp_metrics if not name.endswith("/loss"))
    assert scores and {name: single[name] for name in scores} == {name: ddp_metrics[name] for name in scores}
