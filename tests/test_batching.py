"""The dynamic batcher of `mit serve`: batches by adapter, within the size and wait limits, and a failing
batch fails only its own requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mit_lightning.serve.batching import DynamicBatcher


class Recorder:
    """A runner that records each call (adapter, samples, thread) and answers sample * 10."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.threads: set[int] = set()
        self.fail_on = fail_on

    def __call__(self, adapter: str, samples):
        self.calls.append((adapter, list(samples)))
        self.threads.add(threading.get_ident())
        if adapter == self.fail_on:
            raise RuntimeError("the model broke")
        return [sample * 10 for sample in samples]


def run_all(batcher: DynamicBatcher, requests: list[tuple[str, list[int]]]) -> list:
    async def main():
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(adapter, samples) for adapter, samples in requests),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_requests_arriving_together_run_together_grouped_by_adapter():
    runner = Recorder()
    results = run_all(DynamicBatcher(runner, max_batch_size=8, max_wait=0.2),
                      [("a", [1]), ("b", [2]), ("a", [3, 4]), ("b", [5])])
    assert results == [[10], [20], [30, 40], [50]]
    assert runner.calls == [("a", [1, 3, 4]), ("b", [2, 5])]
    assert len(runner.threads) == 1 and threading.get_ident() not in runner.threads  # one model thread


def test_a_batch_never_exceeds_the_size_and_a_request_too_big_for_it_is_split():
    runner = Recorder()
    batcher = DynamicBatcher(runner, max_batch_size=3, max_wait=0.2)
    results = run_all(batcher, [("a", [1, 2]), ("a", [3, 4]), ("a", [5, 6, 7, 8, 9])])
    assert results == [[10, 20], [30, 40], [50, 60, 70, 80, 90]]
    assert [len(samples) for _, samples in runner.calls] == [2, 2, 3, 2]  # [3,4] waits rather than overfill
    assert batcher.stats.as_dict()["largest_batch"] == 3 and batcher.stats.samples == 9


def test_a_lone_request_waits_no_longer_than_max_wait():
    async def main():
        batcher = DynamicBatcher(Recorder(), max_batch_size=64, max_wait=0.05)
        await batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await batcher.submit("a", [1])
        waited = loop.time() - started
        await batcher.stop()
        return result, waited

    result, waited = asyncio.run(main())
    assert result == [10] and waited < 1.0


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_goes_on():
    runner = Recorder(fail_on="broken")
    results = run_all(DynamicBatcher(runner, max_batch_size=8, max_wait=0.2),
                      [("broken", [1]), ("fine", [2]), ("broken", [3])])
    assert isinstance(results[0], RuntimeError) and isinstance(results[2], RuntimeError)
    assert results[1] == [20]


@pytest.mark.parametrize("size, wait", [(0, 0.01), (4, -1.0)])
def test_impossible_limits_are_refused(size, wait):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=size, max_wait=wait)
