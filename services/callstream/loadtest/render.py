"""The HTML report of a load-test result, and of a comparison: one self-contained file, viewable offline.

Everything shown comes from the JSON result alone (nothing is recomputed here): each number in the tables carries
its JSON path and value (`data-metric`, `data-value`), and the charts are drawn from the result's histogram and
time series. Charts are PNGs embedded as base64 data URIs; there is no script and no external resource.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from callstream.loadtest.compare import MetricDelta, fmt_num, fmt_ratio

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 8px;font-size:.9em}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4d6;border:1px solid #e0b000;padding:.5em 1em} .bad{color:#b00020;font-weight:bold}
.good{color:#08731a} img{max-width:100%;border:1px solid #eee;margin:.3em 0} .muted{color:#777;font-size:.85em}
"""

_LAT_KEYS = ("min", "mean", "p50", "p90", "p95", "p99", "p999", "max")


def _e(x: Any) -> str:
    return html.escape(str(x))


def num_cell(path: str, value: Any) -> str:
    """A table cell showing a JSON number exactly, tagged with its path and value."""
    shown = fmt_num(float(value)) if isinstance(value, int | float) and not isinstance(value, bool) else "-"
    raw = "" if value is None else _e(value)
    return f'<td class="num" data-metric="{_e(path)}" data-value="{raw}">{shown}</td>'


_PART = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


def split_path(path: str) -> list[str]:
    """A JSON path's parts: dots separate names, brackets hold a key that may contain dots (topic names)."""
    return [bracketed or plain for bracketed, plain in _PART.findall(path)]


def get_path(tree: Any, path: str) -> Any:
    """The value at `path` ("summary.latency_ms.p50", "stages[tickets.routed].latency_ms", "counts[3]")."""
    node: Any = tree
    for part in split_path(path):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


