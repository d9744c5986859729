"""The summary of a result on the terminal (and as a markdown table for docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from callstream.loadtest.compare import fmt_num


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    s = result["summary"]
    rows: list[tuple[str, str]] = []
    if result["kind"] == "grpc":
        lat = s["latency_ms"]
        rows += [
            ("requests", f"{s['requests']} ({s['ok']} ok, {s['errors']} errors)"),
            (
                "throughput",
                f"{fmt_num(s['throughput_rps'])} req/s"
                + (f" (target {fmt_num(s['target_rps'])})" if s.get("target_rps") else ""),
            ),
            ("latency p50 / p95 / p99", f"{fmt_num(lat['p50'])} / {fmt_num(lat['p95'])} / {fmt_num(lat['p99'])} ms"),
            ("latency max", f"{fmt_num(lat['max'])} ms"),
            (
                "service time p50 / p99",
                f"{fmt_num(s['service_time_ms']['p50'])} / {fmt_num(s['service_time_ms']['p99'])} ms",
            ),
        ]
        if "ttft_ms" in s:
            rows.append(
                ("time to first token p50 / p99", f"{fmt_num(s['ttft_ms']['p50'])} / {fmt_num(s['ttft_ms']['p99'])} ms")
            )
            rows.append(("output tokens/s", fmt_num(s.get("output_tokens_per_s"))))
    else:
        e2e = s["e2e_ms"]
        rows += [
            (
                "events",
                f"{s['published']} published, {s['completed']} summarized, {s['dead_lettered']} dead-lettered, "
                f"{s['missing']} missing",
            ),
            ("e2e p50 / p95 / p99", f"{fmt_num(e2e['p50'])} / {fmt_num(e2e['p95'])} / {fmt_num(e2e['p99'])} ms"),
        ]
        for stage, d in (result.get("stages") or {}).items():
            lat = d["latency_ms"]
            rows.append((f"-> {stage} p50 / p95", f"{fmt_num(lat['p50'])} / {fmt_num(lat['p95'])} ms"))
        for group, value in (result.get("lag") or {}).get("max", {}).items():
            rows.append((f"max lag {group}", fmt_num(value)))
    for status, count in (result.get("status_counts") or {}).items():
        if status not in ("OK", "summarized"):
            rows.append((f"status {status}", str(count)))
    rows += [("warning", w) for w in result.get("warnings") or []]
    return rows


def print_summary(result: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=str(result.get("name", "load test")), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_rows(result):
        table.add_row(k, v)
    (console or Console(stderr=True)).print(table)
