"""The `mit` command: LightningCLI for fit / validate / test / predict, plus the commands in `OTHER_COMMANDS`.

- The run's config is saved in the run directory and inside every checkpoint, so
  `mit test --ckpt_path X` evaluates a checkpoint with nothing else on the command line; a
  `--config` or any override given after it still applies (another split, another data root).
- Errors the user can fix (missing data or weights, bad settings) print one message, no traceback.
- `test` writes the test metrics to `test_metrics.json` in the run directory and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mit_lightning.checkpoints import (
    CONFIG_ENTRY,
    check_lightning_entries,
    load_weights_file,
    run_config_entry,
    stored_run_config,
)
from mit_lightning.config_safety import option_values
from mit_lightning.data.base import MiTDataModule
from mit_lightning.errors import UserError, user_error_in
from mit_lightning.experiments import config_args
from mit_lightning.metrics.names import metric_of, split_of
from mit_lightning.interrupt import exit_status
from mit_lightning.module import DEFAULT_LR_SCHEDULER, DEFAULT_OPTIMIZER, MiTModule
from mit_lightning.progress import LineProgress
from mit_lightning.resume import (
    LatestCheckpoint,
    check_resumed_data,
    checkpoint_folders,
    disable_save_last,
    follow_moved_run,
    resolve_ckpt_path,
    run_version,
)

EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")
#: commands beside LightningCLI's: name → (module whose `main(argv)` runs it, one-line summary for `mit --help`)
OTHER_COMMANDS = {
    "bench": ("mit_lightning.bench", "speed and memory of each fusion strategy's training step against the frozen floor"),
    "compare": ("mit_lightning.compare", "train fusion strategies alike on one config; one table of metric, parameters, "
                                         "step time, memory"),
    "reproduce": ("mit_lightning.reproduce", "train and test the configs of one of the paper's tables; print it beside "
                                             "the paper's"),
    "serve": ("mit_lightning.serve.cli", "serve trained models over HTTP, with a web page to try them"),
    "export": ("mit_lightning.export", "write a checkpoint's trained weights and config as a folder to share"),
    "inspect": ("mit_lightning.inspection", "draw a trained MiT model's gates and infusion sizes per layer and head as "
                                            "PNG charts"),
    "check-data": ("mit_lightning.check_data", "print a config's data splits (counts, labels, what setup excluded) "
                                               "and draw random samples of each as PNG"),
}


class SaveRunConfig(SaveConfigCallback):
    """Saves config.yaml in the run directory (never overwriting one) and the config in checkpoints.

    A resumed run keeps its folder: its config goes beside the first as config.resume-<n>.yaml.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        resumed = stage == "fit" and self.config.get("ckpt_path")
        if resumed or (log_dir / self.config_filename).exists():
            names = (f"config.resume-{n}.yaml" for n in range(1, 10_000))
            self.config_filename = next(name for name in names if not (log_dir / name).exists())
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_ENTRY] = run_config_entry(yaml.safe_load(self.parser.dump(self.config, skip_unset=False)))

    def on_fit_end(self, trainer, pl_module) -> None:
        """TensorBoard's hparams tab: the run's settings and size beside its final validation metrics (as final/*)."""
        if trainer.logger is None or not trainer.is_global_zero:
            return
        metrics = {f"final/{name}": float(value) for name, value in trainer.callback_metrics.items()
                   if name.startswith("val/") and value.numel() == 1}
        trainable, total = pl_module.parameter_counts()
        settings = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        hparams = {**run_settings(settings), "trainable_parameters": trainable, "total_parameters": total}
        trainer.logger.log_hyperparams(hparams, metrics)


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run config's settings as flat `model.fusion.init_args.layers`-style keys with plain values (lists as text)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif prefix.split(".")[0] in ("model", "data", "seed_everything") or prefix.startswith("trainer.max_"):
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", config)
    return flat


