"""One dynamic batcher in front of each model, shared by the gRPC and the Kafka path.

Callers `await batcher.submit(item)`; a single worker task gathers items until `max_batch_size` are
waiting, `max_wait_ms` has passed since the first one or, when set, `max_idle_ms` since the last one,
then runs the model function on the whole batch in a worker thread (so the event loop keeps serving gRPC
and Kafka while the model runs).
New items queue up while a batch runs and form the next batch: the model is never idle while work waits.

A batch function reports a per-item failure by returning the exception in that item's place; if it
raises instead, each item is retried on its own so that one bad input fails alone instead of failing its
batch-mates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from callstream.core import metrics

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[In, Out]):
    """Collects concurrent requests into batches for `batch_fn(items) -> outputs` (same order)."""

    def __init__(
        self,
        batch_fn: Callable[[Sequence[In]], Sequence[Out | BaseException]],
        *,
        name: str,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        max_idle_ms: float | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._batch_fn = batch_fn
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_idle_s = self.max_wait_s if max_idle_ms is None else min(max_idle_ms, max_wait_ms) / 1000.0
        self._queue: asyncio.Queue[_Pending[In, Out]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # One thread: the model runs one batch at a time, which is what batching is for.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    async def start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, item: In) -> Out:
        if self._queue is None:
            await self.start()
        assert self._queue is not None
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        metrics.BATCH_QUEUE_DEPTH.labels(self.name).set(self._queue.qsize())
        return await future

    async def _collect(self) -> list[_Pending[In, Out]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                # Take whatever is already waiting without waiting longer.
                while len(batch) < self.max_batch_size and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), min(remaining, self.max_idle_s)))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.cancelled()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            batch = await self._collect()
            metrics.BATCH_QUEUE_DEPTH.labels(self.name).set(self._queue.qsize())
            if not batch:
                continue
            started = time.perf_counter()
            for pending in batch:
                metrics.BATCH_QUEUE_SECONDS.labels(self.name).observe(started - pending.enqueued_at)
            metrics.BATCH_SIZE.labels(self.name).observe(len(batch))
            items = [p.item for p in batch]
            try:
                outputs = await loop.run_in_executor(self._executor, self._call, items)
                for pending, output in zip(batch, outputs, strict=True):
                    _deliver(pending, output)
            except Exception as exc:  # noqa: BLE001 - isolate the failing item below
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                else:
                    await self._run_one_by_one(batch)
            metrics.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    async def _run_one_by_one(self, batch: list[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        for pending in batch:
            try:
                (output,) = await loop.run_in_executor(self._executor, self._call, [pending.item])
                _deliver(pending, output)
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                if not pending.future.done():
                    pending.future.set_exception(exc)

    def _call(self, items: list[In]) -> Sequence[Out | BaseException]:
        outputs = self._batch_fn(items)
        if len(outputs) != len(items):
            raise RuntimeError(f"{self.name}: batch function returned {len(outputs)} outputs for {len(items)} inputs")
        return outputs


def _deliver(pending: _Pending[In, Out], output: Out | BaseException) -> None:
    if pending.future.done():
        return
    if isinstance(output, BaseException):
        pending.future.set_exception(output)
    else:
        pending.future.set_result(output)
