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
from mit_lightning.compare.plots import PLOTS, validation_curve
from mit_lightning.compare.stats import paired_difference, spread, t_quantile_975
from mit_lightning.compare.table import Row, markdown, metric_columns, paired_markdown
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
        cli_main(["compare", "--strategies", "mit", "late_addition", "--epochs", "1", "--max-steps", "4", "--seeds", "2",
                  "--runs", str(tmp_path / "runs"), "--", *shrunk_demo(tmp_path)])
    return tmp_path / "runs" / "version_0"


def test_every_strategy_trains_with_each_seed_and_the_tables_are_written(comparison: Path):
    table = (comparison / "comparison.md").read_text()
    assert ("| strategy | oIoU | mIoU | trainable parameters | step time (ms) | CPU time per step (ms) "
            "| peak memory (MiB) |") in table
    assert "CPU threads per run: 1" in table  # no CUDA GPU here: every run pinned to one thread
    with open(comparison / "comparison.csv") as file:
        runs = [(row["strategy"], row["seed"], row) for row in csv.DictReader(file)]
    assert [(name, seed) for name, seed, _ in runs] == [("mit", "0"), ("late_addition", "0"), ("mit", "1"),
                                                         ("late_addition", "1")]
    for name, seed, row in runs:
        assert row["problem"] == "" and 0 <= float(row["test/oIoU"]) <= 1
        assert float(row["step_ms"]) > 0 and int(row["steps_timed"]) >= 1
        assert float(row["step_cpu_ms"]) > 0 and int(row["threads"]) == 1 and float(row["load_per_core"]) >= 0
        # the count is what the run trained: a checkpoint holds exactly the trainable weights
        checkpoint = next((comparison / name / f"seed_{seed}").rglob("last.ckpt"))
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert int(row["trainable_parameters"]) == sum(tensor.numel() for tensor in saved.values())
        config = yaml.safe_load(next((comparison / name / f"seed_{seed}").rglob("config.yaml")).read_text())
        assert config["seed_everything"] == int(seed)
    mit = [float(row["test/oIoU"]) for name, _, row in runs if name == "mit"]
    late = [float(row["test/oIoU"]) for name, _, row in runs if name == "late_addition"]
    mean, sd = sum(mit) / 2, abs(mit[0] - mit[1]) / 2**0.5
    assert f"| mit | {mean:.4f} ± {sd:.4f} | " in table  # mean ± sample sd over the two seeds
    difference = [b - a for a, b in zip(mit, late)]
    half = 12.706 * abs(difference[0] - difference[1]) / 2**0.5 / 2**0.5
    centre = sum(difference) / 2
    assert f"| late_addition | {centre:+.4f} [{centre - half:+.4f}, {centre + half:+.4f}] |" in table
    assert "seeds 0, 1: mean ± standard deviation over seeds" in table


def test_the_plots_are_written_beside_the_table_and_into_tensorboard(comparison: Path):
    for name in PLOTS.values():
        assert (comparison / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plots: metric_vs_parameters.png" in (comparison / "comparison.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(comparison / "tensorboard"))
    events.Reload()
    assert {f"comparison/{name}" for name in PLOTS} <= set(events.Tags()["images"])
    curve = validation_curve(comparison / "mit" / "seed_0", "val/oIoU")
    assert curve and all(0 <= value <= 1 for value in curve.values())


def test_each_strategy_ran_the_same_config_but_its_own_fusion(comparison: Path):
    configs = {name: yaml.safe_load(next((comparison / name / "seed_0").rglob("config.yaml")).read_text())
               for name in ("mit", "late_addition")}
    fusions = {name: config["model"].pop("fusion")["class_path"] for name, config in configs.items()}
    assert fusions == {"mit": "mit_lightning.fusion.MiT", "late_addition": "mit_lightning.fusion.LateAddition"}
    for config in configs.values():
        config["trainer"].pop("default_root_dir")
        config["trainer"]["logger"]["init_args"].pop("save_dir")
        config["trainer"]["logger"]["init_args"].pop("name")  # each overlay logs under its own name
    assert configs["mit"] == configs["late_addition"]  # same data, seed, budget, head and optimizer
    assert configs["mit"]["seed_everything"] == 0 and configs["mit"]["trainer"]["max_steps"] == 4


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
    assert (folder / "pill_stage2" / "seed_0").is_dir()
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


