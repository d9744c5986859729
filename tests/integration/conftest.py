"""Integration fixtures: a REAL Kafka-protocol broker over a socket and the real services as processes.

Broker: testcontainers' Kafka (Apache Kafka) when a Docker daemon answers; otherwise noida-db 0.2.0 on
loopback. Delivery tests also run on Tansu. No mocks here: every service is `callstream serve NAME` with real
models.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from callstream.core.broker import LocalBroker
from callstream.core.kafka import connection_kwargs, ensure_topics, make_producer
from callstream.core.settings import KafkaSettings, TopicSettings
from callstream.core.stack import ServiceProcess, stack_env

log = logging.getLogger(__name__)
TOPICS = TopicSettings()


def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no daemon"
        return False


@dataclass
class Broker:
    kind: str
    bootstrap: str
    idempotent: bool
    session_timeout_ms: int
    log_dir: Path
    services: list[ServiceProcess] = field(default_factory=list)

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=self.idempotent,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.session_timeout_ms // 4),
        )

    def env(self, **extra: str) -> dict[str, str]:
        return stack_env(
            self.bootstrap,
            self.idempotent,
            {
                "KAFKA_SESSION_TIMEOUT_MS": str(self.session_timeout_ms),
                "KAFKA_HEARTBEAT_INTERVAL_MS": str(max(500, self.session_timeout_ms // 4)),
                **extra,
            },
        )

    def start_service(self, name: str, timeout_s: float = 300.0, **extra_env: str) -> ServiceProcess:
        service = ServiceProcess(name, self.env(**extra_env), log_dir=self.log_dir).start()
        self.services.append(service)
        service.wait_ready(timeout_s)
        return service

    # --- producing and consuming with real clients ---------------------------------------------------------
    def produce(self, topic: str, items: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
        async def go() -> None:
            producer = make_producer(self.kafka, f"test-{uuid.uuid4().hex[:6]}")
            await producer.start()
            try:
                acks = [await producer.send(topic, value, key=key, headers=headers) for key, value, headers in items]
                await asyncio.gather(*acks)
            finally:
                await producer.stop()

        asyncio.run(go())

    def consume(
        self, topics: list[str], until: Callable[[list[ConsumerRecord]], bool], timeout_s: float
    ) -> list[ConsumerRecord]:
        """Read `topics` from the beginning (a fresh group) until `until(records)` or the timeout."""

        async def go() -> list[ConsumerRecord]:
            consumer = AIOKafkaConsumer(
                *topics,
                group_id=f"test-{uuid.uuid4().hex[:8]}",
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=max(500, self.session_timeout_ms // 4),
                **connection_kwargs(self.kafka),
            )
            await consumer.start()
            records: list[ConsumerRecord] = []
            deadline = time.monotonic() + timeout_s
            try:
                while time.monotonic() < deadline and not until(records):
                    batches = await consumer.getmany(timeout_ms=500)
                    records.extend(r for rs in batches.values() for r in rs)
            finally:
                await consumer.stop()
            return records

        return asyncio.run(go())


@contextlib.contextmanager
def _broker(kind: str) -> Iterator[Broker]:
    log_dir = Path(tempfile.mkdtemp(prefix=f"callstream-it-{kind}-"))
    if kind == "kafka":
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]

        with KafkaContainer() as container:
            broker = Broker(kind, container.get_bootstrap_server(), True, 10_000, log_dir)
            yield from _with_topics(broker)
    else:
        with LocalBroker(kind) as local:  # type: ignore[arg-type]
            # noida-db refuses session timeouts under 10 s; Tansu's group join waits half of it.
            broker = Broker(
                kind, local.bootstrap_servers, local.supports_idempotence, 10_000 if kind == "noida" else 3_000, log_dir
            )
            yield from _with_topics(broker)


def _with_topics(broker: Broker) -> Iterator[Broker]:
    asyncio.run(ensure_topics(broker.kafka, TOPICS.all_topics()))
    try:
        yield broker
    finally:
        for service in broker.services:
            service.stop()


@pytest.fixture(scope="session")
def primary_broker_kind() -> str:
    return "kafka" if docker_available() else "noida"


@pytest.fixture(scope="module")
def broker(primary_broker_kind: str) -> Iterator[Broker]:
    """The main test broker: Apache Kafka in a container where Docker answers, noida-db otherwise."""
    with _broker(primary_broker_kind) as b:
        yield b


@pytest.fixture(scope="module", params=["primary", "tansu"])
def delivery_broker(request: pytest.FixtureRequest, primary_broker_kind: str) -> Iterator[Broker]:
    """Delivery tests (dead letters, at-least-once) run on the main broker and on Tansu."""
    kind = primary_broker_kind if request.param == "primary" else "tansu"
    with _broker(kind) as b:
        yield b


def decode_all(records: list[ConsumerRecord], message_type: Any) -> list[Any]:
    from callstream.core import codec

    return [codec.decode(message_type, r.value) for r in records]


@pytest.fixture(scope="session")
def starter_classifier() -> str:
    """The default classifier that `callstream setup` trains from the shipped starter intents."""
    from callstream.router.cli import ensure_default_classifier

    return str(ensure_default_classifier(progress=False))


@pytest.fixture(scope="session")
def banking77_classifier() -> str:
    """A few-shot SetFit classifier trained from banking77 train, cached between runs by the data's hash."""
    from callstream.core.settings import callstream_home
    from callstream.router.classifier import load_classifier, train_classifier
    from tests.conftest import shared

    train_csv = shared("banking77", "train.csv")
    digest = hashlib.sha256(train_csv.read_bytes()).hexdigest()[:12]
    out = callstream_home() / "test-models" / f"banking77-8shot-{digest}"
    with contextlib.suppress(Exception):
        load_classifier(out, verify=True)
        return str(out)
    train_classifier(train_csv, out, shots=8, progress=False)
    return str(out)
