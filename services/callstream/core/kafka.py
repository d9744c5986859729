"""Kafka I/O with at-least-once delivery and dead-lettering, on aiokafka.

Why aiokafka rather than faust agents: see docs/architecture.md. In short, faust-streaming 0.15.3 was seen to
skip records produced while a worker was down, and a service that must lose nothing needs to commit an
offset only after its result (or dead letter) is acknowledged by the broker. This module does exactly that:

    poll a batch -> handle its records concurrently (so the model batcher sees them together)
    -> produce every result or dead letter -> wait for the broker's acks -> commit the batch's offsets.

A crash anywhere before the commit means the batch is consumed again: duplicates are possible, losses are not.

A handler whose results span many records (a live call's audio chunks, transcriber/streaming_kafka.py) passes
`hooks` (ProcessorHooks): it gets a `tick()` after every poll for time-driven results (a live call closed for being
idle), it may hold a partition's commit back (to the first chunk of a call still open, so that a crash replays the
whole call), and it hears of revoked partitions. With `sequential_keys`, records with the same key are handled one
after another in offset order (records of different keys still concurrently).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, TopicAlreadyExistsError
from aiokafka.structs import OffsetAndMetadata
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from callstream.core import codec, metrics
from callstream.core.errors import TransientError
from callstream.core.grpc_server import Component, GrpcService, ServiceRuntime
from callstream.core.settings import KafkaSettings, ServiceSettings, TopicSettings
from callstream.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass
class OutRecord:
    """A record to produce: a result or a dead letter."""

    topic: str
    key: bytes
    message: Message
    headers: list[tuple[str, bytes]] = field(default_factory=list)


Handler = Callable[[ConsumerRecord], Awaitable[list[OutRecord]]]


class ProcessorHooks(Protocol):
    """What a handler with state across records tells the processor (see the module docstring)."""

    async def tick(self) -> list[OutRecord]:
        """Results that are due without a new record; produced and acknowledged before the next commit."""
        ...

    def commit_offset(self, tp: TopicPartition, processed: int) -> int:
        """How far `tp` may be committed when every record before `processed` has been handled (<= processed)."""
        ...

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        """These partitions went to another consumer: drop their state (it replays them from the commit)."""
        ...


class _Revocations(ConsumerRebalanceListener):
    def __init__(self, processor: KafkaProcessor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.processor._generation += 1
        revoked = list(revoked)
        for tp in revoked:
            self.processor._processed.pop(tp, None)
            self.processor._committed.pop(tp, None)
        if self.processor.hooks is not None and revoked:
            self.processor.hooks.revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.processor._generation += 1
        for tp in assigned:
            self.processor._processed.pop(tp, None)
            self.processor._committed.pop(tp, None)


def connection_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.sasl_mechanism:
        kwargs.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    return kwargs


def make_producer(settings: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=5,
        max_request_size=16 * 1024 * 1024,
        **connection_kwargs(settings),
    )


async def ensure_topics(
    settings: KafkaSettings, topics: Iterable[str], partitions: int = 3, max_message_bytes: int = 16 * 1024 * 1024
) -> None:
    """Create any missing topics with explicit partition counts (local brokers auto-create with 1)."""
    admin = AIOKafkaAdminClient(client_id=f"{settings.client_id_prefix}-admin", **connection_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                t,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs={"max.message.bytes": str(max_message_bytes)},
            )
            for t in topics
            if t not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


def now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def dead_letter(record: ConsumerRecord, exc: BaseException, service: str, topics: TopicSettings) -> OutRecord:
    letter = events_pb2.DeadLetter(
        original_key=record.key or b"",
        original_value=record.value or b"",
        original_headers=[events_pb2.Header(key=k, value=v) for k, v in (record.headers or [])],
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        error_type=type(exc).__name__,
        error_message=str(exc) or repr(exc),
        service=service,
        failed_at=now_timestamp(),
    )
    return OutRecord(topics.dlq(record.topic), record.key or b"", letter)


class KafkaProcessor:
    """Consumes input topics, runs a handler per record, produces results, commits after acks."""

    def __init__(
        self,
        *,
        service: str,
        kafka: KafkaSettings,
        topics: TopicSettings,
        input_topics: list[str],
        handler: Handler,
        group_id: str | None = None,
        transient_retry_s: float = 60.0,
        batch_lock: asyncio.Lock | None = None,
        hooks: ProcessorHooks | None = None,
        sequential_keys: bool = False,
    ) -> None:
        self.service = service
        # Held for each whole batch (handle, produce, commit): lets a model swap happen only between batches.
        self.batch_lock = batch_lock
        self.kafka = kafka
        self.topics = topics
        self.input_topics = input_topics
        self.handler = handler
        self.group_id = group_id or f"{kafka.client_id_prefix}-{service}"
        self.transient_retry_s = transient_retry_s
        self.hooks = hooks
        self.sequential_keys = sequential_keys
        # Per partition: the offset after the last handled record, and the offset last committed.
        self._processed: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._generation = 0  # rebalances so far: a batch that straddles one commits nothing
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.processed = 0

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        client_id = f"{self.kafka.client_id_prefix}-{self.service}"
        self._producer = make_producer(self.kafka, client_id)
        self._consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=self.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
            max_poll_records=self.kafka.max_poll_records,
            **connection_kwargs(self.kafka),
        )
        self._consumer.subscribe(self.input_topics, listener=_Revocations(self))
        await self._producer.start()
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"kafka-{self.service}")

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        """Finish the batch in hand (its results are produced and committed), then leave the group."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=60)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:  # noqa: BLE001 - already logged by the loop
                pass
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=200, max_records=self.kafka.max_poll_records)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                if self.hooks is not None:
                    await self._produce(await self.hooks.tick())
                    await self._commit()
                continue
            if self.batch_lock is None:
                await self._process_batch(records)
            else:
                async with self.batch_lock:
                    await self._process_batch(records)

    async def _process_batch(self, records: list[ConsumerRecord]) -> None:
        assert self._producer is not None and self._consumer is not None
        generation = self._generation
        outputs = await self._handle_all(records)
        if self.hooks is not None:
            outputs.append(await self.hooks.tick())
        await self._produce(o for outs in outputs for o in outs)
        if generation != self._generation:
            # The group rebalanced while we worked: whoever owns these partitions now consumes them again (their
            # results are out already: duplicates, never losses).
            log.warning("%s: a rebalance happened during the batch; its offsets are not committed", self.service)
            return
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            self._processed[tp] = max(self._processed.get(tp, -1), r.offset + 1)
        await self._commit()
        self.processed += len(records)

    async def _handle_all(self, records: list[ConsumerRecord]) -> list[list[OutRecord]]:
        if not self.sequential_keys:
            return list(await asyncio.gather(*(self._handle(r) for r in records)))
        # Records of one key in offset order (a live call's chunks), different keys concurrently.
        by_key: dict[tuple[str, int, bytes | None], list[int]] = {}
        for i, r in enumerate(records):
            by_key.setdefault((r.topic, r.partition, r.key), []).append(i)
        outputs: list[list[OutRecord]] = [[] for _ in records]

        async def in_order(indexes: list[int]) -> None:
            for i in indexes:
                outputs[i] = await self._handle(records[i])

        await asyncio.gather(*(in_order(ix) for ix in by_key.values()))
        return outputs

    async def _produce(self, outputs: Iterable[OutRecord]) -> None:
        assert self._producer is not None
        acks = []
        for out in outputs:
            headers = codec.headers_for(out.message) + out.headers
            acks.append(
                (
                    out.topic,
                    await self._producer.send(out.topic, codec.encode(out.message), key=out.key, headers=headers),
                )
            )
        for topic, ack in acks:
            await ack  # raises if the broker did not take it: then nothing is committed after it
            metrics.EVENTS_PRODUCED.labels(self.service, topic).inc()

    async def _commit(self) -> None:
        """Commit every partition whose commit point moved (held back where the hooks say so)."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        offsets: dict[TopicPartition, int] = {}
        for tp, processed in self._processed.items():
            if tp not in assigned:
                continue
            target = processed if self.hooks is None else min(processed, self.hooks.commit_offset(tp, processed))
            if target > self._committed.get(tp, -1):
                offsets[tp] = target
        if not offsets:
            return
        try:
            await self._consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        except CommitFailedError as exc:
            # The group rebalanced while we worked: another member will consume these records again.
            log.warning("%s: commit failed after a rebalance, records will be redelivered: %s", self.service, exc)
            return
        self._committed.update(offsets)

    async def _handle(self, record: ConsumerRecord) -> list[OutRecord]:
        metrics.EVENTS_CONSUMED.labels(self.service, record.topic).inc()
        started = time.perf_counter()
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TransientError),
                stop=stop_after_delay(self.transient_retry_s),
                wait=wait_exponential(multiplier=0.5, max=10),
                reraise=True,
            ):
                with attempt:
                    return await self.handler(record)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a dead letter, never a loss
            log.warning(
                "%s: dead-lettering %s[%d]@%d: %s: %s",
                self.service,
                record.topic,
                record.partition,
                record.offset,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, Exception) or log.isEnabledFor(logging.DEBUG),
            )
            metrics.EVENTS_DEAD_LETTERED.labels(self.service, record.topic, type(exc).__name__).inc()
            return [dead_letter(record, exc, self.service, self.topics)]
        finally:
            metrics.EVENT_SECONDS.labels(self.service).observe(time.perf_counter() - started)
        raise AssertionError("unreachable")  # pragma: no cover


def kafka_service_runtime(
    *,
    name: str,
    settings: ServiceSettings,
    model: Component,
    grpc_service: GrpcService,
    input_topics: list[str],
    handler: Handler,
    transient_retry_s: float = 60.0,
    batch_lock: asyncio.Lock | None = None,
    hooks: ProcessorHooks | None = None,
    sequential_keys: bool = False,
) -> ServiceRuntime:
    """A service that answers gRPC and, when `settings.consume`, consumes `input_topics` with `handler`.

    The model component starts first (health stays NOT_SERVING while it loads), the Kafka processor after it;
    the service stops if the Kafka loop dies.
    """
    components: list[Component] = [model]
    processor: KafkaProcessor | None = None
    if settings.consume:
        processor = KafkaProcessor(
            service=name,
            kafka=settings.kafka,
            topics=settings.topics,
            input_topics=input_topics,
            handler=handler,
            transient_retry_s=transient_retry_s,
            batch_lock=batch_lock,
            hooks=hooks,
            sequential_keys=sequential_keys,
        )
        components.append(processor)
    return ServiceRuntime(
        name=name,
        settings=settings,
        grpc_services=[grpc_service],
        components=components,
        watch=lambda: [processor.wait()] if processor else [],
    )
