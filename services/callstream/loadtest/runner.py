"""The load generator: closed-loop (N clients) or open-loop (a fixed rate), free of coordinated omission.

Open loop: request i has a scheduled send time fixed in advance by the rate (and the ramp-up). Its latency is
measured from that scheduled time, not from when it was actually sent. When the server falls behind and the
client cannot send on time (all `max_in_flight` slots taken, or the event loop busy), the wait counts in the
latency, as it does for a real caller who arrived at the scheduled time. The time from the actual send
(`service_time`) and the delay of the send itself (`send_lag`) are recorded too: when the two latencies differ,
the server (or the load generator) fell behind. This is wrk2's correction, applied per request.

Closed loop: N clients each send a request, wait for its answer, send the next. The scheduled time is the send
time, so latency and service time are the same (a closed loop is blind to queueing by construction: use it to
find the capacity, and an open loop below it to measure latency).

Every loop is bounded: by the duration or the request count, then `drain_s` for requests still in flight, which
are then cancelled and counted as CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from callstream.loadtest.stats import LiveHistogram

Mode = Literal["open", "closed"]
# call(i, timeout_s) sends request i; returns optional extra metrics (e.g. {"ttft_ms": 12.0}); raises on failure.
Call = Callable[[int, float | None], Awaitable[Mapping[str, float] | None]]

NOT_SENT = "NOT_SENT"  # due (scheduled) before the run ended, but no in-flight slot freed up in time
CANCELLED = "CANCELLED"


@dataclass
class LoadPlan:
    mode: Mode = "open"
    rate: float = 10.0  # open loop: requests per second after the ramp-up
    concurrency: int = 1  # closed loop: clients
    duration_s: float | None = 10.0  # total, ramp-up included
    requests: int | None = None  # stop after this many requests (with or without a duration)
    ramp_up_s: float = 0.0  # open: the rate grows linearly from 0; closed: clients start evenly spread
    deadline_s: float | None = None  # gRPC deadline per request
    max_in_flight: int = 1000  # open loop: requests outstanding at once; beyond it, sends wait (and it shows)
    drain_s: float = 30.0  # after the last send, how long in-flight requests may still finish

    def validate(self) -> None:
        if self.duration_s is None and self.requests is None:
            raise ValueError("give a duration or a request count")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")
        if self.requests is not None and self.requests <= 0:
            raise ValueError("requests must be > 0")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.ramp_up_s < 0 or (self.duration_s is not None and self.ramp_up_s >= self.duration_s):
            raise ValueError("ramp-up must be >= 0 and shorter than the duration")
        if self.max_in_flight < 1:
            raise ValueError("max-in-flight must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rate": self.rate if self.mode == "open" else None,
            "concurrency": self.concurrency if self.mode == "closed" else None,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "ramp_up_s": self.ramp_up_s,
            "deadline_s": self.deadline_s,
            "max_in_flight": self.max_in_flight if self.mode == "open" else None,
            "drain_s": self.drain_s,
        }


def scheduled_offset(i: int, rate: float, ramp_up_s: float = 0.0) -> float:
    """Seconds from the start at which request i (0-based) is due.

    The rate grows linearly from 0 to `rate` over the ramp-up: n(t) = rate*t^2/(2*ramp) requests are due by t.
    """
    if ramp_up_s <= 0:
        return i / rate
    ramp_requests = rate * ramp_up_s / 2.0
    if i <= ramp_requests:
        return math.sqrt(2.0 * ramp_up_s * i / rate)
    return ramp_up_s + (i - ramp_requests) / rate


def status_of(exc: BaseException) -> tuple[str, str]:
    """(status name, detail) of a failed request: the gRPC status code, or CLIENT_<ExceptionType>."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name, str(exc.details() or "")
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code().name, str(getattr(exc, "details", lambda: "")() or "")
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED, "still in flight when the run ended"
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED", "client-side timeout"
    return f"CLIENT_{type(exc).__name__}", str(exc)[:300]


@dataclass
class Recorder:
    """Every finished request, in completion order. Times are seconds from the run's start (monotonic)."""

    scheduled: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    extras: dict[str, list[float | None]] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # one error detail per status
    live: LiveHistogram = field(default_factory=LiveHistogram)
    sent: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    t0: float = 0.0  # loop.time() at the start
    wall_t0: float = 0.0  # time.time() at the start

    def record(
        self,
        scheduled: float,
        started: float,
        ended: float,
        status: str,
        extra: Mapping[str, float] | None = None,
        detail: str = "",
    ) -> None:
        n = len(self.status)
        self.scheduled.append(scheduled)
        self.started.append(started)
        self.ended.append(ended)
        self.status.append(status)
        for key in extra or {}:
            self.extras.setdefault(key, [None] * n)
        for key, values in self.extras.items():
            values.append((extra or {}).get(key))
        if status == "OK":
            self.live.add((ended - scheduled) * 1000.0)
        elif status not in self.examples and detail:
            self.examples[status] = detail[:300]

    def window(self, now: float, seconds: float) -> tuple[int, int, list[float]]:
        """(ok, errors, sorted OK latencies in ms) of requests that finished in the last `seconds`."""
        ok = errors = 0
        lat: list[float] = []
        for i in range(len(self.ended) - 1, -1, -1):
            if self.ended[i] < now - seconds:
                break
            if self.status[i] == "OK":
                ok += 1
                lat.append((self.ended[i] - self.scheduled[i]) * 1000.0)
            else:
                errors += 1
        return ok, errors, sorted(lat)


