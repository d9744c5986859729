"""Live-call transcription: audio in while the call is going on, interim and final results out as it flows.

Per call (a session) and per channel, audio is decoded (LINEAR16 or G.711 mu-law/A-law), resampled to 16 kHz float32
and appended to the channel's pending buffer. Silero VAD (faster-whisper's `get_speech_timestamps`) then looks at
the pending buffer:
- speech followed by `streaming_endpoint_silence_ms` of silence is an utterance: it is transcribed and sent as a
  final result, and the buffer moves past it (an utterance under 1 s waits to go with the next one, unless 1 s of
  silence follows it: Whisper does badly on a word heard alone);
- speech running past `streaming_max_segment_s` is finalized at its last short pause (the VAD splits it there);
- while a channel speaks, every `streaming_interim_interval_ms` of audio its pending speech is transcribed as an
  interim result, unless the channel's previous interim is still running: interims never pile up in front of
  finals, and an interim that comes back after the final of the same audio is dropped.
Every span goes through the service's shared Transcriber (the dynamic batcher in front of the engine) as a mono
in-memory WAV, so live calls share model batches with post-call work and get the same post-processing.
At the end of the call (or after `streaming_idle_timeout_s` without audio) what is left is finalized, and the whole
call's Transcript is assembled from the final words, merged by word time as on the post-call path.

PII: the engine redacts each span on its own. A span lacks context that redaction needs (the agent asks "your
account number?" in one span, the customer answers with six digits in another), so every result is redacted again
with the words of the call so far (all channels, the last `_REDACTION_CONTEXT_S`) in front of it, and the whole
call's Transcript goes through `finalize_transcript` (analytics over the whole call, redaction with full context),
like a post-call Transcript. What live results cannot do is look ahead: a number read out in pieces, with pauses
longer than the endpoint silence, shows its first pieces before the rest is heard (the Transcript has it masked).

The gRPC RPC (`serve_stream`) lives here; the Kafka path (calls.audio.chunks) is in streaming_kafka.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import wave
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from callstream.core import metrics
from callstream.core.errors import CallstreamError, InvalidInputError, TransientError
from callstream.core.grpc_server import abort_with
from callstream.transcriber.audio import SAMPLE_RATE, channel_roles
from callstream.transcriber.merge import TimedWord, join_words, merge_words, transcript_text
from callstream.transcriber.postprocess import finalize_transcript
from callstream.transcriber.redaction import redact_segments
from callstream.transcriber.settings import TranscriberSettings
from callstream.v1 import events_pb2, transcriber_pb2

log = logging.getLogger(__name__)

LINEAR16 = events_pb2.StreamingConfig.LINEAR16
MULAW = events_pb2.StreamingConfig.MULAW
ALAW = events_pb2.StreamingConfig.ALAW
ENCODING_NAMES = {LINEAR16: "LINEAR16", MULAW: "MULAW", ALAW: "ALAW"}
MIN_RATE, MAX_RATE, MAX_CHANNELS = 8000, 48000, 8

# Audio kept in front of speech that has not started yet, so that an onset keeps its context (VAD pads less).
_LEAD_SAMPLES = SAMPLE_RATE // 2
# An utterance shorter than this is held and joined to the next one, unless `_HOLD_SILENCE` follows it: alone, a
# word like "ask" before a dramatic pause is a guess for Whisper ("S"), with the next words it is right.
_MIN_UTTERANCE = SAMPLE_RATE
_HOLD_SILENCE = SAMPLE_RATE
# The longest pause that VAD padding adds around speech; half the endpoint silence when that is shorter.
_SPEECH_PAD_MS = 200
# Final words of the call before a result that its PII redaction sees as context.
_REDACTION_CONTEXT_S = 30.0


class SessionClosedError(CallstreamError):
    """Audio for a session that has already finished (end of stream, idle timeout or failure)."""


class SessionLimitError(TransientError):
    """`streaming_max_sessions` live calls are open already: try again when one has ended."""


class SpanTranscriber(Protocol):
    """What a session needs from the service: transcribe one (short, mono) call. `Transcriber` is one."""

    async def transcribe(self, call: events_pb2.CallRecorded) -> events_pb2.Transcript: ...


# Speech spans ({"start", "end"} in samples) in 16 kHz audio, as faster_whisper.vad.get_speech_timestamps gives them:
# a span still running at the end of the audio ends exactly at len(audio).
SpeechDetector = Callable[[np.ndarray], list[dict[str, int]]]


def silero_detector(endpoint_silence_ms: float, max_segment_s: float) -> SpeechDetector:
    """Silero VAD with the endpoint silence as its minimum pause, so each span it returns is one utterance."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(
        min_silence_duration_ms=int(endpoint_silence_ms),
        speech_pad_ms=int(min(_SPEECH_PAD_MS, endpoint_silence_ms / 2)),
        max_speech_duration_s=max_segment_s,
    )

    def detect(samples: np.ndarray) -> list[dict[str, int]]:
        return get_speech_timestamps(samples, options) if samples.size else []

    return detect


