"""Load-test results: statistics, the HTML report (its numbers are the JSON's), and comparing two results."""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from callstream.cli import app
from callstream.loadtest.compare import compare, metrics_of
from callstream.loadtest.grpc_load import build_result
from callstream.loadtest.render import render_comparison, render_result
from callstream.loadtest.runner import LoadPlan, Recorder
from callstream.loadtest.stats import histogram, percentile, summarize


def synthetic_result(scale: float = 1.0, errors: int = 0, seed: int = 7, rate: float = 20.0) -> dict[str, Any]:
    """An open-loop run of 60 s at `rate`, latencies lognormal around 20 ms * scale, `errors` UNAVAILABLE."""
    rng = random.Random(seed)
    rec = Recorder()
    n = int(60 * rate)
    fail = set(rng.sample(range(n), errors))
    for i in range(n):
        scheduled = i / rate
        started = scheduled + rng.uniform(0, 0.0005)
        latency = rng.lognormvariate(0, 0.5) * 0.02 * scale
        status = "UNAVAILABLE" if i in fail else "OK"
        rec.record(scheduled, started, started + latency, status, None, "Connection refused")
    rec.ended, rec.scheduled, rec.started, rec.status = zip(  # completion order, as the runner records them
        *sorted(zip(rec.ended, rec.scheduled, rec.started, rec.status, strict=True)), strict=True
    )
    rec.ended, rec.scheduled, rec.started, rec.status = (
        list(rec.ended),
        list(rec.scheduled),
        list(rec.started),
        list(rec.status),
    )
    plan = LoadPlan(mode="open", rate=rate, duration_s=60.0, deadline_s=30.0)
    config = {"service": "router", "target": "127.0.0.1:50052", "payloads": 13}
    return build_result(rec, plan, config, machine={"cpus": 2, "loadavg_start": [1.0, 1.0, 1.0]}, name=f"x{scale}")


def cells(page: str) -> dict[str, tuple[str, str]]:
    """data-metric -> (data-value, shown text) of every tagged cell of a report."""
    found = re.findall(r'data-metric="([^"]+)" data-value="([^"]*)">([^<]*)<', page)
    return {m: (v, shown) for m, v, shown in found}


def lookup(tree: dict[str, Any], path: str) -> Any:
    """The JSON value at a report path: dotted names, [key] for keys with dots, [i] for list items."""
    node: Any = tree
    for bracketed, plain in re.findall(r"\[([^\]]*)\]|([^.\[\]]+)", path):
        part = bracketed or plain
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_percentiles_are_nearest_rank_and_summaries_exact() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([5.0], 99.9) == 5.0
    s = summarize([3.0, 1.0, 2.0])
    assert (s["count"], s["min"], s["p50"], s["max"], s["mean"]) == (3, 1.0, 2.0, 3.0, 2.0)
    assert summarize([])["p50"] is None
    h = histogram([1.0, 1.01, 10.0, 100.0])
    assert sum(h["counts"]) == 4 and len(h["edges_ms"]) == len(h["counts"]) + 1
    assert h["edges_ms"][0] <= 1.0 and h["edges_ms"][-1] > 100.0


def test_the_json_summary_agrees_with_its_own_samples() -> None:
    result = synthetic_result(errors=12)
    smp = result["samples"]
    ok = sorted(
        (e - s) * 1000 for s, e, st in zip(smp["scheduled_s"], smp["ended_s"], smp["status"], strict=True) if st == "OK"
    )
    lat = result["summary"]["latency_ms"]
    for name, p in (("p50", 50), ("p95", 95), ("p99", 99)):
        assert lat[name] == round(percentile(ok, p), 4)
    assert lat["count"] == len(ok) == 1200 - 12
    assert sum(result["histogram"]["counts"]) == len(ok)
    assert result["status_counts"] == {"OK": 1188, "UNAVAILABLE": 12}
    assert sum(result["timeseries"]["ok"]) == 1188 and sum(result["timeseries"]["errors"]) == 12


