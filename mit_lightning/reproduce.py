"""Reproduce the paper's tables: train and test each config, print the paper's numbers beside ours.

    python -m mit_lightning.reproduce table1 [--dry-run] [-- extra mit arguments...]
    (or: make reproduce-table1)

Before anything trains, every experiment of the table is built once (configs parsed, weights and
data paths checked), so a missing file stops the run at once with the list of what is missing.
Each experiment then runs as its own `mit fit ... --test_after_fit true` process (so multi-GPU
strategies launch as usual) in `runs/reproduce/<table>/<experiment>/`; an experiment whose results
are already there is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mit_lightning.errors import UserError

RESULTS_FILE = "test_metrics.json"


@dataclass(frozen=True)
class Experiment:
    """One config and the paper columns its test metrics fill (column → metric name)."""

    name: str
    config: str
    columns: dict[str, str]
    scale: float = 100.0  # the paper prints percentages


@dataclass(frozen=True)
class Table:
    title: str
    experiments: tuple[Experiment, ...]
    paper: dict[str, dict[str, float]]  # method → column → value
    ours_label: str = "MiT (ours)"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def columns(self) -> list[str]:
        return [column for experiment in self.experiments for column in experiment.columns]


def _refcoco_columns(prefix: str, splits: tuple[str, ...]) -> dict[str, str]:
    return {f"{prefix} {split}": f"test/{split}/oIoU" for split in splits}


_TABLE1_PAPER_COLUMNS = [
    "RefCOCO val", "RefCOCO testA", "RefCOCO testB", "RefCOCO+ val", "RefCOCO+ testA", "RefCOCO+ testB",
    "RefCOCOg val", "RefCOCOg test",
]


def _paper_row(values: list[float], columns: list[str]) -> dict[str, float]:
    return dict(zip(columns, values))


TABLES: dict[str, Table] = {
    "table1": Table(
        title="Table 1 — referring segmentation, oIoU (%)",
        experiments=(
            Experiment("refcoco", "configs/refcoco.yaml", _refcoco_columns("RefCOCO", ("val", "testA", "testB"))),
            Experiment("refcoco+", "configs/refcoco+.yaml", _refcoco_columns("RefCOCO+", ("val", "testA", "testB"))),
            Experiment("refcocog", "configs/refcocog.yaml", _refcoco_columns("RefCOCOg", ("val", "test"))),
        ),
        paper={
            "LAVT": _paper_row([72.7, 75.8, 68.8, 62.1, 68.4, 55.1, 61.2, 62.1], _TABLE1_PAPER_COLUMNS),
            "LISA (LLaMA2-13B)": _paper_row([74.1, 76.5, 71.1, 62.4, 67.4, 56.5, 66.4, 68.5], _TABLE1_PAPER_COLUMNS),
            "PixelLM (LLaMA2-13B)": _paper_row([73.0, 76.5, 68.2, 66.3, 71.7, 58.3, 69.3, 70.5], _TABLE1_PAPER_COLUMNS),
            "MiT (paper, LLaMA2-7B)": _paper_row([73.1, 77.1, 68.4, 66.9, 72.2, 57.6, 65.4, 68.5], _TABLE1_PAPER_COLUMNS),
        },
    ),
}


def run_directory(table: str, experiment: Experiment, root: Path) -> Path:
    return root / table / experiment.name


def find_results(directory: Path) -> dict[str, float] | None:
    """The newest test results written under an experiment's run directory, if any."""
    candidates = sorted(directory.rglob(RESULTS_FILE), key=lambda path: path.stat().st_mtime)
    return json.loads(candidates[-1].read_text()) if candidates else None


def preflight(table: Table, extra: list[str]) -> list[str]:
    """Check every experiment's LLM, CLIP weights and data (no weights are loaded); list what is missing."""
    from mit_lightning.cli import parse_run_config

    problems: dict[str, list[str]] = {}  # message → experiments it concerns
    for experiment in table.experiments:
        if not Path(experiment.config).is_file():
            found = [f"config file '{experiment.config}' not found (run from the repository root)."]
        else:
            try:
                found = missing_inputs(parse_run_config(["--config", experiment.config, *extra]))
            except UserError as error:
                found = [str(error)]
        for problem in found:
            problems.setdefault(problem, []).append(experiment.name)
    return [f"{', '.join(names)}: {problem}" for problem, names in problems.items()]


def missing_inputs(config) -> list[str]:
    """Each component checked on its own, so one run reports every missing path at once."""
    from jsonargparse import Namespace
    from lightning.pytorch.cli import instantiate_class

    from mit_lightning.backbones.llm import LLMConfig
    from mit_lightning.backbones.vision import VisionConfig

    checks = [lambda: LLMConfig(**config.model.llm.as_dict()).hf_config()]
    if config.model.vision is not None:
        checks.append(lambda: VisionConfig(**config.model.vision.as_dict()).weights_path())
    checks.append(lambda: instantiate_class((), Namespace(config.data).as_dict()))
    problems = []
    for check in checks:
        try:
            check()
        except UserError as error:
            problems.append(str(error))
    return problems


def train_and_test(table_name: str, experiment: Experiment, root: Path, extra: list[str]) -> dict[str, float]:
    directory = run_directory(table_name, experiment, root)
    command = [
        sys.executable, "-m", "mit_lightning", "fit", "--config", experiment.config, "--test_after_fit", "true",
        "--trainer.default_root_dir", str(directory), "--trainer.logger.init_args.save_dir", str(directory), *extra,
    ]
    print(f"\n=== {experiment.name}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True)
    results = find_results(directory)
    if results is None:
        raise UserError(f"{experiment.name} finished without writing {RESULTS_FILE} under {directory}.")
    return results


def format_table(table: Table, ours: dict[str, dict[str, float]]) -> str:
    """Markdown: the paper's rows, then ours (— where an experiment has no results yet)."""
    columns = table.columns
    lines = [f"### {table.title}", "", "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, values in table.paper.items():
        lines.append(f"| {method} | " + " | ".join(_cell(values.get(column)) for column in columns) + " |")
    cells = []
    for experiment in table.experiments:
        results = ours.get(experiment.name) or {}
        for metric in experiment.columns.values():
            value = results.get(metric)
            cells.append(_cell(None if value is None else value * experiment.scale))
    lines.append(f"| {table.ours_label} | " + " | ".join(cells) + " |")
    lines.extend(["", *table.notes])
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m mit_lightning.reproduce", description=__doc__,
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
            found = find_results(run_directory(args.table, experiment, root))
            if found is not None:
                print(f"{experiment.name}: reusing results in {run_directory(args.table, experiment, root)}")
            elif not args.dry_run:
                found = train_and_test(args.table, experiment, root, extra)
            ours[experiment.name] = found
        print("\n" + format_table(table, ours))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
