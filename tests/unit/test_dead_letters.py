"""The Kafka processor's per-record logic with a fake handler (no broker): what becomes a dead letter."""

from __future__ import annotations

import asyncio

from aiokafka import ConsumerRecord

from callstream.core.errors import AudioNotFoundError, TransientError
from callstream.core.kafka import KafkaProcessor, OutRecord, dead_letter
from callstream.core.settings import KafkaSettings, TopicSettings
from callstream.v1 import events_pb2

TOPICS = TopicSettings()


def record(value: bytes = b"payload", offset: int = 7) -> ConsumerRecord:
    return ConsumerRecord(
        topic="calls.recorded",
        partition=2,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"call-9",
        value=value,
        checksum=None,
        serialized_key_size=6,
        serialized_value_size=len(value),
        headers=[("trace", b"abc")],
    )


def processor(handler, retry_s: float = 0.0) -> KafkaProcessor:  # type: ignore[no-untyped-def]
    return KafkaProcessor(
        service="transcriber",
        kafka=KafkaSettings(),
        topics=TOPICS,
        input_topics=["calls.recorded"],
        handler=handler,
        transient_retry_s=retry_s,
    )


def test_dead_letter_keeps_the_original_record_and_the_reason() -> None:
    out = dead_letter(record(b"\x00bad"), AudioNotFoundError("call call-9: no such file"), "transcriber", TOPICS)
    assert out.topic == "calls.recorded.dlq" and out.key == b"call-9"
    letter = out.message
    assert isinstance(letter, events_pb2.DeadLetter)
    assert letter.original_value == b"\x00bad" and letter.original_key == b"call-9"
    assert [(h.key, h.value) for h in letter.original_headers] == [("trace", b"abc")]
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == ("calls.recorded", 2, 7)
    assert letter.error_type == "AudioNotFoundError" and "no such file" in letter.error_message
    assert letter.service == "transcriber" and letter.failed_at.seconds > 0


def test_a_failing_handler_yields_a_dead_letter_not_an_exception() -> None:
    async def handler(rec: ConsumerRecord) -> list[OutRecord]:
        raise ValueError("boom")

    outs = asyncio.run(processor(handler)._handle(record()))
    assert len(outs) == 1 and outs[0].topic == "calls.recorded.dlq"
    assert outs[0].message.error_type == "ValueError"


def test_transient_errors_are_retried_before_giving_up() -> None:
    attempts: list[int] = []

    async def handler(rec: ConsumerRecord) -> list[OutRecord]:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("engine restarting")
        return [OutRecord("calls.transcribed", rec.key, events_pb2.Transcript(call_id="call-9"))]

    outs = asyncio.run(processor(handler, retry_s=30)._handle(record()))
    assert len(attempts) == 3
    assert outs[0].topic == "calls.transcribed"


def test_a_successful_handler_passes_its_results_through() -> None:
    async def handler(rec: ConsumerRecord) -> list[OutRecord]:
        return [OutRecord("calls.transcribed", rec.key, events_pb2.Transcript(call_id="call-9"))]

    outs = asyncio.run(processor(handler)._handle(record()))
    assert [o.topic for o in outs] == ["calls.transcribed"]
