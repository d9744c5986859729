"""Live-call sessions (transcriber/streaming.py, streaming_kafka.py) with a fake transcriber and a fake VAD.

The fake VAD calls loud stretches speech; the fake transcriber answers one word per tone burst, named after the
burst's amplitude ("w3" for 0.3), at the burst's time in the span it was given. So the tests can check which
audio each result covers and that word times land on the call's timeline, without a model.
"""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from callstream.core import codec
from callstream.core.errors import InvalidInputError
from callstream.core.kafka import KafkaProcessor, OutRecord
from callstream.core.settings import KafkaSettings
from callstream.transcriber.settings import TranscriberSettings
from callstream.transcriber.streaming import (
    ALAW,
    ALAW_TABLE,
    LINEAR16,
    MULAW,
    MULAW_TABLE,
    AudioDecoder,
    Emitted,
    SessionLimitError,
    StreamingSession,
    StreamingSessions,
    encode_audio,
    parse_config,
    plan_endpoints,
    serve_stream,
)
from callstream.transcriber.streaming_kafka import AudioChunkHandler
from callstream.v1 import events_pb2, transcriber_pb2

RATE = 16000
TOPIC = "calls.audio.chunks"


# -- fakes ------------------------------------------------------------------------------------------------------


def tone(amplitude: float, seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def energy_detector(min_silence_ms: float, window: int = 256) -> Callable[[np.ndarray], list[dict[str, int]]]:
    """Loud windows are speech; a span closes after `min_silence_ms` of quiet, else runs to the end (as Silero)."""
    min_silence = int(RATE * min_silence_ms / 1000)

    def detect(samples: np.ndarray) -> list[dict[str, int]]:
        spans: list[dict[str, int]] = []
        start: int | None = None
        last_end = 0
        for i in range(0, samples.size, window):
            if float(np.sqrt(np.mean(samples[i : i + window] ** 2))) >= 0.05:
                start = i if start is None else start
                last_end = min(i + window, samples.size)
            elif start is not None and i - last_end >= min_silence:
                spans.append({"start": start, "end": last_end})
                start = None
        if start is not None:
            spans.append({"start": start, "end": samples.size})
        return spans

    return detect


def bursts(samples: np.ndarray, window: int = 160) -> list[tuple[float, float, float]]:
    """(start s, end s, amplitude) of each tone burst; bursts closer than 100 ms are one."""
    found: list[list[float]] = []
    for i in range(0, samples.size, window):
        peak = float(np.abs(samples[i : i + window]).max(initial=0.0))
        if peak < 0.05:
            continue
        end = min(i + window, samples.size) / RATE
        if found and i / RATE - found[-1][1] < 0.1:
            found[-1][1] = end
            found[-1][2] = max(found[-1][2], peak)
        else:
            found.append([i / RATE, end, peak])
    return [(a, b, c) for a, b, c in found]


class FakeTranscriber:
    """One word per tone burst, "w<amplitude x 10>", or the words `phrases` gives for that amplitude, spread over
    the burst; `gate` (when set) holds every transcription until it opens."""

    def __init__(self, phrases: dict[int, str] | None = None) -> None:
        self.phrases = phrases or {}
        self.spans: list[float] = []  # seconds of audio of each request
        self.in_flight = 0
        self.gate: asyncio.Event | None = None

    async def transcribe(self, call: events_pb2.CallRecorded) -> events_pb2.Transcript:
        with wave.open(io.BytesIO(call.audio_bytes)) as wav:
            assert (wav.getnchannels(), wav.getframerate()) == (1, RATE)
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
        self.spans.append(samples.size / RATE)
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.in_flight -= 1
        words = []
        for a, b, peak in bursts(samples):
            texts = self.phrases.get(round(peak * 10), f"w{round(peak * 10)}").split()
            step = (b - a) / len(texts)
            words += [
                events_pb2.Word(start=a + i * step, end=a + (i + 1) * step, text=t, probability=0.9)
                for i, t in enumerate(texts)
            ]
        segments = []
        if words:
            role = call.channel_roles[0]
            text = " ".join(w.text for w in words)
            segments = [events_pb2.Segment(role=role, channel=0, start=words[0].start, end=words[-1].end, text=text)]
            segments[0].words.extend(words)
        return events_pb2.Transcript(
            call_id=call.call_id, segments=segments, model_id="fake", language="en", processing_seconds=0.01
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: object) -> TranscriberSettings:
    values: dict[str, object] = {"streaming_endpoint_silence_ms": 500, "streaming_interim_interval_ms": 1000}
    values.update(overrides)
    return TranscriberSettings(**values)  # type: ignore[arg-type]


def session(
    transcriber: FakeTranscriber,
    s: TranscriberSettings | None = None,
    clock: Callable[[], float] | None = None,
    **config: object,
) -> StreamingSession:
    s = s or settings()
    message = events_pb2.StreamingConfig(call_id="call-1", tenant="t1", **config)  # type: ignore[arg-type]
    message.started_at.FromSeconds(1_700_000_000)
    return StreamingSession(
        parse_config(message, s),
        transcriber,
        s,
        energy_detector(s.streaming_endpoint_silence_ms),
        clock=clock or Clock(),
    )


def chunked(samples: np.ndarray, encoding: int = LINEAR16, rate: int = RATE, chunk_ms: int = 200) -> list[bytes]:
    step = int(rate * chunk_ms / 1000) * (samples.shape[0] if samples.ndim == 2 else 1)
    flat = samples.T.reshape(-1) if samples.ndim == 2 else samples
    return [encode_audio(flat[i : i + step], encoding) for i in range(0, flat.size, step)]


async def settle() -> None:
    """Let spawned transcriptions (instant fakes) run to completion."""
    for _ in range(20):
        await asyncio.sleep(0)


def results(items: list[object]) -> list[events_pb2.StreamingResult]:
    return [i.result for i in items if isinstance(i, Emitted)]


# -- audio ------------------------------------------------------------------------------------------------------


def test_g711_tables_match_the_itu_reference_values() -> None:
    assert [MULAW_TABLE[c] * 32768 for c in (0xFF, 0x7F, 0x00, 0x80)] == [0, 0, -32124, 32124]
    assert [ALAW_TABLE[c] * 32768 for c in (0xD5, 0x55, 0xAA, 0x2A)] == [8, -8, 32256, -32256]


@pytest.mark.parametrize(("encoding", "table"), [(MULAW, MULAW_TABLE), (ALAW, ALAW_TABLE)])
def test_g711_encoding_round_trips_within_its_quantization_step(encoding: int, table: np.ndarray) -> None:
    x = np.linspace(-0.98, 0.98, 4001, dtype=np.float32)
    y = table[np.frombuffer(encode_audio(x, encoding), dtype=np.uint8)]
    # Logarithmic companding: the error grows with the level, about 3% of it at most (plus the step near zero).
    assert np.all(np.abs(y - x) <= 0.035 * np.abs(x) + 1e-3)
    assert np.array_equal(np.sign(y[np.abs(x) > 0.01]), np.sign(x[np.abs(x) > 0.01]))


def test_decoder_splits_interleaved_channels_and_carries_partial_frames() -> None:
    decoder = AudioDecoder(LINEAR16, RATE, 2)
    data = np.array([100, -100, 200, -200, 300, -300], dtype="<i2").tobytes()
    first = decoder.decode(data[:5])  # two bytes short of the second frame: kept for the next chunk
    second = decoder.decode(data[5:])
    assert [list(c * 32768) for c in first] == [[100], [-100]]
    assert [list(c * 32768) for c in second] == [[200, 300], [-200, -300]]


def test_8khz_mulaw_is_resampled_to_16khz_without_losing_the_pitch() -> None:
    decoder = AudioDecoder(MULAW, 8000, 1)
    audio = tone(0.5, 1.0, rate=8000)
    pieces = [decoder.decode(chunk)[0] for chunk in chunked(audio, MULAW, rate=8000)]
    out = np.concatenate([*pieces, decoder.flush()[0]])
    assert out.size == RATE
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) * RATE / out.size == pytest.approx(300, abs=2)


