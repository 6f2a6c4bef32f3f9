"""bf16 trainable weights with float32 master copies (`model.trainable_dtype: bfloat16`).

What matters: updates smaller than bf16's resolution are kept; training follows full-precision training
as closely as float32 trainable weights under autocast do, with fewer casts; clipping, checkpoints, exact
resume and loading the trained model see the float32 values; a setting that cannot work is one message.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.cli_helpers import fails_at_once, small_run
from mit_lightning import load_model
from mit_lightning.bench.measure import count_operations
from mit_lightning.bench.strategies import PEERS, read_strategies
from mit_lightning.cli import cli_main
from mit_lightning.compute_dtype import NORMALISATION
from mit_lightning.master_weights import MasterWeights
from mit_lightning.scales import SCALES, build_module, synthetic_batch

BF16_RUN = ("--trainer.precision", "bf16-mixed", "--model.trainable_dtype", "bfloat16")


# --- the copies ------------------------------------------------------------------------------------
def test_updates_below_bf16_resolution_are_kept_by_the_copies():
    def adam_steps(layer, parameters, masters=None):
        optimizer = torch.optim.Adam(parameters, lr=1e-4)
        if masters is not None:
            masters.attach(optimizer)
        for _ in range(20):
            optimizer.zero_grad()
            layer(torch.ones(4, 2, dtype=torch.bfloat16)).sum().backward()
            if masters is not None:
                masters.take_gradients()
            optimizer.step()

    plain = nn.Linear(2, 1).to(torch.bfloat16)
    nn.init.ones_(plain.bias)
    adam_steps(plain, plain.parameters())
    assert plain.bias.item() == 1.0  # 1 − 1e-4 rounds back to 1 in bf16, twenty times

    layer = nn.Linear(2, 1).to(torch.bfloat16)
    nn.init.ones_(layer.bias)
    masters = MasterWeights(layer.named_parameters())
    adam_steps(layer, masters.optimized_groups(list(layer.parameters())), masters)
    assert masters.state()["bias"].item() == pytest.approx(1 - 20e-4, abs=1e-5)
    assert layer.bias.item() == masters.state()["bias"].to(torch.bfloat16).item() < 1
    assert layer.bias.grad is None  # the gradient moved to the copy; the next backward starts from nothing


def test_float32_parameters_are_their_own_copies_and_groups_keep_their_settings():
    model = nn.Sequential(nn.Linear(2, 2).to(torch.bfloat16), nn.LayerNorm(2))
    masters = MasterWeights(model.named_parameters())
    assert set(masters.state()) == {"0.weight", "0.bias"}
    assert masters.optimized(model[1].weight) is model[1].weight
    groups = masters.optimized_groups([{"params": [model[0].weight, model[1].weight], "lr": 0.5, "name": "head"}])
    assert groups[0]["params"][0].dtype == torch.float32 and groups[0]["params"][1] is model[1].weight
    assert (groups[0]["lr"], groups[0]["name"]) == (0.5, "head")


# --- a training step --------------------------------------------------------------------------------
def _train(llm_dtype, trainable_dtype, autocast, steps=10):
    """`steps` bench-like training steps of the tiny MiT model; its float32 trainable values and one step's counts."""
    scale = dataclasses.replace(SCALES["tiny"], dtype=llm_dtype)
    torch.manual_seed(0)
    module = build_module(scale, read_strategies(PEERS)["mit"].factory(scale), 48, torch.device("cpu"),
                          trainable_dtype=trainable_dtype)
    optimizer = module.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    batch = synthetic_batch(module, scale, 8, 48, torch.device("cpu"))
    module.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = module.training_step(batch, 0)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()

    initial = {name: p.detach().float().clone() for name, p in module.named_trainable_parameters()}
    for _ in range(steps):
        step()
    masters = module._master_weights.state() if module._master_weights is not None else {}
    values = {name: masters.get(name, p.detach().float()) for name, p in module.named_trainable_parameters()}
    return initial, values, count_operations(step, torch.device("cpu")), module


def _distance(a, b):
    return sum(((a[name] - b[name]) ** 2).sum() for name in a).sqrt().item()


