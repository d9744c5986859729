"""The whole pipeline on a real broker with the real services and models: calls and tickets in, summaries out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from callstream.bench.transcriber import service_counters
from callstream.core import codec, health
from callstream.core.broker import free_port
from callstream.core.kafka import now_timestamp
from callstream.v1 import events_pb2
from tests.conftest import shared, wer
from tests.integration.conftest import TOPICS, Broker, decode_all

pytestmark = pytest.mark.integration

SERVICE_NAMES = {
    "llm-engine": "trtllm.TrtllmService",
    "transcriber": "callstream.v1.TranscriberService",
    "router": "callstream.v1.RouterService",
    "summarizer": "callstream.v1.SummarizerService",
}


TRANSCRIBER_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def stack(broker: Broker, starter_classifier: str) -> Iterator[Broker]:
    engine = broker.start_service("llm-engine")
    broker.start_service("transcriber", CALLSTREAM_TRANSCRIBER_METRICS_PORT=str(TRANSCRIBER_METRICS_PORT))
    broker.start_service("router", CALLSTREAM_ROUTER_MODEL_DIR=starter_classifier)
    broker.start_service("summarizer", CALLSTREAM_SUMMARIZER_ENGINE_ADDRESS=engine.address)
    yield broker


def _by_name(broker: Broker, name: str):  # type: ignore[no-untyped-def]
    return next(s for s in broker.services if s.name == name)


@pytest.mark.parametrize("name", list(SERVICE_NAMES))
def test_every_service_answers_health_and_reflection(stack: Broker, name: str) -> None:
    service = _by_name(stack, name)
    assert health.check(service.address) == "SERVING"
    assert health.check(service.address, SERVICE_NAMES[name]) == "SERVING"
    listed = health.list_services(service.address)
    assert SERVICE_NAMES[name] in listed
    assert "grpc.health.v1.Health" in listed


def test_stereo_call_is_transcribed_per_channel_with_roles(stack: Broker) -> None:
    audio = shared("audio", "stereo_diarization.wav")
    references = json.loads(shared("audio", "references.json").read_text())["stereo_diarization.wav"]
    call = events_pb2.CallRecorded(
        call_id="it-stereo-1",
        tenant="t1",
        started_at=now_timestamp(),
        audio_uri=audio.resolve().as_uri(),
        channel_roles={0: "agent", 1: "customer"},
    )
    stack.produce(TOPICS.calls_recorded, [(b"it-stereo-1", codec.encode(call), codec.headers_for(call))])
    records = stack.consume([TOPICS.calls_transcribed], lambda rs: any(r.key == b"it-stereo-1" for r in rs), 180)
    transcripts = [t for t in decode_all(records, events_pb2.Transcript) if t.call_id == "it-stereo-1"]
    assert transcripts, "no transcript on calls.transcribed"
    transcript = transcripts[0]
    assert transcript.language == "en"
    assert transcript.model_id
    for channel, role in ((0, "agent"), (1, "customer")):
        segments = [s for s in transcript.segments if s.channel == channel]
        assert segments and all(s.role == role for s in segments)
        words = [w for s in segments for w in s.words]
        assert all(w.end >= w.start for w in words)
        text = " ".join(s.text for s in segments)
        assert wer(references["reference_by_channel"][str(channel)], text) <= 0.05, text


def test_calls_published_together_share_engine_batches_and_keep_their_own_words(stack: Broker) -> None:
    """Cross-call batching on the Kafka path: short calls published at once are transcribed in shared batches and
    packed windows (the service's own metrics say so), and each transcript holds its own call's words."""
    references = json.loads(shared("audio", "references.json").read_text())
    # Clips whose references spell no numbers in words (WER would count "1813" against "EIGHTEEN THIRTEEN").
    names = ["jfk.flac", "librispeech-2412-153948-0000.flac", "stereo_diarization.wav"]
    before = service_counters(TRANSCRIBER_METRICS_PORT)
    items = []
    for i, name in enumerate(names):
        call = events_pb2.CallRecorded(
            call_id=f"it-batch-{i}", tenant="t1", audio_uri=shared("audio", name).resolve().as_uri(), language="en"
        )
        items.append((call.call_id.encode(), codec.encode(call), codec.headers_for(call)))
    stack.produce(TOPICS.calls_recorded, items)
    wanted = {key for key, _, _ in items}
    records = stack.consume([TOPICS.calls_transcribed], lambda rs: wanted <= {r.key for r in rs}, 300)
    transcripts = {t.call_id: t for t in decode_all(records, events_pb2.Transcript)}
    for i, name in enumerate(names):
        transcript = transcripts[f"it-batch-{i}"]
        by_channel = references[name].get("reference_by_channel", {"0": references[name].get("reference")})
        for channel, reference in by_channel.items():
            text = " ".join(s.text for s in transcript.segments if s.channel == int(channel))
            assert wer(reference, text) <= 0.1, (name, channel, text)
    after = service_counters(TRANSCRIBER_METRICS_PORT)
    calls, batches = after["calls"] - before["calls"], after["batches"] - before["batches"]
    assert calls == len(names)
    assert batches < len(names), f"{len(names)} calls published together ran in {batches:.0f} batches"
    assert after["packed_windows"] > before["packed_windows"]


def test_a_call_and_a_ticket_reach_summaries(stack: Broker, tmp_path_factory: pytest.TempPathFactory) -> None:
    audio = shared("audio", "stereo_diarization.wav")
    call = events_pb2.CallRecorded(
        call_id="it-sum-call", tenant="t1", audio_uri=str(audio.resolve()), channel_roles={0: "agent", 1: "customer"}
    )
    ticket = events_pb2.TicketCreated(
        ticket_id="it-sum-ticket",
        tenant="t1",
        source_channel="email",
        subject="Card lost",
        body="I lost my debit card yesterday at the station. Please block it and send me a new one.",
    )
    stack.produce(TOPICS.calls_recorded, [(b"it-sum-call", codec.encode(call), codec.headers_for(call))])
    stack.produce(TOPICS.tickets_created, [(b"it-sum-ticket", codec.encode(ticket), codec.headers_for(ticket))])
    wanted = {b"it-sum-call", b"it-sum-ticket"}
    records = stack.consume([TOPICS.tickets_summarized], lambda rs: wanted <= {r.key for r in rs}, 600)
    summaries = {s.source.id: s for s in decode_all(records, events_pb2.Summary)}
    assert {"it-sum-call", "it-sum-ticket"} <= set(summaries)
    for source_id, kind in (
        ("it-sum-call", events_pb2.SourceRef.KIND_CALL),
        ("it-sum-ticket", events_pb2.SourceRef.KIND_TICKET),
    ):
        summary = summaries[source_id]
        assert summary.source.kind == kind
        assert summary.summary.strip(), f"empty summary for {source_id}"
        assert summary.model_id and summary.engine
        assert summary.completion_tokens > 0
        assert summary.queue


def test_a_card_and_a_phone_number_read_out_in_a_call_reach_no_topic(
    stack: Broker, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The customer of samples/calls/card_payment.yaml reads out a card number and a phone number: the
    transcript (default policy: mask), the routed ticket and the summary must show neither, in any form."""
    from tests.integration.card_call import leaks, render

    wav = render(tmp_path_factory.mktemp("card-call"))
    call = events_pb2.CallRecorded(
        call_id="it-pii-call", tenant="t1", audio_uri=str(wav), channel_roles={0: "agent", 1: "customer"}
    )
    stack.produce(TOPICS.calls_recorded, [(b"it-pii-call", codec.encode(call), codec.headers_for(call))])
    topics = [TOPICS.calls_transcribed, TOPICS.tickets_routed, TOPICS.tickets_summarized]
    records = stack.consume(
        topics,
        lambda rs: any(r.key == b"it-pii-call" and r.topic == TOPICS.tickets_summarized for r in rs),
        600,
    )
    mine = [r for r in records if r.key == b"it-pii-call"]
    transcripts = decode_all([r for r in mine if r.topic == TOPICS.calls_transcribed], events_pb2.Transcript)
    routed = decode_all([r for r in mine if r.topic == TOPICS.tickets_routed], events_pb2.RoutedTicket)
    summaries = decode_all([r for r in mine if r.topic == TOPICS.tickets_summarized], events_pb2.Summary)
    assert transcripts and routed and summaries, [r.topic for r in mine]
    transcript = transcripts[0]
    # the numbers were recognized and redacted, not lost (a misheard card digit makes it an account number)
    assert transcript.pii_policy == "mask"
    counts = transcript.redactions
    assert counts["card_number"] + counts["account_number"] == 1 and counts["phone"] == 1, transcript.text
    texts = [transcript.text]
    for segment in transcript.segments:
        texts.append(segment.text)
        texts.extend(w.text for w in segment.words)
    texts.extend(r.text for r in routed)
    for s in summaries:
        texts.extend([s.summary, s.issue, s.resolution, *s.action_items])
    leaked = [t for t in texts if leaks(t)]
    assert not leaked, leaked
    # every record on the way, whole, as a consumer would see it
    for record in mine:
        assert not leaks(record.value.decode("utf-8", "replace")), record.topic
