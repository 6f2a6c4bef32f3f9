"""What `reproduce` and `compare` share: their command lines, checking a run's inputs before it starts, and
reading what a `mit fit --test_after_fit true` run left in its directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from mit_lightning.errors import UserError
from mit_lightning.metrics.names import current_names

RESULTS_FILE = "test_metrics.json"


def find_results(directory: Path, name: str = RESULTS_FILE) -> dict[str, float] | None:
    """The newest `name` written under a run directory, if any (`read_results`)."""
    candidates = sorted((path for path in directory.rglob(name) if path.is_file()), key=lambda path: path.stat().st_mtime)
    return read_results(candidates[-1]) if candidates else None


def read_results(path: Path) -> dict[str, Any]:
    """A JSON mapping a run wrote: for test metrics, metric names to numbers, by their current names (results
    written before a rename are still reused).

    A file in another form (not JSON, cut short, other values) is one line naming it: reused as it was, it
    would fill a table with whatever it holds, or end in a traceback.
    """
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "it nests too deeply" if isinstance(error, RecursionError) else error
        raise UserError(f"'{path}' is not the JSON a run writes ({reason}). Delete it to run that experiment "
                        "again.") from None
    metrics = path.name == RESULTS_FILE  # test metrics are numbers; other records (training cost) hold notes too
    expected = isinstance(results, dict) and all(
        isinstance(key, str) and (not metrics or isinstance(value, (int, float)) and not isinstance(value, bool))
        for key, value in results.items())
    if not expected:
        what = "metric names to numbers" if metrics else "names to values"
        raise UserError(f"'{path}' does not map {what} as a run writes it. Delete it to run that experiment again.")
    return current_names(results) if metrics else results


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


def config_args(configs: Iterable[str | Path]) -> list[str]:
    """`--config A --config B ...`: config files applied in order (a task config, then overlays)."""
    return [arg for config in configs for arg in ("--config", str(config))]


def split_at_dashes(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments, and those after `--` (given to every `mit fit` it runs)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1:]


def problems_by_message(problems: Iterable[tuple[str, str]]) -> list[str]:
    """(run name, problem) pairs as one line per problem, naming every run it stops: "a, b: problem"."""
    names: dict[str, list[str]] = {}
    for name, problem in problems:
        names.setdefault(problem, []).append(name)
    return [f"{', '.join(runs)}: {problem}" for problem, runs in names.items()]
