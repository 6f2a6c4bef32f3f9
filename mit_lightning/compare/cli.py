"""`mit compare` arguments, the check of every strategy before anything trains, the runs and the table."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mit_lightning.compare as package
from mit_lightning.bench.cli import positive_int
from mit_lightning.compare.cost import COST_FILE
from mit_lightning.compare.table import Row, markdown, write_csv
from mit_lightning.errors import UserError
from mit_lightning.experiments import find_results, missing_inputs, problems_by_message, split_at_dashes

DEFAULT_CONFIG = "configs/demo.yaml"
PEERS = "configs/peers"
COST_CALLBACK = "mit_lightning.compare.TrainingCost"
#: `model.init_weights: ${MIT_<STRATEGY>_CKPT}` in an overlay: it starts from that strategy's trained weights
#: (PILL stage 2 from stage 1); compare runs that strategy first and hands its last checkpoint over
#: the environment variables that set a run's CPU threads (torch's intra-op pool follows OMP_NUM_THREADS)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
STARTS_FROM = re.compile(r"^\$\{MIT_(?P<name>[A-Z0-9_]+)_CKPT\}$")


@dataclass
class Strategy:
    """One strategy's run: its overlay, its parsed config and where it runs."""

    name: str
    overlay: Path
    config: Any  # the parsed run config (jsonargparse Namespace)
    directory: Path | None = None
    starts_from: str | None = None  # the strategy whose trained weights this one starts from
    start_checkpoint: Path | None = None  # that strategy's last checkpoint, once it has trained


def available_strategies(folder: Path) -> dict[str, Path]:
    """Every overlay in `folder`, named by its file stem; MiT first."""
    if not folder.is_dir():
        raise UserError(f"No strategy folder at '{folder}': run from the repository root, or give --peers.")
    overlays = {path.stem: path for path in sorted(folder.glob("*.yaml"))}
    if not overlays:
        raise UserError(f"'{folder}' holds no strategy overlays (*.yaml).")
    return dict(sorted(overlays.items(), key=lambda item: (item[0] != "mit", item[0])))


def _parse(args: list[str]):
    """The run config of `mit fit <args>`; a config error becomes a UserError with jsonargparse's message."""
    from mit_lightning.cli import parse_run_config

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_run_config(args)
    except SystemExit:
        message = stderr.getvalue().rsplit("error: ", 1)[-1].strip()
        raise UserError(" ".join(message.split())) from None


def fit_args(configs: Sequence[str], overlay: Path, budget: list[str], extra: list[str]) -> list[str]:
    return [*(arg for config in configs for arg in ("--config", config)), "--config", str(overlay), *budget, *extra]


def starts_from(config: Any, strategies: Sequence[str]) -> str | None:
    """The strategy named by `model.init_weights: ${MIT_<STRATEGY>_CKPT}`, when it is one of `strategies`."""
    match = STARTS_FROM.match(str(config.model.init_weights or ""))
    name = match.group("name").lower() if match else None
    return name if name in strategies else None


def check(name: str, overlay: Path, configs: Sequence[str], budget: list[str], extra: list[str],
          strategies: Sequence[str] = ()) -> Strategy:
    """Parse the strategy's config and check its weights and data paths; nothing is loaded."""
    config = _parse(fit_args(configs, overlay, budget, extra))
    logger = config.trainer.logger
    if isinstance(logger, list):
        raise UserError("mit compare gives every strategy its own log folder, which it cannot do for a list of "
                        "loggers; configure one logger (or none).")
    problems = missing_inputs(config)
    if problems:
        raise UserError(" ".join(problems))
    return Strategy(name, overlay, config, starts_from=starts_from(config, strategies))