# -- G.711 and PCM ----------------------------------------------------------------------------------------------


def _mulaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32)
    u = ~codes & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return (np.where(u & 0x80, -magnitude, magnitude) / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32)
    a = codes ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return (np.where(a & 0x80, magnitude, -magnitude) / 32768.0).astype(np.float32)


MULAW_TABLE = _mulaw_table()  # G.711 code -> sample in [-1, 1)
ALAW_TABLE = _alaw_table()
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(samples, dtype=np.float32) * 32768.0), -32768, 32767).astype(np.int32)


def mulaw_encode(samples: np.ndarray) -> bytes:
    """G.711 mu-law bytes of float samples in [-1, 1] (the ITU algorithm, vectorised)."""
    x = _int16(samples)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def alaw_encode(samples: np.ndarray) -> bytes:
    """G.711 A-law bytes of float samples in [-1, 1] (the ITU algorithm, vectorised)."""
    pcm = _int16(samples) >> 3
    negative = pcm < 0
    mask = np.where(negative, 0x55, 0xD5)
    pcm = np.where(negative, -pcm - 1, pcm)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, pcm)
    mantissa = np.where(segment < 2, pcm >> 1, pcm >> np.maximum(segment, 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | mantissa)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


def encode_audio(samples: np.ndarray, encoding: int) -> bytes:
    """Mono or interleaved float samples as the bytes `encoding` puts on the wire."""
    if encoding == MULAW:
        return mulaw_encode(samples)
    if encoding == ALAW:
        return alaw_encode(samples)
    return _int16(samples).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV file in memory: how a span reaches the engine (it reads CallRecorded.audio_bytes)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(_int16(samples).astype("<i2").tobytes())
    return buf.getvalue()


class _Resampler:
    """One channel to 16 kHz with FFmpeg's swresample (PyAV): it keeps its filter state from chunk to chunk, so
    chunk borders add no clicks."""

    def __init__(self, rate: int) -> None:
        import av

        self.rate = rate
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, samples: np.ndarray | None) -> np.ndarray:
        import av

        if samples is None:
            frames = self._resampler.resample(None)
        elif not samples.size:
            return np.zeros(0, dtype=np.float32)
        else:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.rate
            frames = self._resampler.resample(frame)
        if not frames:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)


