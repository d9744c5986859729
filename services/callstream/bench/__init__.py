"""Benchmarks: `callstream bench SERVICE`. Each prints a table, writes JSON (and a PNG plot) under bench/results/.

Speed is measured here, never in timed tests. Ratios are always measured side by side in one run.
"""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks: a table on the terminal, JSON and a PNG plot in bench/results/.", no_args_is_help=True
)
