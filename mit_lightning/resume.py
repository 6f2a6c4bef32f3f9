"""Runs that survive pre-emption: a true latest checkpoint, written atomically, and resuming it exactly.

- `LatestCheckpoint` keeps ``<run>/checkpoints/last.ckpt`` the latest state of training: rewritten at
  every training-epoch end (after validation), optionally every N optimizer steps, and when the
  process receives SIGTERM (how clusters pre-empt) or SIGINT (Ctrl-C; see `interrupt.py`). Each write
  goes to a temporary file renamed over the old one, so a kill mid-write leaves the previous checkpoint
  intact. It also carries the RNG states, so a resumed run draws the same random numbers as an
  uninterrupted one, and locks the run folder to the process training it.
- `checkpoint_folders` / `latest_checkpoint` find the newest run of a config, so that
  ``mit fit --config X --ckpt_path last`` continues that run in its own folder (same TensorBoard
  curves) and ``mit test --config X --ckpt_path best`` finds its best checkpoint.

The data side of exact resumption (the same samples in the same order) is `data/sampling.py`.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import sys
from pathlib import Path
from typing import IO, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mit_lightning.checkpoints import CONFIG_ENTRY, load_weights_file
from mit_lightning.errors import UserError
from mit_lightning.interrupt import Stopped, StopSignals

LAST_NAME = "last"
CHECKPOINT_SUFFIX = ".ckpt"


# --- random number generators -----------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every RNG training draws from, as tensors and plain data (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the callback -------------------------------------------------------------------------------------
class LatestCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` in the run's checkpoint folder the true latest state of training.

    A `Checkpoint`, so that Lightning calls it with the checkpoint callbacks, after the others at an epoch's
    end; placed after the ModelCheckpoints (the CLI does), its last.ckpt records the best they just saved.

    Args:
        every_n_train_steps: also write it every N optimizer steps (long epochs); None = epoch ends only.

    Under several processes (DDP), only epoch ends are written: the middle of an epoch cannot be
    resumed exactly there, so a pre-empted multi-GPU run continues from its last epoch end.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise UserError(f"LatestCheckpoint every_n_train_steps must be at least 1 (or null), got {every_n_train_steps}.")
        self.every_n_train_steps = every_n_train_steps
        self.saved_path: Path | None = None
        self.saved_at: tuple[int, int] | None = None  # (epoch, global step)
        self.stop = StopSignals()
        self._lock: IO[str] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self._lock = lock_run_folder(self.folder(trainer))
        if trainer.world_size > 1 and self.every_n_train_steps:
            rank_zero_warn("LatestCheckpoint writes only at epoch ends under several processes: the middle of an epoch "
                           "cannot be resumed exactly there.")

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            try:
                restore_rng_state(state_dict["rng"])
            except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as error:
                raise UserError(f"The checkpoint's random number states ({self.state_key}) are not as mit-lightning "
                                f"writes them ({type(error).__name__}: {error}); the file was altered.") from None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:  # one rank stopping alone would leave the others waiting in a collective
            self.stop.install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.stop.uninstall()
            if self._lock is not None:
                self._lock.close()  # releases the lock
                self._lock = None

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        # Lightning resumes a checkpoint of an epoch's last step as a finished epoch (no validation, no epoch end):
        # there, the epoch end saves and stops instead
        last_step = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if not last_step:
            self._stop_if_asked()
        steps = self.every_n_train_steps
        if steps and trainer.world_size == 1 and trainer.global_step % steps == 0 and not last_step:
            self.save(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if not trainer.sanity_checking:
            self._stop_if_asked()

    def on_train_epoch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.save(trainer)
        self._stop_if_asked()

    def _stop_if_asked(self) -> None:
        if self.stop.received is not None:
            raise Stopped(self.stop.received)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Stopped during validation: the checkpoint says validation has just begun, so a resumed run validates the
        epoch again from its first batch (the metrics of the batches already seen are not in the checkpoint)."""
        if trainer.validating and trainer.state.fn == TrainerFn.FITTING:
            begun = {"ready": 1, "started": 1, "processed": 1, "completed": 0}
            progress = {"total": dict(begun), "current": dict(begun), "is_last_batch": False}
            checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"] = progress

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        fitting = trainer.state.fn == TrainerFn.FITTING
        saved_now = self.saved_at is not None and self.saved_at[1] == trainer.global_step and not trainer.validating
        if fitting and not trainer.sanity_checking and trainer.world_size == 1 and not saved_now:
            self.save(trainer)
        if fitting:  # Lightning tears down only the active loop: stopped in validation, the training DataLoader's
            trainer.fit_loop.teardown()  # persistent workers would be left waiting, and the process never exits
        if trainer.is_global_zero:
            where = (f"the latest checkpoint is {self.saved_path} (epoch {self.saved_at[0]}, step {self.saved_at[1]}); "
                     "resume with the same command plus --ckpt_path last" if self.saved_path else
                     "no checkpoint of this run was written yet")
            name = getattr(exception, "signum", signal.SIGTERM).name
            print(f"Stopped by {name}: {where}.", file=sys.stderr, flush=True)

    def folder(self, trainer: L.Trainer) -> Path:
        """Where the run's ModelCheckpoint writes (Lightning's own rule when there is none)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath)
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return Path(save_dir, str(logger.name), version, "checkpoints")
        return Path(trainer.default_root_dir, "checkpoints")

    def save(self, trainer: L.Trainer) -> None:
        """Write to a temporary file, then rename it over the previous one: never a half-written last.ckpt."""
        final = self.folder(trainer) / f"{LAST_NAME}{CHECKPOINT_SUFFIX}"
        partial = final.with_name(final.name + ".partial")
        if trainer.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
        try:
            trainer.save_checkpoint(partial, weights_only=False)  # everything: optimizer, schedulers, loops
            if trainer.is_global_zero:
                os.replace(partial, final)
        except OSError as error:  # a full disk, a quota, a folder gone: the previous last.ckpt stays as it was
            partial.unlink(missing_ok=True)
            kept = f"the previous one ({final}) is intact" if final.is_file() else "there is no earlier one"
            raise UserError(f"Cannot write the latest checkpoint ({error.strerror or error}); {kept}. Free space "
                            "or fix the run folder, then resume with the same command plus --ckpt_path last.") from None
        self.saved_path, self.saved_at = final, (trainer.current_epoch, trainer.global_step)


def lock_run_folder(folder: Path) -> IO[str]:
    """Only one process trains into a run folder: two resuming the same run would overwrite each other's checkpoints.

    The lock is the kernel's (flock on ``<folder>/.lock``): it ends with the process, however that ends.
    """
    folder.mkdir(parents=True, exist_ok=True)
    file = open(folder / ".lock", "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise UserError(f"The run folder '{folder}' is in use by another training process (PID {holder}): two runs "
                        "writing one folder overwrite each other's checkpoints. Wait for it to end, or stop it "
                        "first.") from None
    file.truncate(0)
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def disable_save_last(trainer: L.Trainer) -> None:
    """`LatestCheckpoint` owns last.ckpt; ModelCheckpoint's save_last only refreshes it with a new best."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            callback.save_last = False
            rank_zero_info("last.ckpt is written by mit's LatestCheckpoint at every epoch end (ModelCheckpoint.save_last "
                           "is switched off, it would only refresh it with a new best).")


