"""Timing, peak memory and operation counts of a piece of work, on a GPU or a CPU.

Counts (`count_operations`, one profiled call under torch.profiler): `casts`, the `aten::_to_copy` calls
(dtype casts, autocast's included, and device copies); `launches`, on a GPU the kernel launches the host
makes (`cudaLaunchKernel` and its kin; a replayed CUDA graph is one `cudaGraphLaunch`), on a CPU the
operator calls that do the work (ATen operators that call no other, allocations and views left out; kernels inductor generates for the
CPU are not seen by the profiler, operators they call are).

Peak memory: `mit_lightning.measuring.PeakMemory`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from mit_lightning.measuring import PeakMemory, release, synchronize


def measure(cases: dict[str, Callable[[], Any]], *, steps: int, warmup: int,
            device: torch.device) -> dict[str, dict[str, Any]]:
    """Per case: the median milliseconds of `steps` timed calls after `warmup` calls, and its peak memory.

    Each case first makes its `warmup` calls on its own, inside one peak-memory probe, so the figure
    includes what the case allocates once (e.g. optimizer state); with no warm-up there is no memory
    figure. Then the timed calls alternate between the cases (a, b, a, b, ...) with no probe in
    between: a change in what else the machine runs affects every case alike, so their ratios stay
    meaningful on a shared machine. On a CPU also `cpu_ms`, the median CPU time the process spent per
    call: wall time measures the other processes too, CPU time (with one thread) hardly does.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu_times: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, float | None] = {name: None for name in cases}
    measure_name = PeakMemory(device).measure
    try:
        for name, step in cases.items():
            if warmup:
                with PeakMemory(device) as memory:
                    for _ in range(warmup):
                        step()
                peaks[name] = memory.mib
        for _ in range(steps):
            for name, step in cases.items():
                synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    except torch.OutOfMemoryError:
        release(device)
        failed = {"ms": None, "peak_memory_mib": None, "memory_measure": measure_name, "error": "out of memory"}
        return {name: dict(failed) for name in cases}
    results = {}
    for name, step in cases.items():
        measured: dict[str, Any] = {"ms": 1000 * statistics.median(times[name])}
        if device.type == "cpu":
            measured["cpu_ms"] = 1000 * statistics.median(cpu_times[name])
        results[name] = {**measured, "peak_memory_mib": peaks[name], "memory_measure": measure_name,
                         **count_operations(step, device)}
    return results


#: the CUDA runtime and driver calls that start work on the GPU
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                          "cudaLaunchCooperativeKernel", "cudaGraphLaunch"})
CAST = "aten::_to_copy"
#: ATen operators that allocate or view memory without running a kernel on it
NO_KERNEL = frozenset({"aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::resize_",
                       "aten::_reshape_alias", "aten::alias", "aten::_unsafe_view", "aten::lift_fresh", "aten::set_"})


def count_operations(step: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Casts and launches of one call of `step` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    events = profiler.events()
    casts = sum(event.name == CAST for event in events)
    if device.type == "cuda":
        launches = sum(event.name in LAUNCH_CALLS for event in events)
    else:
        launches = sum(event.name.startswith("aten::") and event.name not in NO_KERNEL
                       and not any(child.name.startswith("aten::") for child in event.cpu_children)
                       for event in events)
    return {"casts": casts, "launches": launches}