def test_config_defaults_and_refusals() -> None:
    s = settings()
    mono = parse_config(events_pb2.StreamingConfig(call_id="a"), s)
    assert (mono.encoding, mono.sample_rate, mono.channels, mono.roles) == (LINEAR16, RATE, 1, {0: "speaker"})
    phone = parse_config(events_pb2.StreamingConfig(call_id="b", encoding=MULAW, audio_channel_count=2), s)
    assert (phone.sample_rate, phone.roles) == (8000, {0: "agent", 1: "customer"})
    with pytest.raises(InvalidInputError, match="call_id"):
        parse_config(events_pb2.StreamingConfig(), s)
    with pytest.raises(InvalidInputError, match="sample_rate_hz"):
        parse_config(events_pb2.StreamingConfig(call_id="c", sample_rate_hz=4000), s)


# -- endpointing ------------------------------------------------------------------------------------------------


def test_plan_finalizes_closed_utterances_and_keeps_running_speech() -> None:
    speech = [{"start": 100, "end": 900}, {"start": 2000, "end": 3000}]
    plan = plan_endpoints(3000, speech, at_end=False, max_segment=10_000, min_utterance=0)
    assert (plan.finals, plan.consumed, plan.open_start) == ([(100, 900)], 2000, 2000)
    # Silence only: keep a lead-in for the next onset.
    assert plan_endpoints(20_000, [], at_end=False, max_segment=10_000, lead=8000).consumed == 12_000
    # Running past the cap: cut now.
    long = plan_endpoints(12_000, [{"start": 0, "end": 12_000}], at_end=False, max_segment=10_000)
    assert (long.finals, long.consumed, long.open_start) == ([(0, 12_000)], 12_000, None)
    # End of the call: everything is final.
    assert plan_endpoints(3000, speech, at_end=True, max_segment=10_000, min_utterance=0).finals == [
        (100, 900),
        (2000, 3000),
    ]