def plan(chosen: Sequence[str] | None, folder: Path, configs: Sequence[str], budget: list[str],
         extra: list[str]) -> list[Strategy]:
    """The strategies to run, all checked first. Named ones must all pass; by default, those that cannot
    run from this config alone (e.g. a stage that needs an earlier stage's checkpoint) are left out with a note."""
    overlays = available_strategies(folder)
    unknown = [name for name in chosen or [] if name not in overlays]
    if unknown:
        raise UserError(f"Unknown strategies {unknown}; available (overlays in {folder}): {', '.join(overlays)}.")
    strategies, problems = [], {}
    for name in chosen or overlays:
        try:
            strategies.append(check(name, overlays[name], configs, budget, extra, list(overlays)))
        except UserError as error:
            problems[name] = str(error)
    planned = {strategy.name for strategy in strategies}
    for strategy in strategies:
        if strategy.starts_from and strategy.starts_from not in planned:
            problems[strategy.name] = (f"it starts from the weights {strategy.starts_from} trains; add "
                                       f"{strategy.starts_from} to --strategies")
    strategies = [strategy for strategy in strategies if strategy.name not in problems]
    if problems and (chosen or not strategies):
        listed = "\n  - ".join(problems_by_message(problems.items()))
        raise UserError(f"Nothing was started; these strategies cannot run:\n  - {listed}")
    for name, problem in problems.items():
        print(f"Leaving out {name}: {problem}", file=sys.stderr)
    return sorted(strategies, key=lambda strategy: strategy.starts_from is not None)  # a start before what uses it


def new_folder(root: Path) -> Path:
    """runs/compare/version_<N>, the first N not taken: an earlier comparison is never written into."""
    root.mkdir(parents=True, exist_ok=True)
    number = len(list(root.glob("version_*")))
    while True:
        folder = root / f"version_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def command(strategy: Strategy, configs: Sequence[str], budget: list[str], extra: list[str]) -> list[str]:
    directory = str(strategy.directory)
    placement = ["--trainer.default_root_dir", directory]
    logger = strategy.config.trainer.logger
    if logger and "save_dir" in (getattr(logger, "init_args", None) or {}):
        placement += ["--trainer.logger.init_args.save_dir", directory]
    if strategy.start_checkpoint is not None:
        placement += ["--model.init_weights", str(strategy.start_checkpoint)]
    return [sys.executable, "-m", "mit_lightning", "fit", *fit_args(configs, strategy.overlay, budget, []),
            "--test_after_fit", "true", *placement, f"--trainer.callbacks+={COST_CALLBACK}", *extra]


def load_per_core() -> float | None:
    """The machine's one-minute load average over its cores (None where the system does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


def thread_environment(threads: int | None) -> dict[str, str]:
    """The environment of a run whose CPU threads are pinned to `threads` (None: torch's choice)."""
    if threads is None:
        return dict(os.environ)
    return {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}


def run(strategy: Strategy, configs: Sequence[str], budget: list[str], extra: list[str],
        threads: int | None = None) -> Row:
    """`mit fit ... --test_after_fit true` in a process of its own (its CPU threads pinned to `threads`); its
    output goes to <run>/fit.log. The machine's load is read before and after: above one per core, the
    run's wall times include waiting for other processes, which is said on the console and in the table."""
    strategy.directory.mkdir()
    log = strategy.directory / "fit.log"
    print(f"{strategy.name}: training (output in {log}) ...", end=" ", flush=True)
    start, loads = time.perf_counter(), [load_per_core()]
    with open(log, "w") as output:
        code = subprocess.run(command(strategy, configs, budget, extra), stdout=output, stderr=subprocess.STDOUT,
                              env=thread_environment(threads)).returncode
    loads.append(load_per_core())
    print(f"{time.perf_counter() - start:.0f} s", flush=True)
    load = max((value for value in loads if value is not None), default=None)
    if load is not None and load > 1:
        print(f"Warning: while {strategy.name} ran, the load was {load:.1f} per CPU core: its step time (wall) "
              "includes waiting for other processes; compare the CPU time per step instead.", file=sys.stderr)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        print(f"{strategy.name} failed (exit code {code}); the end of its output:\n{tail}", file=sys.stderr)
        return Row(strategy.name, problem=f"mit fit failed (exit code {code}), see {log}")
    metrics, cost = find_results(strategy.directory), find_results(strategy.directory, COST_FILE)
    if metrics is None or cost is None:
        return Row(strategy.name, metrics or {}, cost or {}, problem=f"no test metrics or training cost under {log.parent}")
    return Row(strategy.name, metrics, {**cost, "load_per_core": load})


def summary_metrics(strategies: Sequence[Strategy]) -> tuple[str, ...]:
    module, _, name = strategies[0].config.model.head.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).summary_metrics


