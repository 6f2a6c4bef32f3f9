"""Progress as plain lines, for output that is not a terminal (a log file, nohup, SLURM, CI, a pipe).

Rich's bar redraws one terminal line and writes nothing a file keeps; `mit` swaps it for `LineProgress`
when stdout is not a terminal: one line at the end of every training epoch (after its validation) and every
`every_n_steps` batches of a long epoch, with the step, the speed and the metrics logged so far.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn


def _value(value: Any) -> str:
    number = float(value)
    return f"{number:.4g}"


class LineProgress(ProgressBar):
    """One line per training epoch and per `every_n_steps` batches, for logs that are files.

    Args:
        every_n_steps: also print a line every this many batches within an epoch (training and evaluation).
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started = self._last = 0.0
        self._samples = self._batches = 0

    # --- ProgressBar's switch ---------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    # --- one line ---------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        if self.is_enabled:
            print(text, file=sys.stdout, flush=True)

    def _speed(self) -> str:
        """Batches (and samples) per second, up to the last batch counted."""
        seconds = max(self._last - self._started, 1e-9)
        speed = f"{self._batches / seconds:.2f} it/s"
        return speed + (f", {self._samples / seconds:.1f} samples/s" if self._samples else "")

    def _metrics(self, prefixes: tuple[str, ...]) -> str:
        metrics = {
            name: value for name, value in self.trainer.callback_metrics.items()
            if name.startswith(prefixes) and getattr(value, "numel", lambda: 1)() == 1
        }
        return "  ".join(f"{name} {_value(value)}" for name, value in sorted(metrics.items()))

    def _start(self) -> None:
        self._started = self._last = time.perf_counter()
        self._samples = self._batches = 0

    def _count(self, batch: Any) -> None:
        self._last = time.perf_counter()
        self._batches += 1
        prompts = batch.get("prompt") if isinstance(batch, dict) else None
        self._samples += len(prompts) if prompts is not None else 0

    # --- training ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        """A run resumed mid-epoch starts there, without an epoch start: its clock starts with the fit."""
        self._start()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._count(batch)
        done = batch_idx + 1
        if self.every_n_steps and self._batches % self.every_n_steps == 0 and done < self.total_train_batches:
            self._line(f"{self._epoch()} batch {done}/{self._total(self.total_train_batches)} (step "
                       f"{trainer.global_step}), {self._speed()}  {self._metrics(('train/',))}".rstrip())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._line(f"{self._epoch()} done: {self._batches} batches (step {trainer.global_step}), {self._speed()}, "
                   f"{time.perf_counter() - self._started:.1f} s with validation  "
                   f"{self._metrics(('train/', 'val/'))}".rstrip())

    def _epoch(self) -> str:
        total = self.trainer.max_epochs
        return f"epoch {self.trainer.current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")

    @staticmethod
    def _total(total: int | float) -> str:
        return str(int(total)) if total != float("inf") else "?"

    # --- evaluation and prediction on their own (a fit's validation is summed up in its epoch's line) ---
    def _evaluating_alone(self, trainer) -> bool:
        return trainer.state.fn != TrainerFn.FITTING and not trainer.sanity_checking

    def _evaluation_start(self, trainer) -> None:
        if self._evaluating_alone(trainer):
            self._start()

    def _evaluation_batch(self, trainer, name: str, batch: Any) -> None:
        if not self._evaluating_alone(trainer):
            return
        self._count(batch)
        if self.every_n_steps and self._batches % self.every_n_steps == 0:
            self._line(f"{name} batch {self._batches}, {self._speed()}")

    def _evaluation_end(self, trainer, name: str) -> None:
        if self._evaluating_alone(trainer):
            self._line(f"{name} done: {self._batches} batches in {time.perf_counter() - self._started:.1f} s, "
                       f"{self._speed()}")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch(trainer, "validate", batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch(trainer, "test", batch)

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch(trainer, "predict", batch)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "predict")