def test_plan_joins_a_short_utterance_to_the_next_unless_a_long_silence_follows() -> None:
    short_then_long = [{"start": 0, "end": 500}, {"start": 1000, "end": 4000}]
    kw = {"max_segment": 100_000, "min_utterance": 1000, "hold_silence": 2000}
    held = plan_endpoints(3000, short_then_long[:1] + [{"start": 1000, "end": 3000}], at_end=False, **kw)
    assert (held.finals, held.consumed, held.open_start) == ([], 0, 0)  # interims cover both
    joined = plan_endpoints(6000, short_then_long, at_end=False, **kw)
    assert (joined.finals, joined.consumed) == ([(0, 4000)], 4000)
    waiting = plan_endpoints(2000, short_then_long[:1], at_end=False, **kw)
    assert (waiting.finals, waiting.consumed, waiting.open_start) == ([], 0, None)
    alone = plan_endpoints(2600, short_then_long[:1], at_end=False, **kw)
    assert (alone.finals, alone.consumed) == ([(0, 500)], 500)
    assert plan_endpoints(4000, short_then_long, at_end=True, **kw).finals == [(0, 4000)]
    assert plan_endpoints(600, short_then_long[:1], at_end=True, **kw).finals == [(0, 500)]


async def _feed_all(s: StreamingSession, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await s.feed(chunk)
        await settle()


def test_an_utterance_is_final_once_the_endpoint_silence_has_passed() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        s = session(fake)
        audio = np.concatenate([silence(0.5), tone(0.3, 1.0), silence(1.0), tone(0.5, 1.2), silence(0.3)])
        await _feed_all(s, chunked(audio))
        before_end = results(s.drain())
        assert [(r.text, r.is_final) for r in before_end] == [("w3", True)]  # the second one has 0.3 s of quiet
        first = before_end[0]
        assert first.role == "speaker" and first.stability == 1.0
        assert first.words[0].start == pytest.approx(0.5, abs=0.03)
        assert first.audio_start <= first.words[0].start and first.words[0].end <= first.audio_end

        transcript = await s.finish()
        after = results(s.drain()[:-1])
        assert [r.text for r in after] == ["w5"]
        assert after[0].words[0].start == pytest.approx(2.5, abs=0.03)
        assert transcript.text == "speaker: w3 w5"
        assert transcript.audio_seconds == pytest.approx(4.0, abs=0.01)
        assert (transcript.call_id, transcript.tenant, transcript.started_at.seconds) == ("call-1", "t1", 1_700_000_000)
        assert transcript.model_id == "fake" and transcript.language == "en"

    asyncio.run(go())


def test_stereo_channels_are_transcribed_apart_and_merged_by_word_time() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        s = session(fake, audio_channel_count=2, channel_roles={0: "agent", 1: "customer"})
        agent = np.concatenate([silence(0.2), tone(0.3, 0.8), silence(2.0)])
        customer = np.concatenate([silence(1.5), tone(0.6, 1.0), silence(0.5)])
        await _feed_all(s, chunked(np.stack([agent, customer])))
        transcript = await s.finish()
        assert [(seg.role, seg.channel, seg.text) for seg in transcript.segments] == [
            ("agent", 0, "w3"),
            ("customer", 1, "w6"),
        ]
        assert transcript.segments[1].words[0].start == pytest.approx(1.5, abs=0.03)

    asyncio.run(go())


def test_live_results_are_redacted_with_the_other_partys_question_as_context() -> None:
    async def go() -> None:
        # Six digits alone are not PII; after "account number" (asked by the agent, in another span) they are.
        fake = FakeTranscriber({3: "what is your account number", 6: "four five seven two one eight"})
        s = session(fake, audio_channel_count=2, channel_roles={0: "agent", 1: "customer"})
        agent = np.concatenate([silence(0.2), tone(0.3, 1.5), silence(3.0)])
        customer = np.concatenate([silence(2.4), tone(0.6, 1.5), silence(0.8)])
        await _feed_all(s, chunked(np.stack([agent, customer])))
        transcript = await s.finish()
        answer = [r for r in results(s.drain()) if r.role == "customer"]
        assert [r.text for r in answer] == ["# # # # # #"]
        assert [w.text for w in answer[0].words] == ["#"] * 6
        assert transcript.text == "agent: what is your account number\ncustomer: # # # # # #"
        assert dict(transcript.redactions) == {"account_number": 1} and transcript.pii_policy == "mask"
        assert transcript.analytics.duration_seconds == pytest.approx(4.7)

    asyncio.run(go())


def test_mulaw_8khz_gives_the_same_words_and_times() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        s = session(fake, encoding=MULAW, sample_rate_hz=8000)
        audio = np.concatenate([silence(0.4, 8000), tone(0.4, 1.0, 8000), silence(0.8, 8000)])
        await _feed_all(s, chunked(audio, MULAW, rate=8000))
        transcript = await s.finish()
        (word,) = [w for seg in transcript.segments for w in seg.words]
        assert word.text == "w4"
        assert word.start == pytest.approx(0.4, abs=0.03) and word.end == pytest.approx(1.4, abs=0.03)

    asyncio.run(go())


def test_interims_come_while_speech_runs_and_stop_at_its_final() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        s = session(fake, interim_results=True)
        await _feed_all(s, chunked(np.concatenate([silence(0.2), tone(0.4, 3.4)])))
        interims = results(s.drain())
        assert len(interims) >= 2 and not any(r.is_final for r in interims)
        assert all(r.text == "w4" and 0.0 <= r.stability < 1.0 for r in interims)
        assert interims[0].stability == 0.0 and interims[-1].stability > 0.0  # the same words again: more stable
        assert all(r.audio_end > r.audio_start for r in interims)
        await s.finish()
        tail = s.drain()
        assert [(r.text, r.is_final) for r in results(tail)] == [("w4", True)]
        assert isinstance(tail[-1], events_pb2.Transcript)

    asyncio.run(go())


def test_no_interims_unless_asked() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        s = session(fake, interim_results=False)
        await _feed_all(s, chunked(tone(0.4, 3.0)))
        assert s.drain() == [] and fake.spans == []

    asyncio.run(go())


def test_a_running_interim_is_not_doubled_and_does_not_hold_up_the_final() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        fake.gate = asyncio.Event()  # every transcription waits: the first interim is "still running"
        s = session(fake, settings(streaming_interim_interval_ms=400), interim_results=True)
        await _feed_all(s, chunked(np.concatenate([tone(0.4, 3.0), silence(0.8)])))
        assert s.interims_skipped >= 3
        # One interim in the batcher, and the final of the same speech submitted next to it, not after it.
        assert fake.in_flight == 2 and len(fake.spans) == 2
        fake.gate.set()
        await settle()
        # The interim came back after the final of its audio was decided: dropped as stale.
        assert [(r.text, r.is_final) for r in results(s.drain())] == [("w4", True)]

    asyncio.run(go())


def test_speech_longer_than_the_segment_cap_is_finalized_while_it_runs() -> None:
    async def go() -> None:
        fake = FakeTranscriber()
        s = session(fake, settings(streaming_max_segment_s=2))
        await _feed_all(s, chunked(tone(0.5, 5.0)))
        early = results(s.drain())
        assert len(early) == 2 and all(r.is_final for r in early)
        assert early[0].audio_end == pytest.approx(early[1].audio_start)
        assert max(fake.spans) <= 2.2
        transcript = await s.finish()
        assert transcript.audio_seconds == pytest.approx(5.0)

    asyncio.run(go())


def test_final_latency_runs_from_the_arrival_of_the_audio_to_sending() -> None:
    async def go() -> None:
        clock = Clock()
        fake = FakeTranscriber()
        s = session(fake, clock=clock)
        for chunk in chunked(np.concatenate([tone(0.3, 1.0), silence(0.8)])):
            clock.now += 0.2
            await s.feed(chunk)
            await settle()
        (item,) = s.drain()
        assert isinstance(item, Emitted)
        clock.now += 0.25  # sent a little later
        result = s.sent(item)
        # The span ends with the VAD window that straddles the end of the tone (1.0 s), in the chunk that arrived
        # at 1001.2; the endpoint was seen at 1001.6 and the result sent at 1002.05.
        assert result.latency_seconds == pytest.approx(0.85, abs=0.01)

    asyncio.run(go())


def test_the_session_limit_is_shared_and_a_call_id_opens_once() -> None:
    s = settings(streaming_max_sessions=1)
    sessions = StreamingSessions(FakeTranscriber(), s, detector=energy_detector(500))
    first = sessions.open(parse_config(events_pb2.StreamingConfig(call_id="a"), s), "grpc")
    with pytest.raises(InvalidInputError, match="already"):
        sessions.open(parse_config(events_pb2.StreamingConfig(call_id="a"), s), "kafka")
    with pytest.raises(SessionLimitError):
        sessions.open(parse_config(events_pb2.StreamingConfig(call_id="b"), s), "kafka")
    sessions.close(first)
    sessions.open(parse_config(events_pb2.StreamingConfig(call_id="b"), s), "kafka")


# -- Kafka ------------------------------------------------------------------------------------------------------


def chunk_record(
    call_id: str, sequence: int, audio: bytes, offset: int, *, config: bool = False, end: bool = False
) -> ConsumerRecord:
    chunk = events_pb2.AudioChunk(call_id=call_id, tenant="t1", sequence=sequence, audio=audio, end_of_call=end)
    if config:
        chunk.config.CopyFrom(events_pb2.StreamingConfig(encoding=LINEAR16, sample_rate_hz=RATE))
    value = codec.encode(chunk)
    return ConsumerRecord(
        topic=TOPIC,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=call_id.encode(),
        value=value,
        checksum=None,
        serialized_key_size=len(call_id),
        serialized_value_size=len(value),
        headers=codec.headers_for(chunk),
    )


def kafka_handler(clock: Clock | None = None, **overrides: object) -> AudioChunkHandler:
    s = settings(**overrides)
    clock = clock or Clock()
    sessions = StreamingSessions(FakeTranscriber(), s, detector=energy_detector(500), clock=clock)
    return AudioChunkHandler(sessions, s, clock=clock)


def by_topic(outputs: list[OutRecord], topic: str) -> list[object]:
    return [o.message for o in outputs if o.topic == topic]


def test_kafka_chunks_in_order_with_a_repeat_and_a_gap() -> None:
    async def go() -> None:
        handler = kafka_handler()
        audio = np.concatenate([silence(0.4), tone(0.3, 1.0), silence(1.0), tone(0.5, 0.8), silence(0.2)])
        chunks = chunked(audio)  # 17 chunks of 200 ms
        outputs: list[OutRecord] = []
        offset = 100
        for seq, data in enumerate(chunks):
            if seq == 9:
                continue  # lost: a quiet chunk between the two words
            end = seq == len(chunks) - 1
            outputs += await handler(chunk_record("k1", seq, data, offset, config=seq == 0, end=end))
            offset += 1
            if seq == 3:
                assert await handler(chunk_record("k1", 3, data, offset)) == []  # redelivered: ignored
                offset += 1
        partials = by_topic(outputs, "calls.transcribed.partial")
        assert [(p.result.text, p.result.is_final) for p in partials] == [("w3", True), ("w5", True)]
        assert all(p.call_id == "k1" and p.tenant == "t1" for p in partials)
        (transcript,) = by_topic(outputs, "calls.transcribed")
        assert transcript.text == "speaker: w3 w5"
        # The missing chunk was bridged with silence: the second word keeps its time on the call's timeline.
        words = [w for seg in transcript.segments for w in seg.words]
        assert [w.start for w in words] == [pytest.approx(0.4, abs=0.03), pytest.approx(2.4, abs=0.03)]
        assert transcript.audio_seconds == pytest.approx(3.4, abs=0.01)
        assert all(o.key == b"k1" for o in outputs)

    asyncio.run(go())


def test_kafka_chunk_of_an_unknown_call_without_config_is_dead_lettered() -> None:
    handler = kafka_handler()
    processor = KafkaProcessor(
        service="transcriber",
        kafka=KafkaSettings(),
        topics=handler.topics,
        input_topics=[TOPIC],
        handler=handler,
        transient_retry_s=0,
    )
    (out,) = asyncio.run(processor._handle(chunk_record("ghost", 5, b"\x00\x00", 7)))
    assert out.topic == "calls.audio.chunks.dlq"
    assert out.message.error_type == "InvalidInputError"
    assert "must carry config" in out.message.error_message and "'ghost'" in out.message.error_message


def test_kafka_chunks_after_the_end_of_a_call() -> None:
    async def go() -> None:
        handler = kafka_handler()
        data = encode_audio(silence(0.2), LINEAR16)
        await handler(chunk_record("k2", 0, data, 1, config=True))
        await handler(chunk_record("k2", 1, data, 2, end=True))
        assert await handler(chunk_record("k2", 1, data, 3, end=True)) == []  # a redelivered end: ignored
        with pytest.raises(InvalidInputError, match="after the live call was closed"):
            await handler(chunk_record("k2", 2, data, 4))

    asyncio.run(go())


def test_kafka_idle_call_is_closed_with_its_transcript() -> None:
    async def go() -> None:
        clock = Clock()
        handler = kafka_handler(clock, streaming_idle_timeout_s=30)
        chunks = chunked(np.concatenate([silence(0.2), tone(0.7, 1.0)]))
        for seq, data in enumerate(chunks):
            await handler(chunk_record("k3", seq, data, seq, config=seq == 0))
        assert await handler.tick() == []  # not idle yet, nothing due
        clock.now += 31
        outputs = await handler.tick()
        assert [p.result.text for p in by_topic(outputs, "calls.transcribed.partial")] == ["w7"]
        (transcript,) = by_topic(outputs, "calls.transcribed")
        assert transcript.text == "speaker: w7"
        assert handler.sessions.sessions == {}
        with pytest.raises(InvalidInputError, match="no audio for 30 s"):
            await handler(chunk_record("k3", len(chunks), chunks[0], 99))

    asyncio.run(go())


def test_kafka_commits_wait_for_open_calls_and_never_split_a_call() -> None:
    async def go() -> None:
        handler = kafka_handler()
        tp = TopicPartition(TOPIC, 0)
        quiet = encode_audio(silence(0.2), LINEAR16)
        assert handler.commit_offset(tp, 5) == 5  # no live calls: no hold
        await handler(chunk_record("b", 0, quiet, 5, config=True))
        await handler(chunk_record("a", 0, quiet, 10, config=True))
        await handler(chunk_record("b", 1, quiet, 12, end=True))
        # "a" is open (first chunk at 10) and "b" ended at 12 but began at 5: a replay from 10 would cut "b".
        assert handler.commit_offset(tp, 13) == 5
        await handler(chunk_record("a", 1, quiet, 15, end=True))
        assert handler.commit_offset(tp, 16) == 16
        assert handler._ranges[tp] == {}  # both calls are wholly behind the commit: forgotten
        await handler(chunk_record("c", 0, quiet, 20, config=True))
        handler.revoked([tp])  # another consumer replays "c" from its first chunk
        assert handler.sessions.sessions == {} and handler.commit_offset(tp, 21) == 21
        with pytest.raises(InvalidInputError, match="must carry config"):
            await handler(chunk_record("c", 1, quiet, 21))

    asyncio.run(go())


def test_processor_handles_one_key_in_offset_order() -> None:
    seen: list[tuple[bytes, int]] = []

    async def handler(record: ConsumerRecord) -> list[OutRecord]:
        await asyncio.sleep(0.02 if record.offset % 2 == 0 else 0.001)  # later records would overtake
        seen.append((record.key, record.offset))
        return []

    processor = KafkaProcessor(
        service="transcriber",
        kafka=KafkaSettings(),
        topics=settings().topics,
        input_topics=[TOPIC],
        handler=handler,
        sequential_keys=True,
    )
    records = [chunk_record(key, 0, b"", offset) for offset, key in enumerate(["a", "b", "a", "b", "a", "a"])]
    asyncio.run(processor._handle_all(records))
    assert [o for k, o in seen if k == b"a"] == [0, 2, 4, 5]
    assert [o for k, o in seen if k == b"b"] == [1, 3]
    assert seen.index((b"b", 1)) < seen.index((b"a", 2))  # keys still run side by side


# -- the gRPC handler (no server: a fake request stream and context) -------------------------------------------


class AbortedError(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.status: tuple[object, str] | None = None

    async def abort(self, code: object, details: str) -> None:
        self.status = (code, details)
        raise AbortedError(details)


async def _requests(
    config: events_pb2.StreamingConfig | None, chunks: list[bytes], then: asyncio.Event | None = None
) -> AsyncIterator[transcriber_pb2.StreamingTranscribeRequest]:
    if config is not None:
        yield transcriber_pb2.StreamingTranscribeRequest(config=config)
    for chunk in chunks:
        yield transcriber_pb2.StreamingTranscribeRequest(audio=chunk)
        await asyncio.sleep(0)
    if then is not None:
        await then.wait()  # the client goes quiet without closing its side


def test_grpc_stream_sends_results_then_the_transcript_and_closes_an_idle_call() -> None:
    async def go() -> None:
        s = settings(streaming_idle_timeout_s=0.3)
        sessions = StreamingSessions(FakeTranscriber(), s, detector=energy_detector(500))
        config = events_pb2.StreamingConfig(call_id="g1", tenant="t1", interim_results=True)
        audio = chunked(np.concatenate([silence(0.2), tone(0.3, 1.5), silence(0.8), tone(0.6, 1.2)]))
        never = asyncio.Event()
        responses = [r async for r in serve_stream(sessions, _requests(config, audio, never), FakeContext())]
        results = [r for response in responses for r in response.results]
        assert [r.text for r in results if r.is_final] == ["w3", "w6"]  # the second one finalized by the idle close
        assert any(not r.is_final for r in results)
        assert responses[-1].HasField("transcript") and not responses[-1].results
        assert responses[-1].transcript.text == "speaker: w3 w6"
        assert sessions.sessions == {}  # released

    asyncio.run(go())


def test_grpc_stream_must_start_with_a_config() -> None:
    async def go() -> None:
        sessions = StreamingSessions(FakeTranscriber(), settings(), detector=energy_detector(500))
        context = FakeContext()
        with pytest.raises(AbortedError):
            _ = [r async for r in serve_stream(sessions, _requests(None, [b"\x00\x00"]), context)]
        assert context.status is not None and context.status[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert "config" in context.status[1]

    asyncio.run(go())


def test_processor_commits_only_as_far_as_the_hooks_allow() -> None:
    class FakeConsumer:
        def __init__(self, assigned: set[TopicPartition]) -> None:
            self.assigned = assigned
            self.commits: list[dict[TopicPartition, int]] = []

        def assignment(self) -> set[TopicPartition]:
            return self.assigned

        async def commit(self, offsets: dict[TopicPartition, object]) -> None:
            self.commits.append({tp: o.offset for tp, o in offsets.items()})  # type: ignore[attr-defined]

    async def go() -> None:
        handler = kafka_handler()
        processor = KafkaProcessor(
            service="transcriber",
            kafka=KafkaSettings(),
            topics=handler.topics,
            input_topics=[TOPIC],
            handler=handler,
            hooks=handler,
            sequential_keys=True,
        )
        tp, other = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
        consumer = FakeConsumer({tp, other})
        processor._consumer = consumer  # type: ignore[assignment]
        quiet = encode_audio(silence(0.2), LINEAR16)
        await handler(chunk_record("open-call", 0, quiet, 40, config=True))
        processor._processed = {tp: 45, other: 7}
        await processor._commit()
        assert consumer.commits == [{tp: 40, other: 7}]  # held at the open call's first chunk
        await processor._commit()
        assert len(consumer.commits) == 1  # nothing moved: nothing committed
        await handler(chunk_record("open-call", 1, quiet, 45, end=True))
        processor._processed[tp] = 46
        await processor._commit()
        assert consumer.commits[-1] == {tp: 46}

    asyncio.run(go())
