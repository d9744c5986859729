from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from callstream.core.batching import DynamicBatcher


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_keep_their_order() -> None:
    seen: list[int] = []

    def double(items: Sequence[int]) -> list[int]:
        seen.append(len(items))
        time.sleep(0.02)
        return [i * 2 for i in items]

    async def go() -> list[int]:
        batcher = DynamicBatcher(double, name="t-order", max_batch_size=8, max_wait_ms=20)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        finally:
            await batcher.stop()

    assert run(go()) == [i * 2 for i in range(20)]
    assert max(seen) == 8 and sum(seen) == 20
    assert len(seen) <= 4


def test_a_lone_request_waits_at_most_max_wait() -> None:
    async def go() -> float:
        batcher = DynamicBatcher(lambda xs: list(xs), name="t-wait", max_batch_size=64, max_wait_ms=30)
        started = time.perf_counter()
        await batcher.submit(1)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert run(go()) < 1.0


def test_max_idle_gathers_a_trickle_into_one_batch_and_lets_a_lone_request_go() -> None:
    seen: list[int] = []

    def record(items: Sequence[int]) -> list[int]:
        seen.append(len(items))
        return list(items)

    async def go() -> float:
        batcher = DynamicBatcher(record, name="t-idle", max_batch_size=16, max_wait_ms=5000, max_idle_ms=200)
        await batcher.start()

        async def later(i: int) -> int:
            await asyncio.sleep(0.02 * i)  # one every 20 ms: each within max_idle_ms of the one before
            return await batcher.submit(i)

        try:
            await asyncio.gather(*(later(i) for i in range(8)))
            started = time.perf_counter()
            await batcher.submit(99)
            return time.perf_counter() - started
        finally:
            await batcher.stop()

    lone_wait = run(go())
    assert seen == [8, 1]
    # The lone request went after max_idle_ms (0.2 s), not after max_wait_ms (5 s).
    assert lone_wait < 2.5


def test_a_failure_returned_for_one_item_fails_only_that_item() -> None:
    def fn(items: Sequence[int]) -> list[int | Exception]:
        return [ValueError(f"bad {i}") if i == 3 else i for i in items]

    async def go() -> list[object]:
        batcher = DynamicBatcher(fn, name="t-item", max_batch_size=8, max_wait_ms=20)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
        await batcher.stop()
        return list(results)

    results = run(go())
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"


def test_a_batch_that_raises_is_retried_item_by_item() -> None:
    calls: list[list[int]] = []

    def fn(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if 2 in items:
            raise RuntimeError("poisoned")
        return [i + 100 for i in items]

    async def go() -> list[object]:
        batcher = DynamicBatcher(fn, name="t-raise", max_batch_size=4, max_wait_ms=20)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        await batcher.stop()
        return list(results)

    results = run(go())
    assert results[0] == 100 and results[1] == 101 and results[3] == 103
    assert isinstance(results[2], RuntimeError)
    assert calls[0] == [0, 1, 2, 3] and [2] in calls


def test_the_model_runs_off_the_event_loop_thread() -> None:
    threads: list[str] = []

    def fn(items: Sequence[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return list(items)

    async def go() -> None:
        batcher = DynamicBatcher(fn, name="t-thread", max_batch_size=2, max_wait_ms=1)
        await batcher.submit(1)
        await batcher.stop()

    run(go())
    assert threads and threads[0].startswith("batch-t-thread")


def test_invalid_batch_size_is_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda xs: list(xs), name="t-bad", max_batch_size=0)
