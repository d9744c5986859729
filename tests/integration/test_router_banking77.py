"""Real banking77 tickets through the router service on a real broker."""

from __future__ import annotations

import csv

import pytest

from callstream.core import codec
from callstream.v1 import events_pb2
from tests.conftest import shared
from tests.integration.conftest import TOPICS, Broker, decode_all

pytestmark = pytest.mark.integration


def test_50_banking77_tickets_are_routed_with_70_percent_right_intents(
    broker: Broker, banking77_classifier: str
) -> None:
    with shared("banking77", "test.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # Every 61st row: a fixed sample spread over all 77 intents.
    sample = rows[::61][:50]
    assert len(sample) == 50
    broker.start_service("router", CALLSTREAM_ROUTER_MODEL_DIR=banking77_classifier)
    items = []
    for n, row in enumerate(sample):
        ticket = events_pb2.TicketCreated(ticket_id=f"b77-{n:02d}", source_channel="web", body=row["text"])
        items.append((ticket.ticket_id.encode(), codec.encode(ticket), codec.headers_for(ticket)))
    broker.produce(TOPICS.tickets_created, items)
    records = broker.consume([TOPICS.tickets_routed], lambda rs: len({r.key for r in rs}) >= 50, 300)
    routed = {r.source.id: r for r in decode_all(records, events_pb2.RoutedTicket)}
    assert len(routed) == 50
    correct = sum(routed[f"b77-{n:02d}"].intents[0].name == row["category"] for n, row in enumerate(sample))
    assert correct / 50 >= 0.70, f"{correct}/50 intents right"
    some = routed["b77-00"]
    assert some.classifier_version.startswith("banking77") or some.classifier_version
    assert some.queue and some.rule
    assert 0.0 <= some.intents[0].score <= 1.0
