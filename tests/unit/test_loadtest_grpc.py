"""The gRPC load generator against tiny in-process grpc.aio servers: schedules, modes, statuses, and the
coordinated-omission correction (latency counted from the scheduled send time when the server stalls)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from callstream.loadtest.grpc_load import build_result, grpc_loadtest
from callstream.loadtest.runner import LoadPlan, LoadRun, scheduled_offset
from callstream.loadtest.stats import percentile
from callstream.loadtest.targets import TlsOptions
from callstream.v1 import router_pb2, router_pb2_grpc

Behaviour = Callable[[int, router_pb2.ClassifyRequest, grpc.aio.ServicerContext], Awaitable[None]]


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """Answers Classify; `behaviour(n, request, context)` runs first for the n-th request (0-based)."""

    def __init__(self, behaviour: Behaviour | None = None, serial: bool = False) -> None:
        self.behaviour = behaviour
        self.count = 0
        self.lock = asyncio.Lock() if serial else None

    async def Classify(  # noqa: N802
        self, request: router_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ClassifyResponse:
        n = self.count
        self.count += 1
        if self.lock is not None:
            async with self.lock:
                if self.behaviour:
                    await self.behaviour(n, request, context)
        elif self.behaviour:
            await self.behaviour(n, request, context)
        return router_pb2.ClassifyResponse(
            results=[router_pb2.Classification(queue="q", rule="default") for _ in request.texts],
            classifier_version="fake",
        )


async def serve(servicer: FakeRouter) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def run_against(servicer: FakeRouter, plan: LoadPlan, **kwargs: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        server, address = await serve(servicer)
        try:
            return await grpc_loadtest(
                service="router",
                target=address,
                plan=plan,
                target_kwargs={"tls": TlsOptions(), **kwargs},
                live=False,
            )
        finally:
            await server.stop(0)

    return asyncio.run(go())


def test_scheduled_offsets_follow_the_rate_and_the_linear_ramp() -> None:
    assert [scheduled_offset(i, 10.0) for i in range(3)] == [0.0, 0.1, 0.2]
    # 2 s ramp to 10/s: 10 requests are due during the ramp (area of the triangle), then 10/s.
    ramp = [scheduled_offset(i, 10.0, 2.0) for i in range(14)]
    assert ramp[0] == 0.0 and ramp == sorted(ramp)
    assert ramp[10] == pytest.approx(2.0)
    assert ramp[11] - ramp[10] == pytest.approx(0.1)
    assert ramp[1] - ramp[0] > ramp[9] - ramp[8]  # slower at first


def test_open_loop_sends_at_the_rate_and_records_every_request() -> None:
    result = run_against(FakeRouter(), LoadPlan(mode="open", rate=100.0, duration_s=1.0, deadline_s=5.0))
    s = result["summary"]
    assert s["requests"] == 100 and s["ok"] == 100 and s["errors"] == 0
    scheduled = result["samples"]["scheduled_s"]
    assert sorted(scheduled) == pytest.approx([i / 100 for i in range(100)])
    assert s["send_lag_ms"]["p50"] < 50
    assert result["status_counts"] == {"OK": 100}
    assert sum(result["histogram"]["counts"]) == 100
    assert sum(result["timeseries"]["ok"]) == 100 and sum(result["timeseries"]["sent"]) == 100


def test_closed_loop_runs_n_clients_for_a_request_count() -> None:
    in_flight = 0
    peak = 0

    async def slow(n: int, request: Any, context: Any) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1

    result = run_against(FakeRouter(slow), LoadPlan(mode="closed", concurrency=4, duration_s=None, requests=40))
    s = result["summary"]
    assert s["requests"] == 40 and s["ok"] == 40
    assert peak == 4
    assert s["target_rps"] is None
    # Closed loop: no schedule to fall behind, latency is the service time.
    assert s["latency_ms"]["p50"] == s["service_time_ms"]["p50"]
    assert s["latency_ms"]["p50"] >= 10


def test_errors_are_counted_by_grpc_status_with_an_example() -> None:
    async def flaky(n: int, request: Any, context: grpc.aio.ServicerContext) -> None:
        if n % 5 == 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "InvalidInputError: nothing to classify")
        if n % 5 == 2:
            await asyncio.sleep(1.5)  # past the 0.5 s deadline

    result = run_against(FakeRouter(flaky), LoadPlan(mode="open", rate=50.0, duration_s=1.0, deadline_s=0.5))
    counts = result["status_counts"]
    assert counts == {"OK": 30, "INVALID_ARGUMENT": 10, "DEADLINE_EXCEEDED": 10}
    assert result["summary"]["errors"] == 20 and result["summary"]["error_rate"] == 0.4
    assert "nothing to classify" in result["error_examples"]["INVALID_ARGUMENT"]
    assert sum(result["timeseries"]["errors"]) == 20


def test_latency_of_requests_delayed_by_a_stalled_server_counts_from_their_scheduled_time() -> None:
    """A server that stalls 1 s on one request, at a fixed 50 req/s with one request in flight at most.

    The requests scheduled during the stall cannot be sent until it ends. Counted from their scheduled time
    (what the loadtest reports), each one's latency is at least the stall time that remained when it was due;
    counted from the actual send (the naive measurement, kept as service_time), they look fast.
    """
    stall_s = 1.0

    async def stall_once(n: int, request: Any, context: Any) -> None:
        if n == 20:
            await asyncio.sleep(stall_s)

    plan = LoadPlan(mode="open", rate=50.0, duration_s=2.5, deadline_s=5.0, max_in_flight=1)
    result = run_against(FakeRouter(stall_once, serial=True), plan)
    smp = result["samples"]
    rows = sorted(zip(smp["scheduled_s"], smp["started_s"], smp["ended_s"], smp["status"], strict=True))
    assert len(rows) == 125 and all(r[3] == "OK" for r in rows)
    stalled = rows[20]
    stall_end = stalled[2]
    assert stall_end - stalled[1] >= stall_s
    during = [r for r in rows if stalled[0] < r[0] < stall_end]
    assert len(during) >= 45  # ~50 requests were due while the server stalled
    for scheduled, started, ended, _ in during:
        latency = ended - scheduled
        remaining = stall_end - scheduled
        assert latency >= remaining  # counted from the schedule: the wait is in it
        assert started >= stall_end - 1e-3  # ...although it could only be sent after the stall
        assert ended - started < 0.25  # the naive measurement would report a fast request
    # The report says so too: half the delayed requests are above half the stall (from the schedule), while the
    # naive service time shows one slow request.
    latencies = sorted((r[2] - r[0]) * 1000 for r in rows)
    naive = sorted((r[2] - r[1]) * 1000 for r in rows)
    assert sum(x > 500 for x in latencies) >= 20
    assert sum(x > 500 for x in naive) == 1
    s = result["summary"]
    assert s["latency_ms"]["p90"] > 400 and s["service_time_ms"]["p90"] < 100
    assert s["latency_ms"]["max"] >= stall_s * 1000
    assert s["send_lag_ms"]["max"] >= 0.9 * stall_s * 1000
    assert any("late" in w for w in result["warnings"])
    assert s["latency_ms"]["p99"] == round(percentile(latencies, 99), 4)


def test_with_free_slots_requests_are_sent_on_time_and_the_queueing_shows_in_both() -> None:
    """The same stall with enough in-flight slots: sends stay on schedule, and the server's queue is measured."""

    async def stall_once(n: int, request: Any, context: Any) -> None:
        if n == 20:
            await asyncio.sleep(1.0)

    plan = LoadPlan(mode="open", rate=50.0, duration_s=2.0, deadline_s=5.0, max_in_flight=1000)
    result = run_against(FakeRouter(stall_once, serial=True), plan)
    s = result["summary"]
    assert s["send_lag_ms"]["p99"] < 100
    assert s["latency_ms"]["p90"] > 400 and s["service_time_ms"]["p90"] > 400


