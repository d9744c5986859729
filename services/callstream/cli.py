"""The `callstream` command line: serve a service, run the demo, try an engine one-shot, manage topics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load by path; never reach for a model hub

app = typer.Typer(
    name="callstream",
    help="Contact-center calls and tickets in; transcripts, routed tickets and summaries out (Kafka + gRPC).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


class ServiceName(StrEnum):
    transcriber = "transcriber"
    router = "router"
    summarizer = "summarizer"
    llm_engine = "llm-engine"


def setup_logging(level: str = "INFO") -> None:
    """Rich output on a terminal; plain timestamped lines when logs go to a file or a collector."""
    level = os.environ.get("CALLSTREAM_LOG_LEVEL", level).upper()
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        logging.basicConfig(
            level=level,
            format="%(name)s: %(message)s",
            handlers=[RichHandler(show_path=False, console=Console(stderr=True))],
        )
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def serve(name: Annotated[ServiceName, typer.Argument(help="Which service to run.")]) -> None:
    """Run one service: its gRPC server (health, reflection) and, except llm-engine, its Kafka consumer.

    Settings come from CALLSTREAM_<SERVICE>_* environment variables, KAFKA_BOOTSTRAP_SERVERS and the YAML file
    named by CALLSTREAM_CONFIG (docs/configuration.md). Stops gracefully on SIGTERM/SIGINT.
    """
    setup_logging()
    from callstream.core.grpc_server import run_service

    runtime = _build_runtime(name)
    asyncio.run(run_service(runtime))


def _build_runtime(name: ServiceName):  # type: ignore[no-untyped-def]
    if name is ServiceName.transcriber:
        from callstream.transcriber.service import build_runtime as build_t
        from callstream.transcriber.settings import TranscriberSettings

        return build_t(TranscriberSettings())
    if name is ServiceName.router:
        from callstream.router.service import build_runtime as build_r
        from callstream.router.settings import RouterSettings

        return build_r(RouterSettings())
    if name is ServiceName.summarizer:
        from callstream.summarizer.service import build_runtime as build_s
        from callstream.summarizer.settings import SummarizerSettings

        return build_s(SummarizerSettings())
    from callstream.llm_engine.server import build_runtime as build_l
    from callstream.llm_engine.settings import LlmEngineSettings

    return build_l(LlmEngineSettings())


@app.command()
def demo(
    inputs: Annotated[
        Path | None,
        typer.Option(
            help="A folder of your own: *.wav/*.flac/*.mp3 as calls (two channels = agent/customer) "
            "and tickets.csv (a 'text' column) as tickets. Default: the shipped samples."
        ),
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option(help="A trained classifier directory instead of the default.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per input instead of a table.")
    ] = False,
    keep_running: Annotated[bool, typer.Option(help="Leave the broker and services up after the results.")] = False,
    broker: Annotated[str, typer.Option(help="Local broker to start: noida or tansu.")] = "noida",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every summary.")] = 1200.0,
) -> None:
    """Run the whole pipeline locally: broker, four services, sample calls and tickets in, summaries out.

    Uses KAFKA_BOOTSTRAP_SERVERS when set instead of starting a local broker.
    """
    setup_logging("WARNING")
    from callstream.demo import run_demo

    code = run_demo(
        inputs=inputs,
        classifier=classifier,
        json_output=json_output,
        keep_running=keep_running,
        broker_kind=broker,
        timeout_s=timeout,
    )
    raise typer.Exit(code)


@app.command()
def setup() -> None:
    """Prepare the embedded default: train the starter intent classifier and render the sample calls."""
    setup_logging()
    from callstream.demo import prepare_defaults

    model_dir, calls = prepare_defaults()
    typer.echo(f"classifier: {model_dir}")
    typer.echo(f"sample calls: {len(calls)} in {calls[0].parent if calls else '-'}")


@app.command()
def transcribe(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An audio file (wav, flac, mp3, ...).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the Transcript message as JSON.")] = False,
) -> None:
    """Transcribe one audio file with the transcriber's engine (no Kafka)."""
    setup_logging("WARNING")
    from callstream.transcriber.cli import transcribe_command

    transcribe_command(file, json_output)


@app.command("transcribe-stream")
def transcribe_stream(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An audio file; stereo: agent, customer.")],
    address: Annotated[str, typer.Option(help="HOST:PORT of a running transcriber.")] = "127.0.0.1:50051",
    chunk_ms: Annotated[float, typer.Option(min=10, help="Milliseconds of audio per request.")] = 200,
    realtime: Annotated[
        bool, typer.Option("--realtime/--fast", help="Send at the pace of speech, or as fast as possible.")
    ] = True,
    encoding: Annotated[str, typer.Option(help="linear16 (16 kHz), mulaw or alaw (8 kHz telephony).")] = "linear16",
    interim: Annotated[bool, typer.Option("--interim/--no-interim", help="Ask for interim results.")] = True,
    roles: Annotated[str | None, typer.Option(help="Channel roles, e.g. 'agent,customer'.")] = None,
    call_id: Annotated[str | None, typer.Option(help="Call id (default: the file name).")] = None,
) -> None:
    """Stream FILE to a running transcriber (StreamingTranscribe) like a live call: interim and final results."""
    setup_logging("WARNING")
    from callstream.transcriber.stream_client import transcribe_stream_command

    transcribe_stream_command(file, address, chunk_ms, realtime, encoding, interim, roles, call_id)


