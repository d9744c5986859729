"""`callstream loadtest kafka`: calls and tickets into a running stack at a fixed rate, end-to-end latency out.

Each event gets a unique id (the record key), and its event time (TicketCreated.created_at,
CallRecorded.started_at) is its SCHEDULED publish time: latency is measured from there, so a producer that falls
behind does not hide it (as in the gRPC open loop). A consumer of our own, assigned to the output topics
(calls.transcribed, tickets.routed, tickets.summarized and the dead-letter topics) from their end before the first
publish, notes when each event's outputs arrive, on this machine's clock:

    latency to a stage = arrival of the event's first record on that topic - scheduled publish time

An event is complete when its summary arrives (or a dead letter for it). While the test runs, the consumer lag of
every service group (committed offset vs. end offset of its input topics, through the admin client) is sampled.
Everything is bounded: the publishing by the duration or the counts, the wait for outputs by `drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callstream.core import codec
from callstream.core.settings import KafkaSettings, TopicSettings
from callstream.loadtest import SCHEMA
from callstream.loadtest.live import Rows, fmt_ms, show_progress
from callstream.loadtest.stats import histogram, interval_for, percentile, summarize, timeseries
from callstream.v1 import events_pb2

MAX_EVENTS = 1_000_000


@dataclass
class KafkaPlan:
    tickets_rate: float = 1.0  # tickets per second
    calls_rate: float = 0.0  # calls per second
    duration_s: float | None = 30.0  # publishing time
    tickets: int | None = None  # at most this many tickets
    calls: int | None = None  # at most this many calls
    drain_timeout_s: float = 300.0  # after the last publish, how long to wait for the outputs
    lag_interval_s: float = 1.0
    inline_audio: bool = False

    def validate(self) -> None:
        if self.tickets_rate < 0 or self.calls_rate < 0 or self.tickets_rate + self.calls_rate <= 0:
            raise ValueError("give a positive --tickets-rate and/or --calls-rate")
        for rate, count, what in ((self.tickets_rate, self.tickets, "tickets"), (self.calls_rate, self.calls, "calls")):
            if rate > 0 and count is None and self.duration_s is None:
                raise ValueError(f"{what}: give a duration or a count")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")

    def as_dict(self) -> dict[str, Any]:
        return {
            "tickets_rate": self.tickets_rate,
            "calls_rate": self.calls_rate,
            "duration_s": self.duration_s,
            "tickets": self.tickets,
            "calls": self.calls,
            "drain_timeout_s": self.drain_timeout_s,
            "lag_interval_s": self.lag_interval_s,
            "inline_audio": self.inline_audio,
        }


def schedule(plan: KafkaPlan) -> list[tuple[float, str, int]]:
    """(due seconds, kind, n) of every event, in time order: each kind at its own fixed rate."""
    events: list[tuple[float, str, int]] = []
    for kind, rate, count in (("ticket", plan.tickets_rate, plan.tickets), ("call", plan.calls_rate, plan.calls)):
        if rate <= 0 or count == 0:
            continue
        n = 0
        while len(events) < MAX_EVENTS and (count is None or n < count):
            due = n / rate
            if plan.duration_s is not None and due >= plan.duration_s:
                break
            events.append((due, kind, n))
            n += 1
    return sorted(events)


def group_inputs(topics: TopicSettings, prefix: str = "callstream") -> dict[str, list[str]]:
    """Each service's consumer group and the topics it consumes (core/kafka.py: '<prefix>-<service>')."""
    return {
        f"{prefix}-transcriber": [topics.calls_recorded],
        f"{prefix}-router": [topics.tickets_created, topics.calls_transcribed],
        f"{prefix}-summarizer": [topics.tickets_routed],
    }


@dataclass
class Event:
    id: str
    kind: str  # "call" | "ticket"
    scheduled: float  # seconds from the start
    published: float | None = None  # when the broker acknowledged it
    stages: dict[str, float] = field(default_factory=dict)  # topic -> first arrival (seconds from the start)
    dead_letter: tuple[str, str] | None = None  # (source topic, error type)
    publish_error: str = ""
    duplicates: int = 0
    final: float | None = None  # arrival of the summary

    @property
    def done(self) -> bool:
        return self.dead_letter is not None or bool(self.publish_error) or self.final is not None


