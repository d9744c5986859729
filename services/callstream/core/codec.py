"""Protobuf codec for Kafka records: strict decoding, so junk is dead-lettered instead of half-parsed."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from callstream.core.errors import MessageDecodeError

M = TypeVar("M", bound=Message)

CONTENT_TYPE = "application/x-protobuf"


def type_name(message: Message | type[Message]) -> str:
    return message.DESCRIPTOR.full_name


def headers_for(message: Message) -> list[tuple[str, bytes]]:
    """Headers that say what a record holds, so that any consumer can decode it without guessing."""
    return [("content-type", CONTENT_TYPE.encode()), ("message-type", type_name(message).encode())]


def encode(message: Message) -> bytes:
    return message.SerializeToString()


def decode(message_type: type[M], data: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> M:
    """Parse `data` as `message_type`, refusing anything that is not exactly that message.

    Protobuf's wire format accepts many byte strings (plain text often parses as unknown fields), so a
    parse that leaves unknown fields, or a record whose message-type header names another type, is refused.
    """
    expected = type_name(message_type)
    for key, value in headers or []:
        if key == "message-type" and value.decode(errors="replace") != expected:
            raise MessageDecodeError(f"record holds {value.decode(errors='replace')!r}, expected {expected!r}")
    if data is None:
        raise MessageDecodeError(f"empty record (tombstone), expected {expected}")
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise MessageDecodeError(f"not a valid {expected} protobuf message: {exc}") from exc
    if len(UnknownFieldSet(message)):
        raise MessageDecodeError(
            f"not a {expected} message: {len(data)} bytes parse only as unknown fields (wrong topic or not protobuf?)"
        )
    return message
