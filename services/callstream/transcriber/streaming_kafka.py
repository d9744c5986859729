"""Live calls over Kafka: AudioChunk records on calls.audio.chunks in, results out (docs/streaming.md).

Each chunk record is applied to its call's session (streaming.py) and its handler returns what that chunk made
due: PartialTranscript records (interim and final results) on calls.transcribed.partial and, for the chunk that
ends the call, the whole Transcript on calls.transcribed. KafkaProcessor produces them and waits for the acks
before it commits, as for every other topic.

- Order: chunks of one call share a key, hence a partition; the processor handles records of one key one after
  another (`sequential_keys`), and a per-call lock keeps the idle sweep (`tick`) out of a chunk's way.
- Sequence numbers: a repeated or older sequence is ignored (a redelivery); a gap is logged and bridged with
  silence of the missing chunks' length (estimated from the chunk after the gap), so later words keep their times.
- The first chunk of a call must carry `config`; a chunk of a call with no open session and no config is
  dead-lettered (so is audio for a call closed already, except repeats of chunks it had).
- Commits: a partition is committed only up to the first chunk of the earliest call still open there, and never
  into the middle of a finished call. A crash (or a rebalance) then replays every unfinished call from its first
  chunk, so no call's audio is lost with the in-memory session; the price is duplicate PartialTranscripts and
  Transcripts for calls that were replayed (at least once, as everywhere in callstream).
- A call that sends no chunk for `streaming_idle_timeout_s` is closed by `tick` with its Transcript.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import ConsumerRecord, TopicPartition

from callstream.core import codec, metrics
from callstream.core.errors import InvalidInputError
from callstream.core.kafka import OutRecord
from callstream.transcriber.settings import TranscriberSettings
from callstream.transcriber.streaming import Emitted, StreamingSession, StreamingSessions, parse_config
from callstream.v1 import events_pb2

log = logging.getLogger(__name__)

# Calls closed recently, remembered so that redelivered chunks of theirs are ignored rather than dead-lettered.
_CLOSED_MEMORY = 10_000


@dataclass
class _Call:
    session: StreamingSession
    tp: TopicPartition
    next_sequence: int
    chunk_seconds: float = 0.0  # length of the last chunk: the estimate for missing ones


@dataclass
class _Range:
    """Offsets of one call's chunks in its partition."""

    first: int
    last: int
    open: bool = True


