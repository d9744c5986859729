"""Transcriber service — where requests enter and results leave.

Enter: gRPC Transcribe, and Kafka records from calls.recorded (CallRecorded).
Model: faster-whisper (transcriber/engine.py) behind the shared dynamic batcher.
Leave: Transcript on calls.transcribed, keyed by call id.

Live calls (docs/streaming.md) use the same Transcriber: gRPC StreamingTranscribe and Kafka calls.audio.chunks
(AudioChunk) in; StreamingResults (gRPC) or PartialTranscripts (calls.transcribed.partial) and, at the end of the
call, the Transcript out. Sessions are in streaming.py, the Kafka side in streaming_kafka.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiokafka import ConsumerRecord

from callstream.core import codec
from callstream.core.batching import DynamicBatcher
from callstream.core.errors import InvalidInputError
from callstream.core.grpc_server import GrpcService, ServiceRuntime, abort_with
from callstream.core.kafka import OutRecord, kafka_service_runtime
from callstream.transcriber.engine import AsrEngine, FasterWhisperEngine
from callstream.transcriber.settings import TranscriberSettings
from callstream.transcriber.streaming import StreamingSessions, serve_stream
from callstream.transcriber.streaming_kafka import AudioChunkHandler
from callstream.v1 import events_pb2, transcriber_pb2, transcriber_pb2_grpc

log = logging.getLogger(__name__)


def validate_call(call: events_pb2.CallRecorded) -> None:
    if not call.call_id:
        raise InvalidInputError("CallRecorded without call_id")
    if call.WhichOneof("audio") is None:
        raise InvalidInputError(f"call {call.call_id}: no audio (set audio_uri or audio_bytes)")


class Transcriber:
    """The ASR engine and its batcher; shared by the gRPC servicer and the Kafka handler."""

    def __init__(self, settings: TranscriberSettings, engine: AsrEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.batcher: DynamicBatcher[events_pb2.CallRecorded, events_pb2.Transcript] = DynamicBatcher(
            self._transcribe_batch,
            name="transcriber",
            max_batch_size=settings.batch.max_batch_size,
            max_wait_ms=settings.batch.max_wait_ms,
            max_idle_ms=settings.batch.max_idle_ms,
        )

    async def start(self) -> None:
        if self.engine is None:
            self.engine = await asyncio.to_thread(FasterWhisperEngine, self.settings)
        log.info("transcriber: model %s loaded", self.engine.model_id)
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def _transcribe_batch(self, calls: Any) -> list[events_pb2.Transcript | Exception]:
        assert self.engine is not None
        return self.engine.transcribe_batch(calls)

    async def transcribe(self, call: events_pb2.CallRecorded) -> events_pb2.Transcript:
        validate_call(call)
        return await self.batcher.submit(call)


class TranscriberServicer(transcriber_pb2_grpc.TranscriberServiceServicer):
    def __init__(self, transcriber: Transcriber, sessions: StreamingSessions | None = None) -> None:
        self.transcriber = transcriber
        self.sessions = sessions or StreamingSessions(transcriber, transcriber.settings)

    async def Transcribe(  # noqa: N802 - gRPC method name
        self, request: transcriber_pb2.TranscribeRequest, context: grpc.aio.ServicerContext
    ) -> transcriber_pb2.TranscribeResponse:
        try:
            transcript = await self.transcriber.transcribe(request.call)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_with(context, exc)
            raise
        return transcriber_pb2.TranscribeResponse(transcript=transcript)

    async def StreamingTranscribe(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[transcriber_pb2.StreamingTranscribeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[transcriber_pb2.StreamingTranscribeResponse]:
        # aclosing: when the RPC ends early (the client cancels), the inner generator and its session close at once.
        async with contextlib.aclosing(serve_stream(self.sessions, request_iterator, context)) as responses:
            async for response in responses:
                yield response


class TranscriberKafkaHandler:
    """calls.recorded (whole calls) and calls.audio.chunks (live calls, handed to `chunks`)."""

    def __init__(
        self, transcriber: Transcriber, settings: TranscriberSettings, chunks: AudioChunkHandler | None = None
    ) -> None:
        self.transcriber = transcriber
        self.topics = settings.topics
        self.chunks = chunks

    async def __call__(self, record: ConsumerRecord) -> list[OutRecord]:
        if self.chunks is not None and record.topic == self.topics.calls_audio_chunks:
            return await self.chunks(record)
        call = codec.decode(events_pb2.CallRecorded, record.value, record.headers)
        transcript = await self.transcriber.transcribe(call)
        return [OutRecord(self.topics.calls_transcribed, call.call_id.encode(), transcript)]


def build_runtime(settings: TranscriberSettings) -> ServiceRuntime:
    transcriber = Transcriber(settings)
    sessions = StreamingSessions(transcriber, settings)  # live calls over gRPC and Kafka share the limit
    chunks = AudioChunkHandler(sessions, settings)
    return kafka_service_runtime(
        name="transcriber",
        settings=settings,
        model=transcriber,
        grpc_service=GrpcService(
            transcriber_pb2.DESCRIPTOR.services_by_name["TranscriberService"].full_name,
            TranscriberServicer(transcriber, sessions),
            transcriber_pb2_grpc.add_TranscriberServiceServicer_to_server,
        ),
        input_topics=[settings.topics.calls_recorded, settings.topics.calls_audio_chunks],
        handler=TranscriberKafkaHandler(transcriber, settings, chunks),
        hooks=chunks,
        sequential_keys=True,  # a live call's chunks in order
    )
