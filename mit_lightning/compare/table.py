"""The comparison table: one row per strategy, printed as Markdown and written as Markdown and CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class Row:
    """One strategy's results: test metrics (name → value) and its training cost (`cost.TrainingCost`)."""

    strategy: str
    metrics: dict[str, float] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why the row has no figures


def metric_columns(rows: Sequence[Row], metrics: Sequence[str]) -> list[tuple[str, str]]:
    """(label, key of test_metrics.json) for each summary metric on each test split the runs reported."""
    splits = sorted({key.split("/")[1] for row in rows for key in row.metrics if key.count("/") == 2})
    return [
        (metric if len(splits) == 1 else f"{metric} {split}", f"test/{split}/{metric}")
        for split in splits
        for metric in metrics
        if any(f"test/{split}/{metric}" in row.metrics for row in rows)
    ]


COST_COLUMNS = (  # label, key of training_cost.json, format
    ("trainable parameters", "trainable_parameters", "{:,}"),
    ("step time (ms)", "step_ms", "{:.1f}"),
    ("CPU time per step (ms)", "step_cpu_ms", "{:.1f}"),
    ("peak memory (MiB)", "peak_memory_mib", "{:.0f}"),
)


def _cell(value: Any, form: str) -> str:
    return "—" if value is None else form.format(value)


def markdown(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    columns = metric_columns(rows, metrics)
    labels = ["strategy", *(label for label, _ in columns), *(label for label, _, _ in COST_COLUMNS)]
    lines = ["| " + " | ".join(labels) + " |", "|---" * len(labels) + "|"]
    for row in rows:
        cells = [row.strategy]
        cells += [_cell(row.metrics.get(key), "{:.4f}") for _, key in columns]
        cells += [_cell(row.cost.get(key), form) for _, key, form in COST_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    problems = [f"- {row.strategy}: {row.problem}" for row in rows if row.problem]
    return "\n".join(lines + ([""] + problems if problems else []))


def write_csv(path: Path, rows: Sequence[Row], metrics: Sequence[str]) -> None:
    """Raw values (no rounding, no thousands separators), one row per strategy."""
    columns = metric_columns(rows, metrics)
    cost_keys = [key for _, key, _ in COST_COLUMNS] + ["total_parameters", "steps_timed", "threads", "memory_measure",
                                                       "load_per_core"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["strategy", *(key for _, key in columns), *cost_keys, "problem"])
        for row in rows:
            writer.writerow([row.strategy, *(row.metrics.get(key, "") for _, key in columns),
                             *(row.cost.get(key, "") for key in cost_keys), row.problem or ""])
