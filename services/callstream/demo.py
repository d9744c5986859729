"""`callstream demo`: the embedded default, end to end, through a real broker and the real services.

local broker (noida-db) -> topics -> llm-engine, transcriber, router, summarizer (child processes)
-> sample calls (calls.recorded) and tickets (tickets.created) in
-> wait for tickets.summarized (or a dead letter) for every input -> table or JSON -> clean stop
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from callstream.core import codec
from callstream.core.kafka import connection_kwargs, make_producer, now_timestamp
from callstream.core.settings import KafkaSettings, TopicSettings, callstream_home
from callstream.core.stack import LocalStack
from callstream.v1 import events_pb2

SAMPLES = Path(__file__).parent / "samples"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
# Model loading takes a while on two cores; the first run also builds caches.
READY_TIMEOUT_S = 300.0


def prepare_defaults() -> tuple[Path, list[Path]]:
    """Train the starter classifier and render the sample calls, once (cached under CALLSTREAM_HOME)."""
    from callstream.router.cli import ensure_default_classifier
    from callstream.transcriber.synth import synthesize_samples

    model_dir = ensure_default_classifier(progress=True)
    calls = synthesize_samples(callstream_home() / "sample-calls")
    return model_dir, calls


@dataclass
class DemoInput:
    id: str
    kind: str  # "call" or "ticket"
    message: Any
    text: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def _channels(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return int(stream.codec_context.channels or 1)


def call_from_audio(path: Path, call_id: str | None = None, tenant: str = "demo") -> events_pb2.CallRecorded:
    """A CallRecorded pointing at an audio file (two channels = agent/customer)."""
    roles = {0: "agent", 1: "customer"} if _channels(path) >= 2 else {}
    return events_pb2.CallRecorded(
        call_id=call_id or f"call-{path.stem}",
        tenant=tenant,
        started_at=now_timestamp(),
        audio_uri=path.resolve().as_uri(),
        channel_roles=roles,
    )


def tickets_from_csv(path: Path, tenant: str = "demo") -> list[events_pb2.TicketCreated]:
    """TicketCreated messages from a CSV (a `text` or `body` column; optional ticket_id, subject, source_channel)."""
    tickets: list[events_pb2.TicketCreated] = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=1):
            tickets.append(
                events_pb2.TicketCreated(
                    ticket_id=row.get("ticket_id") or f"ticket-{n:03d}",
                    tenant=tenant,
                    source_channel=row.get("source_channel") or "email",
                    subject=row.get("subject") or "",
                    body=row.get("body") or row.get("text") or "",
                    created_at=now_timestamp(),
                )
            )
    return tickets


def audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)


def collect_inputs(inputs: Path | None, sample_calls: list[Path]) -> list[DemoInput]:
    folder = inputs or SAMPLES / "tickets"
    audio = audio_files(folder) if inputs else sample_calls
    items: list[DemoInput] = []
    for path in audio:
        call = call_from_audio(path)
        items.append(DemoInput(call.call_id, "call", call))
    tickets_csv = folder / "tickets.csv"
    if tickets_csv.exists():
        for ticket in tickets_from_csv(tickets_csv):
            items.append(DemoInput(ticket.ticket_id, "ticket", ticket, text=ticket.body))
    return items


async def _publish(kafka: KafkaSettings, topics: TopicSettings, items: list[DemoInput]) -> None:
    producer = make_producer(kafka, "callstream-demo")
    await producer.start()
    try:
        acks = []
        for item in items:
            topic = topics.calls_recorded if item.kind == "call" else topics.tickets_created
            acks.append(
                await producer.send(
                    topic, codec.encode(item.message), key=item.id.encode(), headers=codec.headers_for(item.message)
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def _collect(
    kafka: KafkaSettings, topics: TopicSettings, items: list[DemoInput], timeout_s: float, progress: Progress | None
) -> None:
    by_id = {i.id: i for i in items}
    watched = [
        topics.calls_transcribed,
        topics.tickets_routed,
        topics.tickets_summarized,
        *(
            topics.dlq(t)
            for t in (topics.calls_recorded, topics.calls_transcribed, topics.tickets_created, topics.tickets_routed)
        ),
    ]
    consumer = AIOKafkaConsumer(
        *watched,
        group_id=f"callstream-demo-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=kafka.session_timeout_ms,
        **connection_kwargs(kafka),
    )
    await consumer.start()
    task = progress.add_task("summaries", total=len(items)) if progress else None
    deadline = time.monotonic() + timeout_s
    done: set[str] = set()
    try:
        while len(done) < len(items) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for record in (r for rs in batches.values() for r in rs):
                key = (record.key or b"").decode()
                item = by_id.get(key)
                if item is None:
                    continue
                if record.topic == topics.calls_transcribed:
                    item.text = codec.decode(events_pb2.Transcript, record.value).text
                elif record.topic == topics.tickets_routed:
                    routed = codec.decode(events_pb2.RoutedTicket, record.value)
                    item.result.update(
                        intent=routed.intents[0].name if routed.intents else "",
                        confidence=round(routed.intents[0].score, 3) if routed.intents else 0.0,
                        queue=routed.queue,
                        needs_human=routed.needs_human,
                    )
                    item.text = item.text or routed.text
                elif record.topic == topics.tickets_summarized:
                    summary = codec.decode(events_pb2.Summary, record.value)
                    item.result["summary"] = MessageToDict(summary, preserving_proto_field_name=True)
                    done.add(key)
                else:
                    letter = codec.decode(events_pb2.DeadLetter, record.value)
                    item.result["error"] = f"{letter.source_topic}: {letter.error_type}: {letter.error_message}"
                    done.add(key)
            if progress is not None and task is not None:
                progress.update(task, completed=len(done))
    finally:
        await consumer.stop()


def _as_json(item: DemoInput) -> dict[str, Any]:
    summary = item.result.get("summary", {})
    return {
        "id": item.id,
        "kind": item.kind,
        "text": item.text,
        "intent": item.result.get("intent"),
        "confidence": item.result.get("confidence"),
        "queue": item.result.get("queue"),
        "needs_human": item.result.get("needs_human"),
        "summary": summary.get("summary"),
        "structured": {
            k: summary.get(k) for k in ("issue", "resolution", "action_items", "customer_sentiment", "follow_up_needed")
        }
        if summary
        else None,
        "engine": summary.get("engine"),
        "model_id": summary.get("model_id"),
        "error": item.result.get("error"),
    }


def _table(items: list[DemoInput]) -> Table:
    table = Table(title="callstream demo: routed summaries")
    for column in ("id", "kind", "queue", "intent", "confidence", "summary"):
        table.add_column(column, overflow="fold")
    for item in items:
        error = str(item.result.get("error", "no summary"))[:160]
        summary = item.result.get("summary", {}).get("summary") or f"[red]{error}"
        table.add_row(
            item.id,
            item.kind,
            str(item.result.get("queue", "")),
            str(item.result.get("intent", "")),
            f"{item.result.get('confidence', 0.0):.2f}",
            _first_words(summary, 14),
        )
    return table


def _first_words(text: str, n: int) -> str:
    """The first n words, with an ellipsis when there were more (--json prints the whole summary)."""
    words = text.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def run_demo(
    *,
    inputs: Path | None,
    classifier: Path | None,
    json_output: bool,
    keep_running: bool,
    broker_kind: str,
    timeout_s: float,
) -> int:
    console = Console(stderr=True)
    topics = TopicSettings()
    console.print("[bold]callstream demo[/]: preparing the default classifier and sample calls")
    default_model, sample_calls = prepare_defaults()
    items = collect_inputs(inputs, sample_calls)
    if not items:
        console.print(f"[red]no calls or tickets.csv found in {inputs}")
        return 2

    log_dir = Path(tempfile.mkdtemp(prefix="callstream-demo-logs-"))
    stack = LocalStack(
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        broker_kind=broker_kind,
        env={"CALLSTREAM_ROUTER_MODEL_DIR": str(classifier or default_model)},
        log_dir=log_dir,
    )
    try:
        stack.start()
        if stack.broker is not None:
            console.print(f"started a local {broker_kind} broker on {stack.bootstrap}")
        kafka = stack.kafka_settings()
        services = stack.services
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            loading = progress.add_task("loading models (4 services)", total=len(services))
            stack.wait_ready(READY_TIMEOUT_S, on_ready=lambda _s: progress.advance(loading))
            console.print(
                f"publishing {sum(i.kind == 'call' for i in items)} calls and "
                f"{sum(i.kind == 'ticket' for i in items)} tickets; service logs in {log_dir}"
            )
            asyncio.run(_publish(kafka, topics, items))
            asyncio.run(_collect(kafka, topics, items, timeout_s, progress))
        if json_output:
            for item in items:
                print(json.dumps(_as_json(item)))
        else:
            # Wide enough for the table even when stdout is not a terminal (CI logs, pipes).
            out = Console() if sys.stdout.isatty() else Console(width=180)
            out.print(_table(items))
        missing = [i.id for i in items if "summary" not in i.result]
        if missing:
            console.print(f"[red]{len(missing)} inputs without a summary: {', '.join(missing)}")
        if keep_running:
            console.print(
                f"stack is up: broker {stack.bootstrap}; "
                + ", ".join(f"{s.name} {s.address}" for s in services)
                + ". Ctrl-C stops it."
            )
            try:
                while stack.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 1 if missing else 0
    finally:
        stack.stop()
