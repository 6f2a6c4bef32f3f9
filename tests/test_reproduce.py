"""`python -m mit_lightning.reproduce`: the tables file, table layout, result discovery and the preflight — nothing
trains."""

from __future__ import annotations

import json
import os
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

from helpers.classification_fixtures import write_food101, write_snli_ve
from mit_lightning import reproduce
from mit_lightning.cli import parse_run_config
from mit_lightning.metrics.sentiment import SENTIMENT_METRIC_NAMES
from mit_lightning.metrics.names import metric_name, metric_of, split_of
from mit_lightning.errors import UserError
from mit_lightning.paper_tables import PAPER_TABLES, Experiment, load_tables, paper_tables
from mit_lightning.reproduce import find_results, format_table
from helpers.mmsa_fixtures import write_mmsa

TABLES = paper_tables()

REPO = Path(__file__).resolve().parents[1]
#: the metric names each head logs (test/<split>/<name>)
HEAD_METRICS = {
    "mit_lightning.heads.ReferringSegmentation": {"oIoU", "mIoU", "oIoU_whole_image"},
    "mit_lightning.heads.ImageTextClassification": {"accuracy", "macro_f1"},
    "mit_lightning.heads.SentimentRegression": set(SENTIMENT_METRIC_NAMES),
}


def parsed(experiment: Experiment):
    """An experiment's run config, parsed once per session."""
    return _parse(experiment.configs)


@lru_cache(maxsize=None)
def _parse(configs: tuple[str, ...]):
    return parse_run_config([arg for config in configs for arg in ("--config", str(REPO / config))])


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    """Experiments name their configs relative to the repository root, where `make` runs."""
    monkeypatch.chdir(REPO)


# --- the tables file -------------------------------------------------------------------------------
def test_the_shipped_file_holds_the_papers_numbers_and_the_runs_behind_our_rows():
    assert list(TABLES) == [f"table{n}" for n in range(1, 7)]
    runs = {name: [(e.name, e.configs, e.row) for e in table.experiments] for name, table in TABLES.items()}
    assert runs["table1"] == [("refcoco", ("configs/refcoco.yaml",), None),
                              ("refcoco+", ("configs/refcoco.yaml", "configs/datasets/refcoco+.yaml"), None),
                              ("refcocog", ("configs/refcoco.yaml", "configs/datasets/refcocog.yaml"), None)]
    assert runs["table2"] == [("food101", ("configs/food101.yaml",), None), ("snli_ve", ("configs/snli_ve.yaml",), None)]
    assert runs["table3"] == [("mosi", ("configs/mosi.yaml",), "MOSI — MiT (ours)"),
                              ("mosei", ("configs/mosi.yaml", "configs/datasets/mosei.yaml"), "MOSEI — MiT (ours)")]
    assert [name for name, _, _ in runs["table4"]] == [
        "refcoco_no_infusion", "refcoco_ffn_only", "refcoco_no_ffn", "refcoco_no_rescale", "refcoco",
        "refcoco_clip_b16_224", "refcoco_clip_l14_224", "refcoco_task_token"]
    for name, configs, _ in runs["table4"] + runs["table5"] + runs["table6"]:
        base = "configs/mosi.yaml" if name.startswith("mosi") else "configs/refcoco.yaml"
        assert configs == ((base,) if name == "refcoco" else (base, f"configs/ablations/{name}.yaml")), name
    table1 = TABLES["table1"]
    assert list(table1.paper) == ["LAVT", "LISA (LLaMA2-13B)", "PixelLM (LLaMA2-13B)", "MiT (paper, LLaMA2-7B)"]
    assert table1.paper["LAVT"] == dict(zip([column.label for column in table1.columns],
                                            [72.7, 75.8, 68.8, 62.1, 68.4, 55.1, 61.2, 62.1]))
    assert TABLES["table2"].paper == {"MMBT": {"UPMC-Food101 Acc": 92.10, "SNLI-VE Acc": 74.69},
                                      "MiT (paper, LLaMA2-7B)": {"UPMC-Food101 Acc": 93.88, "SNLI-VE Acc": 74.71}}
    assert TABLES["table6"].paper["T+A (paper)"] == {"Acc-2": 85.2, "F1": 85.0, "MAE": 0.670, "Corr": 0.832,
                                                    "Acc-7": 47.2}
    columns = {column.label: (column.scale, column.decimals) for column in TABLES["table6"].columns}
    assert columns["MAE"] == columns["Corr"] == (1.0, 3) and columns["Acc-7"] == (100.0, 1)
    assert TABLES["table3"].notes == TABLES["table6"].notes[:2] and "has0 = every clip" in TABLES["table3"].notes[0]


