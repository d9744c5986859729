"""`callstream loadtest ...` commands (and `callstream bench all`, registered on import of bench.all)."""

from __future__ import annotations

import asyncio
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

try:
    import callstream.bench.all  # noqa: F401 - registers `callstream bench all`
except Exception as exc:  # noqa: BLE001 - a broken benchmark module must not take the loadtest commands down
    print(f"warning: `callstream bench all` unavailable: {exc}", file=sys.stderr)

loadtest_app = typer.Typer(
    help="Load tests through gRPC and Kafka, with JSON results and self-contained HTML reports (docs/loadtest.md).",
    no_args_is_help=True,
)


class Service(StrEnum):
    transcriber = "transcriber"
    router = "router"
    summarizer = "summarizer"
    llm_engine = "llm-engine"


def _default_out(stem: str) -> Path:
    from callstream.bench.report import results_dir

    return results_dir() / f"loadtest-{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@loadtest_app.command("grpc")
def grpc_command(
    service: Annotated[Service, typer.Option("--service", "-s", help="Which service's API to load.")],
    target: Annotated[str, typer.Option("--target", "-t", help="HOST:PORT of the service's gRPC server.")],
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            "-r",
            help="Open loop: requests per second (after the ramp-up). Latency counts from each request's "
            "scheduled send time.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Closed loop: clients, each one request at a time.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option("--duration", "-d", help="Seconds, ramp-up included. Default 10 unless -n.")
    ] = None,
    requests: Annotated[int | None, typer.Option("--requests", "-n", help="Stop after this many requests.")] = None,
    ramp_up: Annotated[
        float,
        typer.Option(
            help="Seconds of ramp-up (open: rate grows linearly from 0; closed: clients start spread out). "
            "Left out of the summary, shown in the time series."
        ),
    ] = 0.0,
    deadline: Annotated[float, typer.Option(help="gRPC deadline per request in seconds; 0 = none.")] = 30.0,
    max_in_flight: Annotated[
        int, typer.Option(help="Open loop: requests outstanding at most; later sends wait, and the wait counts.")
    ] = 1000,
    drain: Annotated[float, typer.Option(help="Seconds that requests still in flight get after the last send.")] = 30.0,
    connections: Annotated[int, typer.Option(help="gRPC channels (HTTP/2 connections), used round-robin.")] = 1,
    payloads: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Ticket CSV (router, summarizer, llm-engine: a 'text' or 'body' column) or a folder with "
            "tickets.csv; audio file or folder (transcriber). Default: the package's sample tickets / calls.",
        ),
    ] = None,
    texts_per_request: Annotated[int, typer.Option(help="Router: texts per ClassifyRequest.")] = 1,
    inline_audio: Annotated[
        bool,
        typer.Option(
            "--inline-audio/--audio-uri",
            help="Transcriber: send the audio bytes (default), or a file:// URI the server must be able to read.",
        ),
    ] = True,
    tokenizer: Annotated[
        str | None, typer.Option(help="llm-engine: .gguf file or HF tokenizer dir (default: the summarizer's).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="llm-engine: max_tokens per Generate.")] = 64,
    guided: Annotated[
        bool, typer.Option("--guided/--no-guided", help="llm-engine: JSON-schema guided decoding like the summarizer.")
    ] = True,
    tls: Annotated[bool, typer.Option("--tls", help="Use TLS (system roots unless --ca-cert).")] = False,
    ca_cert: Annotated[
        Path | None, typer.Option(exists=True, help="PEM file of trusted roots (implies --tls).")
    ] = None,
    client_cert: Annotated[Path | None, typer.Option(exists=True, help="Client certificate (mutual TLS), PEM.")] = None,
    client_key: Annotated[Path | None, typer.Option(exists=True, help="Client private key (mutual TLS), PEM.")] = None,
    server_name: Annotated[
        str | None, typer.Option(help="Name to verify the server certificate against (and :authority).")
    ] = None,
    insecure_skip_verify: Annotated[
        bool,
        typer.Option(
            "--insecure-skip-verify",
            help="Trust the certificate the server presents (fetched first, unverified). gRPC Python cannot "
            "turn verification off; this makes self-signed certificates work. Implies --tls.",
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON result file (default bench/results/).")] = None,
    html: Annotated[bool, typer.Option("--html/--no-html", help="Also write the HTML report next to the JSON.")] = True,
    samples: Annotated[
        bool, typer.Option("--samples/--no-samples", help="Keep every request's times in the JSON.")
    ] = True,
    live: Annotated[bool, typer.Option("--live/--quiet", help="Live progress on the terminal.")] = True,
    name: Annotated[str, typer.Option(help="Name of the run in the reports.")] = "",
    max_error_rate: Annotated[
        float | None, typer.Option(help="Exit with code 1 when the error rate is above this (e.g. 0.01).")
    ] = None,
) -> None:
    """Load one service through its gRPC API: open loop (--rate) or closed loop (--concurrency).

    Writes a JSON result and a self-contained HTML report (histogram, latency and throughput over time, errors by
    gRPC status). Exit code: 0, or 1 with --max-error-rate exceeded, 2 on bad arguments.

    Example: callstream loadtest grpc -s router -t 127.0.0.1:50052 --rate 10 --duration 60
    """
    from callstream.loadtest.grpc_load import grpc_loadtest, write_result
    from callstream.loadtest.runner import LoadPlan
    from callstream.loadtest.targets import TlsOptions

    if (rate is None) == (concurrency is None):
        raise _fail("give exactly one of --rate (open loop) and --concurrency (closed loop)")
    plan = LoadPlan(
        mode="open" if rate is not None else "closed",
        rate=rate or 0.0,
        concurrency=concurrency or 1,
        duration_s=duration if duration is not None or requests is not None else 10.0,
        requests=requests,
        ramp_up_s=ramp_up,
        deadline_s=deadline or None,
        max_in_flight=max_in_flight,
        drain_s=drain,
    )
    try:
        plan.validate()
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    tls_options = TlsOptions(
        enabled=tls or ca_cert is not None or insecure_skip_verify,
        ca_cert=ca_cert,
        client_cert=client_cert,
        client_key=client_key,
        server_name=server_name,
        insecure_skip_verify=insecure_skip_verify,
    )
    kwargs = {
        "tls": tls_options,
        "connections": connections,
        "payloads": payloads,
        "texts_per_request": texts_per_request,
        "inline_audio": inline_audio,
        "tokenizer": tokenizer,
        "max_tokens": max_tokens,
        "guided": guided,
    }
    try:
        result = asyncio.run(
            grpc_loadtest(
                service=service.value,
                target=target,
                plan=plan,
                target_kwargs=kwargs,
                live=live,
                include_samples=samples,
                name=name,
            )
        )
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    path = write_result(result, out or _default_out(service.value))
    _finish(result, path, html)
    if max_error_rate is not None and result["summary"]["error_rate"] > max_error_rate:
        raise typer.Exit(1)


def _finish(result: dict, path: Path, html: bool) -> None:  # type: ignore[type-arg]
    from callstream.loadtest.report_text import print_summary

    print_summary(result)
    typer.echo(f"result: {path}")
    if html:
        from callstream.loadtest.render import render_result, write_html

        page = write_html(render_result(result), path.with_suffix(".html"))
        typer.echo(f"report: {page}")


@loadtest_app.command("report")
def report_command(
    result: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSON result file.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default: next to the JSON).")] = None,
) -> None:
    """Render the self-contained HTML report of a JSON result (and print its summary)."""
    from callstream.loadtest.compare import load_result
    from callstream.loadtest.render import render_result, write_html
    from callstream.loadtest.report_text import print_summary

    try:
        data = load_result(result)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    print_summary(data)
    typer.echo(f"report: {write_html(render_result(data), out or result.with_suffix('.html'))}")


@loadtest_app.command("compare")
def compare_command(
    a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Result A (before, the baseline).")],
    b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Result B (after).")],
    threshold: Annotated[
        float, typer.Option(min=0.0, help="Relative change in the bad direction that counts as a regression.")
    ] = 0.1,
    html: Annotated[Path | None, typer.Option("--html", help="Also write an HTML comparison report here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the comparison as JSON here.")] = None,
) -> None:
    """Compare two results: each metric's A, B and ratio B/A; regressions over the threshold are flagged.

    Lower is better for latencies, error rate and lag; higher for throughput. Exit code: 0 = no regression,
    1 = at least one regression, 2 = the files cannot be compared.
    """
    import json

    from callstream.loadtest.compare import compare, load_result, print_comparison
    from callstream.loadtest.render import render_comparison, write_html

    try:
        ra, rb = load_result(a), load_result(b)
        deltas = compare(ra, rb, threshold)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    print_comparison(deltas, a.name, b.name, threshold)
    regressions = [d.name for d in deltas if d.regression]
    typer.echo(f"{len(regressions)} regression(s)" + (f": {', '.join(regressions)}" if regressions else ""))
    if html is not None:
        typer.echo(f"report: {write_html(render_comparison(ra, rb, deltas, threshold, (a.name, b.name)), html)}")
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {"a": str(a), "b": str(b), "threshold": threshold, "metrics": [d.as_dict() for d in deltas]}, indent=1
            )
        )
    raise typer.Exit(1 if regressions else 0)


