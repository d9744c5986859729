"""`callstream loadtest grpc`: load a service's gRPC API, then write the JSON result (and the HTML report).

The result's `summary` covers the requests scheduled after the ramp-up (the measured window); the time series
and the samples cover the whole run. Latency is that of successful requests, from the scheduled send time
(see runner.py); failures are counted by gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from callstream.loadtest import SCHEMA
from callstream.loadtest.live import Rows, fmt_ms, show_progress
from callstream.loadtest.runner import NOT_SENT, Call, LoadPlan, LoadRun, Recorder
from callstream.loadtest.stats import histogram, interval_for, percentile, summarize, timeseries

# Sends later than this (p99) are worth a warning: the server or the load generator fell behind.
LATE_SEND_WARN_MS = 50.0


def machine_info() -> dict[str, Any]:
    from callstream.bench.report import machine

    info = machine()
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _round_s(x: float) -> float:
    return round(x, 6)


def build_result(
    rec: Recorder,
    plan: LoadPlan,
    config: dict[str, Any],
    *,
    machine: dict[str, Any] | None = None,
    include_samples: bool = True,
    name: str = "",
) -> dict[str, Any]:
    """The JSON result (docs/loadtest.md) of one finished run."""
    # Times to the microsecond, as the samples are written: the summary is then exactly that of the samples.
    rec = dataclasses.replace(
        rec,
        scheduled=[_round_s(x) for x in rec.scheduled],
        started=[_round_s(x) for x in rec.started],
        ended=[_round_s(x) for x in rec.ended],
    )
    n = len(rec.status)
    start = plan.ramp_up_s
    window = [i for i in range(n) if rec.scheduled[i] >= start]
    ok = [i for i in window if rec.status[i] == "OK"]
    latency = [(rec.ended[i] - rec.scheduled[i]) * 1000.0 for i in ok]
    service = [(rec.ended[i] - rec.started[i]) * 1000.0 for i in ok]
    lag = [(rec.started[i] - rec.scheduled[i]) * 1000.0 for i in window if rec.status[i] != NOT_SENT]
    end = max((rec.ended[i] for i in window), default=start)
    elapsed = max(end - start, 1e-9)
    statuses = Counter(rec.status[i] for i in window)
    summary: dict[str, Any] = {
        "requests": len(window),
        "ok": len(ok),
        "errors": len(window) - len(ok),
        "error_rate": round((len(window) - len(ok)) / len(window), 6) if window else 0.0,
        "measured_from_s": start,
        "elapsed_s": round(elapsed, 3),
        "target_rps": plan.rate if plan.mode == "open" else None,
        "throughput_rps": round(len(ok) / elapsed, 3),
        "peak_in_flight": rec.peak_in_flight,
        "latency_ms": summarize(latency),
        "service_time_ms": summarize(service),
        "send_lag_ms": summarize(lag),
    }
    ttft = rec.extras.get("ttft_service_ms")
    if ttft is not None:
        # Time to first token from the scheduled time, like the latency (send lag + time from the send).
        shifted = [(rec.started[i] - rec.scheduled[i]) * 1000.0 + v for i in ok if (v := ttft[i]) is not None]
        summary["ttft_ms"] = summarize(shifted)
    tokens = rec.extras.get("completion_tokens")
    if tokens is not None:
        total = sum(v for i in ok if (v := tokens[i]) is not None)
        summary["output_tokens"] = int(total)
        summary["output_tokens_per_s"] = round(total / elapsed, 3)
    warnings = []
    if lag and percentile(sorted(lag), 99) > LATE_SEND_WARN_MS:
        p99 = percentile(sorted(lag), 99)
        saturated = plan.mode == "open" and rec.peak_in_flight >= plan.max_in_flight
        why = (
            f"all {plan.max_in_flight} in-flight slots were taken (the server fell behind)"
            if saturated
            else "the load generator was late (CPU-bound?) or the server fell behind"
        )
        warnings.append(
            f"sends were late by {p99:.0f} ms (p99): {why}; latency counts the wait from the scheduled time"
        )
    if statuses.get(NOT_SENT):
        warnings.append(f"{statuses[NOT_SENT]} requests were due but never sent (no free in-flight slot)")
    span = max((rec.ended[-1] if rec.ended else 0.0), plan.duration_s or 0.0)
    interval = interval_for(span)
    all_lat = [(rec.ended[i] - rec.scheduled[i]) * 1000.0 if rec.status[i] == "OK" else None for i in range(n)]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "grpc",
        "name": name or f"{config.get('service', 'grpc')} {plan.mode}-loop",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(rec.wall_t0 or time.time())),
        "machine": machine or machine_info(),
        "config": {**config, **plan.as_dict()},
        "summary": summary,
        "status_counts": dict(sorted(statuses.items(), key=lambda kv: (kv[0] != "OK", -kv[1]))),
        "error_examples": dict(rec.examples),
        "warnings": warnings,
        "histogram": histogram(latency),
        "timeseries": {
            "interval_s": interval,
            "binned_by": "completion time",
            **timeseries(rec.ended, all_lat, interval_s=interval, span_s=span, started_s=rec.started),
        },
    }
    if include_samples:
        result["samples"] = {
            "scheduled_s": [_round_s(x) for x in rec.scheduled],
            "started_s": [_round_s(x) for x in rec.started],
            "ended_s": [_round_s(x) for x in rec.ended],
            "status": list(rec.status),
        }
    return result


def progress_rows(run: LoadRun) -> Rows:
    rec = run.recorder
    now = run.elapsed()
    ok, errors, lat = rec.window(now, 2.0)
    done = len(rec.status)
    failed = sum(1 for s in rec.status if s != "OK") if done < 200_000 else None
    return [
        ("elapsed", f"{now:.1f} s" + (f" / {run.plan.duration_s:.0f} s" if run.plan.duration_s else "")),
        ("sent / done", f"{rec.sent} / {done}" + (f" / {run.plan.requests}" if run.plan.requests else "")),
        ("in flight", str(rec.in_flight)),
        ("rate (last 2 s)", f"{(ok + errors) / 2.0:.1f} /s ({errors / 2.0:.1f} errors/s)"),
        ("errors (total)", "-" if failed is None else str(failed)),
        (
            "p50 / p99 (last 2 s)",
            f"{fmt_ms(percentile(lat, 50) if lat else None)} / {fmt_ms(percentile(lat, 99) if lat else None)}",
        ),
        ("p50 / p99 (run, approx.)", f"{fmt_ms(rec.live.approx(50))} / {fmt_ms(rec.live.approx(99))}"),
    ]


async def run_with_progress(call: Call, plan: LoadPlan, title: str, *, live: bool = True) -> Recorder:
    run = LoadRun(call, plan)
    done = asyncio.Event()
    display = asyncio.create_task(show_progress(title, lambda: progress_rows(run), done, enabled=live))
    try:
        return await run.run()
    finally:
        done.set()
        await display


async def grpc_loadtest(
    *,
    service: str,
    target: str,
    plan: LoadPlan,
    target_kwargs: dict[str, Any],
    live: bool = True,
    include_samples: bool = True,
    name: str = "",
) -> dict[str, Any]:
    from callstream.loadtest.targets import make_target

    machine = machine_info()
    svc = make_target(service, target, **target_kwargs)
    try:
        rec = await run_with_progress(svc, plan, f"loadtest {service} @ {target}", live=live)
    finally:
        await svc.close()
    tls = target_kwargs.get("tls")
    config = {
        "service": service,
        "target": target,
        "connections": target_kwargs.get("connections", 1),
        "payload_source": str(target_kwargs.get("payloads") or "default"),
        "tls": tls.as_dict() if tls is not None else None,
        **svc.describe(),
    }
    if service == "router":
        config["texts_per_request"] = target_kwargs.get("texts_per_request", 1)
    with contextlib.suppress(OSError):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return build_result(rec, plan, config, machine=machine, include_samples=include_samples, name=name)


def write_result(result: dict[str, Any], out: Path) -> Path:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out
