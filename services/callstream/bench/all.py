"""`callstream bench all`: the per-service benchmarks in one run, and docs/benchmarks.md's tables from their JSON.

For now:
- the LLM engine benchmark (`callstream bench llm-engine`, services/callstream/bench/llm_engine.py), when that
  module exists; skipped with a note otherwise;
- load tests against the router (`callstream loadtest grpc --service router`): open loop at each --rate, on a
  router started here (gRPC only, the default classifier) unless --router-target is given.

Each benchmark's table goes between markers in docs/benchmarks.md (`<!-- bench-all:NAME:begin/end -->`), inside
the benchmark's own section; the rest of the file is left as it is.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from callstream.bench import bench_app


@dataclass(frozen=True)
class Section:
    key: str  # marker name
    heading: str  # the section of docs/benchmarks.md the table belongs to


LLM = Section("llm-engine", "## LLM engine")
LOADTEST = Section("loadtest", "## Load tests")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench-all:{key}:begin -->", f"<!-- bench-all:{key}:end -->"


def update_section(text: str, section: Section, table: str) -> str:
    """`text` with the block between the section's markers replaced by `table`.

    Without markers, the block is added at the end of the section under `section.heading` (created at the end of
    the file if missing). Nothing outside the block changes.
    """
    begin, end = _markers(section.key)
    block = f"{begin}\n{table.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == section.heading)
    except StopIteration:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{sep}{section.heading}\n\n{block}\n"
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while stop > start + 1 and not lines[stop - 1].strip():
        stop -= 1
    new = [*lines[:stop], "", block, *([""] if stop < len(lines) else []), *lines[stop:]]
    return "\n".join(new) + "\n"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of dict rows (columns: the given ones, else every key in order of appearance)."""
    if not rows:
        return "_no results_"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return "" if v is None else str(v).replace("|", "\\|")

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def loadtest_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per load-test result: the numbers a reader looks for first."""
    rows = []
    for r in results:
        s, c = r["summary"], r["config"]
        lat = s["latency_ms"]
        m = r.get("machine") or {}
        rows.append(
            {
                "service": c.get("service"),
                "mode": c.get("mode"),
                "rate (req/s)": c.get("rate"),
                "clients": c.get("concurrency"),
                "duration (s)": c.get("duration_s"),
                "requests": s["requests"],
                "errors": s["errors"],
                "throughput (req/s)": s["throughput_rps"],
                "p50 (ms)": lat["p50"],
                "p95 (ms)": lat["p95"],
                "p99 (ms)": lat["p99"],
                "max (ms)": lat["max"],
                "load avg": " → ".join(str((m.get(k) or ["?"])[0]) for k in ("loadavg_start", "loadavg_end")),
            }
        )
    return rows


def _machine_line(results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return ""
    m = results[0].get("machine") or {}
    return f"\n\n_{m.get('cpus', '?')} CPUs, {m.get('platform', '')}, {m.get('time', '')}_"


def run_llm_engine_bench(out_dir: Path, note: Callable[[str], None]) -> str | None:
    """Run `callstream bench llm-engine` if its module exists; its results' table in markdown, or None."""
    if importlib.util.find_spec("callstream.bench.llm_engine") is None:
        note("LLM engine: skipped (services/callstream/bench/llm_engine.py is not there yet)")
        return None
    import os

    env = {**os.environ, "CALLSTREAM_BENCH_DIR": str(out_dir)}
    before = set(out_dir.glob("*.json"))
    proc = subprocess.run([sys.executable, "-m", "callstream", "bench", "llm-engine"], env=env, check=False)
    if proc.returncode != 0:
        note(f"LLM engine: `callstream bench llm-engine` failed with exit code {proc.returncode}")
        return None
    written = sorted(set(out_dir.glob("*.json")) - before) or sorted(out_dir.glob("*llm*.json"))
    tables = []
    module = importlib.import_module("callstream.bench.llm_engine")
    custom = getattr(module, "markdown_table", None)
    for path in written:
        data = json.loads(path.read_text())
        if callable(custom):
            tables.append(str(custom(data)))
        else:
            tables.append(markdown_table(data.get("runs") or []))
    note(f"LLM engine: {len(written)} result file(s) in {out_dir}")
    return "\n\n".join(tables) if tables else None


def run_router_loadtests(
    out_dir: Path,
    rates: Sequence[float],
    duration_s: float,
    target: str | None,
    note: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Open-loop load tests of the router at each rate (a router started here unless a target is given)."""
    import asyncio
    import tempfile

    from callstream.loadtest.grpc_load import grpc_loadtest, write_result
    from callstream.loadtest.render import render_result, write_html
    from callstream.loadtest.runner import LoadPlan
    from callstream.loadtest.targets import TlsOptions

    router = None
    if target is None:
        from callstream.core.stack import ServiceProcess
        from callstream.router.cli import ensure_default_classifier

        env = {"CALLSTREAM_ROUTER_CONSUME": "false", "CALLSTREAM_ROUTER_MODEL_DIR": str(ensure_default_classifier())}
        router = ServiceProcess("router", env, log_dir=Path(tempfile.mkdtemp(prefix="callstream-bench-"))).start()
        router.wait_ready(300)
        target = router.address
    results = []
    try:
        for rate in rates:
            plan = LoadPlan(mode="open", rate=rate, duration_s=duration_s, deadline_s=30.0)
            result = asyncio.run(
                grpc_loadtest(
                    service="router",
                    target=target,
                    plan=plan,
                    target_kwargs={"tls": TlsOptions()},
                    live=False,
                    name=f"router open loop {rate:g} req/s",
                )
            )
            path = write_result(result, out_dir / f"loadtest-router-{rate:g}rps.json")
            write_html(render_result(result), path.with_suffix(".html"))
            note(f"router at {rate:g} req/s: p50 {result['summary']['latency_ms']['p50']} ms, JSON {path}")
            results.append(result)
    finally:
        if router is not None:
            router.stop()
    return results


@bench_app.command("all")
def bench_all(
    docs: Annotated[Path, typer.Option(help="The markdown file whose tables are rewritten.")] = Path(
        "docs/benchmarks.md"
    ),
    only: Annotated[list[str] | None, typer.Option(help="Run only these: llm-engine, loadtest (repeatable).")] = None,
    rates: Annotated[
        list[float] | None, typer.Option("--rate", help="Router load-test rates (req/s); default 10.")
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds per router load test.")] = 60.0,
    router_target: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running router (default: start one, gRPC only).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option(help="Where the JSON results go (default bench/results/all-*).")
    ] = None,
) -> None:
    """Run every benchmark there is, then write their tables into docs/benchmarks.md from their JSON."""
    from callstream.bench.report import results_dir

    wanted = set(only or ["llm-engine", "loadtest"])
    unknown = wanted - {"llm-engine", "loadtest"}
    if unknown:
        typer.secho(f"error: unknown benchmark(s): {', '.join(sorted(unknown))}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    out = out_dir or results_dir() / f"all-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        typer.echo(line, err=True)

    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if "llm-engine" in wanted:
        table = run_llm_engine_bench(out, note)
        if table:
            text = update_section(text, LLM, table)
    if "loadtest" in wanted:
        results = run_router_loadtests(out, rates or [10.0], duration, router_target, note)
        if results:
            text = update_section(text, LOADTEST, markdown_table(loadtest_rows(results)) + _machine_line(results))
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
    note(f"wrote {docs}")