class AudioDecoder:
    """Wire bytes (interleaved channels) -> one float32 16 kHz array per channel. A chunk may end inside a sample
    frame: the rest is carried over to the next chunk."""

    def __init__(self, encoding: int, sample_rate: int, channels: int) -> None:
        self.encoding = encoding
        self.channels = channels
        self.sample_rate = sample_rate
        self.width = 2 if encoding == LINEAR16 else 1
        self.frame_bytes = self.width * channels
        self._carry = b""
        self._resamplers = [_Resampler(sample_rate) for _ in range(channels)] if sample_rate != SAMPLE_RATE else None

    def seconds(self, n_bytes: int) -> float:
        return n_bytes / self.frame_bytes / self.sample_rate

    def decode(self, data: bytes) -> list[np.ndarray]:
        data = self._carry + data
        usable = len(data) - len(data) % self.frame_bytes
        self._carry = data[usable:]
        raw = data[:usable]
        if self.width == 2:
            flat = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        else:
            flat = (MULAW_TABLE if self.encoding == MULAW else ALAW_TABLE)[np.frombuffer(raw, dtype=np.uint8)]
        per_channel = flat.reshape(-1, self.channels).T
        if self._resamplers is None:
            return [np.ascontiguousarray(c) for c in per_channel]
        return [r(np.ascontiguousarray(c)) for r, c in zip(self._resamplers, per_channel, strict=True)]

    def flush(self) -> list[np.ndarray]:
        """What the resamplers still hold (an incomplete frame at the very end is dropped)."""
        self._carry = b""
        if self._resamplers is None:
            return [np.zeros(0, dtype=np.float32) for _ in range(self.channels)]
        return [r(None) for r in self._resamplers]


# -- configuration ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """A validated StreamingConfig, with every default filled in."""

    call_id: str
    tenant: str
    encoding: int
    sample_rate: int
    channels: int
    roles: dict[int, str]
    language: str
    interim_results: bool
    message: events_pb2.StreamingConfig


def parse_config(message: events_pb2.StreamingConfig, settings: TranscriberSettings) -> StreamConfig:
    """Check a StreamingConfig and fill in its defaults; InvalidInputError names what is wrong."""
    call_id = message.call_id.strip()
    if not call_id:
        raise InvalidInputError("StreamingConfig without call_id")
    encoding = message.encoding or LINEAR16
    if encoding not in ENCODING_NAMES:
        raise InvalidInputError(f"call {call_id!r}: unknown audio encoding {encoding}")
    rate = message.sample_rate_hz or (SAMPLE_RATE if encoding == LINEAR16 else 8000)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInputError(f"call {call_id!r}: sample_rate_hz {rate} is outside {MIN_RATE}..{MAX_RATE}")
    channels = message.audio_channel_count or 1
    if channels > MAX_CHANNELS:
        raise InvalidInputError(f"call {call_id!r}: {channels} audio channels, at most {MAX_CHANNELS} are supported")
    given = {int(k): v for k, v in message.channel_roles.items() if v}
    if channels <= 2:
        roles = channel_roles(given, channels == 2, settings.default_roles, settings.mono_role)
    else:
        source = given or {int(k): v for k, v in settings.default_roles.items()}
        roles = {ch: source.get(ch) or f"channel{ch}" for ch in range(channels)}
    return StreamConfig(
        call_id=call_id,
        tenant=message.tenant,
        encoding=encoding,
        sample_rate=rate,
        channels=channels,
        roles=roles,
        language=message.language,
        interim_results=message.interim_results,
        message=message,
    )


# -- endpointing ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to do with a channel's pending buffer after a VAD pass (sample indexes into the buffer)."""

    finals: list[tuple[int, int]]  # spans to transcribe as final results, in order
    consumed: int  # samples at the front of the buffer that are no longer needed
    open_start: int | None  # start of speech still running at the end of the buffer (interims cover it)


