"""`mit compare`: two strategies trained end to end on a shrunk demo, the table and its files, and the
checks that run before anything trains."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mit_lightning.cli import cli_main
from mit_lightning.compare import cli as compare
from mit_lightning.compare.table import Row, markdown, metric_columns
from mit_lightning.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "configs" / "peers"


def shrunk_demo(tmp_path: Path) -> list[str]:
    """`mit fit` arguments that shrink the demo to seconds."""
    return ["--data.root", str(tmp_path / "data"), "--data.train_images", "4", "--data.val_images", "1",
            "--data.test_images", "2", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    """Strategies and the demo config are named relative to the repository root, where `make` runs."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        cli_main(["compare", "--strategies", "mit", "late_addition", "--epochs", "1", "--max-steps", "3",
                  "--runs", str(tmp_path / "runs"), "--", *shrunk_demo(tmp_path)])
    return tmp_path / "runs" / "version_0"


def test_every_strategy_trains_and_the_table_is_written_as_markdown_and_csv(comparison: Path, capsys):
    table = (comparison / "comparison.md").read_text()
    assert ("| strategy | oIoU | mIoU | trainable parameters | step time (ms) | CPU time per step (ms) "
            "| peak memory (MiB) |") in table
    assert "CPU threads per run: 1" in table  # no CUDA GPU here: every run pinned to one thread
    with open(comparison / "comparison.csv") as file:
        rows = {row["strategy"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["mit", "late_addition"]
    for name, row in rows.items():
        assert row["problem"] == "" and 0 <= float(row["test/test/oIoU"]) <= 1
        assert float(row["step_ms"]) > 0 and int(row["steps_timed"]) >= 1
        assert float(row["step_cpu_ms"]) > 0 and int(row["threads"]) == 1 and float(row["load_per_core"]) >= 0
        # the count is what the run trained: a checkpoint holds exactly the trainable weights
        checkpoint = next((comparison / name).rglob("last.ckpt"))
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert int(row["trainable_parameters"]) == sum(tensor.numel() for tensor in saved.values())
        assert f"| {name} | " in table
    assert rows["mit"]["trainable_parameters"] != rows["late_addition"]["trainable_parameters"]


def test_each_strategy_ran_the_same_config_but_its_own_fusion(comparison: Path):
    configs = {name: yaml.safe_load(next((comparison / name).rglob("config.yaml")).read_text())
               for name in ("mit", "late_addition")}
    fusions = {name: config["model"].pop("fusion")["class_path"] for name, config in configs.items()}
    assert fusions == {"mit": "mit_lightning.fusion.MiT", "late_addition": "mit_lightning.fusion.LateAddition"}
    for config in configs.values():
        config["trainer"].pop("default_root_dir")
        config["trainer"]["logger"]["init_args"].pop("save_dir")
        config["trainer"]["logger"]["init_args"].pop("name")  # each overlay logs under its own name
    assert configs["mit"] == configs["late_addition"]  # same data, seed, budget, head and optimizer
    assert configs["mit"]["seed_everything"] == 0 and configs["mit"]["trainer"]["max_steps"] == 3


def test_a_new_comparison_gets_a_new_folder(tmp_path: Path):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_0" / "comparison.md").write_text("earlier")
    assert compare.new_folder(tmp_path) == tmp_path / "version_1"
    assert compare.new_folder(tmp_path) == tmp_path / "version_2"
    assert (tmp_path / "version_0" / "comparison.md").read_text() == "earlier"


# --- before anything trains ---------------------------------------------------------------------------
def test_every_overlay_is_a_strategy_named_by_its_file():
    strategies = compare.available_strategies(PEERS)
    assert list(strategies)[0] == "mit"
    assert {"mit", "concat", "text_only", "late_addition"} <= set(strategies)
    assert all(path == PEERS / f"{name}.yaml" for name, path in strategies.items())


@pytest.mark.parametrize("name", sorted(path.stem for path in PEERS.glob("*.yaml")))
def test_every_strategy_parses_on_the_demo(name: str):
    config = compare.check(name, PEERS / f"{name}.yaml", ["configs/demo.yaml"], [], []).config
    assert config.model.fusion.class_path.startswith("mit_lightning.fusion.")


@pytest.fixture
def peers_with_a_broken_one(tmp_path: Path) -> Path:
    shutil.copy(PEERS / "mit.yaml", tmp_path / "mit.yaml")
    (tmp_path / "broken.yaml").write_text("model:\n  fusion:\n    class_path: mit_lightning.fusion.NoSuchFusion\n")
    return tmp_path


def test_by_default_a_strategy_that_cannot_run_is_left_out_with_its_reason(peers_with_a_broken_one, capsys):
    strategies = compare.plan(None, peers_with_a_broken_one, ["configs/demo.yaml"], [], [])
    assert [strategy.name for strategy in strategies] == ["mit"]
    note = capsys.readouterr().err
    assert note.startswith("Leaving out broken: ") and "NoSuchFusion" in note


def test_a_named_strategy_that_cannot_run_stops_everything(peers_with_a_broken_one, tmp_path, no_training):
    with pytest.raises(UserError, match=r"(?s)Nothing was started.*broken: .*NoSuchFusion"):
        compare.main(["--strategies", "mit", "broken", "--peers", str(peers_with_a_broken_one),
                      "--runs", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_an_unknown_strategy_names_the_available_ones(tmp_path, no_training):
    with pytest.raises(UserError, match=r"Unknown strategies \['pil'\].*mit, concat"):
        compare.main(["--strategies", "pil", "--runs", str(tmp_path / "runs")])


def test_missing_data_is_named_before_anything_trains(tmp_path, monkeypatch, no_training):
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path / "nodata"))
    with pytest.raises(UserError, match="nodata"):
        compare.main(["--config", "configs/food101.yaml", "--strategies", "text_only", "--runs", str(tmp_path / "r"),
                      "--", "--model.llm.path", "tiny"])


def test_a_strategy_that_starts_from_another_runs_after_it(no_training):
    strategies = compare.plan(["pill_stage2", "mit", "pill_stage1"], PEERS, ["configs/demo.yaml"], [], [])
    assert [(strategy.name, strategy.starts_from) for strategy in strategies] == [
        ("mit", None), ("pill_stage1", None), ("pill_stage2", "pill_stage1")]


def test_a_strategy_named_without_its_start_stops_everything(tmp_path, no_training):
    with pytest.raises(UserError, match=r"pill_stage2: it starts from the weights pill_stage1 trains; add pill_stage1"):
        compare.main(["--strategies", "mit", "pill_stage2", "--runs", str(tmp_path / "runs")])


@pytest.mark.slow
def test_pill_stage2_trains_from_the_checkpoint_stage1_left(tmp_path):
    cli_main(["compare", "--strategies", "pill_stage1", "pill_stage2", "--epochs", "1", "--max-steps", "2",
              "--runs", str(tmp_path / "runs"), "--", *shrunk_demo(tmp_path)])
    folder = tmp_path / "runs" / "version_0"
    with open(folder / "comparison.csv") as file:
        rows = {row["strategy"]: row for row in csv.DictReader(file)}
    assert [rows[name]["problem"] for name in ("pill_stage1", "pill_stage2")] == ["", ""]
    stage2 = yaml.safe_load(next((folder / "pill_stage2").rglob("config.yaml")).read_text())
    assert Path(stage2["model"]["init_weights"]) == next((folder / "pill_stage1").rglob("last.ckpt"))
    assert "pill_stage2 starts from the weights pill_stage1 trained" in (folder / "comparison.md").read_text()


# --- the table --------------------------------------------------------------------------------------
def test_metrics_get_a_column_per_test_split_and_a_failed_run_a_note():
    rows = [
        Row("mit", {"test/testA/oIoU": 0.5, "test/testB/oIoU": 0.25, "test/testA/loss": 1.0},
            {"trainable_parameters": 1234567, "step_ms": 12.345, "step_cpu_ms": 11.04, "peak_memory_mib": 100.4}),
        Row("concat", problem="mit fit failed (exit code 1), see x/fit.log"),
    ]
    assert metric_columns(rows, ["oIoU"]) == [("oIoU testA", "test/testA/oIoU"), ("oIoU testB", "test/testB/oIoU")]
    lines = markdown(rows, ["oIoU"]).splitlines()
    assert lines[0] == ("| strategy | oIoU testA | oIoU testB | trainable parameters | step time (ms) "
                        "| CPU time per step (ms) | peak memory (MiB) |")
    assert lines[2] == "| mit | 0.5000 | 0.2500 | 1,234,567 | 12.3 | 11.0 | 100 |"
    assert lines[3] == "| concat | — | — | — | — | — | — |"
    assert lines[-1] == "- concat: mit fit failed (exit code 1), see x/fit.log"


def test_runs_are_pinned_to_their_threads_and_a_busy_machine_is_named(tmp_path):
    assert {compare.thread_environment(2)[name] for name in compare.THREAD_VARIABLES} == {"2"}
    rows = [Row("mit", {"test/test/oIoU": 0.5}, {"step_ms": 10.0, "load_per_core": 0.5}),
            Row("pill", {"test/test/oIoU": 0.4}, {"step_ms": 30.0, "load_per_core": 3.25})]
    text = compare.report(tmp_path, rows, ["oIoU"], ["## header"])
    assert "load reached 3.2 per CPU core while pill ran" in text and "while mit ran" not in text