def test_a_tables_file_of_ones_own_prints_like_the_shipped_ones(tmp_path: Path):
    path = tmp_path / "tables.yaml"
    path.write_text(textwrap.dedent("""\
        experiments:
          run: {configs: [a.yaml, b.yaml], columns: {Acc: test/accuracy, Loss: test/loss}}
        tables:
          mine:
            title: Mine
            columns: [{label: Acc}, {label: Loss, scale: 1, decimals: 3}]
            experiments: [{name: run}]
            ours_label: ours
            paper: {columns: [Acc], rows: {theirs: [91]}}
        """), encoding="utf-8")
    table = load_tables(path)["mine"]
    assert table.experiments[0].config_args() == ["--config", "a.yaml", "--config", "b.yaml"]
    rows = rows_of(format_table(table, {"run": {"test/accuracy": 0.9, "test/loss": 0.12345}}))
    assert rows == {"theirs": ["91.0", "—"], "ours": ["90.0", "0.123"]}


SHIPPED = PAPER_TABLES.read_text(encoding="utf-8")
#: an edit of the shipped file → what the error must say
MALFORMED = {
    "decimals as text": (("{label: SNLI-VE Acc, decimals: 2}", "{label: SNLI-VE Acc, decimals: two}"),
                         "tables.table2.columns[1].decimals: expected a whole number ≥ 0, got 'two'"),
    "a paper row one number short": (("LAVT: [72.7, 75.8, 68.8, 62.1, 68.4, 55.1, 61.2, 62.1]",
                                      "LAVT: [72.7, 75.8, 68.8, 62.1, 68.4, 55.1, 61.2]"),
                                     "tables.table1.paper.rows.LAVT: expected 8 numbers"),
    "a paper value as text": (("MMBT: [92.10, 74.69]", "MMBT: [92.10, n/a]"),
                              "tables.table2.paper.rows.MMBT[1]: expected a number, got 'n/a'"),
    "a misspelt experiment": (("- {name: refcoco_no_ffn, row:", "- {name: refcoco_no_fnn, row:"),
                              "tables.table4.experiments[2].name: no experiment 'refcoco_no_fnn'"),
    "a cell for a column the table lacks": (("      F1 has0: test/F1_has0", "      F1 zero: test/F1_has0"),
                                            "tables.table3: cells for columns the table does not have: ['F1 zero'] (its columns: ['Acc-2',"),
    "a misspelt field": (("    notes:\n      - The paper's Table 2", "    note:\n      - The paper's Table 2"),
                         "tables.table2: unknown note (fields: title, columns, experiments, paper, ours_label "
                         "(optional), notes (optional))"),
    "a missing field": (("  table5:\n    title: Table 5 — infused layers (1-based) on RefCOCO, oIoU (%)\n", "  table5:\n"),
                        "tables.table5: missing title"),
    "a paper row given twice": (("        T+A (paper):", "        T+F (paper):"), "T+F (paper) given twice"),
    "an experiment in no table": (("\nexperiments:\n", "\nexperiments:\n  spare: {configs: [a.yaml], columns: {}}\n"),
                                  "experiments: no table lists spare"),
    "not YAML": (("  table2:\n", "  table2: [\n"), "is not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_tables_file_is_refused_naming_the_table_and_field(case: str, tmp_path: Path):
    (old, new), expected = MALFORMED[case]
    assert old in SHIPPED
    path = tmp_path / "tables.yaml"
    path.write_text(SHIPPED.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_tables(path)
    assert expected in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_tables_file_cannot_run_code(tmp_path: Path):
    made = tmp_path / "made"
    path = tmp_path / "tables.yaml"
    path.write_text(f"experiments: !!python/object/apply:os.mkdir ['{made}']\ntables: {{}}\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        load_tables(path)
    assert not made.exists()


def test_main_reports_a_broken_tables_file_in_one_line(tmp_path: Path, monkeypatch, capsys, no_training):
    path = tmp_path / "tables.yaml"
    path.write_text("tables: {}\n", encoding="utf-8")
    monkeypatch.setattr(reproduce, "paper_tables", lambda: load_tables(path))
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["table1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "top level: missing experiments" in error and "Traceback" not in error


# --- what each table reads -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_column_reads_a_metric_its_config_produces(name: str):
    table = TABLES[name]
    for experiment in table.experiments:
        config = parsed(experiment)
        produced = HEAD_METRICS[config.model.head.class_path]
        for label, metric in experiment.columns.items():
            split = split_of(metric)
            assert metric.startswith("test/") and metric_of(metric) in produced, f"{experiment.name}: {label} → {metric}"
            assert split in config.data.init_args.test_splits, f"{experiment.name}: {split} is not tested"
            assert metric == metric_name("test", split, metric_of(metric)), f"{experiment.name}: {metric} is misspelt"


def test_table6_rows_differ_only_in_the_modalities_and_the_fusion():
    seen = {}
    for experiment in TABLES["table6"].experiments:
        assert experiment.configs[0] == "configs/mosi.yaml" and len(experiment.configs) == 2
        config = parsed(experiment)
        assert config.model.sequence_modalities == config.data.init_args.modalities
        assert config.trainer.default_root_dir == f"runs/{experiment.name}"  # runs do not overwrite each other
        seen[experiment.name] = (tuple(config.model.sequence_modalities), config.model.fusion.class_path)
    assert seen == {
        "mosi_text": ((), "mit_lightning.fusion.TextOnly"),
        "mosi_text_facial": (("facial",), "mit_lightning.fusion.MiT"),
        "mosi_text_audio": (("audio",), "mit_lightning.fusion.MiT"),
        "mosi_text_audio_facial": (("audio", "facial"), "mit_lightning.fusion.MiT"),
        "mosi_late_addition": (("audio", "facial"), "mit_lightning.fusion.LateAddition"),
    }


def test_an_experiment_is_the_same_run_in_every_table_it_appears_in():
    experiments: dict[str, Experiment] = {}
    for table in TABLES.values():
        for experiment in table.experiments:
            seen = experiments.setdefault(experiment.name, experiment)
            assert (seen.configs, seen.columns) == (experiment.configs, experiment.columns), experiment.name
    assert {"table1", "table4", "table5"} == {name for name, table in TABLES.items()
                                              if any(e.name == "refcoco" for e in table.experiments)}


@pytest.mark.parametrize("name", ["table4", "table5"])
def test_refcoco_ablation_rows_differ_from_the_paper_settings_only_in_their_overlay(name: str):
    base = parsed(Experiment("refcoco", ("configs/refcoco.yaml",), {}))
    for experiment in TABLES[name].experiments:
        assert experiment.configs[0] == "configs/refcoco.yaml"
        config = parsed(experiment)
        assert (config.data, config.trainer.max_epochs, config.model.optimizer) == (
            base.data, base.trainer.max_epochs, base.model.optimizer)
    layers = {tuple(parsed(e).model.fusion.init_args.layers) for e in TABLES["table5"].experiments}
    assert layers == {(1, 9, 17, 25, 32), (9, 17, 25, 32), (21, 25, 29, 32), (17, 21, 25, 29, 32),
                      (13, 17, 21, 25, 29, 32)}


def test_table4_puts_the_papers_ablation_rows_beside_ours():
    results = {"test/val/oIoU": 0.7, "test/testA/oIoU": 0.75, "test/testB/oIoU": 0.65}
    rows = rows_of(format_table(TABLES["table4"], {"refcoco": results, "refcoco_task_token": results}))
    assert rows["none (paper)"] == ["51.4", "60.1", "50.0"]
    assert rows["CLIP-B/16-224 (paper)"] == ["71.1", "75.3", "66.1"]
    assert rows["K/V+FF+AR, CLIP-L/14-336 (ours)"] == ["70.0", "75.0", "65.0"]
    assert rows["K/V+FF+AR, task token instead of last token (ours)"] == ["70.0", "75.0", "65.0"]
    assert set(rows["none (ours)"]) == {"—"}
    assert parsed(next(e for e in TABLES["table4"].experiments if e.name == "refcoco_task_token")).model.text_feature \
        == "task_token"


def test_table5_rows_follow_the_papers_layer_lists():
    rows = rows_of(format_table(TABLES["table5"], {}))
    assert rows["1,9,17,25,32 (paper)"] == ["69.1", "74.2", "66.0"]
    assert rows["13,17,21,25,29,32 (paper)"] == ["73.1", "77.1", "68.4"]
    assert [method for method in rows if method.endswith("(ours)")] == [
        "1,9,17,25,32 (ours)", "9,17,25,32 (ours)", "21,25,29,32 (ours)", "17,21,25,29,32 (ours)",
        "13,17,21,25,29,32 (ours)"]


# --- formatting ------------------------------------------------------------------------------------
def rows_of(text: str) -> dict[str, list[str]]:
    """Markdown table rows: method → cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table2_prints_the_paper_beside_ours_in_percent():
    ours = {"food101": {"test/accuracy": 0.912345, "test/macro_f1": 0.9}}
    rows = rows_of(format_table(TABLES["table2"], ours))
    assert rows["MMBT"] == ["92.10", "74.69", "—", "—"]
    assert rows["MiT (paper, LLaMA2-7B)"] == ["93.88", "74.71", "—", "—"]
    assert rows["MiT (ours)"] == ["91.23", "—", "90.00", "—"]  # SNLI-VE not run yet
    assert not any(name.startswith(("MaPLe", "PromptFuse", "PMF")) for name in rows)  # no invented numbers


def sentiment_results(scale: float) -> dict[str, float]:
    values = {"MAE": 0.7123, "Corr": 0.8, "Acc7": 0.45, "Acc5": 0.5, "Acc2_has0": 0.851, "F1_has0": 0.849,
              "Acc2_non0": 0.862, "F1_non0": 0.8615}
    return {f"test/{name}": value * scale for name, value in values.items()}


def test_table3_labels_both_acc2_conventions_and_keeps_regression_scores_unscaled():
    text = format_table(TABLES["table3"], {"mosi": sentiment_results(1.0)})
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "Acc-2 has0" in header and "Acc-2 non0" in header
    rows = rows_of(text)
    assert rows["MOSI — MiT (paper)"] == ["86.5", "86.5", "—", "—", "—", "—", "0.632", "0.858", "49.0"]
    assert rows["MOSEI — MiT (paper)"] == ["87.2", "87.2", "—", "—", "—", "—", "0.509", "0.788", "55.2"]
    assert rows["MOSI — MiT (ours)"] == ["—", "—", "85.1", "84.9", "86.2", "86.2", "0.712", "0.800", "45.0"]
    assert set(rows["MOSEI — MiT (ours)"]) == {"—"}
    assert "has0" in text.split("| MOSEI — MiT (ours)")[1]  # the notes say what the conventions are


def test_table6_gives_each_modality_setting_its_own_row():
    ours = {"mosi_text": sentiment_results(1.0), "mosi_late_addition": sentiment_results(0.5)}
    rows = rows_of(format_table(TABLES["table6"], ours))
    assert rows["T (paper)"][-3:] == ["0.701", "0.744", "45.3"]
    assert rows["T+A+F (paper)"][:2] == ["86.5", "86.5"]
    assert rows["T (ours)"][2] == "85.1"
    late = next(name for name in rows if "MiT removed" in name)
    assert rows[late][-3:] == ["0.356", "0.400", "22.5"]
    assert set(rows["T+A (ours)"]) == {"—"}
    assert len([name for name in rows if name.endswith("(ours)")]) == 5


# --- results on disk -------------------------------------------------------------------------------
def write_results(directory: Path, results: dict[str, float], mtime: float | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / reproduce.RESULTS_FILE
    path.write_text(json.dumps(results))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_find_results_takes_the_newest_run_and_none_when_nothing_ran(tmp_path: Path):
    assert find_results(tmp_path / "nothing") is None
    write_results(tmp_path / "tensorboard" / "version_1", {"test/accuracy": 0.1}, mtime=1_000)
    write_results(tmp_path / "tensorboard" / "version_0", {"test/accuracy": 0.9}, mtime=2_000)
    assert find_results(tmp_path) == {"test/accuracy": 0.9}


def test_results_written_under_the_earlier_doubled_names_are_read_by_the_current_ones(tmp_path: Path):
    write_results(tmp_path, {"test/test/accuracy": 0.9, "test/testA/oIoU": 0.5, "test/val/oIoU": 0.4})
    assert find_results(tmp_path) == {"test/accuracy": 0.9, "test/testA/oIoU": 0.5, "test/val/oIoU": 0.4}


@pytest.fixture
def available_inputs(tmp_path: Path, monkeypatch) -> Path:
    """Every path tables 2, 3 and 6 need (the tiny LLM; a CLIP file that is checked, never loaded)."""
    write_food101(tmp_path / "data" / "food101")
    write_snli_ve(tmp_path / "data" / "snli_ve")
    for dataset in ("MOSI", "MOSEI"):
        write_mmsa(tmp_path / "data", dataset, aligned=False)
    (tmp_path / "clip.pt").write_bytes(b"")
    monkeypatch.setenv("MIT_LLM_PATH", "tiny")
    monkeypatch.setenv("MIT_CLIP_PATH", str(tmp_path / "clip.pt"))
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path / "data"))
    return tmp_path


def test_main_runs_only_the_experiments_without_results(available_inputs: Path, monkeypatch, capsys):
    runs = available_inputs / "runs"
    write_results(runs / "mosi_text" / "tensorboard" / "version_0", sentiment_results(1.0))
    started: list[list[str]] = []

    def fake_run(command: list[str]) -> int:
        started.append(command)
        write_results(Path(command[command.index("--trainer.default_root_dir") + 1]) / "v0", sentiment_results(0.5))
        return 0

    monkeypatch.setattr(reproduce, "run_child", fake_run)
    reproduce.main(["table6", "--runs", str(runs), "--", "--trainer.max_epochs", "1"])
    assert len(started) == 4  # mosi_text had results already
    command = started[0]
    assert command[command.index("fit") + 1:command.index("fit") + 5] == [
        "--config", "configs/mosi.yaml", "--config", "configs/ablations/mosi_text_facial.yaml",
    ]
    assert command[-2:] == ["--trainer.max_epochs", "1"] and "--test_after_fit" in command
    assert command[command.index("--ckpt_path") + 1] == "last"  # a run stopped before continues
    rows = rows_of(capsys.readouterr().out)
    assert rows["T (ours)"][2] == "85.1" and rows["T+F (ours)"][2] == "42.5"


def test_seeds_run_every_experiment_once_per_seed_and_rows_show_mean_and_sd(available_inputs: Path, monkeypatch,
                                                                            capsys):
    runs = available_inputs / "runs"
    write_results(runs / "mosi_text" / "seed_3" / "v0", sentiment_results(1.0))  # reused
    started: list[list[str]] = []

    def fake_run(command: list[str]) -> int:
        started.append(command)
        seed = int(command[command.index("--seed_everything") + 1])
        write_results(Path(command[command.index("--trainer.default_root_dir") + 1]) / "v0",
                      sentiment_results(0.5 if seed == 3 else 0.7))
        return 0

    monkeypatch.setattr(reproduce, "run_child", fake_run)
    reproduce.main(["table6", "--runs", str(runs), "--seeds", "2", "--seed", "3"])
    assert len(started) == 2 * 5 - 1
    directories = {Path(command[command.index("--trainer.default_root_dir") + 1]).relative_to(runs) for command in started}
    assert Path("mosi_text/seed_4") in directories and Path("mosi_text/seed_3") not in directories
    rows = rows_of(capsys.readouterr().out)
    # Acc-2 (has0) 85.1 × 0.5 and × 0.7 in percent: mean 51.06, sd 0.2 · 85.1 / √2 = 12.04
    assert rows["T+F (ours)"][2] == "51.1 ± 12.0"
    assert rows["T (ours)"][2] == f"{(85.1 + 0.7 * 85.1) / 2:.1f} ± {0.3 * 85.1 / 2**0.5:.1f}"


@pytest.mark.parametrize("name", ["table2", "table3"])
def test_dry_run_checks_the_inputs_and_trains_nothing(name: str, available_inputs: Path, no_training, capsys):
    reproduce.main([name, "--dry-run", "--runs", str(available_inputs / "runs")])
    rows = rows_of(capsys.readouterr().out)
    ours = [cells for method, cells in rows.items() if method.endswith("(ours)")]
    assert ours and all(set(cells) == {"—"} for cells in ours)


# --- preflight -------------------------------------------------------------------------------------
#: table → paths that must be named when nothing is there (relative to the missing data root)
EXPECTED_MISSING = {
    "table1": ["nodata"],
    "table4": ["nodata"],
    "table5": ["nodata"],
    "table2": ["nodata/food101", "nodata/snli_ve"],
    "table3": ["nodata/MOSI/Processed/unaligned_50.pkl", "nodata/MOSEI/Processed/unaligned_50.pkl"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MISSING))
def test_preflight_lists_every_missing_input_at_once(name, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.setenv("MIT_LLM_PATH", str(tmp_path / "llama"))
    monkeypatch.setenv("MIT_CLIP_PATH", str(tmp_path / "clip.pt"))
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path / "nodata"))
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main([name, "--runs", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "nothing was started" in error and "Traceback" not in error
    assert f"LLM weights not found: expected a model folder at '{tmp_path / 'llama'}'" in error
    needs_clip = any(parsed(experiment).model.vision for experiment in TABLES[name].experiments)
    assert (f"CLIP weights not found: expected a file at '{tmp_path / 'clip.pt'}'" in error) is needs_clip
    for path in EXPECTED_MISSING[name]:
        assert f"'{tmp_path / path}'" in error, path
    for experiment in TABLES[name].experiments:
        assert experiment.name in error
    assert error.count("LLM weights not found") == 1  # one line for every experiment it concerns


def test_preflight_names_only_what_is_missing(available_inputs: Path, monkeypatch, capsys, no_training):
    (available_inputs / "data" / "MOSEI" / "Processed" / "unaligned_50.pkl").unlink()
    with pytest.raises(SystemExit):
        reproduce.main(["table3", "--runs", str(available_inputs / "runs")])
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith("  - mosei: MOSEI feature file not found")


def test_an_extra_argument_the_parser_rejects_is_one_line_naming_every_run(available_inputs: Path, capsys,
                                                                           no_training):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["table3", "--runs", str(available_inputs / "runs"), "--", "--trainer.max_epochs", "many"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    problems = [line for line in error.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and "max_epochs" in problems[0] and "many" in problems[0], error
    assert "mosi" in problems[0] and "mosei" in problems[0] and "usage:" not in error