def test_two_seeds_give_mean_and_sample_standard_deviation_and_a_paired_interval():
    rows = [Row("mit", {"test/oIoU": 0.5}, {"trainable_parameters": 10, "step_ms": 2.0}, seed=0),
            Row("mit", {"test/oIoU": 0.7}, {"trainable_parameters": 10, "step_ms": 4.0}, seed=1),
            Row("concat", {"test/oIoU": 0.4}, {"trainable_parameters": 30, "step_ms": 9.0}, seed=0),
            Row("concat", {"test/oIoU": 0.8}, {"trainable_parameters": 30, "step_ms": 9.0}, seed=1)]
    lines = markdown(rows, ["oIoU"]).splitlines()
    # mean 0.6, sd sqrt(((0.1)² + (0.1)²) / 1) = 0.1414; step 3.0 ± 1.4142
    assert lines[2] == "| mit | 0.6000 ± 0.1414 | 10 ± 0 | 3.0 ± 1.4 | — | — |"  # no CPU time, no memory given
    assert lines[3] == "| concat | 0.6000 ± 0.2828 | 30 ± 0 | 9.0 ± 0.0 | — | — |"
    # differences −0.1 and +0.1: mean 0, sd 0.1414, half width 12.706 · 0.1414 / √2 = 1.2706
    paired = paired_markdown(rows, ["oIoU"]).splitlines()
    assert paired[0] == "| strategy − mit | oIoU |"
    assert paired[2] == "| concat | +0.0000 [-1.2706, +1.2706] |"


def test_the_paired_difference_uses_only_the_seeds_both_ran():
    difference = paired_difference({0: 1.0, 1: 2.0, 2: 4.0, 5: 9.0}, {0: 0.0, 1: 0.0, 2: 1.0})
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303, half width 4.303 / √3
    assert difference.n == 3 and difference.mean == pytest.approx(2.0)
    assert (difference.low, difference.high) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5))
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert paired_difference({0: 1.0}, {0: 0.5}).low is None
    assert spread([1.0]).sd is None


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (10, 2.228), (30, 2.042), (40, 2.021),
                                          (60, 2.000), (120, 1.980)])
def test_t_quantiles_match_the_tables(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=1e-3)


def test_same_optimizer_spells_out_the_task_configs_recipe(no_training):
    arguments = compare.same_optimizer(["configs/demo.yaml"], [], [])
    from mit_lightning.cli import parse_run_config

    base = parse_run_config(["--config", "configs/demo.yaml"])
    pill = parse_run_config(["--config", "configs/demo.yaml", "--config", str(PEERS / "pill_stage1.yaml"), *arguments])
    assert pill.model.optimizer == base.model.optimizer  # PILL's betas and weight decay do not survive
    assert pill.model.lr_scheduler == base.model.lr_scheduler
    default = compare.same_optimizer(["configs/demo.yaml"], [], ["--model.optimizer", "null"])
    assert '"torch.optim.Adam"' in default[1] and '"lr": 4e-05' in default[1]  # the module's default, spelled out


def test_seeds_start_at_the_given_or_the_configs_seed():
    assert compare.seed_list(None, 3, 7) == [7, 8, 9]
    assert compare.seed_list(2, 2, 7) == [2, 3]
    assert compare.seed_list(None, 1, True) == [None]  # a random seed stays the config's
    assert compare.seed_list(None, 2, None) == [0, 1]


def test_runs_are_pinned_to_their_threads_and_a_busy_machine_is_named(tmp_path):
    assert {compare.thread_environment(2)[name] for name in compare.THREAD_VARIABLES} == {"2"}
    rows = [Row("mit", {"test/oIoU": 0.5}, {"step_ms": 10.0, "load_per_core": 0.5}),
            Row("pill", {"test/oIoU": 0.4}, {"step_ms": 30.0, "load_per_core": 3.25})]
    text = compare.report(tmp_path, rows, ["oIoU"], ["## header"])
    assert "load reached 3.2 per CPU core while pill ran" in text and "while mit ran" not in text


def test_a_stopped_comparison_is_continued_by_the_same_command(tmp_path, monkeypatch):
    """Stopped (SIGTERM passed on to the second run, which saved): the rerun keeps the first run's results and
    continues the second from its checkpoint, in the same folder; other arguments start a new comparison."""
    started: list[list[str]] = []

    def fake_run(command: list[str], **_: object) -> int:
        started.append(command)
        directory = Path(command[command.index("--trainer.default_root_dir") + 1])
        if "late_addition" in str(directory) and len(started) == 2:
            raise SystemExit(143)
        (directory / "v0").mkdir(parents=True, exist_ok=True)
        (directory / "v0" / "test_metrics.json").write_text('{"test/oIoU": 0.5}')
        (directory / "v0" / "training_cost.json").write_text('{"step_ms": 1.0}')
        return 0

    monkeypatch.setattr(compare, "run_child", fake_run)
    arguments = ["compare", "--strategies", "mit", "late_addition", "--epochs", "1", "--runs", str(tmp_path / "runs"),
                 "--", *shrunk_demo(tmp_path)]
    with pytest.raises(SystemExit):
        cli_main(arguments)
    cli_main(arguments)
    assert [command[command.index("--trainer.default_root_dir") + 1].split("/")[-2] for command in started] == [
        "mit", "late_addition", "late_addition"]  # mit's results reused
    assert all(command[command.index("--ckpt_path") + 1] == "last" for command in started)
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["version_0"]
    assert (tmp_path / "runs" / "version_0" / "comparison.md").is_file()
    cli_main([*arguments[:4], "--epochs", "2", *arguments[6:]])
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["version_0", "version_1"]
