"""The peer overlays (configs/peers/): parsed on every task config, trained and tested with `mit` on the
demo data and on MOSI fixtures, their checkpoints holding exactly what trains (LoRA included), PILL's
second stage started from the first one's weights, and clear errors for what cannot work."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers.cli_helpers import TINY_LLM, fails_at_once, small_run
from mit_lightning.cli import MiTCLI, cli_main, parse_run_config
from mit_lightning.metrics.sentiment import SENTIMENT_METRIC_NAMES
from helpers.mmsa_fixtures import write_mmsa

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PEERS = CONFIGS / "peers"
OVERLAYS = {
    "concat": "mit_lightning.fusion.TokenConcat",
    "concat_lora_r16_qkv": "mit_lightning.fusion.TokenConcat",
    "concat_lora_r128_all_linear": "mit_lightning.fusion.TokenConcat",
    "pill_stage1": "mit_lightning.fusion.PILL",
    "pill_stage2": "mit_lightning.fusion.PILL",
    "modex": "mit_lightning.fusion.ModeX",
    "mit": "mit_lightning.fusion.MiT",
    "late_addition": "mit_lightning.fusion.LateAddition",
    "text_only": "mit_lightning.fusion.TextOnly",
}
#: the peers trained here (MiT and the simple fusions train in tests of their own)
TRAINED = ("concat", "concat_lora_r16_qkv", "pill_stage1", "pill_stage2", "modex")
#: each peer's own optimiser recipe, its overlay's default: PILL's, and LLaVA-1.5's for the LLaVA-style ones
PILL_RECIPE = ("torch.optim.AdamW", {"betas": (0.9, 0.95), "weight_decay": 0.02})
LLAVA_RECIPE = ("torch.optim.AdamW", {"weight_decay": 0.0})
RECIPES = {"pill_stage1": PILL_RECIPE, "pill_stage2": PILL_RECIPE, "concat": LLAVA_RECIPE, "modex": LLAVA_RECIPE,
           "concat_lora_r16_qkv": LLAVA_RECIPE, "concat_lora_r128_all_linear": LLAVA_RECIPE}
TASKS = ["demo", "refcoco", "food101", "mosi"]


def overlay(name: str) -> list[str]:
    return ["--config", str(PEERS / f"{name}.yaml")]


# --- parsing ----------------------------------------------------------------------------------------
def test_every_overlay_is_listed_here():
    assert sorted(path.stem for path in PEERS.glob("*.yaml")) == sorted(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("task", TASKS)
def test_each_overlay_selects_its_method_and_keeps_the_task(task, name):
    alone = parse_run_config(["--config", str(CONFIGS / f"{task}.yaml")])
    config = parse_run_config(["--config", str(CONFIGS / f"{task}.yaml"), *overlay(name)])
    assert config.model.fusion.class_path == OVERLAYS[name]
    assert (config.data, config.model.head, config.model.llm, config.model.vision) == (
        alone.data, alone.model.head, alone.model.llm, alone.model.vision)
    assert config.trainer.logger.init_args.save_dir == alone.trainer.logger.init_args.save_dir
    assert config.trainer.logger.init_args.name == name  # runs of each method in their own folder
    assert config.model.optimizer.init_args.lr == alone.model.optimizer.init_args.lr  # same budget
    if name.startswith("pill"):
        assert config.model.fusion.init_args.stage == int(name[-1])
        assert config.model.fusion.init_args.tokens == 32  # PILL's Q-Former budget
    if name in RECIPES:
        optimizer, arguments = RECIPES[name]
        assert config.model.optimizer.class_path == optimizer
        assert {key: getattr(config.model.optimizer.init_args, key) for key in arguments} == arguments
        assert config.model.lr_scheduler.class_path == "mit_lightning.schedules.WarmupCosine"
        assert config.model.lr_scheduler.init_args.warmup == 0.03
    else:
        assert config.model.optimizer == alone.model.optimizer and config.model.lr_scheduler == alone.model.lr_scheduler
    assert (getattr(config.model.fusion.init_args, "lora", None) is not None) == name.startswith("concat_lora")
    assert config.model.init_weights == ("${MIT_PILL_STAGE1_CKPT}" if name == "pill_stage2" else None)


# --- training and testing on the demo ---------------------------------------------------------------
@dataclass
class Run:
    cli: MiTCLI
    checkpoint: Path
    metrics: dict[str, float]

    @property
    def saved(self) -> dict[str, torch.Tensor]:
        return torch.load(self.checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def fit_demo(tmp_path: Path, *extra: str) -> Run:
    """The shrunk demo with even fewer training images: a couple of steps are enough here."""
    cli = cli_main(["fit", *small_run(tmp_path, "--data.train_images", "4", *extra)])
    metrics_file = Path(cli.trainer.log_dir) / "test_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Run(cli, Path(cli.trainer.checkpoint_callback.best_model_path), metrics)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Each overlay trained one epoch and tested; stage 2 of PILL from stage 1's checkpoint."""
    tmp_path = tmp_path_factory.mktemp("peers")
    done = {name: fit_demo(tmp_path, *overlay(name)) for name in ("concat", "concat_lora_r16_qkv", "pill_stage1", "modex")}
    stage1 = str(done["pill_stage1"].checkpoint)
    done["pill_stage2"] = fit_demo(tmp_path, *overlay("pill_stage2"), "--model.init_weights", stage1)
    return done