@dataclass
class KafkaRun:
    kafka: KafkaSettings
    topics: TopicSettings
    plan: KafkaPlan
    tickets: Sequence[events_pb2.TicketCreated]
    calls: Sequence[events_pb2.CallRecorded]
    group_prefix: str = "callstream"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    events: dict[str, Event] = field(default_factory=dict)
    lag_t: list[float] = field(default_factory=list)
    lag: dict[str, list[int | None]] = field(default_factory=dict)
    lag_errors: list[str] = field(default_factory=list)
    t0: float = 0.0
    wall_t0: float = 0.0
    publish_done: bool = False
    publish_end: float = 0.0
    collect_end: float = 0.0
    dlq_examples: dict[str, str] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    @property
    def stage_topics(self) -> list[str]:
        t = self.topics
        return [t.calls_transcribed, t.tickets_routed, t.tickets_summarized]

    @property
    def dlq_topics(self) -> list[str]:
        t = self.topics
        return [t.dlq(x) for x in (t.calls_recorded, t.calls_transcribed, t.tickets_created, t.tickets_routed)]

    # --- messages ------------------------------------------------------------------------------------------
    def _message(self, kind: str, n: int, due: float) -> tuple[str, str, Any]:
        from google.protobuf.timestamp_pb2 import Timestamp

        ts = Timestamp()
        ts.FromNanoseconds(int((self.wall_t0 + due) * 1e9))
        if kind == "ticket":
            ticket = events_pb2.TicketCreated()
            ticket.CopyFrom(self.tickets[n % len(self.tickets)])
            ticket.ticket_id = f"lt-{self.run_id}-t{n:05d}"
            ticket.tenant = "loadtest"
            ticket.created_at.CopyFrom(ts)
            return ticket.ticket_id, self.topics.tickets_created, ticket
        call = events_pb2.CallRecorded()
        call.CopyFrom(self.calls[n % len(self.calls)])
        call.call_id = f"lt-{self.run_id}-c{n:05d}"
        call.tenant = "loadtest"
        call.started_at.CopyFrom(ts)
        return call.call_id, self.topics.calls_recorded, call

    # --- the run -------------------------------------------------------------------------------------------
    async def run(self, live: bool = True) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        from callstream.core.kafka import connection_kwargs, make_producer

        self.plan.validate()
        plan_events = schedule(self.plan)
        if any(k == "call" for _, k, _ in plan_events) and not self.calls:
            raise ValueError("calls are scheduled but there is no audio to send")
        if any(k == "ticket" for _, k, _ in plan_events) and not self.tickets:
            raise ValueError("tickets are scheduled but there are no tickets to send")
        conn = connection_kwargs(self.kafka)
        prefix = f"{self.kafka.client_id_prefix}-loadtest"
        watcher = AIOKafkaConsumer(client_id=f"{prefix}-watch", enable_auto_commit=False, **conn)
        probe = AIOKafkaConsumer(client_id=f"{prefix}-probe", enable_auto_commit=False, **conn)
        admin = AIOKafkaAdminClient(client_id=f"{prefix}-admin", **conn)
        producer = make_producer(self.kafka, f"{prefix}-producer")
        started: list[Any] = []
        try:
            for client in (watcher, probe, producer):
                await client.start()
                started.append(client)
            await admin.start()
            started.append(admin)
            await watcher.topics()  # metadata for every topic
            tps = [
                TopicPartition(topic, p)
                for topic in self.stage_topics + self.dlq_topics
                for p in sorted(watcher.partitions_for_topic(topic) or ())
            ]
            if not tps:
                raise ValueError(f"none of the output topics exist on {self.kafka.bootstrap_servers}")
            watcher.assign(tps)
            await watcher.seek_to_end(*tps)
            for tp in tps:
                await watcher.position(tp)  # resolve the end offsets now, before anything is published
            await probe.topics()
            loop = asyncio.get_running_loop()
            self.t0 = loop.time()
            self.wall_t0 = time.time()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGINT, self.stop.set)  # Ctrl-C: stop, keep what was measured
            done = asyncio.Event()
            display = asyncio.create_task(show_progress("loadtest kafka", self.progress_rows, done, enabled=live))
            lagger = asyncio.create_task(self._sample_lag(admin, probe, done))
            collector = asyncio.create_task(self._collect(watcher))
            try:
                await self._publish(producer, plan_events)
                await collector
            finally:
                done.set()
                collector.cancel()
                await asyncio.gather(collector, lagger, display, return_exceptions=True)
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(signal.SIGINT)
        finally:
            for client in reversed(started):
                with contextlib.suppress(Exception):
                    await (client.close() if client is admin else client.stop())

    async def _publish(self, producer: Any, plan_events: list[tuple[float, str, int]]) -> None:
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[Any]] = []
        for due, kind, n in plan_events:
            delay = due - self.now()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                break
            key, topic, message = self._message(kind, n, due)
            event = Event(key, kind, due)
            self.events[key] = event
            try:
                ack = await producer.send(
                    topic, codec.encode(message), key=key.encode(), headers=codec.headers_for(message)
                )
            except Exception as exc:  # noqa: BLE001 - counted as a failed publish
                event.publish_error = f"{type(exc).__name__}: {exc}"
                continue

            def acked(fut: asyncio.Future[Any], event: Event = event) -> None:
                if fut.cancelled() or fut.exception() is not None:
                    event.publish_error = repr(fut.exception()) if not fut.cancelled() else "cancelled"
                else:
                    event.published = loop.time() - self.t0

            ack.add_done_callback(acked)
            acks.append(ack)
        if acks:
            await asyncio.gather(*acks, return_exceptions=True)
        self.publish_end = self.now()
        self.publish_done = True

    async def _collect(self, watcher: Any) -> None:
        stage_topics = set(self.stage_topics)
        summarized = self.topics.tickets_summarized
        try:
            while True:
                if self.stop.is_set():
                    break
                if self.publish_done and (
                    all(e.done for e in self.events.values())
                    or self.now() > self.publish_end + self.plan.drain_timeout_s
                ):
                    break
                batches = await watcher.getmany(timeout_ms=200)
                arrived = self.now()
                for record in (r for rs in batches.values() for r in rs):
                    event = self.events.get((record.key or b"").decode(errors="replace"))
                    if event is None:
                        continue
                    if record.topic in stage_topics:
                        if record.topic in event.stages:
                            event.duplicates += 1
                            continue
                        event.stages[record.topic] = arrived
                        if record.topic == summarized:
                            event.final = arrived
                    elif event.dead_letter is None:
                        letter = codec.decode(events_pb2.DeadLetter, record.value)
                        event.dead_letter = (letter.source_topic, letter.error_type)
                        label = f"dead letter {letter.source_topic}: {letter.error_type}"
                        self.dlq_examples.setdefault(label, letter.error_message[:300])
        finally:
            self.collect_end = self.now()

    async def _sample_lag(self, admin: Any, probe: Any, done: asyncio.Event) -> None:
        from aiokafka import TopicPartition

        groups = group_inputs(self.topics, self.group_prefix)
        for g in groups:
            self.lag[g] = []
        while not done.is_set():
            t = self.now()
            values: dict[str, int | None] = {}
            for group, inputs in groups.items():
                try:
                    tps = [TopicPartition(tp, p) for tp in inputs for p in sorted(probe.partitions_for_topic(tp) or ())]
                    committed = await asyncio.wait_for(admin.list_consumer_group_offsets(group, partitions=tps), 5)
                    ends = await asyncio.wait_for(probe.end_offsets(tps), 5)
                    starts = await asyncio.wait_for(probe.beginning_offsets(tps), 5)
                    total = 0
                    for tp in tps:
                        meta = committed.get(tp)
                        at = meta.offset if meta is not None and meta.offset >= 0 else starts.get(tp, 0)
                        total += max(0, ends.get(tp, 0) - at)
                    values[group] = total
                except Exception as exc:  # noqa: BLE001 - lag is best effort; the error is reported
                    values[group] = None
                    if len(self.lag_errors) < 5:
                        self.lag_errors.append(f"{group}: {type(exc).__name__}: {exc}")
            self.lag_t.append(round(t, 3))
            for group in groups:
                self.lag[group].append(values[group])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.plan.lag_interval_s)

    # --- progress and result -------------------------------------------------------------------------------
    def progress_rows(self) -> Rows:
        events = list(self.events.values())
        counts = Counter(t for e in events for t in e.stages)
        e2e = sorted((e.final - e.scheduled) * 1000.0 for e in events if e.final is not None)
        lag = ", ".join(
            f"{g.rsplit('-', 1)[-1]} {v[-1] if v and v[-1] is not None else '-'}" for g, v in self.lag.items()
        )
        calls = sum(e.kind == "call" for e in events)
        return [
            ("elapsed", f"{self.now():.1f} s"),
            ("published", f"{len(events)} ({calls} calls, {len(events) - calls} tickets)"),
            *((f"-> {t}", str(counts.get(t, 0))) for t in self.stage_topics),
            ("dead letters", str(sum(e.dead_letter is not None for e in events))),
            (
                "e2e p50 / p95",
                f"{fmt_ms(percentile(e2e, 50) if e2e else None)} / {fmt_ms(percentile(e2e, 95) if e2e else None)}",
            ),
            ("consumer lag", lag or "-"),
        ]

    def result(
        self, config: Mapping[str, Any], machine: Mapping[str, Any], include_samples: bool = True
    ) -> dict[str, Any]:
        events = list(self.events.values())
        published = [e for e in events if not e.publish_error]
        completed = [e for e in events if e.final is not None]
        dead = [e for e in events if e.dead_letter is not None and e.final is None]
        missing = [e for e in published if not e.done]
        e2e = [(e.final - e.scheduled) * 1000.0 for e in completed if e.final is not None]
        first = min((e.scheduled for e in events), default=0.0)
        last = max((e.final for e in completed if e.final is not None), default=first)
        elapsed = max(last - first, 1e-9)
        span_pub = max((e.scheduled for e in events), default=0.0) - first
        summary: dict[str, Any] = {
            "published": len(published),
            "published_calls": sum(e.kind == "call" for e in published),
            "published_tickets": sum(e.kind == "ticket" for e in published),
            "publish_failed": len(events) - len(published),
            "completed": len(completed),
            "dead_lettered": len(dead),
            "missing": len(missing),
            "duplicates": sum(e.duplicates for e in events),
            "error_rate": round((len(events) - len(completed)) / len(events), 6) if events else 0.0,
            "elapsed_s": round(elapsed, 3),
            "publish_rate_per_s": round((len(events) - 1) / span_pub, 3) if span_pub > 0 else None,
            "throughput_per_s": round(len(completed) / elapsed, 3) if completed else 0.0,
            "e2e_ms": summarize(e2e),
            "e2e_ms_by_kind": {
                kind: summarize((e.final - e.scheduled) * 1000.0 for e in completed if e.kind == kind and e.final)
                for kind in ("call", "ticket")
                if any(e.kind == kind for e in events)
            },
        }
        previous: dict[str, dict[str, str | None]] = {
            self.topics.calls_transcribed: {"call": None},
            self.topics.tickets_routed: {"call": self.topics.calls_transcribed, "ticket": None},
            self.topics.tickets_summarized: {"call": self.topics.tickets_routed, "ticket": self.topics.tickets_routed},
        }
        stages: dict[str, Any] = {}
        stage_hists: dict[str, Any] = {}
        for topic in self.stage_topics:
            lat = [(e.stages[topic] - e.scheduled) * 1000.0 for e in events if topic in e.stages]
            if not lat and not any(e.kind in previous[topic] for e in events):
                continue
            step = []
            for e in events:
                if topic in e.stages and e.kind in previous[topic]:
                    before = previous[topic][e.kind]
                    base = e.scheduled if before is None else e.stages.get(before)
                    if base is not None:
                        step.append((e.stages[topic] - base) * 1000.0)
            stages[topic] = {
                "count": len(lat),
                "latency_ms": summarize(lat),
                "stage_time_ms": summarize(step),
                "by_kind": {
                    kind: summarize(
                        (e.stages[topic] - e.scheduled) * 1000.0 for e in events if e.kind == kind and topic in e.stages
                    )
                    for kind in previous[topic]
                    if any(e.kind == kind for e in events)
                },
            }
            stage_hists[topic] = histogram(lat)
        status: Counter[str] = Counter()
        status["summarized"] = len(completed)
        for e in dead:
            assert e.dead_letter is not None
            status[f"dead letter {e.dead_letter[0]}: {e.dead_letter[1]}"] += 1
        if missing:
            status["missing (no summary within the drain timeout)"] = len(missing)
        if summary["publish_failed"]:
            status["publish failed"] = summary["publish_failed"]
        lag_max = {g: max((v for v in vals if v is not None), default=None) for g, vals in self.lag.items()}
        lag_mean = {
            g: round(sum(ok) / len(ok), 3) if (ok := [v for v in vals if v is not None]) else None
            for g, vals in self.lag.items()
        }
        span = max(self.collect_end, self.plan.duration_s or 0.0)
        interval = interval_for(span)
        ended = [e.final if e.final is not None else self.collect_end for e in events if e.done]
        lat_or_none = [(e.final - e.scheduled) * 1000.0 if e.final is not None else None for e in events if e.done]
        warnings = []
        if self.lag_errors:
            warnings.append("consumer lag could not always be read: " + "; ".join(self.lag_errors[:3]))
        if missing:
            warnings.append(
                f"{len(missing)} events had no summary or dead letter after {self.plan.drain_timeout_s:g} s"
            )
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "kind": "kafka",
            "name": config.get("name") or "kafka end to end",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.wall_t0)),
            "machine": dict(machine),
            "config": {
                **{k: v for k, v in config.items() if k != "name"},
                **self.plan.as_dict(),
                "run_id": self.run_id,
            },
            "summary": summary,
            "stages": stages,
            "status_counts": dict(status),
            "error_examples": dict(self.dlq_examples),
            "warnings": warnings,
            "histogram": histogram(e2e),
            "stage_histograms": stage_hists,
            "timeseries": {
                "interval_s": interval,
                "binned_by": "arrival of the summary (or dead letter)",
                **timeseries(
                    ended, lat_or_none, interval_s=interval, span_s=span, started_s=[e.scheduled for e in events]
                ),
            },
            "lag": {
                "interval_s": self.plan.lag_interval_s,
                "groups_topics": group_inputs(self.topics, self.group_prefix),
                "t_s": self.lag_t,
                "groups": self.lag,
                "max": lag_max,
                "mean": lag_mean,
            },
        }
        if include_samples:
            result["samples"] = {
                "events": [
                    {
                        "id": e.id,
                        "kind": e.kind,
                        "scheduled_s": round(e.scheduled, 6),
                        "published_s": None if e.published is None else round(e.published, 6),
                        "stages_s": {k: round(v, 6) for k, v in e.stages.items()},
                        "dead_letter": list(e.dead_letter) if e.dead_letter else None,
                        "publish_error": e.publish_error or None,
                    }
                    for e in events
                ]
            }
        return result


def load_calls(audio: Path | None, inline: bool) -> list[events_pb2.CallRecorded]:
    from callstream.demo import call_from_audio
    from callstream.loadtest.targets import load_audio

    calls = []
    for path in load_audio(audio):
        call = call_from_audio(path, tenant="loadtest")
        if inline:
            call.audio_bytes = path.read_bytes()
        calls.append(call)
    return calls


async def kafka_loadtest(
    kafka: KafkaSettings,
    topics: TopicSettings,
    plan: KafkaPlan,
    *,
    tickets: Sequence[events_pb2.TicketCreated],
    calls: Sequence[events_pb2.CallRecorded],
    config: Mapping[str, Any],
    group_prefix: str = "callstream",
    live: bool = True,
    include_samples: bool = True,
) -> dict[str, Any]:
    import os

    from callstream.loadtest.grpc_load import machine_info

    machine = machine_info()
    run = KafkaRun(kafka, topics, plan, tickets, calls, group_prefix=group_prefix)
    await run.run(live=live)
    with contextlib.suppress(OSError):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return run.result(config, machine, include_samples=include_samples)