def test_a_run_that_is_stopped_ends_cleanly_and_keeps_what_it_measured() -> None:
    async def go() -> Any:
        server, address = await serve(FakeRouter())
        try:
            channel = grpc.aio.insecure_channel(address)
            stub = router_pb2_grpc.RouterServiceStub(channel)

            async def call(i: int, timeout: float | None) -> None:
                await stub.Classify(router_pb2.ClassifyRequest(texts=["x"]), timeout=timeout)
                return None

            run = LoadRun(call, LoadPlan(mode="open", rate=100.0, duration_s=30.0))
            asyncio.get_running_loop().call_later(0.5, run.stop.set)
            rec = await asyncio.wait_for(run.run(), 10)
            await channel.close()
            return rec, run.plan
        finally:
            await server.stop(0)

    rec, plan = asyncio.run(go())
    assert 20 <= len(rec.status) <= 80
    result = build_result(rec, plan, {"service": "router"}, machine={})
    assert result["summary"]["ok"] == len(rec.status)


def test_payloads_come_from_a_csv_given_on_the_command_line(tmp_path: Path) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text("text\nmy card is lost\nrefund please\n")
    seen: list[str] = []

    async def remember(n: int, request: router_pb2.ClassifyRequest, context: Any) -> None:
        seen.extend(request.texts)

    result = run_against(
        FakeRouter(remember), LoadPlan(mode="open", rate=50, duration_s=None, requests=4), payloads=csv
    )
    assert result["summary"]["ok"] == 4
    assert seen == ["my card is lost", "refund please", "my card is lost", "refund please"]
    assert result["config"]["payloads"] == 2


def test_a_hung_server_cannot_hang_the_run() -> None:
    """No deadline, one slot, a server that never answers: the run still ends (duration + drain), and every
    request that was due is counted, as NOT_SENT or CANCELLED, from its scheduled time."""

    async def hang(n: int, request: Any, context: Any) -> None:
        await asyncio.sleep(30)

    plan = LoadPlan(mode="open", rate=20.0, duration_s=1.0, deadline_s=None, max_in_flight=1, drain_s=0.5)
    t = time.monotonic()
    result = run_against(FakeRouter(hang), plan)
    assert time.monotonic() - t < 5
    assert result["status_counts"] == {"NOT_SENT": 19, "CANCELLED": 1}
    assert result["summary"]["ok"] == 0 and result["summary"]["latency_ms"]["p50"] is None
    assert any("never sent" in w for w in result["warnings"])
