"""`mit compare` arguments, the check of every strategy before anything trains, the runs and the table."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mit_lightning.compare as package
from mit_lightning.compare.cost import COST_FILE
from mit_lightning.compare.plots import write_plots
from mit_lightning.compare.table import Row, markdown, metric_columns, paired_markdown, write_csv
from mit_lightning.errors import UserError
from mit_lightning.experiments import config_args, find_results, missing_inputs, problems_by_message, split_at_dashes
from mit_lightning.interrupt import run_child
from mit_lightning.measuring import positive_int

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
    starts_from: str | None = None  # the strategy whose trained weights this one starts from


def available_strategies(folder: Path) -> dict[str, Path]:
    """Every overlay in `folder`, named by its file stem; MiT first."""
    if not folder.is_dir():
        raise UserError(f"No strategy folder at '{folder}': run from the repository root, or give --peers.")
    overlays = {path.stem: path for path in sorted(folder.glob("*.yaml"))}
    if not overlays:
        raise UserError(f"'{folder}' holds no strategy overlays (*.yaml).")
    return dict(sorted(overlays.items(), key=lambda item: (item[0] != "mit", item[0])))


def fit_args(configs: Sequence[str], overlay: Path, budget: list[str], extra: list[str]) -> list[str]:
    return [*config_args([*configs, overlay]), *budget, *extra]


def starts_from(config: Any, strategies: Sequence[str]) -> str | None:
    """The strategy named by `model.init_weights: ${MIT_<STRATEGY>_CKPT}`, when it is one of `strategies`."""
    match = STARTS_FROM.match(str(config.model.init_weights or ""))
    name = match.group("name").lower() if match else None
    return name if name in strategies else None


def check(name: str, overlay: Path, configs: Sequence[str], budget: list[str], extra: list[str],
          strategies: Sequence[str] = ()) -> Strategy:
    """Parse the strategy's config and check its weights and data paths; nothing is loaded."""
    from mit_lightning.cli import parse_run_config

    config = parse_run_config(fit_args(configs, overlay, budget, extra))
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


ARGUMENTS_FILE = "arguments.json"


def comparison_folder(root: Path, arguments: list[str]) -> Path:
    """The newest comparison with these same arguments that stopped before its table (Ctrl-C, SIGTERM): it is
    continued; otherwise a new folder, which records its arguments."""
    unfinished = [folder for folder in root.glob("version_*") if not (folder / "comparison.md").exists()]
    for folder in sorted(unfinished, key=lambda folder: folder.stat().st_mtime, reverse=True):
        try:
            same = json.loads((folder / ARGUMENTS_FILE).read_text()) == arguments
        except (OSError, ValueError):
            continue
        if same:
            print(f"Continuing the comparison stopped in {folder}", flush=True)
            return folder
    folder = new_folder(root)
    (folder / ARGUMENTS_FILE).write_text(json.dumps(arguments) + "\n")
    return folder


def same_optimizer(configs: Sequence[str], budget: list[str], extra: list[str]) -> list[str]:
    """Arguments giving every strategy the task config's optimizer and schedule, every argument spelled out
    (an overlay's own values, e.g. PILL's betas, would otherwise survive a change of class)."""
    from mit_lightning.cli import parse_run_config
    from mit_lightning.module import DEFAULT_LR_SCHEDULER, DEFAULT_OPTIMIZER

    base = [*config_args(configs), *budget, *extra]
    config = parse_run_config(base)
    defaults = []
    if config.model.optimizer is None:
        defaults += ["--model.optimizer", json.dumps(DEFAULT_OPTIMIZER)]
    if config.model.lr_scheduler is None:
        defaults += ["--model.lr_scheduler", json.dumps(DEFAULT_LR_SCHEDULER)]
    if defaults:
        config = parse_run_config([*base, *defaults])
    return [argument for key in ("optimizer", "lr_scheduler")
            for argument in (f"--model.{key}", json.dumps(config.model[key].as_dict()))]