# --- finding the runs of a config ---------------------------------------------------------------------
_DEFAULT_LOGGER_NAMES = {"TensorBoardLogger": "lightning_logs", "CSVLogger": "lightning_logs"}
_VERSION = re.compile(r"^version_(\d+)$")


def _value(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    return default if value is None else value


def checkpoint_folders(trainer_config: Any) -> list[Path]:
    """The checkpoint folders a config's runs write to (one per run version), from the parsed trainer config."""
    root = Path(_value(trainer_config, "default_root_dir", "."))
    for callback in _value(trainer_config, "callbacks", []) or []:
        if str(_value(callback, "class_path", "")).endswith("ModelCheckpoint"):
            dirpath = _value(_value(callback, "init_args"), "dirpath")
            if dirpath:
                return [Path(dirpath)]
            break
    logger = _value(trainer_config, "logger", True)
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        return [root / "checkpoints"]
    if logger is True:
        save_dir, name, version = root, "lightning_logs", None
    else:
        kind = str(_value(logger, "class_path", "")).rsplit(".", 1)[-1]
        if kind not in _DEFAULT_LOGGER_NAMES:
            raise UserError(f"Cannot find the runs of a {kind or 'custom'} logger by myself: give the checkpoint path "
                            "itself to --ckpt_path.")
        args = _value(logger, "init_args")
        save_dir = Path(_value(args, "save_dir", root))
        name, version = _value(args, "name", _DEFAULT_LOGGER_NAMES[kind]), _value(args, "version")
    base = Path(save_dir, name) if name else Path(save_dir)
    if version is not None:
        return [base / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"]
    return sorted(base.glob("version_*/checkpoints"))


def latest_checkpoint(trainer_config: Any) -> Path | None:
    """The newest checkpoint a config's runs can resume from, or None before their first one.

    Usually a run's last.ckpt; a step checkpoint of the run's own ModelCheckpoint written after it (with its
    loops and optimizer, so resumable) is newer work and counts as the latest. Half-written files never count.
    """
    files = [path for folder in checkpoint_folders(trainer_config) for path in folder.glob(f"*{CHECKPOINT_SUFFIX}")]
    for path in sorted((path for path in files if path.is_file()), key=lambda path: path.stat().st_mtime, reverse=True):
        if path.stem == LAST_NAME or _resumable(path):
            return path
    return None


def _resumable(path: Path) -> bool:
    try:
        checkpoint = load_weights_file(path)
    except UserError:
        return False
    return isinstance(checkpoint, dict) and "loops" in checkpoint and bool(checkpoint.get("optimizer_states"))


def best_checkpoint(last: Path) -> Path | None:
    """The best checkpoint the run of `last` recorded (its ModelCheckpoint state), if it still exists."""
    checkpoint = load_weights_file(last)
    states = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    for key, state in (states.items() if isinstance(states, dict) else ()):
        best = state.get("best_model_path") if isinstance(state, dict) else None
        if str(key).startswith("ModelCheckpoint") and best:
            if not isinstance(best, str):
                raise UserError(f"'{last}' records its best checkpoint as a {type(best).__name__}, not a path; the file "
                                "was altered. Give a checkpoint path to --ckpt_path.")
            path = Path(best)
            return path if path.is_file() else None
    return None


def run_version(checkpoint: Path) -> int | str | None:
    """The logger version of the run a checkpoint belongs to (``<name>/version_N/checkpoints/x.ckpt``)."""
    folder = checkpoint.resolve().parent
    if folder.name != "checkpoints":
        return None
    match = _VERSION.match(folder.parent.name)
    return int(match.group(1)) if match else folder.parent.name


#: data settings that change where and how fast samples are read, never which samples nor their order
_FREE_DATA_SETTINGS = frozenset({"root", "image_dir", "num_workers", "pin_memory", "eval_batch_size"})


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_resumed_data(checkpoint: dict[str, Any], data_config: dict[str, Any], source: Path) -> None:
    """A resumed epoch goes on at (batches done × batch size) in the epoch's order: with another batch size or other
    data, samples would be trained twice or skipped. Refused mid-epoch; at an epoch end, a warning."""
    stored = (checkpoint.get(CONFIG_ENTRY) or {}).get("data")
    if not isinstance(stored, dict):
        return
    before, now = _plain(stored.get("init_args") or {}), _plain(data_config.get("init_args") or {})
    changed = [f"data.{key} {before.get(key)!r} → {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if key not in _FREE_DATA_SETTINGS and before.get(key) != now.get(key)]
    if stored.get("class_path") != data_config.get("class_path"):
        changed.insert(0, f"data {stored.get('class_path')} → {data_config.get('class_path')}")
    if not changed:
        return
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    mid_epoch = not progress.get("is_last_batch", True) and progress.get("current", {}).get("processed", 0) > 0
    what = "; ".join(changed)
    if mid_epoch:
        raise UserError(f"'{source}' stopped in the middle of an epoch trained with other data settings ({what}): "
                        "going on would train some samples twice and skip others. Resume with the checkpoint's "
                        f"settings, or start a new run from its weights (--model.init_weights {source}).")
    rank_zero_warn(f"Resuming '{source}' with other data settings ({what}): it goes on from an epoch end, so no sample "
                   "is trained twice, but the rest of the run differs from the run it continues.")


def follow_moved_run(stored: dict[str, Any], checkpoint: Path) -> None:
    """A run folder moved or copied elsewhere: evaluating its checkpoint writes beside it as it is now, never to the
    folder recorded in its config when it was trained (`stored`, the checkpoint's run config, is changed in place)."""
    trainer = stored.get("trainer")
    run = checkpoint.resolve().parent.parent  # <save_dir>/<name>/version_N/checkpoints/x.ckpt
    if not isinstance(trainer, dict) or checkpoint.resolve().parent.name != "checkpoints":
        return
    logger = trainer.get("logger", True)
    args = logger.get("init_args") if isinstance(logger, dict) else None
    if logger is True or logger is None:
        name = "lightning_logs"
    elif isinstance(args, dict) and "save_dir" in args:
        name = args.get("name") or ""
    else:
        return
    save_dir = run.parent.parent if name else run.parent
    if name and run.parent.name != name:
        return  # not the logger's layout: the checkpoints were written somewhere of the user's choosing
    if isinstance(args, dict):
        if Path(str(args["save_dir"])).resolve() == save_dir:
            return
        args["save_dir"] = str(save_dir)
    elif Path(str(trainer.get("default_root_dir") or ".")).resolve() == save_dir:
        return
    trainer["default_root_dir"] = str(save_dir)


def resolve_ckpt_path(subcommand: str, ckpt_path: str | None, trainer_config: Any) -> Path | str | None:
    """``last`` / ``best`` → that file of the config's newest run; a given path is checked to exist.

    ``mit fit --ckpt_path last`` before any run of the config starts a new run (so a job script can
    always pass it); evaluating ``last`` or ``best`` needs a run.
    """
    if ckpt_path in (None, "hpc", "registry"):
        return ckpt_path
    if ckpt_path not in ("last", "best"):
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise UserError(f"Checkpoint not found: '{path}'. Give the path of a .ckpt file written by `mit fit`, "
                            "or 'last' / 'best' for the newest run of the config.")
        return path
    folders = checkpoint_folders(trainer_config)
    last = latest_checkpoint(trainer_config)
    where = ", ".join(str(folder) for folder in folders) or "no run folder yet"
    if last is None:
        if subcommand == "fit" and ckpt_path == "last":
            rank_zero_info(f"No earlier run of this config to resume ({where}): starting a new run.")
            return None
        raise UserError(f"--ckpt_path {ckpt_path}: this config has no run with a checkpoint yet ({where}). "
                        "Train it first (mit fit --config ...), or give a checkpoint path.")
    if ckpt_path == "last":
        return last
    best = best_checkpoint(last)
    if best is None:
        raise UserError(f"--ckpt_path best: the newest run ('{last.parent}') has no best checkpoint (no "
                        "ModelCheckpoint with a monitored metric, or its file was removed). Give a checkpoint path.")
    return best
