"""Live progress on the terminal (rich Live), or a plain line every few seconds when stderr is not a terminal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.live import Live
from rich.table import Table

Rows = Sequence[tuple[str, str]]


def _table(title: str, rows: Rows) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


async def show_progress(
    title: str,
    rows: Callable[[], Rows],
    done: asyncio.Event,
    *,
    console: Console | None = None,
    refresh_s: float = 0.5,
    plain_every_s: float = 10.0,
    enabled: bool = True,
) -> None:
    """Re-render `rows()` until `done` is set (the caller bounds the run); then render once more."""
    if not enabled:
        await done.wait()
        return
    console = console or Console(stderr=True)
    if console.is_terminal:
        with Live(_table(title, rows()), console=console, refresh_per_second=4, transient=False) as live:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), refresh_s)
                live.update(_table(title, rows()))
        return
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), plain_every_s)
        console.print(f"{title}: " + ", ".join(f"{k} {v}" for k, v in rows()), highlight=False, soft_wrap=True)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 10_000 else f"{value / 1000:.1f} s"