def test_html_report_shows_exactly_the_json_numbers_and_embeds_its_charts(tmp_path: Path) -> None:
    result = synthetic_result(errors=5)
    # Through a file, as `callstream loadtest report` does.
    path = tmp_path / "run.json"
    path.write_text(json.dumps(result))
    out = CliRunner().invoke(app, ["loadtest", "report", str(path)])
    assert out.exit_code == 0, out.output
    page = (tmp_path / "run.html").read_text()
    shown = cells(page)
    for key in ("p50", "p95", "p99", "p90", "max", "min", "mean"):
        metric = f"summary.latency_ms.{key}"
        value = lookup(result, metric)
        assert float(shown[metric][0]) == value, metric
        assert float(shown[metric][1]) == value, metric  # the text a reader sees is the JSON number
    for metric in ("summary.requests", "summary.errors", "summary.throughput_rps", "status_counts[UNAVAILABLE]"):
        assert float(shown[metric][1]) == lookup(result, metric), metric
    # Every histogram bucket in the report is the JSON's bucket.
    buckets = {m: v for m, v in shown.items() if m.startswith("histogram.counts[")}
    assert buckets and all(int(v[1]) == lookup(result, m) for m, v in buckets.items())
    assert sum(int(v[1]) for v in buckets.values()) == result["summary"]["ok"]
    # Self-contained: PNG charts inline (histogram, latency and throughput over time, statuses), nothing fetched.
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {alt for alt, _ in images} >= {
        "latency histogram",
        "latency over time",
        "throughput over time",
        "errors by status",
    }
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page


def test_report_renders_a_run_without_any_success() -> None:
    rec = Recorder()
    for i in range(5):
        rec.record(i * 0.1, i * 0.1, i * 0.1 + 0.01, "UNAVAILABLE", None, "refused")
    result = build_result(rec, LoadPlan(mode="open", rate=10, duration_s=0.5), {"service": "router"}, machine={})
    page = render_result(result)
    assert result["summary"]["latency_ms"]["p50"] is None
    assert "latency histogram: no data" in page and cells(page)["status_counts[UNAVAILABLE]"][1] == "5"


def test_compare_gives_the_ratio_per_metric_and_flags_regressions_over_the_threshold() -> None:
    before = synthetic_result(scale=1.0)
    after = synthetic_result(scale=1.3, errors=30)  # 30 % slower, 2.5 % errors
    deltas = {d.name: d for d in compare(before, after, threshold=0.1)}
    p99 = deltas["latency_ms.p99"]
    assert p99.ratio == pytest.approx(after["summary"]["latency_ms"]["p99"] / before["summary"]["latency_ms"]["p99"])
    assert p99.ratio == pytest.approx(1.3, rel=0.05) and p99.regression
    assert deltas["latency_ms.p50"].regression
    assert deltas["error_rate"].regression and deltas["error_rate"].ratio == float("inf")
    assert deltas["throughput_rps"].better == "higher" and not deltas["throughput_rps"].regression
    # Over a 50 % threshold the latency change is no regression; the new errors still are.
    loose = {d.name: d for d in compare(before, after, threshold=0.5)}
    assert not loose["latency_ms.p99"].regression and loose["error_rate"].regression
    # Faster is an improvement, never a regression.
    assert not any(d.regression for d in compare(after, before, threshold=0.1) if d.name.startswith("latency"))
    assert compare(after, before, threshold=0.1)[2].improvement  # latency_ms.p50
    assert set(metrics_of(before)) >= {"throughput_rps", "error_rate", "latency_ms.p95", "service_time_ms.p99"}


def test_compare_command_prints_ratios_and_exits_non_zero_on_a_regression(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(synthetic_result(scale=1.0)))
    b.write_text(json.dumps(synthetic_result(scale=1.3)))
    runner = CliRunner()
    html, js = tmp_path / "cmp.html", tmp_path / "cmp.json"
    out = runner.invoke(
        app,
        ["loadtest", "compare", str(a), str(b), "--threshold", "0.1", "--html", str(html), "--json", str(js)],
        env={"COLUMNS": "200"},
    )
    assert out.exit_code == 1, out.output
    line = next(ln for ln in out.output.splitlines() if "latency_ms.p99 " in ln)
    data = json.loads(js.read_text())
    p99 = next(m for m in data["metrics"] if m["metric"] == "latency_ms.p99")
    assert f"{p99['ratio']:.3f}" in line and "REGRESSION" in line
    assert "regression(s): latency_ms" in out.output
    page = html.read_text()
    assert "REGRESSION" in page and "data:image/png;base64," in page
    # Same run twice: ratio 1 everywhere, exit 0.
    same = runner.invoke(app, ["loadtest", "compare", str(a), str(a)])
    assert same.exit_code == 0 and "0 regression(s)" in same.output
    # Unrelated files: exit 2.
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert runner.invoke(app, ["loadtest", "compare", str(a), str(bad)]).exit_code == 2


def test_comparison_page_lists_every_metric_with_both_values() -> None:
    before, after = synthetic_result(1.0), synthetic_result(0.8)
    deltas = compare(before, after, 0.1)
    page = render_comparison(before, after, deltas, 0.1, ("a.json", "b.json"))
    shown = cells(page)
    for d in deltas:
        if d.a is not None:
            assert float(shown[f"a.{d.name}"][0]) == d.a and float(shown[f"b.{d.name}"][0]) == d.b
    assert "no regression over 10%" in page
