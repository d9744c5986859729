from __future__ import annotations

import pytest

from callstream.core import codec
from callstream.core.errors import MessageDecodeError
from callstream.v1 import events_pb2


def test_round_trip_keeps_every_field() -> None:
    call = events_pb2.CallRecorded(call_id="c1", tenant="t", audio_uri="file:///a.wav", channel_roles={0: "agent"})
    decoded = codec.decode(events_pb2.CallRecorded, codec.encode(call), codec.headers_for(call))
    assert decoded == call


def test_headers_name_the_message_type() -> None:
    headers = dict(codec.headers_for(events_pb2.TicketCreated()))
    assert headers["message-type"] == b"callstream.v1.TicketCreated"
    assert headers["content-type"] == b"application/x-protobuf"


@pytest.mark.parametrize(
    "junk",
    [b"this is not a protobuf message", b'{"ticket_id": "t1", "body": "json, not protobuf"}', b"\xff\xff\xff\xff"],
)
def test_junk_is_refused_with_a_reason(junk: bytes) -> None:
    with pytest.raises(MessageDecodeError, match="TicketCreated"):
        codec.decode(events_pb2.TicketCreated, junk)


def test_a_message_of_another_type_is_refused_by_its_header() -> None:
    ticket = events_pb2.TicketCreated(ticket_id="t1")
    with pytest.raises(MessageDecodeError, match="expected 'callstream.v1.CallRecorded'"):
        codec.decode(events_pb2.CallRecorded, codec.encode(ticket), codec.headers_for(ticket))


def test_a_tombstone_is_refused() -> None:
    with pytest.raises(MessageDecodeError, match="empty record"):
        codec.decode(events_pb2.Transcript, None)
