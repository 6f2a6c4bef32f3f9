"""Measuring on a GPU or a CPU, for the benchmark (`mit bench`) and the training-cost record (`mit compare`).

Peak memory: on a GPU, `torch.cuda.max_memory_allocated` (weights included); on a CPU, how far the
process's peak resident memory rose (Linux `/proc`, else None): a rough figure, since freed memory
the allocator keeps is not counted again.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
from typing import Any

import torch

MIB = 2**20


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
        self.mib = self.so_far()

    def so_far(self) -> float | None:
        """The peak since the block began, read while it runs."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        peak = _status_kib("VmHWM")
        if self._start_kib is None or peak is None:
            return None
        return max(peak - self._start_kib, 0) / 1024
