"""What a fit costs: training-step time, peak memory and parameter counts, written beside its logs."""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mit_lightning.measuring import PeakMemory, synchronize

COST_FILE = "training_cost.json"


class TrainingCost(Callback):
    """Writes `training_cost.json` into the run's log directory when training ends.

    - step_ms: median time from `on_train_batch_start` to `on_train_batch_end` (forward, backward and
      optimizer step; data loading and validation are not in it), synchronised on a GPU. The first
      `warmup` steps (allocator and cache warm-up) are left out while later ones exist.
    - step_cpu_ms: the median CPU time the process spent over the same steps (all its threads): on a
      busy CPU-only machine the wall time follows the other processes' load, the CPU time hardly does.
    - threads: torch's CPU threads during the run.
    - peak_memory_mib: over the training loop, validation included (`mit_lightning.measuring.PeakMemory`: on
      a GPU the peak allocated memory, weights included; on a CPU the rise of the peak resident size).
    - trainable / total parameters of the model.

    A run resumed from a checkpoint continues the figures of the part before it (its step times and
    peak memory travel in the checkpoint), so they describe the whole run.

    Every step waits for the GPU, so add it to measure a run, not to every run.

    Args:
        warmup: first training steps left out of the median.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self._times: list[float] = []
        self._cpu_times: list[float] = []
        self._start = self._cpu_start = 0.0
        self._memory: PeakMemory | None = None
        self._earlier_peak_mib: float | None = None  # of the run's part before a resume

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a checkpoint's state is loaded into it
            self._times, self._cpu_times, self._earlier_peak_mib = [], [], None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._memory = PeakMemory(pl_module.device).__enter__()

    def state_dict(self) -> dict[str, Any]:
        return {"times": list(self._times), "cpu_times": list(self._cpu_times), "peak_memory_mib": self._peak_mib()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        record = state_dict if isinstance(state_dict, dict) else {}
        times, cpu_times, peak = record.get("times"), record.get("cpu_times"), record.get("peak_memory_mib")
        if not (_non_negative_numbers(times) and _non_negative_numbers(cpu_times) and len(times) == len(cpu_times)
                and (peak is None or _non_negative_numbers([peak]))):
            warnings.warn("The checkpoint's training-cost record is not a list of step times: the cost figures "
                          "cover only the training after this resume.", stacklevel=2)
            return
        self._times, self._cpu_times, self._earlier_peak_mib = list(times), list(cpu_times), peak

    def _peak_mib(self) -> float | None:
        now = self._memory.so_far() if self._memory is not None else None
        known = [mib for mib in (self._earlier_peak_mib, now) if mib is not None]
        return max(known) if known else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._times.append(time.perf_counter() - self._start)
        self._cpu_times.append(time.process_time() - self._cpu_start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._memory.__exit__(None, None, None)
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / COST_FILE).write_text(json.dumps(self.summary(pl_module), indent=2) + "\n")

    def summary(self, pl_module: L.LightningModule) -> dict[str, Any]:
        skip = self.warmup if len(self._times) > self.warmup else 0
        timed, cpu_timed = self._times[skip:], self._cpu_times[skip:]
        parameters = list(pl_module.parameters())
        return {
            "step_ms": 1000 * statistics.median(timed) if timed else None,
            "step_cpu_ms": 1000 * statistics.median(cpu_timed) if cpu_timed else None,
            "steps_timed": len(timed),
            "threads": torch.get_num_threads(),
            "peak_memory_mib": self._peak_mib(),
            "memory_measure": self._memory.measure,
            "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
            "total_parameters": sum(p.numel() for p in parameters),
        }


def _non_negative_numbers(values: Any) -> bool:
    """A list of finite, non-negative numbers (seconds or MiB), as `state_dict` writes them."""
    return isinstance(values, list) and all(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        for value in values)
