"""`callstream eval summarizer`: fact coverage, schema validity and invented entities on a labelled set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(help="Evaluate model quality on labelled sets.", no_args_is_help=True)


@eval_app.command("summarizer")
def eval_summarizer(
    data: Annotated[
        Path | None,
        typer.Option(help="A YAML set (items: id, kind, text, facts). Default: the shipped samples/eval set."),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Engine address (HOST:PORT, TensorRT-LLM gRPC protocol). Default: start the CPU engine in-process."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report to this file.")] = None,
    concurrency: Annotated[int, typer.Option(help="Summaries in flight at once (the engine batches them).")] = 8,
) -> None:
    """Summarize every item of the set and report fact coverage, schema validity rate and invented entities."""
    from callstream.cli import setup_logging

    setup_logging("WARNING")
    from callstream.evaluation.summarizer import DEFAULT_SET, evaluate, load_items, report

    items = load_items(data or DEFAULT_SET)
    results, engine_info = asyncio.run(evaluate(items, engine, concurrency))
    payload = report(results, engine_info)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    if json_output:
        typer.echo(json.dumps(payload, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"summarizer on {len(items)} items ({engine_info['engine']}, {engine_info['model_id']})")
    for column in ("item", "valid", "tries", "facts", "missing", "invented"):
        table.add_column(column)
    for r in results:
        invented = ", ".join(v for values in r.invented.values() for v in values)
        table.add_row(
            r.id,
            "yes" if r.schema_valid else f"no: {r.error}",
            str(r.attempts),
            f"{r.facts_found}/{r.facts_total}",
            ", ".join(r.missing_facts),
            invented,
        )
    console = Console()
    console.print(table)
    agg = payload["aggregate"]
    console.print(
        f"schema valid {agg['schema_valid']}/{agg['items']} ({agg['schema_valid_rate']:.0%}), "
        f"fact coverage {agg['facts_found']}/{agg['facts_total']} ({(agg['fact_coverage'] or 0):.0%}), "
        f"invented entities {agg['invented_entities']} in {agg['items_with_invented_entities']} items"
    )