@app.command()
def classify(
    text: Annotated[str, typer.Argument(help="The ticket or transcript text.")],
    model: Annotated[Path | None, typer.Option(help="Classifier directory (default: the starter classifier).")] = None,
    rules: Annotated[Path | None, typer.Option(help="Routing rules YAML (default: the shipped rules).")] = None,
    source_channel: Annotated[str, typer.Option(help="Source channel the rules see.")] = "email",
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Classify one text and show the queue the routing rules choose (no Kafka)."""
    setup_logging("WARNING")
    from callstream.router.cli import classify_command

    classify_command(text, model, rules, source_channel, json_output)


@app.command()
def summarize(
    source: Annotated[str, typer.Argument(help="A text file, or the text itself.")],
    engine: Annotated[
        str | None,
        typer.Option(
            help="Engine address (HOST:PORT) speaking the TensorRT-LLM gRPC protocol. Default: start the "
            "CPU engine in this process."
        ),
    ] = None,
    kind: Annotated[str, typer.Option(help="call or ticket")] = "ticket",
    json_output: Annotated[bool, typer.Option("--json", help="Print the structured summary as JSON.")] = False,
) -> None:
    """Summarize one transcript or ticket through the LLM engine's gRPC protocol (no Kafka)."""
    setup_logging("WARNING")
    from callstream.summarizer.oneshot import summarize_once

    path = Path(source)
    text = path.read_text() if len(source) < 4096 and path.is_file() else source
    result = asyncio.run(summarize_once(text, kind, engine))
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            typer.echo(f"{key:>20}: {value}")


@app.command()
def health(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a callstream service.")],
    service: Annotated[str, typer.Option(help="Service name to check; empty = the whole server.")] = "",
) -> None:
    """Ask a service's grpc.health.v1 endpoint, and list its services by reflection."""
    from callstream.core import health as health_client

    status = health_client.check(address, service)
    typer.echo(f"{address} {service or '(server)'}: {status}")
    for name in health_client.list_services(address):
        typer.echo(f"  {name}")
    raise typer.Exit(0 if status == "SERVING" else 1)


topics_app = typer.Typer(help="Kafka topics callstream uses.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create(
    partitions: Annotated[int, typer.Option(help="Partitions per topic.")] = 3,
) -> None:
    """Create every callstream topic (and its .dlq) on KAFKA_BOOTSTRAP_SERVERS if missing."""
    from callstream.core.kafka import ensure_topics
    from callstream.router.settings import RouterSettings

    settings = RouterSettings()
    topics = settings.topics.all_topics()
    asyncio.run(ensure_topics(settings.kafka, topics, partitions))
    typer.echo("\n".join(topics))


@topics_app.command("list")
def topics_list() -> None:
    """Print the topic names from the settings, with their message types (see docs/topics.md)."""
    from callstream.core.settings import TopicSettings

    t = TopicSettings()
    rows = [
        (t.calls_recorded, "CallRecorded"),
        (t.calls_transcribed, "Transcript"),
        (t.tickets_created, "TicketCreated"),
        (t.tickets_routed, "RoutedTicket"),
        (t.tickets_summarized, "Summary"),
        (t.calls_audio_chunks, "AudioChunk"),
        (t.calls_transcribed_partial, "PartialTranscript"),
    ]
    for name, kind in rows:
        typer.echo(f"{name:<26} callstream.v1.{kind}")
    for name in (t.calls_recorded, t.calls_transcribed, t.tickets_created, t.tickets_routed, t.calls_audio_chunks):
        typer.echo(f"{t.dlq(name):<26} callstream.v1.DeadLetter")


def _register_subapps() -> None:
    from callstream.loadtest.cli import loadtest_app  # also registers `callstream bench all`

    app.add_typer(loadtest_app, name="loadtest")
    try:
        from callstream.router.cli import classifier_app
    except ImportError as exc:  # pragma: no cover - only when the router package is broken
        print(f"warning: classifier commands unavailable: {exc}", file=sys.stderr)
        return
    app.add_typer(classifier_app, name="classifier", help="Train and evaluate intent classifiers.")
    app.command("route")(__import__("callstream.router.cli", fromlist=["route_command"]).route_command)
    from callstream.bench import bench_app

    app.add_typer(bench_app, name="bench")
    app.add_typer(__import__("callstream.transcriber.cli", fromlist=["x"]).transcriber_app, name="transcriber")
    app.add_typer(__import__("callstream.evaluation.cli", fromlist=["eval_app"]).eval_app, name="eval")


_register_subapps()


def main() -> None:
    """The console script: callstream's own errors (bad settings, a tampered model, unreadable input) print one
    clear line and exit 2 instead of a traceback."""
    from callstream.core.errors import CallstreamError

    try:
        app(standalone_mode=True)
    except CallstreamError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(2) from None
