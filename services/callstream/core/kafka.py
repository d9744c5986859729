"""Kafka I/O with at-least-once delivery and dead-lettering, on aiokafka.

Why aiokafka rather than faust agents: see docs/architecture.md. In short, faust-streaming 0.15.3 was seen to
skip records produced while a worker was down, and a service that must lose nothing needs to commit an
offset only after its result (or dead letter) is acknowledged by the broker. This module does exactly that:

    poll a batch -> handle its records concurrently (so the model batcher sees them together)
    -> produce every result or dead letter -> wait for the broker's acks -> commit the batch's offsets.

A crash anywhere before the commit means the batch is consumed again: duplicates are possible, losses are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
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
            *self.input_topics,
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
                continue
            if self.batch_lock is None:
                await self._process_batch(records)
            else:
                async with self.batch_lock:
                    await self._process_batch(records)

    async def _process_batch(self, records: list[ConsumerRecord]) -> None:
        assert self._producer is not None and self._consumer is not None
        outputs = await asyncio.gather(*(self._handle(r) for r in records))
        acks = []
        for out in (o for outs in outputs for o in outs):
            headers = codec.headers_for(out.message) + out.headers
            acks.append(
                (
                    out.topic,
                    await self._producer.send(out.topic, codec.encode(out.message), key=out.key, headers=headers),
                )
            )
        for topic, ack in acks:
            await ack  # raises if the broker did not take it: then nothing below is committed
            metrics.EVENTS_PRODUCED.labels(self.service, topic).inc()
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        try:
            await self._consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        except CommitFailedError as exc:
            # The group rebalanced while we worked: another member will consume these records again.
            log.warning("%s: commit failed after a rebalance, records will be redelivered: %s", self.service, exc)
        self.processed += len(records)

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
        )
        components.append(processor)
    return ServiceRuntime(
        name=name,
        settings=settings,
        grpc_services=[grpc_service],
        components=components,
        watch=lambda: [processor.wait()] if processor else [],
    )