def command(strategy: Strategy, directory: Path, seed: int | None, start_checkpoint: Path | None,
            configs: Sequence[str], budget: list[str], extra: list[str]) -> list[str]:
    placement = ["--trainer.default_root_dir", str(directory)]
    logger = strategy.config.trainer.logger
    if logger and "save_dir" in (getattr(logger, "init_args", None) or {}):
        placement += ["--trainer.logger.init_args.save_dir", str(directory)]
    if start_checkpoint is not None:
        placement += ["--model.init_weights", str(start_checkpoint)]
    if seed is not None:
        placement += ["--seed_everything", str(seed)]
    return [sys.executable, "-m", "mit_lightning", "fit", *fit_args(configs, strategy.overlay, budget, []),
            "--test_after_fit", "true", *placement, "--ckpt_path", "last", f"--trainer.callbacks+={COST_CALLBACK}",
            *extra]


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


def run(strategy: Strategy, directory: Path, seed: int | None, start_checkpoint: Path | None,
        configs: Sequence[str], budget: list[str], extra: list[str], threads: int | None = None) -> Row:
    """`mit fit ... --test_after_fit true` in a process of its own, in `directory` (its CPU threads pinned to
    `threads`); its output goes to fit.log. The machine's load is read before and after: above one per core, the
    run's wall times include waiting for other processes, which is said on the console and in the table."""
    log = directory / "fit.log"
    name = strategy.name + (f" (seed {seed})" if seed is not None else "")
    metrics, cost = find_results(directory), find_results(directory, COST_FILE)
    if metrics is not None and cost is not None:  # trained before a comparison was stopped and continued
        print(f"{name}: reusing the results in {directory}", flush=True)
        return Row(strategy.name, metrics, cost, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{name}: training (output in {log}) ...", end=" ", flush=True)
    start, loads = time.perf_counter(), [load_per_core()]
    with open(log, "a") as output:  # a run stopped earlier continues (--ckpt_path last), its log too
        code = run_child(command(strategy, directory, seed, start_checkpoint, configs, budget, extra), stdout=output,
                         stderr=subprocess.STDOUT, env=thread_environment(threads))
    loads.append(load_per_core())
    print(f"{time.perf_counter() - start:.0f} s", flush=True)
    load = max((value for value in loads if value is not None), default=None)
    if load is not None and load > 1:
        print(f"Warning: while {strategy.name} ran, the load was {load:.1f} per CPU core: its step time (wall) "
              "includes waiting for other processes; compare the CPU time per step instead.", file=sys.stderr)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        print(f"{name} failed (exit code {code}); the end of its output:\n{tail}", file=sys.stderr)
        return Row(strategy.name, problem=f"mit fit failed (exit code {code}), see {log}", seed=seed)
    metrics, cost = find_results(directory), find_results(directory, COST_FILE)
    if metrics is None or cost is None:
        return Row(strategy.name, metrics or {}, cost or {}, problem=f"no test metrics or training cost under {directory}",
                   seed=seed)
    return Row(strategy.name, metrics, {**cost, "load_per_core": load}, seed=seed)


def summary_metrics(strategies: Sequence[Strategy]) -> tuple[str, ...]:
    module, _, name = strategies[0].config.model.head.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).summary_metrics


def report(folder: Path, rows: list[Row], metrics: Sequence[str], header: list[str], plots: Sequence[Path] = ()) -> str:
    """The tables with what they were measured on; written to comparison.md and comparison.csv in `folder`."""
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
        f"Runs, logs and checkpoints: {folder}/<strategy>/seed_<seed>/",
    ]
    paired = paired_markdown(rows, metrics)
    seeds = sorted({row.seed for row in rows if row.seed is not None})
    if paired and len(seeds) > 1:
        notes.insert(0, f"Each strategy minus MiT, paired by seed: the mean difference over the seeds both ran "
                        f"and its 95% t interval [low, high] ({len(seeds)} seeds: {len(seeds) - 1} degrees of freedom)."
                        "\n\n" + paired + "\n")
    if plots:
        notes.append("Plots: " + ", ".join(path.name for path in plots) + f" (also in TensorBoard: {folder}/tensorboard)")
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
                        help="strategy names (overlays in --peers, by file stem); default: every one that can run")
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs of every strategy (default 3)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="also stop every run after this many steps")
    parser.add_argument("--seed", type=int, default=None, help="the first seed (default: the config's)")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="runs per strategy, with seeds seed, seed+1, ...; the table shows mean ± sd and a paired "
                             "comparison with MiT (default 1)")
    parser.add_argument("--same-optimizer", action="store_true",
                        help="give every strategy the task config's optimizer and schedule instead of its overlay's "
                             "own recipe")
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