@pytest.mark.filterwarnings("ignore:.*self.log")
def test_training_follows_full_precision_as_closely_as_float32_weights_under_autocast_with_fewer_casts():
    initial, exact, _, _ = _train("float32", "float32", autocast=False)
    _, autocast, autocast_counts, _ = _train("bfloat16", "float32", autocast=True)
    _, bf16, bf16_counts, module = _train("bfloat16", "bfloat16", autocast=True)
    assert _distance(exact, initial) > 5 * _distance(autocast, exact) > 0  # the weights moved; bf16 shows
    assert _distance(bf16, exact) <= 1.25 * _distance(autocast, exact)
    for prefix, layer in module.named_modules():
        for name, parameter in layer.named_parameters(recurse=False):
            if f"{prefix}.{name}" in exact:
                assert parameter.dtype == (torch.float32 if isinstance(layer, NORMALISATION) else torch.bfloat16)
    # the weights' casts in the forward pass and their gradients' in the backward pass are gone
    assert bf16_counts["casts"] <= autocast_counts["casts"] - len(module._master_weights.masters)


# --- a run --------------------------------------------------------------------------------------------
def _fit(folder: Path, *extra: str):
    return cli_main(["fit", *small_run(folder, *BF16_RUN, *extra)])


def test_checkpoints_hold_the_float32_copies_and_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path):
    whole = _fit(tmp_path / "whole", "--trainer.max_epochs", "2", "--test_after_fit", "false")
    first = _fit(tmp_path / "parts", "--test_after_fit", "false")
    first_last = Path(first.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    resumed = _fit(tmp_path / "parts", "--trainer.max_epochs", "2", "--test_after_fit", "false",
                   "--ckpt_path", str(first_last))
    expected = whole.model._master_weights.state()
    assert len(expected) > 10
    for name, value in resumed.model._master_weights.state().items():
        assert torch.equal(value, expected[name]), name
    saved = torch.load(Path(whole.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)["state_dict"]
    parameters = dict(whole.model.named_parameters())
    for name, value in expected.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], value)
        assert torch.equal(parameters[name], value.to(torch.bfloat16))  # the model runs the copies rounded

    # the trained model answers with the copies rounded to bf16, as it ran in validation
    model = load_model(Path(whole.trainer.checkpoint_callback.dirpath) / "last.ckpt", device="cpu")
    loaded = dict(model.module.named_parameters())
    for name, value in expected.items():
        assert torch.equal(loaded[name], value.to(torch.bfloat16)), name


def test_clipping_acts_on_the_gradients_the_optimizer_uses(tmp_path):
    def moved(*extra):
        cli = _fit(tmp_path / str(len(extra)), "--test_after_fit", "false", "--model.optimizer", "torch.optim.SGD",
                   "--model.optimizer.lr", "0.1", "--model.optimizer.fused", "false", *extra)
        return max((value - before[name]).abs().max().item() for name, value in cli.model._master_weights.state().items())

    torch.manual_seed(0)
    before_cli = cli_main(["fit", *small_run(tmp_path / "before", *BF16_RUN,
                                             "--trainer.max_epochs", "0", "--test_after_fit", "false",
                                             "--model.optimizer", "torch.optim.SGD")])
    before = {name: p.detach().float() for name, p in before_cli.model.named_trainable_parameters()}
    # two SGD steps of 0.1 × a gradient clipped to norm 1e-6 move no weight by more than 2e-7
    assert moved("--trainer.gradient_clip_val", "1e-6") <= 3e-7 < moved()


def test_clipping_under_autocast_with_a_fused_optimizer_is_one_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, "--trainer.precision", "bf16-mixed",
                                                                 "--trainer.gradient_clip_val", "1.0"))
    assert "trainer.gradient_clip_val under trainer.precision bf16-mixed needs an optimizer that is not fused" in error
    assert "--model.optimizer.fused false" in error


def test_bf16_weights_without_bf16_autocast_are_one_message(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "fit", *small_run(tmp_path, "--model.trainable_dtype", "bfloat16"))
    assert "model.trainable_dtype bfloat16 runs under bf16 autocast, but trainer.precision is 32-true" in error
    assert "--trainer.precision bf16-mixed" in error