@pytest.mark.parametrize("name", TRAINED)
def test_each_method_trains_and_tests_on_the_demo(runs, name):
    run = runs[name]
    assert run.cli.model.fusion.__class__.__name__ == OVERLAYS[name].rsplit(".", 1)[1]
    assert Path(run.cli.trainer.log_dir).parent.name == name
    assert {"test/oIoU", "test/mIoU", "test/prec@0.5"} <= set(run.metrics)
    assert all(math.isfinite(value) for value in run.metrics.values())


@pytest.mark.parametrize("name", TRAINED)
def test_checkpoints_hold_the_methods_weights_and_no_frozen_one(runs, name):
    model = runs[name].cli.model
    saved = runs[name].saved
    lora = {key for key, _ in model.llm.named_parameters(prefix="llm") if ".lora_" in key}
    expected = {key for key in model.state_dict() if key.startswith(("fusion.", "head."))} | lora
    assert set(saved) == expected
    assert bool(lora) == (name == "concat_lora_r16_qkv")
    if name == "concat_lora_r16_qkv":  # A and B of q, k, v in each of the 4 layers
        assert len(lora) == 4 * 3 * 2
        trainable = {key for key, parameter in model.named_parameters() if parameter.requires_grad}
        assert set(saved) == trainable
        assert not any("base_layer" in key for key in saved)


def test_mit_test_restores_the_lora_weights(runs):
    fitted = runs["concat_lora_r16_qkv"]
    cli = cli_main(["test", "--ckpt_path", str(fitted.checkpoint), "--trainer.enable_progress_bar", "false"])
    restored = cli.model.state_dict()
    for key, value in fitted.saved.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0)
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert metrics == pytest.approx(fitted.metrics, abs=1e-6)


def test_pill_stage1_trains_only_a_vis_and_the_projector(runs):
    saved = runs["pill_stage1"].saved
    gates = [value for key, value in saved.items() if key.endswith(".gate.weight") and "adapter" not in key]
    assert gates and all(torch.count_nonzero(gate) == 0 for gate in gates)  # MAG off, W_g untouched
    for adapter in ("attention_adapter", "text_adapter"):
        assert all(torch.count_nonzero(value) == 0 for key, value in saved.items() if f"{adapter}.up" in key)
    # A_vis trained in every layer: in the last one the routing is flipped (text through A_vis), as in the release
    trained = {key: torch.count_nonzero(value) > 0 for key, value in saved.items() if "visual_adapter.up" in key}
    assert len(trained) == 4 and all(trained.values())


def test_pill_stage2_starts_from_stage1_weights_with_a_fresh_optimizer(runs, tmp_path):
    stage1 = runs["pill_stage1"]
    start = fit_demo(tmp_path, *overlay("pill_stage2"), "--model.init_weights", str(stage1.checkpoint),
                     "--trainer.max_epochs", "0", "--test_after_fit", "false")
    state = start.cli.model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in stage1.saved.items())
    assert start.cli.trainer.current_epoch == 0
    # stage 2 then trains W_g away from 0 and steps its warm-up + cosine schedule per optimizer step
    stage2 = runs["pill_stage2"]
    assert any(torch.count_nonzero(value) > 0 for key, value in stage2.saved.items() if key.endswith("layers.0.gate.weight"))
    schedule = stage2.cli.trainer.lr_scheduler_configs[0]
    assert schedule.interval == "step" and schedule.scheduler.total_steps == stage2.cli.trainer.num_training_batches


def test_a_stage2_run_without_its_stage1_checkpoint_says_what_to_set(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MIT_PILL_STAGE1_CKPT", raising=False)
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, *overlay("pill_stage2")))
    assert "MIT_PILL_STAGE1_CKPT" in error


def test_starting_from_weights_of_another_method_is_refused(runs, monkeypatch, capsys, tmp_path):
    stage1 = str(runs["pill_stage1"].checkpoint)
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, *overlay("modex"), "--model.init_weights", stage1))
    assert f"model.init_weights '{stage1}' does not fit this model" in error
    missing = str(tmp_path / "stage1.ckpt")
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, *overlay("modex"), "--model.init_weights", missing))
    assert f"'{missing}' does not exist" in error


def test_lora_is_not_an_option_of_mit(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, "--model.fusion.init_args.lora", "{rank: 8}"))
    assert "mit_lightning.fusion.MiT" in error and "'lora.rank' is not accepted" in error


# --- sentiment: acoustic and facial frames as tokens -------------------------------------------------
def test_pill_reads_the_mosi_frames_as_tokens_end_to_end(tmp_path):
    write_mmsa(tmp_path / "data", "MOSI", aligned=False)
    runs_dir = str(tmp_path / "runs")
    cli = cli_main([
        "fit", "--config", str(CONFIGS / "mosi.yaml"), *TINY_LLM, *overlay("pill_stage2"),
        "--model.init_weights", "null", "--data.root", str(tmp_path / "data"),
        "--trainer.default_root_dir", runs_dir, "--trainer.logger.init_args.save_dir", runs_dir, "--test_after_fit", "true",
    ])
    model = cli.model
    assert list(model.fusion.tokens.projectors) == ["audio", "facial"] and model.fusion.vision_blocks == ()
    assert len(model.sequence_encoders) == 0  # the frames are read as tokens, not encoded to vectors
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert all(math.isfinite(metrics[f"test/{name}"]) for name in SENTIMENT_METRIC_NAMES)