# --- charts ---------------------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _log_label(value: float, _pos: int | None = None) -> str:
    """Tick labels on a log axis: 1, 2, 3 and 5 times a power of ten, plain numbers (no 10^x)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 3) in (1.0, 2.0, 3.0, 5.0) else ""


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram_png(
    hists: Sequence[tuple[str, dict[str, list[Any]]]], marks: Sequence[tuple[str, float | None]], title: str
) -> str | None:
    """Bucket counts on a log latency axis; vertical lines at the marked percentiles."""
    hists = [(label, h) for label, h in hists if h.get("counts")]
    if not hists:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    for n, (label, h) in enumerate(hists):
        edges, counts = h["edges_ms"], h["counts"]
        widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
        if len(hists) == 1:
            ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4c72b0", edgecolor="#2d4a7a", label=label)
        else:
            ax.stairs(counts, edges, label=label, linewidth=1.6, color=f"C{n}")
    colors = {"p50": "#2a9d8f", "p95": "#e9c46a", "p99": "#e76f51"}
    for label, value in marks:
        if value is not None and value > 0:
            ax.axvline(
                value, linestyle="--", color=colors.get(label.split()[-1], "#555"), label=f"{label} {fmt_num(value)} ms"
            )
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_log_label))
    ax.xaxis.set_minor_formatter(FuncFormatter(_log_label))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def series_png(
    lines: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
    title: str,
    ylabel: str,
    *,
    logy: bool = False,
    step: bool = False,
) -> str | None:
    lines = [ln for ln in lines if any(v is not None for v in ln[2])]
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    for label, xs, ys in lines:
        y = [math.nan if v is None else v for v in ys]
        if step:
            ax.step(xs, y, where="post", label=label)
        else:
            ax.plot(xs, y, marker=".", markersize=3, label=label)
    if logy:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_log_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(_log_label))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def bars_png(counts: dict[str, int], title: str) -> str | None:
    if not counts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(counts)), dpi=100)
    names = list(counts)
    ax.barh(
        names, [counts[n] for n in names], color=["#2a9d8f" if n in ("OK", "summarized") else "#e76f51" for n in names]
    )
    for y, n in enumerate(names):
        ax.text(counts[n], y, f" {counts[n]}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("requests")
    return _png(fig)


def _img(uri: str | None, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="{uri}">' if uri else f'<p class="muted">{_e(alt)}: no data</p>'


# --- sections --------------------------------------------------------------------------------------------------


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v not in (None, ""))
    return f"<table>{body}</table>"


def _latency_table(rows: Sequence[tuple[str, str]], result: dict[str, Any]) -> str:
    """One row per latency summary (label, JSON path of the summary dict), one column per statistic."""
    head = "<tr><th></th><th>count</th>" + "".join(f"<th>{k} (ms)</th>" for k in _LAT_KEYS) + "</tr>"
    body = ""
    for label, path in rows:
        d = get_path(result, path)
        if not isinstance(d, dict):
            continue
        cells = num_cell(f"{path}.count", d.get("count")) + "".join(
            num_cell(f"{path}.{k}", d.get(k)) for k in _LAT_KEYS
        )
        body += f"<tr><th>{_e(label)}</th>{cells}</tr>"
    return f"<table>{head}{body}</table>"


def _numbers_table(rows: Sequence[tuple[str, str]], result: dict[str, Any]) -> str:
    body = "".join(
        f"<tr><th>{_e(label)}</th>{num_cell(path, get_path(result, path))}</tr>"
        for label, path in rows
        if get_path(result, path) is not None
    )
    return f"<table>{body}</table>"


def _status_table(result: dict[str, Any]) -> str:
    counts = result.get("status_counts") or {}
    examples = result.get("error_examples") or {}
    body = "".join(
        f"<tr><th>{_e(k)}</th>{num_cell(f'status_counts[{k}]', v)}<td>{_e(examples.get(k, ''))}</td></tr>"
        for k, v in counts.items()
    )
    return f"<table><tr><th>status</th><th>count</th><th>example</th></tr>{body}</table>"


def _histogram_details(hist: dict[str, list[Any]], path: str) -> str:
    edges, counts = hist.get("edges_ms") or [], hist.get("counts") or []
    rows = "".join(
        f"<tr><td class='num'>{fmt_num(edges[i])}</td><td class='num'>{fmt_num(edges[i + 1])}</td>"
        f"{num_cell(f'{path}.counts[{i}]', c)}</tr>"
        for i, c in enumerate(counts)
        if c
    )
    return (
        f"<details><summary>histogram buckets ({sum(counts)} requests)</summary><table>"
        f"<tr><th>from (ms)</th><th>to (ms)</th><th>requests</th></tr>{rows}</table></details>"
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _header(result: dict[str, Any]) -> str:
    m = result.get("machine") or {}
    load = m.get("loadavg_start")
    load_end = m.get("loadavg_end")
    machine = (
        f"{m.get('platform', '')}, {m.get('cpus', '?')} CPUs, Python {m.get('python', '')}"
        + (f", load average {load} at start" if load else "")
        + (f", {load_end} at end" if load_end else "")
    )
    warnings = "".join(f'<p class="warn">{_e(w)}</p>' for w in result.get("warnings") or [])
    config = result.get("config") or {}
    rows = [(k, v if not isinstance(v, dict | list) else _compact(v)) for k, v in config.items()]
    return (
        f"<h1>{_e(result.get('name', 'load test'))}</h1>"
        f"<p>{_e(result.get('kind'))} load test started {_e(result.get('started_at', ''))}<br>"
        f"<span class='muted'>{_e(machine)}</span></p>{warnings}<h2>Configuration</h2>{_kv_table(rows)}"
    )


def _compact(v: Any) -> str:
    import json

    return json.dumps(v, separators=(", ", ": "))[:400]


def render_grpc(result: dict[str, Any]) -> str:
    s = result["summary"]
    lat = s.get("latency_ms") or {}
    ts = result.get("timeseries") or {}
    t = ts.get("t_s") or []
    marks = [(f"{k}", lat.get(k)) for k in ("p50", "p95", "p99")]
    numbers = [
        ("requests (measured window)", "summary.requests"),
        ("ok", "summary.ok"),
        ("errors", "summary.errors"),
        ("error rate", "summary.error_rate"),
        ("target rate (req/s)", "summary.target_rps"),
        ("throughput (ok req/s)", "summary.throughput_rps"),
        ("measured from (s)", "summary.measured_from_s"),
        ("measured for (s)", "summary.elapsed_s"),
        ("peak in flight", "summary.peak_in_flight"),
        ("output tokens/s", "summary.output_tokens_per_s"),
    ]
    lat_rows = [
        ("latency (from the scheduled send)", "summary.latency_ms"),
        ("service time (from the actual send)", "summary.service_time_ms"),
        ("send lag (actual - scheduled)", "summary.send_lag_ms"),
        ("time to first token", "summary.ttft_ms"),
    ]
    interval = ts.get("interval_s", 1)
    body = _header(result)
    body += "<h2>Summary</h2>" + _numbers_table(numbers, result)
    body += "<h3>Latency (successful requests, ms)</h3>" + _latency_table(lat_rows, result)
    body += "<h2>Latency histogram</h2>" + _img(
        histogram_png([("latency", result.get("histogram") or {})], marks, "latency from the scheduled send time"),
        "latency histogram",
    )
    body += _histogram_details(result.get("histogram") or {}, "histogram")
    body += "<h2>Latency over time</h2>" + _img(
        series_png(
            [(k, t, ts.get(f"{k}_ms") or []) for k in ("p50", "p95", "p99")],
            f"latency percentiles per {interval:g} s (by completion time)",
            "latency (ms)",
            logy=True,
        ),
        "latency over time",
    )
    body += "<h2>Throughput over time</h2>" + _img(
        series_png(
            [
                ("ok / s", t, ts.get("throughput_rps") or []),
                ("errors / s", t, [e / interval for e in ts.get("errors") or []]),
                ("sent / s", t, [x / interval for x in ts.get("sent") or []]),
            ],
            f"requests per second ({interval:g} s bins)",
            "requests / s",
            step=True,
        ),
        "throughput over time",
    )
    counts = result.get("status_counts") or {}
    body += "<h2>Results by gRPC status</h2>" + _status_table(result)
    body += _img(bars_png(dict(counts), "requests by gRPC status"), "errors by status")
    return _page(str(result.get("name", "load test")), body)


def render_kafka(result: dict[str, Any]) -> str:
    s = result["summary"]
    e2e = s.get("e2e_ms") or {}
    ts = result.get("timeseries") or {}
    t = ts.get("t_s") or []
    interval = ts.get("interval_s", 1)
    numbers = [
        ("events published", "summary.published"),
        ("calls published", "summary.published_calls"),
        ("tickets published", "summary.published_tickets"),
        ("summaries received", "summary.completed"),
        ("dead-lettered", "summary.dead_lettered"),
        ("missing at the end", "summary.missing"),
        ("error rate", "summary.error_rate"),
        ("publish rate (events/s)", "summary.publish_rate_per_s"),
        ("throughput (summaries/s)", "summary.throughput_per_s"),
        ("measured for (s)", "summary.elapsed_s"),
    ]
    lat_rows = [("end to end: event -> summary", "summary.e2e_ms")]
    for kind in ("call", "ticket"):
        lat_rows.append((f"end to end, {kind}s", f"summary.e2e_ms_by_kind.{kind}"))
    for stage in result.get("stages") or {}:
        lat_rows.append((f"event -> {stage}", f"stages[{stage}].latency_ms"))
    body = _header(result)
    body += "<h2>Summary</h2>" + _numbers_table(numbers, result)
    body += "<h3>Latency from event time (ms)</h3>" + _latency_table(lat_rows, result)
    lag = result.get("lag") or {}
    lag_rows = [(f"max lag {g} (records)", f"lag.max[{g}]") for g in lag.get("max") or {}]
    lag_rows += [(f"mean lag {g} (records)", f"lag.mean[{g}]") for g in lag.get("mean") or {}]
    body += "<h3>Consumer lag per service group</h3>" + _numbers_table(lag_rows, result)
    hists = [("event -> summary", result.get("histogram") or {})]
    hists += [
        (f"event -> {st}", h) for st, h in (result.get("stage_histograms") or {}).items() if st != "tickets.summarized"
    ]
    body += "<h2>Latency histograms</h2>" + _img(
        histogram_png(hists, [(k, e2e.get(k)) for k in ("p50", "p95", "p99")], "latency from event time (e2e marks)"),
        "latency histogram",
    )
    body += _histogram_details(result.get("histogram") or {}, "histogram")
    body += "<h2>Latency over time</h2>" + _img(
        series_png(
            [(k, t, ts.get(f"{k}_ms") or []) for k in ("p50", "p95", "p99")],
            f"event -> summary latency per {interval:g} s (by arrival of the summary)",
            "latency (ms)",
            logy=True,
        ),
        "latency over time",
    )
    body += "<h2>Throughput over time</h2>" + _img(
        series_png(
            [
                ("summaries / s", t, ts.get("throughput_rps") or []),
                ("dead letters / s", t, [e / interval for e in ts.get("errors") or []]),
                ("published / s", t, [x / interval for x in ts.get("sent") or []]),
            ],
            f"events per second ({interval:g} s bins)",
            "events / s",
            step=True,
        ),
        "throughput over time",
    )
    lt = lag.get("t_s") or []
    body += "<h2>Consumer lag over time</h2>" + _img(
        series_png(
            [(g, lt, v) for g, v in (lag.get("groups") or {}).items()],
            "records not yet committed, per consumer group",
            "lag (records)",
            step=True,
        ),
        "consumer lag",
    )
    body += "<h2>Results</h2>" + _status_table(result)
    body += _img(bars_png(dict(result.get("status_counts") or {}), "events by outcome"), "outcomes")
    return _page(str(result.get("name", "load test")), body)


def render_result(result: dict[str, Any]) -> str:
    return render_kafka(result) if result.get("kind") == "kafka" else render_grpc(result)


def render_comparison(
    a: dict[str, Any], b: dict[str, Any], deltas: Sequence[MetricDelta], threshold: float, names: tuple[str, str]
) -> str:
    regressions = [d for d in deltas if d.regression]
    rows = "".join(
        f"<tr><th>{_e(d.name)}</th><td>{_e(d.better)}</td>{num_cell(f'a.{d.name}', d.a)}{num_cell(f'b.{d.name}', d.b)}"
        f"<td class='num' data-metric='ratio.{_e(d.name)}'>{fmt_ratio(d.ratio)}</td>"
        f"<td class='{'bad' if d.regression else 'good' if d.improvement else ''}'>"
        f"{'REGRESSION' if d.regression else 'improved' if d.improvement else ''}</td></tr>"
        for d in deltas
    )
    verdict = (
        f'<p class="warn bad">{len(regressions)} regression(s) over {threshold:.0%}: '
        + ", ".join(_e(d.name) for d in regressions)
        + "</p>"
        if regressions
        else f'<p class="good">no regression over {threshold:.0%}</p>'
    )
    body = f"<h1>Comparison: A = {_e(names[0])}, B = {_e(names[1])}</h1>{verdict}"
    body += (
        "<table><tr><th>metric</th><th>better</th><th>A</th><th>B</th><th>B/A</th><th></th></tr>" + rows + "</table>"
    )
    body += "<h2>Latency histograms</h2>" + _img(
        histogram_png([("A", a.get("histogram") or {}), ("B", b.get("histogram") or {})], [], "A and B"),
        "histograms",
    )
    for key, title in (("p99_ms", "p99 latency"), ("p50_ms", "p50 latency"), ("throughput_rps", "throughput")):
        lines = []
        for label, r in (("A", a), ("B", b)):
            ts = r.get("timeseries") or {}
            lines.append((f"{label} {key}", ts.get("t_s") or [], ts.get(key) or []))
        body += f"<h2>{_e(title)} over time</h2>" + _img(
            series_png(lines, f"{title} over time", key, logy=key.endswith("_ms")), title
        )
    body += "<h2>A</h2>" + _header(a) + "<h2>B</h2>" + _header(b)
    return _page("load test comparison", body)


def write_html(text: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
