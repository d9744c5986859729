"""A new model version is picked up mid-stream on a real broker: every ticket routed exactly once, by exactly one
version, and within each partition the versions change once, old to new (the swap happens between batches)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from callstream.core import codec
from callstream.core.kafka import connection_kwargs, make_producer
from callstream.router.registry import activate, publish
from callstream.v1 import events_pb2
from tests.integration.conftest import TOPICS, Broker
from tests.unit.test_router_registry import renamed_copy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, starter_classifier: str) -> Path:
    root = tmp_path_factory.mktemp("registry")
    reg = root / "registry"
    publish(renamed_copy(Path(starter_classifier), root / "v1", "starter-v1"), reg)
    publish(renamed_copy(Path(starter_classifier), root / "v2", "starter-v2"), reg, make_current=False)
    return reg


@pytest.fixture(scope="module")
def router(broker: Broker, registry: Path) -> Iterator[Broker]:
    broker.start_service("router", CALLSTREAM_ROUTER_MODEL_DIR=str(registry), CALLSTREAM_ROUTER_RELOAD_INTERVAL_S="0.2")
    yield broker


def test_version_switch_mid_stream_routes_every_ticket_exactly_once(router: Broker, registry: Path) -> None:
    run = uuid.uuid4().hex[:6]
    sent: list[bytes] = []
    routed: list[tuple[int, int, bytes, str]] = []  # output partition, offset, key, version

    async def go() -> None:
        producer = make_producer(router.kafka, f"test-{run}")
        consumer = AIOKafkaConsumer(
            TOPICS.tickets_routed,
            group_id=f"test-{run}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=router.session_timeout_ms,
            heartbeat_interval_ms=max(500, router.session_timeout_ms // 4),
            **connection_kwargs(router.kafka),
        )
        await producer.start()
        await consumer.start()

        async def publish_chunk(n: int) -> None:
            acks = []
            for _ in range(n):
                key = f"{run}-{len(sent):04d}".encode()
                ticket = events_pb2.TicketCreated(
                    ticket_id=key.decode(), source_channel="email", body="my card payment failed at the shop"
                )
                sent.append(key)
                acks.append(await producer.send(TOPICS.tickets_created, codec.encode(ticket), key=key))
            await asyncio.gather(*acks)

        async def drain(timeout_ms: int = 200) -> None:
            batches = await consumer.getmany(timeout_ms=timeout_ms)
            for r in (r for rs in batches.values() for r in rs):
                if r.key and r.key.startswith(run.encode()):
                    version = codec.decode(events_pb2.RoutedTicket, r.value).classifier_version
                    routed.append((r.partition, r.offset, r.key, version))

        try:
            for _ in range(4):  # traffic on v1
                await publish_chunk(10)
                await drain()
            activate(registry, "starter-v2")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not any(v == "starter-v2" for *_, v in routed):
                await publish_chunk(5)  # keep traffic flowing while the router loads v2 in the background
                await drain()
            for _ in range(2):
                await publish_chunk(10)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and {k for _, _, k, _ in routed} < set(sent):
                await drain(500)
            await drain(1000)  # anything duplicated would show up here
        finally:
            await consumer.stop()
            await producer.stop()

    asyncio.run(go())
    keys = [k for _, _, k, _ in routed]
    assert set(keys) == set(sent), f"missing: {sorted(set(sent) - set(keys))[:5]}"
    assert len(keys) == len(set(keys)), "a ticket was routed twice"
    versions = {v for *_, v in routed}
    assert versions == {"starter-v1", "starter-v2"}
    by_partition: dict[int, list[str]] = {}
    for partition, _, _, version in sorted(routed):
        by_partition.setdefault(partition, []).append(version)
    for partition, seq in by_partition.items():
        assert seq == sorted(seq), f"partition {partition}: versions went back: {seq}"
