"""The warm-up + cosine schedule (PILL's), against hand-computed learning rates."""

from __future__ import annotations

import math

import pytest
import torch

from mit_lightning.errors import UserError
from mit_lightning.schedules import WarmupCosine, warmup_cosine_factor


def test_factor_warms_up_linearly_then_follows_a_half_cosine():
    # 100 steps, 3% warm-up: 3 warm-up steps at 1/4, 2/4, 3/4, then cosine over steps 3..99
    assert [warmup_cosine_factor(step, 100, 0.03, 0.0) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine_factor(51, 100, 0.03, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine_factor(27, 100, 0.03, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_factor(99, 100, 0.03, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(99, 100, 0.03, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(150, 100, 0.03, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert warmup_cosine_factor(0, 10, 0.0, 0.0) == 1.0  # no warm-up


def test_scheduler_takes_the_run_length_it_is_given_and_steps_per_optimizer_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    scheduler = WarmupCosine(optimizer, warmup=0.2)
    assert scheduler.interval == "step" and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    scheduler.set_total_steps(10)  # 2 warm-up steps
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * warmup_cosine_factor(step, 10, 0.2, 0.0) for step in range(10)]
    assert rates == pytest.approx(expected)
    assert rates[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1]) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    restored = WarmupCosine(torch.optim.AdamW([parameter], lr=0.1), warmup=0.2)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.total_steps == 10 and restored.last_epoch == 10


def test_bad_settings_are_refused():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="warmup is a fraction"):
        WarmupCosine(optimizer, warmup=3)
    with pytest.raises(UserError, match="final_factor"):
        WarmupCosine(optimizer, final_factor=2.0)
    with pytest.raises(UserError, match="at least one optimizer step"):
        WarmupCosine(optimizer).set_total_steps(0)
    with pytest.raises(UserError, match="set trainer.max_epochs or trainer.max_steps"):
        WarmupCosine(optimizer).set_total_steps(float("inf"))  # what Lightning estimates for an endless run
