"""Reproduce the paper's tables: train and test each config, print the paper's numbers beside ours.

    mit reproduce {table1,...,table6} [--dry-run] [--seeds N [--seed S]] [-- extra mit arguments...]
    (or: python -m mit_lightning.reproduce ..., make reproduce-table1 ... reproduce-table6)

Before anything trains, every experiment of the table is built once (configs parsed, weights and
data paths checked), so a missing file stops the run at once with the list of what is missing.
Each experiment then runs as its own `mit fit ... --test_after_fit true` process (so multi-GPU
strategies launch as usual) in `runs/reproduce/<experiment>/`; an experiment whose results are
already there is not run again, one stopped (Ctrl-C, SIGTERM: passed on to the run, which saves) continues
where it stopped — an experiment several tables share (RefCOCO with the paper's
settings fills a row of tables 1, 4 and 5) runs once.

With `--seeds N` every experiment runs N times, with seeds S, S+1, ... (`--seed`, default 0), in
`runs/reproduce/<experiment>/seed_<s>/`, and our rows show the mean ± standard deviation over them.

The tables themselves (titles, columns, the runs behind our rows and the paper's published numbers)
are data: mit_lightning/paper_tables.yaml.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from mit_lightning.errors import UserError
from mit_lightning.interrupt import run_child
from mit_lightning.measuring import positive_int
from mit_lightning.experiments import RESULTS_FILE, find_results, missing_inputs, problems_by_message, split_at_dashes
from mit_lightning.paper_tables import Column, Experiment, Table, paper_tables


def run_directory(experiment: Experiment, root: Path, seed: int | None = None) -> Path:
    """Named by the experiment alone (and the seed, for runs of several seeds): the same experiment in several
    tables is one run."""
    return root / experiment.name if seed is None else root / experiment.name / f"seed_{seed}"


def preflight(table: Table, extra: list[str]) -> list[str]:
    """Check every experiment's LLM, CLIP weights and data (no weights are loaded); list what is missing."""
    from mit_lightning.cli import parse_run_config

    problems: list[tuple[str, str]] = []
    for experiment in table.experiments:
        absent = [config for config in experiment.configs if not Path(config).is_file()]
        if absent:
            found = [f"config file '{config}' not found (run from the repository root)." for config in absent]
        else:
            try:
                found = missing_inputs(parse_run_config([*experiment.config_args(), *extra]))
            except UserError as error:
                found = [str(error)]
        problems += [(experiment.name, problem) for problem in found]
    return problems_by_message(problems)


def train_and_test(experiment: Experiment, root: Path, extra: list[str], seed: int | None = None) -> dict[str, float]:
    directory = run_directory(experiment, root, seed)
    command = [
        sys.executable, "-m", "mit_lightning", "fit", *experiment.config_args(), "--test_after_fit", "true",
        "--trainer.default_root_dir", str(directory), "--trainer.logger.init_args.save_dir", str(directory),
        "--ckpt_path", "last", *extra,  # a run stopped earlier continues; none yet: a new one
        *(["--seed_everything", str(seed)] if seed is not None else []),
    ]
    print(f"\n=== {experiment.name}: {' '.join(command[2:])}", flush=True)
    code = run_child(command)
    if code != 0:
        raise UserError(f"{experiment.name}: mit fit failed (exit code {code}); its output is above.")
    results = find_results(directory)
    if results is None:
        raise UserError(f"{experiment.name} finished without writing {RESULTS_FILE} under {directory}.")
    return results


def format_table(table: Table, ours: dict[str, dict[str, float] | list[dict[str, float]]]) -> str:
    """Markdown: the paper's rows, then ours (— where a run has no results yet or fills no such column). An
    experiment's results are one run's, or a list of runs' (seeds): then the cell is mean ± standard deviation."""
    columns = table.columns
    ours_rows: dict[str, dict[str, list[float]]] = {row: {} for row in table.ours_rows}
    for experiment in table.experiments:
        runs = ours.get(experiment.name) or []
        row = ours_rows[experiment.row or table.ours_label]
        for results in [runs] if isinstance(runs, dict) else runs:
            for label, metric in experiment.columns.items():
                if metric in results:
                    row.setdefault(label, []).append(results[metric])
    scaled = {
        row: {column.label: [value * column.scale for value in values[column.label]]
              for column in columns if column.label in values}
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


def _cell(value: float | list[float] | None, column: Column) -> str:
    if value is None or value == []:
        return "—"
    values = value if isinstance(value, list) else [value]
    text = f"{statistics.fmean(values):.{column.decimals}f}"
    return text + (f" ± {statistics.stdev(values):.{column.decimals}f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> None:
    try:
        _run(list(sys.argv[1:] if argv is None else argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(argv: list[str]) -> None:
    tables = paper_tables()
    argv, extra = split_at_dashes(argv)
    parser = argparse.ArgumentParser(prog="mit reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=sorted(tables))
    parser.add_argument("--runs", default="runs/reproduce", help="where the runs and their results go")
    parser.add_argument("--dry-run", action="store_true", help="check paths and print the table with results found so far")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="runs per experiment (seeds --seed, --seed + 1, ...); our rows show mean ± sd (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed with --seeds (default 0)")
    args = parser.parse_args(argv)
    seeds = [None] if args.seeds == 1 else list(range(args.seed, args.seed + args.seeds))
    table, root = tables[args.table], Path(args.runs)
    problems = preflight(table, extra)
    if problems:
        raise UserError(f"Cannot reproduce {args.table}; nothing was started. Missing:\n  - " + "\n  - ".join(problems))
    ours: dict[str, list[dict[str, float]]] = {}
    for experiment in table.experiments:
        for seed in seeds:
            directory = run_directory(experiment, root, seed)
            found = find_results(directory) if directory.is_dir() else None
            if found is not None:
                print(f"{experiment.name}: reusing results in {directory}")
            elif not args.dry_run:
                found = train_and_test(experiment, root, extra, seed)
            if found is not None:
                ours.setdefault(experiment.name, []).append(found)
    print("\n" + format_table(table, ours))


if __name__ == "__main__":
    main()
