"""Nothing is lost: bad events go to the right dead-letter topic with a reason, the consumer goes on, and
records published while a service is down are all processed after it comes back. Runs on the main broker
and on Tansu."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from callstream.core import codec
from callstream.v1 import events_pb2
from tests.conftest import shared
from tests.integration.conftest import TOPICS, Broker, decode_all

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def services(delivery_broker: Broker, starter_classifier: str) -> Iterator[Broker]:
    delivery_broker.start_service("transcriber")
    delivery_broker.start_service("router", CALLSTREAM_ROUTER_MODEL_DIR=starter_classifier)
    yield delivery_broker


def _ticket(ticket_id: str, body: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    ticket = events_pb2.TicketCreated(ticket_id=ticket_id, source_channel="email", body=body)
    return ticket_id.encode(), codec.encode(ticket), codec.headers_for(ticket)


def _call(call_id: str, **audio: object) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    call = events_pb2.CallRecorded(call_id=call_id, **audio)  # type: ignore[arg-type]
    return call_id.encode(), codec.encode(call), codec.headers_for(call)


def _dead_letters(broker: Broker, topic: str, keys: set[bytes]) -> dict[bytes, events_pb2.DeadLetter]:
    records = broker.consume([TOPICS.dlq(topic)], lambda rs: keys <= {r.key for r in rs}, 120)
    return {r.key: letter for r, letter in zip(records, decode_all(records, events_pb2.DeadLetter), strict=True)}


def test_non_protobuf_ticket_is_dead_lettered_and_the_next_is_routed(services: Broker) -> None:
    services.produce(
        TOPICS.tickets_created,
        [
            (b"junk-1", b'this is not a protobuf message {"id": 1}', []),
            _ticket("after-junk-1", "I was charged twice for my subscription this month, please refund one."),
        ],
    )
    letters = _dead_letters(services, TOPICS.tickets_created, {b"junk-1"})
    letter = letters[b"junk-1"]
    assert letter.error_type == "MessageDecodeError"
    assert "TicketCreated" in letter.error_message
    assert letter.original_value.startswith(b"this is not a protobuf")
    assert letter.source_topic == TOPICS.tickets_created and letter.service == "router"
    routed = services.consume([TOPICS.tickets_routed], lambda rs: b"after-junk-1" in {r.key for r in rs}, 120)
    assert b"after-junk-1" in {r.key for r in routed}


def test_bad_calls_are_dead_lettered_with_reasons_and_the_next_call_is_transcribed(services: Broker) -> None:
    good_audio = shared("audio", "ljspeech-LJ002-0020.wav")
    services.produce(
        TOPICS.calls_recorded,
        [
            (b"junk-call", b"\x00\x01\x02 not protobuf at all", []),
            _call("corrupt-call", audio_bytes=b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is not audio" * 20),
            _call("missing-call", audio_uri="file:///nonexistent/recordings/call-404.wav"),
            _call("good-call", audio_uri=good_audio.resolve().as_uri()),
        ],
    )
    letters = _dead_letters(services, TOPICS.calls_recorded, {b"junk-call", b"corrupt-call", b"missing-call"})
    assert letters[b"junk-call"].error_type == "MessageDecodeError"
    assert letters[b"corrupt-call"].error_type == "AudioDecodeError"
    assert "corrupt-call" in letters[b"corrupt-call"].error_message
    assert letters[b"missing-call"].error_type == "AudioNotFoundError"
    assert "call-404.wav" in letters[b"missing-call"].error_message
    assert all(letter.service == "transcriber" for letter in letters.values())
    records = services.consume([TOPICS.calls_transcribed], lambda rs: b"good-call" in {r.key for r in rs}, 180)
    transcripts = [t for t in decode_all(records, events_pb2.Transcript) if t.call_id == "good-call"]
    assert transcripts and ("1813" in transcripts[0].text or "thirteen" in transcripts[0].text.lower())


def test_tickets_published_while_the_router_is_down_all_come_out(services: Broker, starter_classifier: str) -> None:
    router = next(s for s in services.services if s.name == "router")
    assert router.stop() == 0, "router did not shut down cleanly on SIGTERM"
    services.services.remove(router)
    keys = {f"restart-{n:02d}".encode() for n in range(50)}
    services.produce(
        TOPICS.tickets_created,
        [
            _ticket(k.decode(), f"Ticket {n}: my card payment failed at the shop, can you check why?")
            for n, k in enumerate(sorted(keys))
        ],
    )
    services.start_service("router", CALLSTREAM_ROUTER_MODEL_DIR=starter_classifier)
    records = services.consume([TOPICS.tickets_routed], lambda rs: keys <= {r.key for r in rs}, 240)
    assert keys <= {r.key for r in records}, f"missing: {sorted(keys - {r.key for r in records})}"
