"""`TrainingCost`: the cost figures of a resumed run cover the whole run, and a damaged record only warns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mit_lightning.checkpoints import load_weights_file
from mit_lightning.cli import cli_main
from mit_lightning.compare import TrainingCost
from tests.helpers.cli_helpers import small_run

COST = '--trainer.callbacks+={"class_path": "mit_lightning.compare.TrainingCost", "init_args": {"warmup": 0}}'


def cost_record(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "runs").rglob("training_cost.json")
    return json.loads(path.read_text())


def test_a_resumed_run_reports_the_steps_of_both_parts(tmp_path):
    cli_main(["fit", *small_run(tmp_path, COST)])  # one epoch
    first = cost_record(tmp_path)
    assert first["steps_timed"] > 1 and first["step_ms"] > 0
    stored = [state for path in (tmp_path / "runs").rglob("*.ckpt")
              for name, state in load_weights_file(path)["callbacks"].items() if "TrainingCost" in name]
    stored = [state for state in stored if len(state["times"]) == first["steps_timed"]]  # saved at the epoch's end
    assert stored
    cli_main(["fit", *small_run(tmp_path, COST, "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    both = cost_record(tmp_path)
    assert both["steps_timed"] == 2 * first["steps_timed"]
    # the peak is the larger of the resumed part's and the one its checkpoint held
    assert both["peak_memory_mib"] >= max(state["peak_memory_mib"] for state in stored)


@pytest.mark.parametrize("record", [
    None, [], {"times": "0.1"}, {"times": [0.1], "cpu_times": []}, {"times": [float("nan")], "cpu_times": [0.1]},
    {"times": [True], "cpu_times": [0.1]}, {"times": [0.1], "cpu_times": [0.1], "peak_memory_mib": -5},
])
def test_a_damaged_record_warns_and_the_figures_start_afresh(record):
    cost = TrainingCost()
    with pytest.warns(UserWarning, match="cover only the training after this resume"):
        cost.load_state_dict(record)
    assert cost.state_dict() == {"times": [], "cpu_times": [], "peak_memory_mib": None}


def test_a_record_round_trips():
    cost = TrainingCost()
    cost.load_state_dict({"times": [0.5, 0.25], "cpu_times": [0.4, 0.2], "peak_memory_mib": 12.5})
    assert cost.state_dict() == {"times": [0.5, 0.25], "cpu_times": [0.4, 0.2], "peak_memory_mib": 12.5}
