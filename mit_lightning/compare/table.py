"""The comparison tables: one row per strategy (mean ± standard deviation over its seeds), a paired
comparison of each strategy with MiT, printed as Markdown; every run's raw figures as CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mit_lightning.compare.stats import paired_difference, spread
from mit_lightning.metrics.names import metric_name, split_of

REFERENCE = "mit"


@dataclass
class Row:
    """One run's results: test metrics (name → value) and its training cost (`cost.TrainingCost`)."""

    strategy: str
    metrics: dict[str, float] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why the row has no figures
    seed: int | None = None


def metric_columns(rows: Sequence[Row], metrics: Sequence[str]) -> list[tuple[str, str]]:
    """(label, key of test_metrics.json) for each summary metric on each test split the runs reported."""
    splits = sorted({split_of(key) for row in rows for key in row.metrics} - {None})
    return [
        (metric if len(splits) == 1 else f"{metric} {split}", metric_name("test", split, metric))
        for split in splits
        for metric in metrics
        if any(metric_name("test", split, metric) in row.metrics for row in rows)
    ]


COST_COLUMNS = (  # label, key of training_cost.json, format
    ("trainable parameters", "trainable_parameters", "{:,.0f}"),
    ("step time (ms)", "step_ms", "{:.1f}"),
    ("CPU time per step (ms)", "step_cpu_ms", "{:.1f}"),
    ("peak memory (MiB)", "peak_memory_mib", "{:.0f}"),
)


def by_strategy(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """The runs of each strategy, strategies in the order they first appear."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.strategy, []).append(row)
    return groups


def values(runs: Sequence[Row], key: str, cost: bool = False) -> dict[int | None, float]:
    """seed → the figure `key` of each run that has it."""
    return {run.seed: (run.cost if cost else run.metrics)[key] for run in runs
            if (run.cost if cost else run.metrics).get(key) is not None}


def _cell(figures: dict[Any, float], form: str) -> str:
    if not figures:
        return "—"
    summary = spread(figures.values())
    return form.format(summary.mean) + ("" if summary.sd is None else " ± " + form.format(summary.sd))


def _lines(labels: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(labels) + " |", "|---" * len(labels) + "|", *("| " + " | ".join(cells) + " |" for cells in body)]


def markdown(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    """Strategies × (metrics, costs); a cell is one run's figure, or mean ± sd over the strategy's seeds."""
    columns = metric_columns(rows, metrics)
    labels = ["strategy", *(label for label, _ in columns), *(label for label, _, _ in COST_COLUMNS)]
    body = []
    for strategy, runs in by_strategy(rows).items():
        cells = [strategy]
        cells += [_cell(values(runs, key), "{:.4f}") for _, key in columns]
        cells += [_cell(values(runs, key, cost=True), form) for _, key, form in COST_COLUMNS]
        body.append(cells)
    problems = [f"- {row.strategy}" + (f" (seed {row.seed})" if row.seed is not None else "") + f": {row.problem}"
                for row in rows if row.problem]
    return "\n".join(_lines(labels, body) + ([""] + problems if problems else []))


def paired_markdown(rows: Sequence[Row], metrics: Sequence[str], reference: str = REFERENCE) -> str | None:
    """Each strategy minus `reference`, per metric: the mean difference over the seeds both ran and its 95%
    t interval. None without the reference or another strategy."""
    groups = by_strategy(rows)
    if reference not in groups or len(groups) < 2:
        return None
    columns = metric_columns(rows, metrics)
    body = []
    for strategy, runs in groups.items():
        if strategy == reference:
            continue
        cells = [strategy]
        for _, key in columns:
            difference = paired_difference(values(runs, key), values(groups[reference], key))
            if difference is None:
                cells.append("—")
            elif difference.low is None:
                cells.append(f"{difference.mean:+.4f} (one seed)")
            else:
                cells.append(f"{difference.mean:+.4f} [{difference.low:+.4f}, {difference.high:+.4f}]")
        body.append(cells)
    return "\n".join(_lines([f"strategy − {reference}", *(label for label, _ in columns)], body))


def write_csv(path: Path, rows: Sequence[Row], metrics: Sequence[str]) -> None:
    """Every run's raw values (no rounding, no thousands separators), one row per strategy and seed."""
    columns = metric_columns(rows, metrics)
    cost_keys = [key for _, key, _ in COST_COLUMNS] + ["total_parameters", "steps_timed", "threads", "memory_measure",
                                                       "load_per_core"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["strategy", "seed", *(key for _, key in columns), *cost_keys, "problem"])
        for row in rows:
            writer.writerow([row.strategy, "" if row.seed is None else row.seed,
                             *(row.metrics.get(key, "") for _, key in columns),
                             *(row.cost.get(key, "") for key in cost_keys), row.problem or ""])
