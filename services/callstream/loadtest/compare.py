"""Compare two load-test results (before/after): the ratio B/A per metric, regressions over a threshold flagged.

A metric regresses when it moved in its bad direction by more than `threshold` relative to A:
- lower is better (latencies, error rate, consumer lag): (B - A) / A > threshold;
- higher is better (throughput, tokens per second): (A - B) / A > threshold.
When A is 0, any increase of a lower-is-better metric is a regression (e.g. errors where there were none).
The error rate must also rise by more than ERROR_RATE_FLOOR (0.1 percentage point) to count, so that one
failed request in ten thousand does not fail a comparison.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOWER, HIGHER = "lower", "higher"
ERROR_RATE_FLOOR = 0.001
_ALL = ("p50", "p90", "p95", "p99", "p999", "max", "mean")


@dataclass(frozen=True)
class MetricDelta:
    name: str
    better: str  # LOWER or HIGHER
    a: float | None
    b: float | None
    ratio: float | None  # b / a (inf when a == 0 < b)
    change: float | None  # relative change in the bad direction (> 0 = worse)
    regression: bool
    improvement: bool

    def as_dict(self) -> dict[str, Any]:
        def clean(x: float | None) -> float | str | None:
            return "inf" if x is not None and math.isinf(x) else x

        return {
            "metric": self.name,
            "better": self.better,
            "a": self.a,
            "b": self.b,
            "ratio": clean(self.ratio),
            "change": clean(self.change),
            "regression": self.regression,
            "improvement": self.improvement,
        }


def load_result(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "summary" not in data or data.get("kind") not in ("grpc", "kafka"):
        raise ValueError(f"{path} is not a callstream load-test result")
    return data


def metrics_of(result: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """The compared metrics of a result: {name: (value, better)}."""
    s = result["summary"]
    out: dict[str, tuple[float | None, str]] = {}

    def lat(prefix: str, d: dict[str, Any] | None, keys: tuple[str, ...] = _ALL) -> None:
        for k in keys:
            if d and k in d:
                out[f"{prefix}.{k}"] = (d[k], LOWER)

    if result["kind"] == "grpc":
        out["throughput_rps"] = (s.get("throughput_rps"), HIGHER)
        out["error_rate"] = (s.get("error_rate"), LOWER)
        lat("latency_ms", s.get("latency_ms"))
        lat("service_time_ms", s.get("service_time_ms"), ("p50", "p99"))
        if "ttft_ms" in s:
            lat("ttft_ms", s["ttft_ms"], ("p50", "p95", "p99"))
        if "output_tokens_per_s" in s:
            out["output_tokens_per_s"] = (s["output_tokens_per_s"], HIGHER)
    else:
        out["throughput_per_s"] = (s.get("throughput_per_s"), HIGHER)
        out["error_rate"] = (s.get("error_rate"), LOWER)
        lat("e2e_ms", s.get("e2e_ms"), ("p50", "p95", "p99", "max"))
        for stage, d in (result.get("stages") or {}).items():
            lat(f"stage[{stage}]_ms", d.get("latency_ms"), ("p50", "p95", "p99"))
        for group, value in ((result.get("lag") or {}).get("max") or {}).items():
            out[f"lag_max[{group}]"] = (value, LOWER)
    return out


def delta(name: str, better: str, a: float | None, b: float | None, threshold: float) -> MetricDelta:
    if a is None or b is None:
        return MetricDelta(name, better, a, b, None, None, False, False)
    if a == 0:
        ratio = 1.0 if b == 0 else math.inf
        worse = b > 0 if better == LOWER else False
        change = 0.0 if b == 0 else (math.inf if better == LOWER else -math.inf)
    else:
        ratio = b / a
        change = (b - a) / abs(a) if better == LOWER else (a - b) / abs(a)
        worse = change > threshold
    if name == "error_rate" and b - a <= ERROR_RATE_FLOOR:
        worse = False
    improvement = not worse and change is not None and -change > threshold
    return MetricDelta(name, better, a, b, ratio, change, worse, improvement)


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.1) -> list[MetricDelta]:
    if a.get("kind") != b.get("kind"):
        raise ValueError(f"cannot compare a {a.get('kind')} result with a {b.get('kind')} result")
    ma, mb = metrics_of(a), metrics_of(b)
    names = list(ma) + [n for n in mb if n not in ma]
    return [
        delta(
            n,
            (ma.get(n) or mb.get(n) or (None, LOWER))[1],
            ma.get(n, (None, ""))[0],
            mb.get(n, (None, ""))[0],
            threshold,
        )
        for n in names
    ]


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x == int(x) and abs(x) < 1e12:
        return str(int(x))
    return f"{x:.4f}".rstrip("0").rstrip(".")


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.3f}"


def print_comparison(
    deltas: list[MetricDelta], a_name: str, b_name: str, threshold: float, console: Any | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"A = {a_name}   B = {b_name}   (regression: worse by more than {threshold:.0%})")
    for col in ("metric", "better", "A", "B", "B/A", ""):
        table.add_column(col, justify="left" if col in ("metric", "better", "") else "right")
    for d in deltas:
        flag = "[red]REGRESSION" if d.regression else ("[green]improved" if d.improvement else "")
        table.add_row(d.name, d.better, fmt_num(d.a), fmt_num(d.b), fmt_ratio(d.ratio), flag)
    (console or Console(width=120)).print(table)
