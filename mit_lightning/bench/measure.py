"""Timing and peak memory of a piece of work, on a GPU or a CPU.

Peak memory: on a GPU, `torch.cuda.max_memory_allocated` (weights included); on a CPU, how far the
process's peak resident memory rose (Linux `/proc`, else None): a rough figure, since freed memory
the allocator keeps is not counted again.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Any, Callable

import torch

MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Give back what earlier work left behind before measuring the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """The current resident size in KiB, after resetting the kernel's peak (Linux); None where impossible.

    Memory freed earlier is handed back to the system first (glibc keeps it otherwise), so that the
    measured work's own allocations raise the resident size again.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


class PeakMemory:
    """Peak memory during a block, in MiB (see the module docstring for what it means per device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self._start_kib: int | None = None

    @property
    def measure(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_peak_rss_rise"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start_kib = _reset_peak_rss()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / MIB
            return
        peak = _status_kib("VmHWM")
        if self._start_kib is not None and peak is not None:
            self.mib = max(peak - self._start_kib, 0) / 1024


def measure(step: Callable[[], Any], *, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Median milliseconds of `steps` timed calls after `warmup` calls, and the peak memory of them all.

    On a CPU also `cpu_ms`, the median CPU time the process spent per call: where other processes share
    the cores, wall time measures them too, CPU time (with one thread) hardly does.
    """
    times, cpu_times = [], []
    memory = PeakMemory(device)
    try:
        with memory:
            for _ in range(warmup):
                step()
            for _ in range(steps):
                synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                synchronize(device)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    except torch.OutOfMemoryError:
        release(device)
        return {"ms": None, "peak_memory_mib": None, "memory_measure": memory.measure, "error": "out of memory"}
    measured = {"ms": 1000 * statistics.median(times)}
    if device.type == "cpu":
        measured["cpu_ms"] = 1000 * statistics.median(cpu_times)
    return {**measured, "peak_memory_mib": memory.mib, "memory_measure": memory.measure}