class _KeepEpilogLines(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help layout, with the description and epilog printed line by line as written."""


class MiTArgumentParser(LightningArgumentParser):
    """Says what a config without a model or data usually means: an overlay given without its task config."""

    def error(self, message: str, ex: Exception | None = None):
        if "arguments are required" in message and ("model.head" in message or ".data" in message):
            message += (
                ". Give a task config first (e.g. --config configs/demo.yaml or configs/refcoco.yaml); overlays "
                "such as configs/datasets/*.yaml, configs/peers/*.yaml and configs/ablations/*.yaml go after it."
            )
        return super().error(message, ex)


class MiTCLI(LightningCLI):
    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            MiTModule,
            MiTDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            parser_class=MiTArgumentParser,
            auto_configure_optimizers=False,
            trainer_defaults={"default_root_dir": "runs"},
            args=args,
            run=run,
        )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        """`mit --help` also lists the commands `cli_main` runs before LightningCLI sees them."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            self.parser.formatter_class = _KeepEpilogLines
            width = max(len(name) for name in OTHER_COMMANDS)
            self.parser.epilog = "other commands:\n" + "\n".join(
                f"  {name.ljust(width)}  {summary}" for name, (_, summary) in OTHER_COMMANDS.items()
            )

    def before_instantiate_classes(self) -> None:
        """Settle the checkpoint and the run folder before the model is built (minutes for a 7B LLM).

        Without a subcommand (``run=False``: used from Python, or parsing only) there is neither yet.
        """
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        check_writable(config.trainer)
        ckpt_path = resolve_ckpt_path(self.subcommand, config.ckpt_path, config.trainer)
        config.ckpt_path = str(ckpt_path) if ckpt_path else None
        if isinstance(ckpt_path, Path):
            # a broken or altered file fails now, with one line naming it
            checkpoint = load_weights_file(ckpt_path)
            check_lightning_entries(checkpoint, ckpt_path)
            if self.subcommand == "fit":
                check_resumed_data(checkpoint, config.data.as_dict(), ckpt_path)
                continue_run_folder(config.trainer, ckpt_path)

    def _parse_ckpt_path(self) -> None:
        """Lightning would read model settings from the checkpoint's `hyper_parameters`, importing any class path
        they name. A run's config travels as its own checked entry instead (`with_checkpoint_config`)."""

    def _keep_latest_checkpoint(self) -> None:
        """Every run keeps a true latest checkpoint; evaluation runs carry the callback so its state loads quietly.

        It goes after the ModelCheckpoints: Lightning calls checkpoint callbacks in their order, after all others,
        and last.ckpt must record the best checkpoint its epoch saved (`--ckpt_path best` reads it from there).
        """
        callbacks = self.trainer.callbacks
        latest = [callback for callback in callbacks if isinstance(callback, LatestCheckpoint)] or [LatestCheckpoint()]
        self.trainer.callbacks = [callback for callback in callbacks if not isinstance(callback, LatestCheckpoint)] + latest
        disable_save_last(self.trainer)
        self._lines_off_a_terminal()

    def _lines_off_a_terminal(self) -> None:
        """A progress bar draws nothing a log file keeps: with stdout not a terminal, progress comes as lines."""
        bar = self.trainer.progress_bar_callback
        if bar is None or isinstance(bar, LineProgress) or sys.stdout.isatty():
            return
        self.trainer.callbacks = [LineProgress() if callback is bar else callback for callback in self.trainer.callbacks]

    def before_fit(self) -> None:
        self._keep_latest_checkpoint()

    def before_validate(self) -> None:
        self._keep_latest_checkpoint()

    def before_test(self) -> None:
        self._keep_latest_checkpoint()
        self.config_init["test"]["verbose"] = self._lightning_table_fits()

    def _lightning_table_fits(self) -> bool:
        """Lightning's table of test results has a column per test split but puts every split's metrics in every
        column; with several splits only `after_test`'s summary (a line per split) is printed."""
        return len(getattr(self.datamodule, "test_splits", ())) <= 1

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = user_error_in(error)
            if cause is None:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model.optimizer": DEFAULT_OPTIMIZER,
                "model.lr_scheduler": DEFAULT_LR_SCHEDULER,
            }
        )
        if any(getattr(action, "dest", None) == "weights_only" for action in parser._actions):
            # checkpoints hold tensors and plain data: loading one never needs to unpickle (and run) code
            parser.set_defaults({"weights_only": True})
        if any(getattr(action, "dest", None) == "return_predictions" for action in parser._actions):
            # predictions are written batch by batch; keeping them all would hold a whole split in memory
            parser.set_defaults({"return_predictions": False})
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After fit, test the best checkpoint (or the last one without a monitored metric).",
        )

    def before_predict(self) -> None:
        """Without a writer of the user's, predictions go to <run dir>/predictions (see callbacks.py)."""
        self._keep_latest_checkpoint()
        from lightning.pytorch.callbacks import BasePredictionWriter

        from mit_lightning.callbacks import PredictionWriter

        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            output = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
            self.trainer.callbacks.append(PredictionWriter(str(output)))
            print(f"Predictions will be written to {output}")

    def after_fit(self) -> None:
        if not self.config_init[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None,
                          verbose=self._lightning_table_fits())
        self.after_test()

    def after_test(self) -> None:
        results = {
            name: float(value)
            for name, value in self.trainer.callback_metrics.items()
            if name.startswith("test/") and value.numel() == 1
        }
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero or not results:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "test_metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(_summary(results) + f"\nTest metrics written to {log_dir / 'test_metrics.json'}")