def seed_list(first: int | None, count: int, config_seed: Any) -> list[int | None]:
    """The seeds of every strategy's runs: `first` (default the config's), first+1, ...; [None] leaves one run
    to a config whose seed is not a number (a random one)."""
    if first is None:
        if isinstance(config_seed, int) and not isinstance(config_seed, bool):
            first = config_seed
        elif count == 1:
            return [None]
        else:
            first = 0
    return list(range(first, first + count))


def main(argv: Sequence[str] | None = None) -> None:
    own, extra = split_at_dashes(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(own)
    configs = args.config or [DEFAULT_CONFIG]
    budget = ["--trainer.max_epochs", str(args.epochs)]
    budget += ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    if args.list:
        print("\n".join(f"{name}  ({path})" for name, path in available_strategies(args.peers).items()))
        return
    if args.same_optimizer:
        budget += same_optimizer(configs, budget, extra)
    strategies = plan(args.strategies, args.peers, configs, budget, extra)
    seeds = seed_list(args.seed, args.seeds, strategies[0].config.seed_everything)
    threads = args.threads or (None if _has_cuda() else 1)
    folder = comparison_folder(args.runs, [*own, "--", *extra])
    print(f"Comparing {', '.join(s.name for s in strategies)} in {folder}", flush=True)
    rows, directories = [], {}
    for seed in seeds:
        for strategy in strategies:
            directory = folder / strategy.name / f"seed_{seed if seed is not None else 'config'}"
            start_checkpoint = None
            if strategy.starts_from:
                start = directory.parent.parent / strategy.starts_from / directory.name
                start_checkpoint = next(start.rglob("last.ckpt"), None) if start.is_dir() else None
                if start_checkpoint is None:
                    rows.append(Row(strategy.name, problem=f"it starts from {strategy.starts_from}'s weights, and "
                                                            f"{strategy.starts_from} left no checkpoint", seed=seed))
                    continue
            directories.setdefault(strategy.name, []).append(directory)
            rows.append(run(strategy, directory, seed, start_checkpoint, configs, budget, extra, threads))
    metrics = args.metrics or summary_metrics(strategies)
    shown = ", ".join(str(seed) for seed in seeds) if seeds != [None] else "the config's"
    header = [f"## mit compare: {' + '.join(configs)}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}"
              + (f" (at most {args.max_steps} steps)" if args.max_steps else "")
              + (f", seeds {shown}: mean ± standard deviation over seeds" if len(seeds) > 1 else f", seed {shown}"),
              "Optimiser: " + ("the task config's, for every strategy" if args.same_optimizer
                               else "each strategy's own recipe (its overlay's; the task config's where it sets none)"),
              *([f"Arguments given to every run: {' '.join(extra)}"] if extra else []),
              *([f"CPU threads per run: {threads}"] if threads else []),
              *(f"{s.name} starts from the weights {s.starts_from} trained; its budget comes on top of that one's."
                for s in strategies if s.starts_from)]
    plots = plot(folder, rows, metrics, directories)
    print("\n" + report(folder, rows, metrics, header, plots))
    print(f"\nWritten to {folder / 'comparison.md'} and {folder / 'comparison.csv'}")


def plot(folder: Path, rows: list[Row], metrics: Sequence[str], directories: dict[str, list[Path]]) -> list[Path]:
    """The plots of the first metric column, when any run has it."""
    columns = metric_columns(rows, metrics)
    if not columns:
        return []
    label, key = columns[0]
    return write_plots(folder, rows, key, label.split(" ")[0], directories)