def plan_endpoints(
    length: int,
    speech: Sequence[Mapping[str, int]],
    *,
    at_end: bool,
    max_segment: int,
    lead: int = _LEAD_SAMPLES,
    min_utterance: int = _MIN_UTTERANCE,
    hold_silence: int = _HOLD_SILENCE,
) -> Plan:
    """Closed utterances become finals; running speech stays pending (forced final past `max_segment`).

    A closed utterance shorter than `min_utterance` waits for the next one and goes with it, unless
    `hold_silence` of silence follows it (then it goes alone). At the end of the call everything goes, short
    utterances still joined to the next.
    """
    spans = [(int(s["start"]), min(int(s["end"]), length)) for s in speech if int(s["end"]) > int(s["start"])]
    running = None if at_end or not spans or spans[-1][1] < length else spans[-1]
    closed = spans if running is None else spans[:-1]
    finals: list[tuple[int, int]] = []
    held: int | None = None  # start of short closed speech waiting for more
    for i, (start, end) in enumerate(closed):
        held = start if held is None else held
        next_start = spans[i + 1][0] if i + 1 < len(spans) else length
        last = at_end and i == len(closed) - 1
        if last or end - held >= min_utterance or next_start - end >= hold_silence:
            finals.append((held, end))
            held = None
    if at_end:
        return Plan(finals=finals, consumed=length, open_start=None)
    if running is not None:
        open_start = running[0] if held is None else held
        if length - open_start >= max_segment:
            # No pause to split at (the VAD splits long speech itself): cut here rather than outgrow Whisper's 30 s.
            return Plan(finals=[*finals, (open_start, length)], consumed=length, open_start=None)
        return Plan(finals=finals, consumed=open_start, open_start=open_start)
    if held is not None:
        return Plan(finals=finals, consumed=held, open_start=None)
    if finals:
        return Plan(finals=finals, consumed=finals[-1][1], open_start=None)
    return Plan(finals=[], consumed=max(0, length - lead), open_start=None)


# -- sessions ---------------------------------------------------------------------------------------------------


@dataclass
class Emitted:
    """A result waiting to be sent, and when the last audio it covers arrived (its latency starts there)."""

    result: events_pb2.StreamingResult
    arrived: float


# What a session's outbox carries: results, then the call's Transcript (the end), or the error that ended it.
Outgoing = Emitted | events_pb2.Transcript | BaseException


@dataclass
class _Channel:
    index: int
    role: str
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    start: int = 0  # call-timeline sample of pending[0]
    received: int = 0  # samples received so far: the timeline position of the next one
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (timeline end of a piece of audio, arrival)
    since_interim: int = 0  # samples received since the last interim started
    interim: asyncio.Task[None] | None = None
    interim_words: tuple[int, list[str]] | None = None  # (span start, words) of the last interim sent
    last_final: asyncio.Task[None] | None = None
    finalized: int = 0  # timeline sample up to which audio is finalized: older interims are stale
    words: list[TimedWord] = field(default_factory=list)  # final words, on the call timeline

    def arrival_of(self, sample: int) -> float:
        """When the piece of audio holding timeline sample `sample - 1` arrived."""
        for end, arrived in self.arrivals:
            if end >= sample:
                return arrived
        return self.arrivals[-1][1] if self.arrivals else time.monotonic()


