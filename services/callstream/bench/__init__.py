"""Benchmarks: `callstream bench SERVICE`. Each prints a table, writes JSON (and a PNG plot) under bench/results/.

Speed is measured here, never in timed tests. Ratios are always measured side by side in one run.
"""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks: a table on the terminal, JSON and a PNG plot in bench/results/.", no_args_is_help=True
)

from callstream.bench import llm_engine as _llm_engine  # noqa: E402, F401 - registers `callstream bench llm-engine`
from callstream.bench import router as _router  # noqa: E402, F401 - registers `callstream bench router`
from callstream.bench import transcriber as _transcriber  # noqa: E402, F401 - registers `callstream bench transcriber`