def check_writable(trainer_config) -> None:
    """An unwritable run folder fails now, in one line, not after the model is built."""
    logger = trainer_config.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    folders = [trainer_config.get("default_root_dir") or "."]
    folders += [item.init_args.get("save_dir") for item in loggers if isinstance(item, Namespace) and "init_args" in item]
    for folder in (Path(folder) for folder in folders if folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise UserError(f"Cannot write the run folder '{folder}' ({error.strerror or error}). Choose another with "
                            "--trainer.default_root_dir (and the logger's save_dir), or fix its permissions.") from None


def continue_run_folder(trainer_config, ckpt_path: Path) -> None:
    """Resuming a run's checkpoint logs into that run's folder: the same TensorBoard curves, continued."""
    version = run_version(ckpt_path)
    own_folders = {folder.resolve() for folder in checkpoint_folders(trainer_config)}
    if version is None or ckpt_path.resolve().parent not in own_folders:
        return  # a checkpoint from elsewhere: this run gets a folder of its own
    logger = trainer_config.get("logger")
    if logger is None or logger is True:
        trainer_config.logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=trainer_config.get("default_root_dir") or ".", version=version),
        )
    elif isinstance(logger, Namespace) and "init_args" in logger:
        logger.init_args.version = version
    rank_zero_info(f"Resuming {ckpt_path}: logging into the same run folder (version {version}).")


def _summary(results: dict[str, float]) -> str:
    lines = ["Test results:"]
    for split in sorted({split_of(name) for name in results} - {None}):
        metrics = {metric_of(name): value for name, value in results.items() if split_of(name) == split}
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
        lines.append(f"  {split}: {shown}")
    return "\n".join(lines)


def with_checkpoint_config(args: list[str]) -> list[str]:
    """`mit test --ckpt_path X ...` → `mit test --config <X's run config> --ckpt_path X ...`.

    The stored config comes first, so the user's own --config files and overrides win.
    """
    if not args or args[0] not in EVALUATION_SUBCOMMANDS:
        return args
    ckpt_path = next(option_values(args, "--ckpt_path"), None)
    if ckpt_path in (None, "best", "last", "hpc", "registry"):
        return args
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"Checkpoint not found: '{path}'. Give the path of a .ckpt file written by `mit fit`.")
    stored = stored_run_config(load_weights_file(path), path, args)
    if stored is None:
        return args
    follow_moved_run(stored, path)
    return [args[0], "--config", yaml.safe_dump(stored, sort_keys=False), *args[1:]]


