"""The paper's tables as `mit reproduce` prints them, read from `paper_tables.yaml` beside this module.

The file holds the data (titles, columns, the runs that fill our rows, the paper's published numbers);
this module holds its shape and checks every field, so a mistake in the file is reported by table and
field instead of printing a wrong table.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from mit_lightning.errors import UserError
from mit_lightning.experiments import config_args

PAPER_TABLES = Path(__file__).with_name("paper_tables.yaml")


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
        return config_args(self.configs)


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
        cells = [label for experiment in self.experiments for label in experiment.columns]
        cells += [label for values in self.paper.values() for label in values]
        unknown = [label for label in dict.fromkeys(cells) if label not in labels]
        if unknown:
            raise ValueError(f"cells for columns the table does not have: {unknown} (its columns: {sorted(labels)})")

    @property
    def ours_rows(self) -> list[str]:
        return list(dict.fromkeys(experiment.row or self.ours_label for experiment in self.experiments))


@cache
def paper_tables() -> dict[str, Table]:
    """The tables shipped with the package, read once."""
    return load_tables(PAPER_TABLES)


def load_tables(path: Path) -> dict[str, Table]:
    """Every table of a tables file (the format is described at the top of `paper_tables.yaml`)."""
    try:
        text = path.read_text(encoding="utf-8")
        _refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        document = yaml.safe_load(text)
    except OSError as error:
        raise UserError(f"Cannot read the tables file '{path}': {error.strerror}. The paper's tables come with "
                        "mit-lightning (mit_lightning/paper_tables.yaml); reinstall it if that file is gone.") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"'{path}' is not valid YAML{line}: {getattr(error, 'problem', None) or error}.") from None
    reader = _Reader(path)
    top = reader.mapping(document, "top level", required=("experiments", "tables"))
    experiments = {name: reader.experiment(name, spec)
                   for name, spec in reader.mapping(top["experiments"], "experiments").items()}
    tables = {name: reader.table(spec, f"tables.{name}", experiments)
              for name, spec in reader.mapping(top["tables"], "tables").items()}
    used = {experiment.name for table in tables.values() for experiment in table.experiments}
    unused = sorted(set(experiments) - used)
    if unused:
        raise reader.error("experiments", f"no table lists {', '.join(unused)}; add each to a table or remove it")
    return tables


def _refuse_repeated_keys(node: yaml.Node | None, path: Path) -> None:
    """YAML keeps the last of two equal keys without a word; here that would drop a row of a table."""
    pending, seen = [node], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = [key.value for key, _ in node.value]
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            if repeated:
                raise UserError(f"'{path}', line {node.start_mark.line + 1}: {', '.join(map(str, repeated))} "
                                "given twice in one mapping; keep one.")
            pending.extend(item for pair in node.value for item in pair)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)


class _Reader:
    """Checks each part of a tables file; an error names the file and the field (e.g. tables.table3.columns[2])."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, where: str, problem: str) -> UserError:
        return UserError(f"'{self.path}': {where}: {problem}.")

    def mapping(self, value: Any, where: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
        """A mapping with text keys; with `required`, all of those and any of `optional`, nothing else."""
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise self.error(where, f"expected a mapping with text keys, got {reprlib.repr(value)}")
        if required:
            missing = [key for key in required if key not in value]
            unknown = [key for key in value if key not in (*required, *optional)]
            if missing or unknown:
                allowed = ", ".join((*required, *(f"{key} (optional)" for key in optional)))
                found = "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                unknown and f"unknown {', '.join(unknown)}"]))
                raise self.error(where, f"{found} (fields: {allowed})")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, f"expected text, got {reprlib.repr(value)}")
        return value

    def texts(self, value: Any, where: str) -> tuple[str, ...]:
        return tuple(self.text(item, f"{where}[{index}]") for index, item in enumerate(self.sequence(value, where)))

    def sequence(self, value: Any, where: str) -> list:
        if not isinstance(value, list) or not value:
            raise self.error(where, f"expected a non-empty list, got {reprlib.repr(value)}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(where, f"expected a number, got {reprlib.repr(value)}")
        return float(value)

    def experiment(self, name: str, spec: Any) -> Experiment:
        where = f"experiments.{name}"
        spec = self.mapping(spec, where, required=("configs", "columns"))
        cells = self.mapping(spec["columns"], f"{where}.columns")
        return Experiment(
            name=name,
            configs=self.texts(spec["configs"], f"{where}.configs"),
            columns={label: self.text(metric, f"{where}.columns.{label}") for label, metric in cells.items()},
        )

    def column(self, spec: Any, where: str) -> Column:
        spec = self.mapping(spec, where, required=("label",), optional=("scale", "decimals"))
        decimals = spec.get("decimals", Column.decimals)
        if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
            raise self.error(f"{where}.decimals", f"expected a whole number ≥ 0, got {reprlib.repr(decimals)}")
        return Column(self.text(spec["label"], f"{where}.label"),
                      self.number(spec.get("scale", Column.scale), f"{where}.scale"), decimals)

    def table(self, spec: Any, where: str, experiments: dict[str, Experiment]) -> Table:
        spec = self.mapping(spec, where, required=("title", "columns", "experiments", "paper"),
                            optional=("ours_label", "notes"))
        runs = []
        for index, run in enumerate(self.sequence(spec["experiments"], f"{where}.experiments")):
            run_where = f"{where}.experiments[{index}]"
            run = self.mapping(run, run_where, required=("name",), optional=("row",))
            name = self.text(run["name"], f"{run_where}.name")
            if name not in experiments:
                raise self.error(f"{run_where}.name", f"no experiment '{name}' (listed under experiments: "
                                                      f"{', '.join(sorted(experiments))})")
            row = self.text(run["row"], f"{run_where}.row") if "row" in run else None
            runs.append(Experiment(name, experiments[name].configs, experiments[name].columns, row))
        try:
            return Table(
                title=self.text(spec["title"], f"{where}.title"),
                columns=tuple(self.column(column, f"{where}.columns[{index}]")
                              for index, column in enumerate(self.sequence(spec["columns"], f"{where}.columns"))),
                experiments=tuple(runs),
                paper=self.paper(spec["paper"], f"{where}.paper"),
                ours_label=self.text(spec.get("ours_label", Table.ours_label), f"{where}.ours_label"),
                notes=self.texts(spec["notes"], f"{where}.notes") if "notes" in spec else (),
            )
        except ValueError as error:
            raise self.error(where, str(error)) from None

    def paper(self, spec: Any, where: str) -> dict[str, dict[str, float]]:
        """Rows of values in the order of `columns`, as method → column → value."""
        spec = self.mapping(spec, where, required=("columns", "rows"))
        columns = self.texts(spec["columns"], f"{where}.columns")
        if len(set(columns)) < len(columns):
            raise self.error(f"{where}.columns", f"a column given twice in {list(columns)}")
        paper = {}
        for method, values in self.mapping(spec["rows"], f"{where}.rows").items():
            row_where = f"{where}.rows.{method}"
            if not isinstance(values, list) or len(values) != len(columns):
                raise self.error(row_where, f"expected {len(columns)} numbers (one per paper column: "
                                            f"{', '.join(columns)}), got {reprlib.repr(values)}")
            paper[method] = {column: self.number(value, f"{row_where}[{index}]")
                             for index, (column, value) in enumerate(zip(columns, values))}
        return paper