class LoadRun:
    """Runs one plan against one `call`; `recorder` fills as requests finish (read it for live progress)."""

    def __init__(self, call: Call, plan: LoadPlan) -> None:
        plan.validate()
        self.call = call
        self.plan = plan
        self.recorder = Recorder()
        self.stop = asyncio.Event()
        self.finished_sending = False

    def elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self.recorder.t0

    def _time_up(self, t: float) -> bool:
        return self.plan.duration_s is not None and t >= self.plan.duration_s

    async def _one(self, i: int, scheduled: float | None) -> None:
        """Send request i; `scheduled` None (closed loop) means: scheduled when sent."""
        rec = self.recorder
        loop = asyncio.get_running_loop()
        started = loop.time() - rec.t0
        if scheduled is None:
            scheduled = started
        rec.sent += 1
        rec.in_flight += 1
        rec.peak_in_flight = max(rec.peak_in_flight, rec.in_flight)
        try:
            extra = await self.call(i, self.plan.deadline_s)
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded; cancellation re-raised
            status, detail = status_of(exc)
            rec.record(scheduled, started, loop.time() - rec.t0, status, None, detail)
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
        else:
            rec.record(scheduled, started, loop.time() - rec.t0, "OK", extra)
        finally:
            rec.in_flight -= 1

    async def run(self) -> Recorder:
        loop = asyncio.get_running_loop()
        self.recorder.t0 = loop.time()
        self.recorder.wall_t0 = time.time()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, self.stop.set)
        try:
            if self.plan.mode == "open":
                await self._open_loop()
            else:
                await self._closed_loop()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)
        return self.recorder

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        self.finished_sending = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.plan.drain_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _open_loop(self) -> None:
        plan, rec = self.plan, self.recorder
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(plan.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        # Sends stop for good at the end of the duration plus the drain time, even if no slot ever frees up.
        if plan.duration_s is not None:
            last_due = plan.duration_s
        else:
            last_due = scheduled_offset((plan.requests or 1) - 1, plan.rate, plan.ramp_up_s)
        give_up = last_due + plan.drain_s
        i = 0
        while not self.stop.is_set():
            if plan.requests is not None and i >= plan.requests:
                break
            due = scheduled_offset(i, plan.rate, plan.ramp_up_s)
            if self._time_up(due):
                break
            now = loop.time() - rec.t0
            if due > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), due - now)
                if self.stop.is_set():
                    break
            acquired = False
            while not self.stop.is_set() and loop.time() - rec.t0 < give_up:
                try:
                    await asyncio.wait_for(slots.acquire(), timeout=0.25)
                    acquired = True
                    break
                except TimeoutError:
                    continue
            if not acquired:
                # Requests that were due but never sent are failures, counted from their scheduled time.
                now = loop.time() - rec.t0
                while (plan.requests is None or i < plan.requests) and (
                    d := scheduled_offset(i, plan.rate, plan.ramp_up_s)
                ) <= now:
                    if self._time_up(d):
                        break
                    rec.record(d, now, now, NOT_SENT, None, f"no free slot of max_in_flight={plan.max_in_flight}")
                    i += 1
                break
            task = asyncio.create_task(self._one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _t: slots.release())
            i += 1
        await self._drain(tasks)

    async def _closed_loop(self) -> None:
        plan = self.plan
        loop = asyncio.get_running_loop()
        counter = iter(range(plan.requests if plan.requests is not None else 2**62))

        async def client(k: int) -> None:
            start_at = k * plan.ramp_up_s / plan.concurrency
            delay = start_at - (loop.time() - self.recorder.t0)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            while not self.stop.is_set():
                now = loop.time() - self.recorder.t0
                if self._time_up(now):
                    return
                i = next(counter, None)
                if i is None:
                    return
                await self._one(i, None)

        tasks = {asyncio.create_task(client(k)) for k in range(plan.concurrency)}
        # Clients stop sending at the end of the duration (or on Ctrl-C); what is in flight then gets drain_s.
        pending = set(tasks)
        while pending and not self.stop.is_set() and not self._time_up(loop.time() - self.recorder.t0):
            _, pending = await asyncio.wait(pending, timeout=0.25)
        await self._drain(pending)