def find_checkpoint(ckpt_path: str, configs: Sequence[str] = ()) -> Path:
    """A checkpoint or export path as given, or ``best`` / ``last`` of the newest run of the `configs`
    (the --config files the run was trained with): how `mit serve` and `mit export` read --ckpt_path."""
    if ckpt_path not in ("best", "last"):
        return Path(ckpt_path).expanduser()
    if not configs:
        raise UserError(f"--ckpt_path {ckpt_path} needs the run's --config, to find where its runs are.")
    trainer = parse_run_config(config_args(configs)).trainer
    return resolve_ckpt_path("test", ckpt_path, trainer)


class _ParseOnly(MiTCLI):
    def _set_seed(self) -> None:
        """Parsing only: leave the global RNG alone."""

    def instantiate_classes(self) -> None:
        """Nothing is built: the caller only wants the parsed config."""


def parse_run_config(args: Sequence[str]):
    """The config a `mit fit` with these arguments would run, without building anything.

    A config the parser rejects is a UserError carrying the parser's one-line message (the parser itself
    prints usage and exits, which suits a command line but not a caller checking many runs)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _ParseOnly(args=list(args), run=False).config
    except SystemExit:
        message = stderr.getvalue().rsplit("error: ", 1)[-1].strip()
        raise UserError(" ".join(message.split())) from None


def cli_main(args: Sequence[str] | None = None) -> MiTCLI | None:
    """Entry point used by the `mit` script and by tests (which pass `args`)."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in OTHER_COMMANDS:
        module, _ = OTHER_COMMANDS[args[0]]
        importlib.import_module(module).main(args[1:])
        return None
    return MiTCLI(args=with_checkpoint_config(args))


def _quiet_known_warnings() -> None:
    """Warnings a `mit` run would print every time, about choices made on purpose (the command, not the library)."""
    # Frozen backbones are in eval mode on purpose; Lightning would warn about it at every fit.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    # Testing a checkpoint in a new run directory: ModelCheckpoint's own state does not apply there.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    # `cli_main` rewrites the command line (checkpoint config) and hands it to LightningCLI as `args`.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # Lightning's own use of a torch API torch deprecated; nothing a user of `mit` can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger(LIGHTNING_INFO_LOGGER).addFilter(_no_advertisements)
    logging.getLogger(BITSANDBYTES_INT8_LOGGER).addFilter(_INT8_CAST_ONCE)


#: the logger Lightning's rank-zero messages come from
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"


def _no_advertisements(record: logging.LogRecord) -> bool:
    """Lightning's suggestions to install its cloud services ("💡 Tip: ...") are not printed."""
    return not record.getMessage().startswith("💡 Tip")


#: the logger of bitsandbytes' 8-bit matmul, which says at every call of every int8 layer that it casts its input
BITSANDBYTES_INT8_LOGGER = "bitsandbytes.autograd._functions"


class FirstOnly(logging.Filter):
    """Lets the first record whose message starts with `prefix` through, and no later one."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


_INT8_CAST_ONCE = FirstOnly("MatMul8bitLt: inputs will be cast")


def _close_process_group() -> None:
    """End a distributed run's process group before the interpreter exits: left to interpreter teardown, gloo's
    threads are destroyed while joinable and the C++ runtime aborts the process (SIGABRT) after a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    _quiet_known_warnings()
    try:
        cli_main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException as stop:  # saved and stopped: never status 0, so a job scheduler requeues it
        raise SystemExit(exit_status(getattr(stop, "signum", signal.SIGTERM))) from None
    finally:
        _close_process_group()