class StreamingSession:
    """One live call: feed it audio, read results from `outbox`, `finish()` it for the whole Transcript."""

    def __init__(
        self,
        config: StreamConfig,
        transcriber: SpanTranscriber,
        settings: TranscriberSettings,
        detector: SpeechDetector,
        *,
        source: str = "grpc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.settings = settings
        self.transcriber = transcriber
        self.detector = detector
        self.source = source
        self.clock = clock
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.channels = [_Channel(i, config.roles[i]) for i in range(config.channels)]
        self.decoder = AudioDecoder(config.encoding, config.sample_rate, config.channels)
        self.closed = False
        self.failure: BaseException | None = None
        self.last_activity = clock()
        self.interims_skipped = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._interval = int(settings.streaming_interim_interval_ms * SAMPLE_RATE / 1000)
        self._max_segment = int(settings.streaming_max_segment_s * SAMPLE_RATE)
        self._max_samples = int(settings.max_audio_seconds * SAMPLE_RATE)
        self._language = ("", 0.0)
        self._model_id = ""
        self._processing_seconds = 0.0
        self._redactions: dict[str, int] = {}  # PII spans redacted in final results, by kind

    @property
    def call_id(self) -> str:
        return self.config.call_id

    @property
    def audio_seconds(self) -> float:
        return max((c.received for c in self.channels), default=0) / SAMPLE_RATE

    async def feed(self, audio: bytes, arrived: float | None = None) -> list[asyncio.Task[None]]:
        """Take a piece of audio; returns the final results' tasks it started (they put their results in the
        outbox when done, in audio order per channel)."""
        async with self._lock:
            self._check_open()
            arrived = self.clock() if arrived is None else arrived
            self.last_activity = arrived
            return await self._advance(self.decoder.decode(audio), arrived, at_end=False)

    async def add_silence(self, seconds: float, arrived: float | None = None) -> list[asyncio.Task[None]]:
        """Bridge audio that never came (a gap in a Kafka call's chunks) so later words keep their call times."""
        async with self._lock:
            self._check_open()
            arrived = self.clock() if arrived is None else arrived
            silence = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
            return await self._advance([silence] * len(self.channels), arrived, at_end=False)

    async def finish(self) -> events_pb2.Transcript:
        """End of the call: finalize what is pending, wait for every final, put the Transcript in the outbox."""
        async with self._lock:
            self._check_open()
            self.closed = True
            for channel in self.channels:
                if channel.interim is not None:
                    channel.interim.cancel()  # superseded by the finals below
            await self._advance(self.decoder.flush(), self.clock(), at_end=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.failure is not None:
            raise self.failure
        transcript = self._transcript()
        self.outbox.put_nowait(transcript)
        return transcript

    def fail(self, exc: BaseException) -> None:
        """End the session with an error: the reader of the outbox gets it after the results before it."""
        if self.failure is None:
            self.failure = exc
            self.outbox.put_nowait(exc)
        self.closed = True

    async def abandon(self) -> None:
        """Stop everything without results (the client went away, the partition was revoked)."""
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def sent(self, emitted: Emitted) -> events_pb2.StreamingResult:
        """Stamp a result's latency as it leaves, and count it."""
        result = emitted.result
        result.latency_seconds = max(0.0, self.clock() - emitted.arrived)
        kind = "final" if result.is_final else "interim"
        metrics.STREAMING_RESULTS.labels(self.source, kind).inc()
        metrics.STREAMING_RESULT_SECONDS.labels(self.source, kind).observe(result.latency_seconds)
        return result

    def drain(self) -> list[Outgoing]:
        """Everything in the outbox now, without waiting."""
        items: list[Outgoing] = []
        while not self.outbox.empty():
            items.append(self.outbox.get_nowait())
        return items

    # -- inside ---------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.failure is not None:
            raise SessionClosedError(f"call {self.call_id!r}: the live session failed: {self.failure}")
        if self.closed:
            raise SessionClosedError(f"call {self.call_id!r}: the live session is already closed")

    async def _advance(self, pieces: Sequence[np.ndarray], arrived: float, *, at_end: bool) -> list[asyncio.Task[None]]:
        started: list[asyncio.Task[None]] = []
        for channel, piece in zip(self.channels, pieces, strict=True):
            if piece.size:
                channel.pending = np.concatenate([channel.pending, piece.astype(np.float32, copy=False)])
                channel.received += piece.size
                channel.since_interim += piece.size
                channel.arrivals.append((channel.received, arrived))
                if channel.received > self._max_samples:
                    raise InvalidInputError(
                        f"call {self.call_id!r}: live audio is over the limit of {self._max_samples // SAMPLE_RATE} s"
                    )
            started.extend(await self._endpoint(channel, at_end))
        return started

    async def _endpoint(self, channel: _Channel, at_end: bool) -> list[asyncio.Task[None]]:
        if not channel.pending.size:
            return []
        # Off the event loop: a VAD pass over a long utterance takes tens of milliseconds.
        speech = await asyncio.to_thread(self.detector, channel.pending)
        plan = plan_endpoints(channel.pending.size, speech, at_end=at_end, max_segment=self._max_segment)
        started = [
            self._start_final(channel, channel.pending[s:e].copy(), channel.start + s, channel.start + e)
            for s, e in plan.finals
        ]
        open_start = None if plan.open_start is None else channel.start + plan.open_start
        if plan.consumed:
            channel.pending = channel.pending[plan.consumed :].copy()
            channel.start += plan.consumed
            channel.arrivals = [a for a in channel.arrivals if a[0] > channel.start] or channel.arrivals[-1:]
        if open_start is not None and self.config.interim_results and not at_end:
            self._maybe_interim(channel, open_start)
        return started

    def _maybe_interim(self, channel: _Channel, start: int) -> None:
        if channel.since_interim < self._interval:
            return
        if channel.interim is not None and not channel.interim.done():
            # The previous interim of this channel is still in the batcher: never queue a second one.
            self.interims_skipped += 1
            metrics.STREAMING_INTERIMS_SKIPPED.labels(self.source).inc()
            return
        channel.since_interim = 0
        samples = channel.pending[start - channel.start :].copy()
        channel.interim = self._spawn(self._interim(channel, samples, start, channel.arrivals[-1][1]))

    def _start_final(self, channel: _Channel, samples: np.ndarray, start: int, end: int) -> asyncio.Task[None]:
        channel.finalized = max(channel.finalized, end)
        task = self._spawn(self._final(channel, samples, start, end, channel.arrival_of(end), channel.last_final))
        channel.last_final = task
        return task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _span_call(self, channel: _Channel, samples: np.ndarray) -> events_pb2.CallRecorded:
        # One channel at a time, as a mono call whose only role is the channel's: the engine reads it like any call.
        return events_pb2.CallRecorded(
            call_id=self.call_id,
            tenant=self.config.tenant,
            audio_bytes=wav_bytes(samples),
            channel_roles={0: channel.role},
            language=self.config.language,
        )

    async def _interim(self, channel: _Channel, samples: np.ndarray, start: int, arrived: float) -> None:
        try:
            transcript = await self.transcriber.transcribe(self._span_call(channel, samples))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - only a preview: the final of the same audio follows
            log.warning("call %s channel %d: interim failed: %s", self.call_id, channel.index, exc)
            return
        if self.closed or channel.finalized > start:
            return  # the final of this audio is out (or on its way): this guess is stale
        words = _words(channel.index, transcript, start)
        if not words:
            return
        texts = [w.text.strip() for w in words]
        previous = channel.interim_words[1] if channel.interim_words and channel.interim_words[0] == start else []
        same = next((i for i, (a, b) in enumerate(zip(texts, previous, strict=False)) if a != b), None)
        stable = min(len(texts), len(previous)) if same is None else same
        channel.interim_words = (start, texts)
        # Never 1.0: an interim can always change; 1.0 is for finals.
        stability = 0.9 * stable / len(texts)
        self._emit(channel, words, start, start + samples.size, is_final=False, stability=stability, arrived=arrived)

    async def _final(
        self,
        channel: _Channel,
        samples: np.ndarray,
        start: int,
        end: int,
        arrived: float,
        previous: asyncio.Task[None] | None,
    ) -> None:
        try:
            transcript = await self.transcriber.transcribe(self._span_call(channel, samples))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the outbox
            log.warning("call %s channel %d: final transcription failed: %s", self.call_id, channel.index, exc)
            self.fail(exc)
            return
        if previous is not None:
            await asyncio.wait([previous])  # finals of one channel leave in audio order
        if self.failure is not None:
            return
        self._processing_seconds += transcript.processing_seconds
        self._model_id = self._model_id or transcript.model_id
        if transcript.language and not self._language[0]:
            self._language = (transcript.language, transcript.language_probability)
        for kind, n in transcript.redactions.items():
            self._redactions[kind] = self._redactions.get(kind, 0) + n
        words = _words(channel.index, transcript, start)
        if words:
            words = self._emit(channel, words, start, end, is_final=True, stability=1.0, arrived=arrived)
        channel.words.extend(words)

    def _emit(
        self,
        channel: _Channel,
        words: list[TimedWord],
        start: int,
        end: int,
        *,
        is_final: bool,
        stability: float,
        arrived: float,
    ) -> list[TimedWord]:
        """Queue a result; returns its words as sent (redacted with the call's context)."""
        words = self._redact(channel, words, count=is_final)
        result = events_pb2.StreamingResult(
            call_id=self.call_id,
            channel=channel.index,
            role=channel.role,
            is_final=is_final,
            stability=stability,
            text=join_words(w.text for w in words),
            words=[
                events_pb2.Word(start=w.start, end=w.end, text=w.text.strip(), probability=w.probability) for w in words
            ],
            audio_start=start / SAMPLE_RATE,
            audio_end=end / SAMPLE_RATE,
        )
        self.outbox.put_nowait(Emitted(result, arrived))
        return words

    def _redact(self, channel: _Channel, words: list[TimedWord], *, count: bool) -> list[TimedWord]:
        """Redact a result's words again, with the call's recent final words in front of them as context."""
        policy = self.settings.pii_redaction
        if policy == "off":
            return words
        horizon = words[0].start - _REDACTION_CONTEXT_S
        context: list[TimedWord] = []
        for c in self.channels:  # each channel's final words are in time order: take the tail within the horizon
            first = len(c.words)
            while first > 0 and c.words[first - 1].end >= horizon:
                first -= 1
            context += c.words[first:]
        own = events_pb2.Segment(
            role=channel.role,
            channel=channel.index,
            text=join_words(w.text for w in words),
            words=[events_pb2.Word(start=w.start, end=w.end, text=w.text.strip()) for w in words],
        )
        # The result last, so that all of the context comes before it.
        segments = [*merge_words(context, {c.index: c.role for c in self.channels}), own]
        counts = redact_segments(segments, policy)
        if count:
            for kind, n in counts.items():
                self._redactions[kind] = self._redactions.get(kind, 0) + n
        redacted = [w.text for w in own.words]
        return [
            TimedWord(w.channel, w.start, w.end, " " + text, w.probability)
            for w, text in zip(words, redacted, strict=True)
        ]

    def _transcript(self) -> events_pb2.Transcript:
        words = [w for channel in self.channels for w in channel.words]
        segments = merge_words(words, {c.index: c.role for c in self.channels})
        transcript = events_pb2.Transcript(
            call_id=self.call_id,
            tenant=self.config.tenant,
            segments=segments,
            language=self._language[0] or self.config.language,
            language_probability=self._language[1],
            model_id=self._model_id,
            processing_seconds=self._processing_seconds,
            audio_seconds=self.audio_seconds,
            text=transcript_text(segments),
        )
        if self.config.message.HasField("started_at"):
            transcript.started_at.CopyFrom(self.config.message.started_at)
        for kind, n in self._redactions.items():
            transcript.redactions[kind] = n
        # As the engine does for a post-call Transcript: analytics, then redaction, now over the whole call (what
        # it finds beyond the spans and results is added to `redactions`).
        return finalize_transcript(transcript, self.settings)


def _words(channel: int, transcript: events_pb2.Transcript, start: int) -> list[TimedWord]:
    """A span's words on the call's timeline (the span began `start` samples into the call)."""
    offset = start / SAMPLE_RATE
    # Word.text is stripped in a Segment: the leading space that join_words expects goes back on.
    return [
        TimedWord(channel, w.start + offset, w.end + offset, " " + w.text, w.probability)
        for segment in transcript.segments
        for w in segment.words
        if w.text.strip()
    ]


class StreamingSessions:
    """The live calls open in this process, gRPC and Kafka together, at most `streaming_max_sessions`."""

    def __init__(
        self,
        transcriber: SpanTranscriber,
        settings: TranscriberSettings,
        detector: SpeechDetector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transcriber = transcriber
        self.settings = settings
        self.clock = clock
        self._detector = detector
        self.sessions: dict[str, StreamingSession] = {}

    @property
    def detector(self) -> SpeechDetector:
        if self._detector is None:  # faster-whisper is imported on the first live call, not at start-up
            s = self.settings
            self._detector = silero_detector(s.streaming_endpoint_silence_ms, s.streaming_max_segment_s)
        return self._detector

    def open(self, config: StreamConfig, source: str) -> StreamingSession:
        if config.call_id in self.sessions:
            raise InvalidInputError(f"call {config.call_id!r} already has a live session open")
        if len(self.sessions) >= self.settings.streaming_max_sessions:
            raise SessionLimitError(
                f"call {config.call_id!r}: {len(self.sessions)} live calls are open, the limit "
                f"(streaming_max_sessions) is {self.settings.streaming_max_sessions}"
            )
        session = StreamingSession(
            config, self.transcriber, self.settings, self.detector, source=source, clock=self.clock
        )
        self.sessions[config.call_id] = session
        metrics.STREAMING_SESSIONS.labels(source).inc()
        log.info(
            "call %s: live session opened (%s, %s %d Hz x%d, interim results %s)",
            config.call_id,
            source,
            events_pb2.StreamingConfig.Encoding.Name(config.encoding),  # type: ignore[arg-type]
            config.sample_rate,
            config.channels,
            "on" if config.interim_results else "off",
        )
        return session

    def close(self, session: StreamingSession) -> None:
        if self.sessions.get(session.call_id) is session:
            del self.sessions[session.call_id]
            metrics.STREAMING_SESSIONS.labels(session.source).dec()


# -- gRPC -------------------------------------------------------------------------------------------------------


async def serve_stream(
    sessions: StreamingSessions,
    requests: AsyncIterator[transcriber_pb2.StreamingTranscribeRequest],
    context: grpc.aio.ServicerContext,
) -> AsyncGenerator[transcriber_pb2.StreamingTranscribeResponse, None]:
    """StreamingTranscribe: read audio in one task, send results as the session produces them."""
    iterator = aiter(requests)
    first = await anext(iterator, None)
    if first is None or first.WhichOneof("streaming_request") != "config":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first StreamingTranscribeRequest must carry config")
        return
    try:
        session = sessions.open(parse_config(first.config, sessions.settings), "grpc")
    except SessionLimitError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - mapped to a status
        await abort_with(context, exc)
        return
    reader = asyncio.create_task(_read(session, iterator), name=f"stream-read-{session.call_id}")
    watchdog = asyncio.create_task(
        _close_when_idle(session, sessions.settings.streaming_idle_timeout_s), name=f"stream-idle-{session.call_id}"
    )
    try:
        while True:
            items = [await session.outbox.get(), *session.drain()]
            results = [session.sent(i) for i in items if isinstance(i, Emitted)]
            if results:
                yield transcriber_pb2.StreamingTranscribeResponse(results=results)
            for item in items:
                if isinstance(item, BaseException):
                    await abort_with(context, item if isinstance(item, Exception) else RuntimeError(str(item)))
                    return
                if isinstance(item, events_pb2.Transcript):
                    yield transcriber_pb2.StreamingTranscribeResponse(transcript=item)
                    return
    finally:
        for task in (reader, watchdog):
            task.cancel()
        await asyncio.gather(reader, watchdog, return_exceptions=True)
        await session.abandon()
        sessions.close(session)


async def _read(session: StreamingSession, iterator: AsyncIterator[transcriber_pb2.StreamingTranscribeRequest]) -> None:
    try:
        async for request in iterator:
            kind = request.WhichOneof("streaming_request")
            if kind == "config":
                raise InvalidInputError(f"call {session.call_id!r}: config may only come in the first request")
            if kind == "audio":
                await session.feed(request.audio)
        await session.finish()
    except SessionClosedError:
        pass  # closed for being idle, or failed: the outbox says so
    except Exception as exc:  # noqa: BLE001 - the writer turns it into the RPC's status
        session.fail(exc)


async def _close_when_idle(session: StreamingSession, idle_s: float) -> None:
    while not session.closed:
        await asyncio.sleep(min(1.0, idle_s / 4))
        if not session.closed and session.clock() - session.last_activity >= idle_s:
            log.info("call %s: no audio for %.0f s, closing the live session", session.call_id, idle_s)
            try:
                await session.finish()
            except SessionClosedError:
                pass  # the stream ended at the same moment
            except Exception as exc:  # noqa: BLE001 - the writer turns it into the RPC's status
                session.fail(exc)
            return
