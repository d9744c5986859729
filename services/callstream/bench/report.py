"""Shared output of every benchmark: a table, a JSON file and a PNG plot, all from the same runs."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def results_dir() -> Path:
    """bench/results/ in the working directory, or CALLSTREAM_BENCH_DIR."""
    path = Path(os.environ.get("CALLSTREAM_BENCH_DIR", "bench/results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(
    name: str, runs: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None, out: Path | None = None
) -> Path:
    """Write {"benchmark", "machine", "meta", "runs"} to OUT (default bench/results/<name>.json)."""
    path = out or results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "meta": dict(meta or {}), "runs": list(runs)}
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(
    title: str, runs: Sequence[Mapping[str, Any]], columns: Sequence[str], console: Console | None = None
) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(*(_fmt(run.get(c)) for c in columns))
    # Piped output (a log, CI) would otherwise be cut to 80 columns and abbreviate every header.
    (console or Console(width=None if sys.stdout.isatty() else 320)).print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def plot_lines(
    path: Path,
    runs: Sequence[Mapping[str, Any]],
    *,
    x: str,
    y: str,
    series: str,
    title: str,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
) -> Path:
    """One line per value of `series`, y against x; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name in sorted({str(r[series]) for r in runs}):
        points = sorted((r[x], r[y]) for r in runs if str(r[series]) == name and r.get(y) is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
