"""A small dynamic batcher: concurrent requests run together, per adapter, in one model thread.

Requests wait in a queue; the batcher takes the first, then whatever arrives within `max_wait`
seconds, up to `max_batch_size` samples (a segmentation request with three expressions is three
samples). It runs them grouped by adapter, each group as few forward passes as the size allows,
in a single worker thread that owns the models: the loaded LLM is never used by two threads, and
switching adapters (`SharedBackbones.activate`) happens only there. While a batch runs, the next
one fills up, so under load the batches grow by themselves and at low load a request waits at
most `max_wait`.

A batch that fails fails only its own requests; the loop goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

#: runs one adapter's samples in one forward pass: (adapter name, samples) -> one result per sample
Runner = Callable[[str, Sequence[Any]], list[Any]]


@dataclass
class _Job:
    adapter: str
    samples: Sequence[Any]
    future: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher has run: forward passes, samples, and the largest batch."""

    batches: int = 0
    samples: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def record(self, size: int) -> None:
        self.batches += 1
        self.samples += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples, "largest_batch": self.largest,
                "mean_batch_size": self.samples / self.batches if self.batches else None,
                "batch_sizes": dict(sorted(self.sizes.items()))}


class DynamicBatcher:
    """Start it inside the event loop (`start`), `await submit(adapter, samples)` from request handlers."""

    def __init__(self, runner: Runner, max_batch_size: int = 8, max_wait: float = 0.01) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}.")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._held: _Job | None = None  # taken from the queue, but it would have overfilled the batch

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mit-model")
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, adapter: str, samples: Sequence[Any]) -> list[Any]:
        """The results of `samples` (in order), once the batch they joined has run."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(adapter, samples, future))
        return await future

    async def _serve(self) -> None:
        while True:
            jobs = await self._collect()
            groups: dict[str, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.adapter, []).append(job)
            for adapter, group in groups.items():
                await self._run(adapter, group)

    async def _collect(self) -> list[_Job]:
        """The next batch: the first job, then those arriving within max_wait, up to max_batch_size samples."""
        loop = asyncio.get_running_loop()
        if self._held is not None:
            first, self._held = self._held, None
        else:
            first = await self._queue.get()
        jobs, size = [first], len(first.samples)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - loop.time()
            try:
                job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if size + len(job.samples) > self.max_batch_size:
                self._held = job  # first of the next batch
                break
            jobs.append(job)
            size += len(job.samples)
        return jobs

    async def _run(self, adapter: str, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        samples = [sample for job in jobs for sample in job.samples]
        results: list[Any] = []
        try:
            for start in range(0, len(samples), self.max_batch_size):  # a single request may exceed the size
                chunk = samples[start:start + self.max_batch_size]
                results += await loop.run_in_executor(self._executor, self.runner, adapter, chunk)
                self.stats.record(len(chunk))
        except Exception as error:  # noqa: BLE001 -- reported to these requests; the server goes on
            log.exception("A batch of %d samples for '%s' failed", len(samples), adapter)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        position = 0
        for job in jobs:
            if not job.future.done():  # a client that went away cancelled its future
                job.future.set_result(results[position:position + len(job.samples)])
            position += len(job.samples)
