"""Reproduce the paper's tables: train and test each config, print the paper's numbers beside ours.

    mit reproduce {table1,...,table6} [--dry-run] [-- extra mit arguments...]
    (or: python -m mit_lightning.reproduce ..., make reproduce-table1 ... reproduce-table6)

Before anything trains, every experiment of the table is built once (configs parsed, weights and
data paths checked), so a missing file stops the run at once with the list of what is missing.
Each experiment then runs as its own `mit fit ... --test_after_fit true` process (so multi-GPU
strategies launch as usual) in `runs/reproduce/<experiment>/`; an experiment whose results are
already there is not run again — an experiment several tables share (RefCOCO with the paper's
settings fills a row of tables 1, 4 and 5) runs once.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mit_lightning.errors import UserError
from mit_lightning.experiments import RESULTS_FILE, find_results, missing_inputs


@dataclass(frozen=True)
class Column:
    """One column of a table: its label, whether values print as percentages, and their precision."""

    label: str
    scale: float = 100.0  # ours are fractions; the paper prints percentages
    decimals: int = 1


@dataclass(frozen=True)
class Experiment:
    """One run and the table cells its test metrics fill.

    `configs` are applied in order (a base config, then overlays such as an ablation row);
    `columns` maps a column label to the metric of test_metrics.json it shows; `row` names the
    table row the values go to (None: the table's `ours_label` row).
    """

    name: str
    configs: tuple[str, ...]
    columns: dict[str, str]
    row: str | None = None

    def config_args(self) -> list[str]:
        return [arg for config in self.configs for arg in ("--config", config)]


@dataclass(frozen=True)
class Table:
    """The paper's rows (method → column label → value) and the rows our experiments fill.

    A column no experiment fills shows the paper only (e.g. a convention the paper does not state).
    """

    title: str
    columns: tuple[Column, ...]
    experiments: tuple[Experiment, ...]
    paper: dict[str, dict[str, float]]
    ours_label: str = "MiT (ours)"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        labels = {column.label for column in self.columns}
        unknown = [label for experiment in self.experiments for label in experiment.columns if label not in labels]
        unknown += [label for values in self.paper.values() for label in values if label not in labels]
        if unknown:
            raise ValueError(f"{self.title}: cells for columns it does not have: {unknown}")

    @property
    def ours_rows(self) -> list[str]:
        return list(dict.fromkeys(experiment.row or self.ours_label for experiment in self.experiments))


def _refcoco_columns(prefix: str, splits: tuple[str, ...]) -> dict[str, str]:
    return {f"{prefix} {split}": f"test/{split}/oIoU" for split in splits}


def _paper_row(values: list[float], columns: list[str]) -> dict[str, float]:
    return dict(zip(columns, values))


_TABLE1_COLUMNS = [
    "RefCOCO val", "RefCOCO testA", "RefCOCO testB", "RefCOCO+ val", "RefCOCO+ testA", "RefCOCO+ testB",
    "RefCOCOg val", "RefCOCOg test",
]

#: Acc-2 / F1 as the paper prints them (convention not stated), then ours in both conventions
_SENTIMENT_COLUMNS = (
    Column("Acc-2"), Column("F1"), Column("Acc-2 has0"), Column("F1 has0"), Column("Acc-2 non0"), Column("F1 non0"),
    Column("MAE", scale=1.0, decimals=3), Column("Corr", scale=1.0, decimals=3), Column("Acc-7"),
)
_SENTIMENT_PAPER_COLUMNS = ["Acc-2", "F1", "MAE", "Corr", "Acc-7"]
#: our sentiment columns → metrics of the test split
_SENTIMENT_CELLS = {
    label: f"test/test/{metric}"
    for label, metric in {
        "Acc-2 has0": "Acc2_has0", "F1 has0": "F1_has0", "Acc-2 non0": "Acc2_non0", "F1 non0": "F1_non0",
        "MAE": "MAE", "Corr": "Corr", "Acc-7": "Acc7",
    }.items()
}
_SENTIMENT_NOTES = (
    "Acc-2 / F1: the paper does not say which convention its numbers use, so they stand in their own columns. "
    "Ours are given in both conventions: has0 = every clip, label ≥ 0 vs prediction ≥ 0; non0 = clips labelled 0 "
    "dropped, label > 0 vs prediction > 0 (F1 weighted by class support).",
    "MAE and Corr on unclipped predictions; Acc-7 after clipping to [-3, 3] and rounding. Ours: MMSA unaligned "
    "features, test split, checkpoint chosen on the validation loss.",
)


def _mosi_ablation(name: str, row: str) -> Experiment:
    return Experiment(name, ("configs/mosi.yaml", f"configs/ablations/{name}.yaml"), _SENTIMENT_CELLS, row=row)


_REFCOCO_SPLITS = ("val", "testA", "testB")
_REFCOCO_ABLATION_COLUMNS = [f"RefCOCO {split}" for split in _REFCOCO_SPLITS]
#: RefCOCO with the paper's settings: a row of tables 1, 4 and 5, run once
_REFCOCO = Experiment("refcoco", ("configs/refcoco.yaml",), _refcoco_columns("RefCOCO", _REFCOCO_SPLITS))


def _refcoco_ablation(name: str, row: str) -> Experiment:
    return Experiment(name, ("configs/refcoco.yaml", f"configs/ablations/{name}.yaml"),
                      _refcoco_columns("RefCOCO", _REFCOCO_SPLITS), row=row)


def _refcoco_paper_rows(rows: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {f"{method} (paper)": _paper_row(values, _REFCOCO_ABLATION_COLUMNS) for method, values in rows.items()}


TABLES: dict[str, Table] = {
    "table1": Table(
        title="Table 1 — referring segmentation, oIoU (%)",
        columns=tuple(Column(label) for label in _TABLE1_COLUMNS),
        experiments=(
            _REFCOCO,
            Experiment("refcoco+", ("configs/refcoco.yaml", "configs/refcoco+.yaml"), _refcoco_columns("RefCOCO+", ("val", "testA", "testB"))),
            Experiment("refcocog", ("configs/refcoco.yaml", "configs/refcocog.yaml"), _refcoco_columns("RefCOCOg", ("val", "test"))),
        ),
        paper={
            "LAVT": _paper_row([72.7, 75.8, 68.8, 62.1, 68.4, 55.1, 61.2, 62.1], _TABLE1_COLUMNS),
            "LISA (LLaMA2-13B)": _paper_row([74.1, 76.5, 71.1, 62.4, 67.4, 56.5, 66.4, 68.5], _TABLE1_COLUMNS),
            "PixelLM (LLaMA2-13B)": _paper_row([73.0, 76.5, 68.2, 66.3, 71.7, 58.3, 69.3, 70.5], _TABLE1_COLUMNS),
            "MiT (paper, LLaMA2-7B)": _paper_row([73.1, 77.1, 68.4, 66.9, 72.2, 57.6, 65.4, 68.5], _TABLE1_COLUMNS),
        },
    ),
    "table2": Table(
        title="Table 2 — image-text classification on the test split, accuracy and macro-F1 (%)",
        columns=(
            Column("UPMC-Food101 Acc", decimals=2), Column("SNLI-VE Acc", decimals=2),
            Column("UPMC-Food101 macro-F1", decimals=2), Column("SNLI-VE macro-F1", decimals=2),
        ),
        experiments=(
            Experiment("food101", ("configs/food101.yaml",),
                       {"UPMC-Food101 Acc": "test/test/accuracy", "UPMC-Food101 macro-F1": "test/test/macro_f1"}),
            Experiment("snli_ve", ("configs/snli_ve.yaml",),
                       {"SNLI-VE Acc": "test/test/accuracy", "SNLI-VE macro-F1": "test/test/macro_f1"}),
        ),
        paper={
            "MMBT": {"UPMC-Food101 Acc": 92.10, "SNLI-VE Acc": 74.69},
            "MiT (paper, LLaMA2-7B)": {"UPMC-Food101 Acc": 93.88, "SNLI-VE Acc": 74.71},
        },
        notes=(
            "The paper's Table 2 also lists MaPLe, PromptFuse and PMF; their numbers are not carried over here.",
            "Macro-F1 is ours only (the paper reports accuracy). Ours: best checkpoint by validation accuracy "
            "(Food101: 6,846 stratified train images; SNLI-VE: dev).",
        ),
    ),
    "table3": Table(
        title="Table 3 — multimodal sentiment analysis (Acc-2, F1, Acc-7 in %)",
        columns=_SENTIMENT_COLUMNS,
        experiments=(
            Experiment("mosi", ("configs/mosi.yaml",), _SENTIMENT_CELLS, row="MOSI — MiT (ours)"),
            Experiment("mosei", ("configs/mosei.yaml",), _SENTIMENT_CELLS, row="MOSEI — MiT (ours)"),
        ),
        paper={
            "MOSI — MiT (paper)": _paper_row([86.5, 86.5, 0.632, 0.858, 49.0], _SENTIMENT_PAPER_COLUMNS),
            "MOSEI — MiT (paper)": _paper_row([87.2, 87.2, 0.509, 0.788, 55.2], _SENTIMENT_PAPER_COLUMNS),
        },
        notes=_SENTIMENT_NOTES,
    ),
    "table4": Table(
        title="Table 4 — modules and vision encoders on RefCOCO, oIoU (%) (FF: FFN infusion, K/V: key/value "
              "infusion, AR: adaptive head rescaling)",
        columns=tuple(Column(label) for label in _REFCOCO_ABLATION_COLUMNS),
        experiments=(
            _refcoco_ablation("refcoco_no_infusion", "none (ours)"),
            _refcoco_ablation("refcoco_ffn_only", "FF (+AR) (ours)"),
            _refcoco_ablation("refcoco_no_ffn", "K/V+AR (ours)"),
            _refcoco_ablation("refcoco_no_rescale", "K/V+FF (ours)"),
            dataclasses.replace(_REFCOCO, row="K/V+FF+AR, CLIP-L/14-336 (ours)"),
            _refcoco_ablation("refcoco_clip_b16_224", "CLIP-B/16-224 (ours)"),
            _refcoco_ablation("refcoco_clip_l14_224", "CLIP-L/14-224 (ours)"),
            _refcoco_ablation("refcoco_task_token", "K/V+FF+AR, task token instead of last token (ours)"),
        ),
        paper=_refcoco_paper_rows({
            "none": [51.4, 60.1, 50.0],
            "FF+AR": [69.4, 72.1, 65.0],
            "K/V+AR": [72.9, 75.6, 67.7],
            "K/V+FF": [72.2, 75.4, 67.4],
            "K/V+FF+AR, CLIP-L/14-336": [73.1, 77.1, 68.4],
            "CLIP-B/16-224": [71.1, 75.3, 66.1],
            "CLIP-L/14-224": [72.0, 76.0, 66.2],
        }),
        notes=(
            "AR rescales the infused change of K and V, so without K/V infusion it has nothing to act on: our "
            "\"FF (+AR)\" row is FFN infusion alone.",
            "The encoder rows keep every module (K/V+FF+AR); CLIP-B/16 is read by the decoder at blocks 9, 6, 3.",
            "Task token: the text feature read at a learnable <SEG> token appended to the prompt instead of at the "
            "last token (paper section 5.2, which reports that the last token wins on short texts but gives no "
            "number); ours only.",
        ),
    ),
    "table5": Table(
        title="Table 5 — infused layers (1-based) on RefCOCO, oIoU (%)",
        columns=tuple(Column(label) for label in _REFCOCO_ABLATION_COLUMNS),
        experiments=(
            _refcoco_ablation("refcoco_layers_1_9_17_25_32", "1,9,17,25,32 (ours)"),
            _refcoco_ablation("refcoco_layers_9_17_25_32", "9,17,25,32 (ours)"),
            _refcoco_ablation("refcoco_layers_21_25_29_32", "21,25,29,32 (ours)"),
            _refcoco_ablation("refcoco_layers_17_21_25_29_32", "17,21,25,29,32 (ours)"),
            dataclasses.replace(_REFCOCO, row="13,17,21,25,29,32 (ours)"),
        ),
        paper=_refcoco_paper_rows({
            "1,9,17,25,32": [69.1, 74.2, 66.0],
            "9,17,25,32": [71.9, 75.5, 66.8],
            "21,25,29,32": [72.6, 76.8, 67.9],
            "17,21,25,29,32": [72.7, 76.7, 68.0],
            "13,17,21,25,29,32": [73.1, 77.1, 68.4],
        }),
    ),
    "table6": Table(
        title="Table 6 — modalities on CMU-MOSI (T text, A acoustic, F facial; Acc-2, F1, Acc-7 in %)",
        columns=_SENTIMENT_COLUMNS,
        experiments=(
            _mosi_ablation("mosi_text", "T (ours)"),
            _mosi_ablation("mosi_text_facial", "T+F (ours)"),
            _mosi_ablation("mosi_text_audio", "T+A (ours)"),
            _mosi_ablation("mosi_text_audio_facial", "T+A+F (ours)"),
            _mosi_ablation("mosi_late_addition", "T+A+F, MiT removed: vectors added after the LLM (ours)"),
        ),
        paper={
            "T (paper)": _paper_row([82.2, 82.2, 0.701, 0.744, 45.3], _SENTIMENT_PAPER_COLUMNS),
            "T+F (paper)": _paper_row([83.9, 84.0, 0.677, 0.813, 46.6], _SENTIMENT_PAPER_COLUMNS),
            "T+A (paper)": _paper_row([85.2, 85.0, 0.670, 0.832, 47.2], _SENTIMENT_PAPER_COLUMNS),
            "T+A+F (paper)": _paper_row([86.5, 86.5, 0.632, 0.858, 49.0], _SENTIMENT_PAPER_COLUMNS),
        },
        notes=(
            *_SENTIMENT_NOTES,
            "Each row is configs/mosi.yaml with an overlay from configs/ablations/. \"MiT removed\" has no paper "
            "number here; it separates the gain of infusion from the gain of the extra modalities.",
        ),
    ),
}


def run_directory(experiment: Experiment, root: Path) -> Path:
    """Named by the experiment alone: the same experiment in several tables is one run."""
    return root / experiment.name


def preflight(table: Table, extra: list[str]) -> list[str]:
    """Check every experiment's LLM, CLIP weights and data (no weights are loaded); list what is missing."""
    from mit_lightning.cli import parse_run_config

    problems: dict[str, list[str]] = {}  # message → experiments it concerns
    for experiment in table.experiments:
        absent = [config for config in experiment.configs if not Path(config).is_file()]
        if absent:
            found = [f"config file '{config}' not found (run from the repository root)." for config in absent]
        else:
            try:
                found = missing_inputs(parse_run_config([*experiment.config_args(), *extra]))
            except UserError as error:
                found = [str(error)]
        for problem in found:
            problems.setdefault(problem, []).append(experiment.name)
    return [f"{', '.join(names)}: {problem}" for problem, names in problems.items()]


def train_and_test(experiment: Experiment, root: Path, extra: list[str]) -> dict[str, float]:
    directory = run_directory(experiment, root)
    command = [
        sys.executable, "-m", "mit_lightning", "fit", *experiment.config_args(), "--test_after_fit", "true",
        "--trainer.default_root_dir", str(directory), "--trainer.logger.init_args.save_dir", str(directory), *extra,
    ]
    print(f"\n=== {experiment.name}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True)
    results = find_results(directory)
    if results is None:
        raise UserError(f"{experiment.name} finished without writing {RESULTS_FILE} under {directory}.")
    return results


def format_table(table: Table, ours: dict[str, dict[str, float]]) -> str:
    """Markdown: the paper's rows, then ours (— where a run has no results yet or fills no such column)."""
    columns = table.columns
    ours_rows: dict[str, dict[str, float]] = {row: {} for row in table.ours_rows}
    for experiment in table.experiments:
        results = ours.get(experiment.name) or {}
        row = ours_rows[experiment.row or table.ours_label]
        row.update({label: results[metric] for label, metric in experiment.columns.items() if metric in results})
    scaled = {
        row: {column.label: values[column.label] * column.scale for column in columns if column.label in values}
        for row, values in ours_rows.items()
    }
    lines = [
        f"### {table.title}", "",
        "| method | " + " | ".join(column.label for column in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for method, values in [*table.paper.items(), *scaled.items()]:
        cells = [_cell(values.get(column.label), column) for column in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if table.notes:
        lines.extend(["", *(f"- {note}" for note in table.notes)])
    return "\n".join(lines)


def _cell(value: float | None, column: Column) -> str:
    return "—" if value is None else f"{value:.{column.decimals}f}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="mit reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--runs", default="runs/reproduce", help="where the runs and their results go")
    parser.add_argument("--dry-run", action="store_true", help="check paths and print the table with results found so far")
    args = parser.parse_args(argv)
    table, root = TABLES[args.table], Path(args.runs)
    try:
        problems = preflight(table, extra)
        if problems:
            raise UserError(
                f"Cannot reproduce {args.table}; nothing was started. Missing:\n  - " + "\n  - ".join(problems)
            )
        ours = {}
        for experiment in table.experiments:
            found = find_results(run_directory(experiment, root))
            if found is not None:
                print(f"{experiment.name}: reusing results in {run_directory(experiment, root)}")
            elif not args.dry_run:
                found = train_and_test(experiment, root, extra)
            ours[experiment.name] = found
        print("\n" + format_table(table, ours))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