def report(folder: Path, rows: list[Row], metrics: Sequence[str], header: list[str]) -> str:
    """The table with what it was measured on; written to comparison.md and comparison.csv in `folder`."""
    memory = next((row.cost["memory_measure"] for row in rows if row.cost.get("memory_measure")), None)
    notes = [
        "Step time: median training step (forward, backward, optimizer step; data loading and validation "
        "excluded). Peak memory: " + {
            "cuda_max_memory_allocated": "peak GPU memory allocated during training, weights included.",
            "cpu_peak_rss_rise": "rise of the process's peak resident memory during training (frozen weights, "
                                 "loaded before, not included; a rough figure).",
        }.get(memory, "not measured."),
        "CPU time per step: the process's CPU time over the same steps, all its threads (on a busy machine the "
        "steadier figure: wall time also counts waiting for other processes).",
        *(f"Warning: the machine's load reached {row.cost['load_per_core']:.1f} per CPU core while {row.strategy} "
          "ran: its step time includes waiting for other processes." for row in rows
          if (row.cost.get("load_per_core") or 0) > 1),
        f"Runs, logs and checkpoints: {folder}/<strategy>/",
    ]
    text = "\n".join([*header, "", markdown(rows, metrics), "", *notes])
    (folder / "comparison.md").write_text(text + "\n")
    write_csv(folder / "comparison.csv", rows, metrics)
    return text


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mit compare", description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="mit compare [options] [-- any mit fit argument, given to every run]",
    )
    parser.add_argument("--config", action="append", default=None,
                        help=f"the run config every strategy shares (repeat to compose; default {DEFAULT_CONFIG})")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help=f"strategy names (overlays in --peers, by file stem); default: every one that can run")
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs of every strategy (default 3)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="also stop every run after this many steps")
    parser.add_argument("--seed", type=int, default=None, help="seed of every run (default: the config's)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="test metrics shown (default: the task head's summary metrics)")
    parser.add_argument("--peers", type=Path, default=Path(PEERS), help=f"the strategy overlays (default {PEERS})")
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"),
                        help="each comparison gets a new version_<N> folder here (default runs/compare)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of every run (OMP/MKL), so that runs measured one after another use the same "
                             "number whatever else runs; default: 1 without a CUDA GPU, else torch's choice")
    parser.add_argument("--list", action="store_true", help="list the strategies and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    own, extra = split_at_dashes(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(own)
    configs = args.config or [DEFAULT_CONFIG]
    budget = ["--trainer.max_epochs", str(args.epochs)]
    budget += ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    budget += ["--seed_everything", str(args.seed)] if args.seed is not None else []
    if args.list:
        print("\n".join(f"{name}  ({path})" for name, path in available_strategies(args.peers).items()))
        return
    strategies = plan(args.strategies, args.peers, configs, budget, extra)
    threads = args.threads or (None if _has_cuda() else 1)
    folder = new_folder(args.runs)
    print(f"Comparing {', '.join(s.name for s in strategies)} in {folder}", flush=True)
    rows = []
    for strategy in strategies:
        strategy.directory = folder / strategy.name
        if strategy.starts_from:
            strategy.start_checkpoint = next((folder / strategy.starts_from).rglob("last.ckpt"), None)
            if strategy.start_checkpoint is None:
                rows.append(Row(strategy.name, problem=f"it starts from {strategy.starts_from}'s weights, and "
                                                        f"{strategy.starts_from} left no checkpoint"))
                continue
        rows.append(run(strategy, configs, budget, extra, threads))
    seed = strategies[0].config.seed_everything
    header = [f"## mit compare: {' + '.join(configs)}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}"
              + (f" (at most {args.max_steps} steps)" if args.max_steps else "") + f", seed {seed}",
              *([f"Arguments given to every run: {' '.join(extra)}"] if extra else []),
              *([f"CPU threads per run: {threads}"] if threads else []),
              *(f"{s.name} starts from the weights {s.starts_from} trained; its budget comes on top of that one's."
                for s in strategies if s.starts_from)]
    print("\n" + report(folder, rows, args.metrics or summary_metrics(strategies), header))
    print(f"\nWritten to {folder / 'comparison.md'} and {folder / 'comparison.csv'}")