class AudioChunkHandler:
    """The calls.audio.chunks handler, with the KafkaProcessor hooks (tick, commit_offset, revoked)."""

    def __init__(
        self, sessions: StreamingSessions, settings: TranscriberSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.topics = settings.topics
        self.clock = clock
        self._calls: dict[str, _Call] = {}
        self._closed: OrderedDict[str, tuple[int, str]] = OrderedDict()  # call id -> (last sequence, why)
        self._ranges: dict[TopicPartition, dict[str, _Range]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    async def __call__(self, record: ConsumerRecord) -> list[OutRecord]:
        chunk = codec.decode(events_pb2.AudioChunk, record.value, record.headers)
        if not chunk.call_id:
            raise InvalidInputError("AudioChunk without call_id")
        async with self._lock(chunk.call_id):
            return await self._apply(record, chunk)

    def _lock(self, call_id: str) -> asyncio.Lock:
        return self._locks.setdefault(call_id, asyncio.Lock())

    async def _apply(self, record: ConsumerRecord, chunk: events_pb2.AudioChunk) -> list[OutRecord]:
        call_id, sequence = chunk.call_id, chunk.sequence
        call = self._calls.get(call_id)
        if call is None:
            if call_id in self._closed:
                last, why = self._closed[call_id]
                if sequence <= last:
                    metrics.STREAMING_CHUNKS_OUT_OF_ORDER.labels("duplicate").inc()
                    return []
                raise InvalidInputError(
                    f"call {call_id!r}: AudioChunk {sequence} arrived after the live call was closed ({why}); "
                    "its audio is not transcribed"
                )
            call = self._open(record, chunk)
        tp = TopicPartition(record.topic, record.partition)
        self._ranges.setdefault(tp, {}).setdefault(call_id, _Range(record.offset, record.offset)).last = record.offset
        if sequence < call.next_sequence:
            metrics.STREAMING_CHUNKS_OUT_OF_ORDER.labels("duplicate").inc()
            log.info("call %s: AudioChunk %d again (expected %d); ignored", call_id, sequence, call.next_sequence)
            return []
        session = call.session
        try:
            finals: list[asyncio.Task[None]] = []
            if sequence > call.next_sequence:
                missing = sequence - call.next_sequence
                seconds = missing * (call.chunk_seconds or session.decoder.seconds(len(chunk.audio)))
                metrics.STREAMING_CHUNKS_OUT_OF_ORDER.labels("gap").inc(missing)
                log.warning(
                    "call %s: AudioChunks %d..%d never came; bridging %.2f s with silence",
                    call_id,
                    call.next_sequence,
                    sequence - 1,
                    seconds,
                )
                finals += await session.add_silence(seconds)
            call.next_sequence = sequence + 1
            if chunk.audio:
                call.chunk_seconds = session.decoder.seconds(len(chunk.audio))
                finals += await session.feed(chunk.audio)
            if chunk.end_of_call:
                await session.finish()
            else:
                # The finals this chunk completed leave with it (interims still running leave with a later one).
                await asyncio.gather(*finals)
                if session.failure is not None:
                    raise session.failure
            outputs = self._outputs(call, sequence)
        except Exception as exc:
            self._close(call, f"failed: {type(exc).__name__}: {exc}")
            raise
        if chunk.end_of_call:
            self._close(call, "end_of_call")
        return outputs

    def _open(self, record: ConsumerRecord, chunk: events_pb2.AudioChunk) -> _Call:
        if not chunk.HasField("config"):
            raise InvalidInputError(
                f"call {chunk.call_id!r}: AudioChunk {chunk.sequence} has no config and the call has no live "
                "session; the first chunk of a call (sequence 0) must carry config"
            )
        config_message = events_pb2.StreamingConfig()
        config_message.CopyFrom(chunk.config)
        if config_message.call_id and config_message.call_id != chunk.call_id:
            raise InvalidInputError(
                f"call {chunk.call_id!r}: AudioChunk config names another call ({config_message.call_id!r})"
            )
        config_message.call_id = chunk.call_id
        config_message.tenant = config_message.tenant or chunk.tenant
        session = self.sessions.open(parse_config(config_message, self.settings), "kafka")
        call = _Call(session, TopicPartition(record.topic, record.partition), next_sequence=chunk.sequence)
        self._calls[chunk.call_id] = call
        return call

    def _outputs(self, call: _Call, sequence: int) -> list[OutRecord]:
        session = call.session
        key = session.call_id.encode()
        outputs: list[OutRecord] = []
        for item in session.drain():
            if isinstance(item, Emitted):
                partial = events_pb2.PartialTranscript(
                    call_id=session.call_id,
                    tenant=session.config.tenant,
                    result=session.sent(item),
                    chunk_sequence=sequence,
                )
                outputs.append(OutRecord(self.topics.calls_transcribed_partial, key, partial))
            elif isinstance(item, events_pb2.Transcript):
                outputs.append(OutRecord(self.topics.calls_transcribed, key, item))
            else:
                raise item
        return outputs

    def _close(self, call: _Call, why: str) -> None:
        session = call.session
        self.sessions.close(session)
        self._calls.pop(session.call_id, None)
        self._closed[session.call_id] = (call.next_sequence - 1, why)
        self._closed.move_to_end(session.call_id)
        while len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)
        span = self._ranges.get(call.tp, {}).get(session.call_id)
        if span is not None:
            span.open = False
        if not session.closed or session.failure is not None:
            self._abandon(session)

    def _abandon(self, session: StreamingSession) -> None:
        """Cancel what a dropped session still runs, without waiting for it (a reference keeps the task alive)."""
        task = asyncio.ensure_future(session.abandon())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # -- KafkaProcessor hooks -------------------------------------------------------------------------------

    async def tick(self) -> list[OutRecord]:
        """Interims that finished since their call's last chunk, and the Transcript of calls idle too long."""
        outputs: list[OutRecord] = []
        idle_s = self.settings.streaming_idle_timeout_s
        for call_id in list(self._calls):
            lock = self._lock(call_id)
            if lock.locked():
                continue  # a chunk of this call is being applied: its handler returns the results
            async with lock:
                call = self._calls.get(call_id)
                if call is None:
                    continue
                last = call.next_sequence - 1
                idle = self.clock() - call.session.last_activity >= idle_s
                try:
                    if idle:
                        log.info("call %s: no AudioChunk for %.0f s, closing the live call", call_id, idle_s)
                        await call.session.finish()
                    outputs += self._outputs(call, last)
                except Exception as exc:  # noqa: BLE001 - no record to dead-letter here: logged, the call closed
                    log.error("call %s: the live call failed: %s: %s", call_id, type(exc).__name__, exc)
                    self._close(call, f"failed: {type(exc).__name__}: {exc}")
                    continue
                if idle:
                    self._close(call, f"no audio for {idle_s:.0f} s")
        for call_id in [c for c, lock in self._locks.items() if c not in self._calls and not lock.locked()]:
            del self._locks[call_id]
        return outputs

    def commit_offset(self, tp: TopicPartition, processed: int) -> int:
        """Hold the commit at the first chunk of any open call, and out of the middle of any finished call."""
        ranges = self._ranges.get(tp)
        if not ranges:
            return processed
        target = processed
        moved = True
        while moved:
            moved = False
            for span in ranges.values():
                if span.first < target and (span.open or span.last >= target):
                    target, moved = span.first, True
        for call_id in [c for c, span in ranges.items() if not span.open and span.last < target]:
            del ranges[call_id]  # wholly before the commit point: can never hold it back again
        return target

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        """Another consumer replays these partitions from their (held back) commit: drop their calls unsent."""
        gone = set(tps)
        for call_id, call in list(self._calls.items()):
            if call.tp in gone:
                log.info("call %s: partition %s revoked; its new owner replays the call", call_id, call.tp)
                self.sessions.close(call.session)
                del self._calls[call_id]
                self._abandon(call.session)
        for tp in gone:
            self._ranges.pop(tp, None)
