"""Latency statistics shared by the gRPC and the Kafka load tests: percentiles, histograms, time series.

Percentiles are exact (nearest rank over every sample), never estimated from buckets. The histogram uses one
fixed grid of log-spaced buckets (40 per decade, 6 % wide, 10 us to 1000 s) for every run, so two runs'
histograms can be overlaid bucket for bucket; only the span from the first to the last non-empty bucket is
written.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BUCKETS_PER_DECADE = 40
_LO_EXP, _HI_EXP = -2, 6  # 10^-2 ms .. 10^6 ms
GRID_MS: list[float] = [
    10 ** (e / BUCKETS_PER_DECADE) for e in range(_LO_EXP * BUCKETS_PER_DECADE, _HI_EXP * BUCKETS_PER_DECADE + 1)
]
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p999", 99.9),
)
DIGITS = 4  # ms values are kept to 0.1 us: the report shows exactly what the JSON holds


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence: the smallest value with at least p% of values <= it."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _r(x: float) -> float:
    return round(float(x), DIGITS)


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """count, min, mean, stdev, p50, p90, p95, p99, p999, max of the values (None for each when there are none)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return {"count": 0, **{k: None for k in ("min", "mean", "stdev", *(p for p, _ in PERCENTILES), "max")}}
    mean = math.fsum(ordered) / n
    var = math.fsum((v - mean) ** 2 for v in ordered) / n
    out: dict[str, Any] = {"count": n, "min": _r(ordered[0]), "mean": _r(mean), "stdev": _r(math.sqrt(var))}
    for name, p in PERCENTILES:
        out[name] = _r(percentile(ordered, p))
    out["max"] = _r(ordered[-1])
    return out


def bucket_index(value_ms: float) -> int:
    """Index i of the grid bucket [GRID_MS[i], GRID_MS[i+1]) holding the value (clamped to the grid)."""
    i = bisect.bisect_right(GRID_MS, value_ms) - 1
    return min(max(i, 0), len(GRID_MS) - 2)


def histogram(values_ms: Iterable[float]) -> dict[str, list[Any]]:
    """{"edges_ms": [...], "counts": [...]} on the shared grid, trimmed to the non-empty span (len(edges) = n+1)."""
    counts = [0] * (len(GRID_MS) - 1)
    for v in values_ms:
        counts[bucket_index(v)] += 1
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return {"edges_ms": [], "counts": []}
    lo, hi = nonzero[0], nonzero[-1]
    return {"edges_ms": [_r(e) for e in GRID_MS[lo : hi + 2]], "counts": counts[lo : hi + 1]}


class LiveHistogram:
    """Bucket counts kept as samples arrive, for approximate running percentiles on the live display."""

    def __init__(self) -> None:
        self.counts = [0] * (len(GRID_MS) - 1)
        self.total = 0

    def add(self, value_ms: float) -> None:
        self.counts[bucket_index(value_ms)] += 1
        self.total += 1

    def approx(self, p: float) -> float | None:
        """The upper edge of the bucket that holds the p-th percentile."""
        if not self.total:
            return None
        rank = max(1, math.ceil(p / 100.0 * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return GRID_MS[i + 1]
        return GRID_MS[-1]


def interval_for(span_s: float, max_bins: int = 600) -> float:
    """1 s bins, wider for long runs so that a series has at most max_bins points."""
    return float(max(1, math.ceil(span_s / max_bins)))


def timeseries(
    end_s: Sequence[float],
    latency_ms: Sequence[float | None],
    *,
    interval_s: float,
    span_s: float,
    started_s: Sequence[float] | None = None,
) -> dict[str, list[Any]]:
    """Per-bin counts and latency percentiles, binned by completion time (end_s, seconds from the start).

    latency_ms[i] is None for a failed request: it counts in `errors`, not in the latency percentiles.
    `sent` counts requests by their send time (started_s) when given.
    """
    nbins = max(1, math.ceil(span_s / interval_s))
    ok_lat: list[list[float]] = [[] for _ in range(nbins)]
    errors = [0] * nbins
    sent = [0] * nbins
    for t, lat in zip(end_s, latency_ms, strict=True):
        b = min(max(int(t // interval_s), 0), nbins - 1)
        if lat is None:
            errors[b] += 1
        else:
            ok_lat[b].append(lat)
    for t in started_s or ():
        sent[min(max(int(t // interval_s), 0), nbins - 1)] += 1
    series: dict[str, list[Any]] = {
        "t_s": [round(i * interval_s, 3) for i in range(nbins)],
        "ok": [len(b) for b in ok_lat],
        "errors": errors,
        "throughput_rps": [round(len(b) / interval_s, 3) for b in ok_lat],
    }
    if started_s is not None:
        series["sent"] = sent
    for name, p in (("p50_ms", 50.0), ("p95_ms", 95.0), ("p99_ms", 99.0)):
        series[name] = [_r(percentile(sorted(b), p)) if b else None for b in ok_lat]
    return series


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a.b.c": value} (lists and strings left out)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float):
            out[name] = float(value)
    return out