@loadtest_app.command("kafka")
def kafka_command(
    tickets_rate: Annotated[float, typer.Option(help="Tickets per second into tickets.created.")] = 1.0,
    calls_rate: Annotated[float, typer.Option(help="Calls per second into calls.recorded.")] = 0.0,
    duration: Annotated[
        float | None, typer.Option("--duration", "-d", help="Seconds of publishing (default 30 unless counts).")
    ] = None,
    tickets: Annotated[int | None, typer.Option(help="Publish at most this many tickets.")] = None,
    calls: Annotated[int | None, typer.Option(help="Publish at most this many calls.")] = None,
    bootstrap: Annotated[
        str | None,
        typer.Option(help="Kafka bootstrap servers of the running stack. Default: KAFKA_BOOTSTRAP_SERVERS."),
    ] = None,
    start_stack: Annotated[
        bool,
        typer.Option(
            "--start-stack",
            help="Start the stack first, as `callstream demo` does: a local broker (unless --bootstrap or "
            "KAFKA_BOOTSTRAP_SERVERS) and the four services; stopped at the end.",
        ),
    ] = False,
    broker: Annotated[str, typer.Option(help="With --start-stack: local broker, noida or tansu.")] = "noida",
    classifier: Annotated[
        Path | None, typer.Option(help="With --start-stack: the router's classifier (default: the starter one).")
    ] = None,
    payloads: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="A folder like `demo --inputs`: audio files and tickets.csv."),
    ] = None,
    tickets_csv: Annotated[
        Path | None, typer.Option(exists=True, help="Ticket CSV (default: the package's sample tickets).")
    ] = None,
    audio: Annotated[
        Path | None, typer.Option(exists=True, help="Audio file or folder for calls (default: the sample calls).")
    ] = None,
    inline_audio: Annotated[
        bool, typer.Option(help="Put the audio in the record (audio_bytes) instead of a file:// URI.")
    ] = False,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the outputs after the last publish.")
    ] = 300.0,
    lag_interval: Annotated[float, typer.Option(help="Seconds between consumer-lag samples.")] = 1.0,
    group_prefix: Annotated[
        str | None,
        typer.Option(
            help="Consumer groups are PREFIX-transcriber, -router, -summarizer (default: KAFKA_CLIENT_ID_PREFIX, "
            "else callstream)."
        ),
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="With --start-stack: seconds for the models to load.")] = 300.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON result file (default bench/results/).")] = None,
    html: Annotated[bool, typer.Option("--html/--no-html", help="Also write the HTML report.")] = True,
    samples: Annotated[bool, typer.Option("--samples/--no-samples", help="Keep every event's times.")] = True,
    live: Annotated[bool, typer.Option("--live/--quiet", help="Live progress on the terminal.")] = True,
    name: Annotated[str, typer.Option(help="Name of the run in the reports.")] = "",
    max_error_rate: Annotated[
        float | None, typer.Option(help="Exit with code 1 when the share of events without a summary is above this.")
    ] = None,
) -> None:
    """Publish calls and tickets at a fixed rate into a running stack; measure end-to-end latency and lag.

    Latency runs from each event's scheduled publish time (its event time) to the arrival of its outputs on
    calls.transcribed, tickets.routed and tickets.summarized; the consumer lag of the callstream-transcriber,
    -router and -summarizer groups is sampled throughout. Exit code: 0, 1 with --max-error-rate exceeded, 2 on
    bad arguments or an unreachable broker.

    Example: callstream loadtest kafka --start-stack --tickets-rate 0.5 --calls-rate 0.05 --duration 60
    """
    import os
    import tempfile

    from callstream.core.settings import ServiceSettings
    from callstream.loadtest.grpc_load import write_result
    from callstream.loadtest.kafka_load import KafkaPlan, kafka_loadtest, load_calls
    from callstream.loadtest.targets import load_tickets

    plan = KafkaPlan(
        tickets_rate=tickets_rate,
        calls_rate=calls_rate,
        duration_s=duration if duration is not None or (tickets is not None or calls is not None) else 30.0,
        tickets=tickets,
        calls=calls,
        drain_timeout_s=drain_timeout,
        lag_interval_s=lag_interval,
        inline_audio=inline_audio,
    )
    try:
        plan.validate()
        ticket_msgs = load_tickets(tickets_csv or payloads) if tickets_rate > 0 and tickets != 0 else []
        call_msgs = load_calls(audio or payloads, inline_audio) if calls_rate > 0 and calls != 0 else []
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    settings = ServiceSettings()
    group_prefix = group_prefix or settings.kafka.client_id_prefix
    bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap and not start_stack:
        raise _fail("no broker: give --bootstrap, set KAFKA_BOOTSTRAP_SERVERS, or use --start-stack")
    stack = None
    try:
        if start_stack:
            from callstream.core.stack import LocalStack
            from callstream.router.cli import ensure_default_classifier

            log_dir = Path(tempfile.mkdtemp(prefix="callstream-loadtest-logs-"))
            model = classifier or ensure_default_classifier(progress=False)
            stack = LocalStack(
                bootstrap_servers=bootstrap,
                broker_kind=broker,
                env={"CALLSTREAM_ROUTER_MODEL_DIR": str(model)},
                log_dir=log_dir,
            ).start()
            typer.echo(f"stack: broker {stack.bootstrap}, service logs in {log_dir}; loading models", err=True)
            stack.wait_ready(ready_timeout)
            kafka = stack.kafka_settings()
        else:
            kafka = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap})
        config = {
            "name": name,
            "bootstrap": kafka.bootstrap_servers,
            "started_stack": start_stack,
            "broker": broker if stack is not None and stack.broker is not None else None,
            "tickets_source": str(tickets_csv or payloads or "default"),
            "audio_source": str(audio or payloads or "default"),
            "ticket_payloads": len(ticket_msgs),
            "call_payloads": len(call_msgs),
            "group_prefix": group_prefix,
        }
        result = asyncio.run(
            kafka_loadtest(
                kafka,
                settings.topics,
                plan,
                tickets=ticket_msgs,
                calls=call_msgs,
                config=config,
                group_prefix=group_prefix,
                live=live,
                include_samples=samples,
            )
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise _fail(str(exc)) from exc
    except Exception as exc:  # aiokafka's connection errors
        if type(exc).__module__.startswith("aiokafka"):
            raise _fail(f"Kafka: {type(exc).__name__}: {exc}") from exc
        raise
    finally:
        if stack is not None:
            stack.stop()
    path = write_result(result, out or _default_out("kafka"))
    _finish(result, path, html)
    if max_error_rate is not None and result["summary"]["error_rate"] > max_error_rate:
        raise typer.Exit(1)
