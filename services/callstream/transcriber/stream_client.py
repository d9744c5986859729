"""A StreamingTranscribe client: stream an audio file to a running transcriber as a live call would.

`callstream transcribe-stream FILE` prints interim and final results as they arrive, then the call's Transcript
and the latency of the final results. Its options are declared once, in callstream/cli.py, which imports this
module only when the command runs (PyAV and faster-whisper stay out of every other command's start-up). The
integration tests use `stream_audio` too, so what they measure is what a person running the command sees.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer

from callstream.transcriber.audio import same_audio
from callstream.transcriber.streaming import ENCODING_NAMES, LINEAR16, encode_audio
from callstream.v1 import events_pb2, transcriber_pb2, transcriber_pb2_grpc

ENCODINGS = {name.lower(): value for value, name in ENCODING_NAMES.items()}


@dataclass
class StreamEvent:
    """One response: when it came (seconds after the first chunk was sent) and how many chunks had gone by then."""

    at: float
    chunks_sent: int
    results: list[events_pb2.StreamingResult]
    transcript: events_pb2.Transcript | None = None


@dataclass
class StreamRun:
    chunks: int
    chunk_seconds: float
    events: list[StreamEvent] = field(default_factory=list)
    last_chunk_at: float = 0.0
    transcript: events_pb2.Transcript | None = None

    def results(self, final: bool) -> list[events_pb2.StreamingResult]:
        return [r for e in self.events for r in e.results if r.is_final == final]

    def interims_before_last_chunk(self) -> int:
        """Interim results that arrived while audio was still being sent."""
        return sum(1 for e in self.events if e.chunks_sent < self.chunks for r in e.results if not r.is_final)

    def final_latencies(self) -> list[float]:
        return [r.latency_seconds for r in self.results(final=True)]


def load_audio(path: Path, rate: int) -> np.ndarray:
    """The file as float32 samples at `rate`, shape (channels, samples): two channels only if they differ."""
    from faster_whisper import decode_audio

    from callstream.transcriber.audio import probe

    channels, _ = probe(str(path), "file", str(path))
    if channels >= 2:
        left, right = decode_audio(str(path), sampling_rate=rate, split_stereo=True)
        if not same_audio(left, right):
            return np.stack([left, right]).astype(np.float32)
        return ((left + right) * 0.5).astype(np.float32)[None, :]
    return np.asarray(decode_audio(str(path), sampling_rate=rate), dtype=np.float32)[None, :]


def audio_chunks(samples: np.ndarray, rate: int, encoding: int, chunk_ms: float) -> list[bytes]:
    """Interleave the channels, encode, and cut into chunks of `chunk_ms` of audio."""
    frames = int(rate * chunk_ms / 1000)
    interleaved = samples.T.reshape(-1)
    step = frames * samples.shape[0]
    return [encode_audio(interleaved[i : i + step], encoding) for i in range(0, interleaved.size, step)]


async def stream_audio(
    address: str,
    config: events_pb2.StreamingConfig,
    chunks: list[bytes],
    chunk_seconds: float,
    speed: float = 1.0,
    on_event: Callable[[StreamEvent], None] | None = None,
    timeout_s: float = 600.0,
) -> StreamRun:
    """Send `chunks` at `speed` times real time (0: as fast as possible) and collect every response."""
    import grpc

    run = StreamRun(chunks=len(chunks), chunk_seconds=chunk_seconds)
    sent = 0
    started = time.perf_counter()

    async def requests() -> AsyncIterator[transcriber_pb2.StreamingTranscribeRequest]:
        nonlocal sent
        yield transcriber_pb2.StreamingTranscribeRequest(config=config)
        for i, chunk in enumerate(chunks):
            if speed > 0:
                # Paced against the clock, not by sleeping a fixed time per chunk, so that slow sends do not drift.
                await asyncio.sleep(max(0.0, started + i * chunk_seconds / speed - time.perf_counter()))
            yield transcriber_pb2.StreamingTranscribeRequest(audio=chunk)
            sent = i + 1
            run.last_chunk_at = time.perf_counter() - started

    async with grpc.aio.insecure_channel(address) as channel:
        stub = transcriber_pb2_grpc.TranscriberServiceStub(channel)
        async for response in stub.StreamingTranscribe(requests(), timeout=timeout_s):
            event = StreamEvent(
                at=time.perf_counter() - started,
                chunks_sent=sent,
                results=list(response.results),
                transcript=response.transcript if response.HasField("transcript") else None,
            )
            run.events.append(event)
            if event.transcript is not None:
                run.transcript = event.transcript
            if on_event is not None:
                on_event(event)
    return run


def _format_result(event: StreamEvent, result: events_pb2.StreamingResult) -> str:
    from callstream.transcriber.cli import format_time

    span = f"[{format_time(result.audio_start)}-{format_time(result.audio_end)}]"
    if result.is_final:
        return f"{event.at:6.2f}s FINAL   {span} {result.role}: {result.text}  (latency {result.latency_seconds:.2f} s)"
    return f"{event.at:6.2f}s interim {span} {result.role} ({result.stability:.2f}): {result.text}"


def transcribe_stream_command(
    file: Path,
    address: str,
    chunk_ms: float,
    realtime: bool,
    encoding: str,
    interim: bool,
    roles: str | None,
    call_id: str | None,
) -> None:
    """Stream FILE to a transcriber's StreamingTranscribe like a live call; print interim and final results."""
    from callstream.transcriber.cli import format_transcript, parse_roles

    if encoding.lower() not in ENCODINGS:
        raise typer.BadParameter(f"{encoding!r}: expected one of {', '.join(ENCODINGS)}", param_hint="--encoding")
    wire = ENCODINGS[encoding.lower()]
    rate = 16000 if wire == LINEAR16 else 8000
    samples = load_audio(file, rate)
    config = events_pb2.StreamingConfig(
        call_id=call_id or file.stem,
        encoding=wire,
        sample_rate_hz=rate,
        audio_channel_count=samples.shape[0],
        channel_roles=parse_roles(roles),
        interim_results=interim,
    )
    chunks = audio_chunks(samples, rate, wire, chunk_ms)

    def show(event: StreamEvent) -> None:
        for result in event.results:
            typer.echo(_format_result(event, result))

    import grpc

    try:
        run = asyncio.run(stream_audio(address, config, chunks, chunk_ms / 1000, 1.0 if realtime else 0.0, show))
    except grpc.aio.AioRpcError as exc:
        typer.echo(f"error: {address}: {exc.code().name}: {exc.details()}", err=True)
        raise typer.Exit(1) from exc
    if run.transcript is not None:
        typer.echo("\n" + (format_transcript(run.transcript) or "(no speech)"))
    latencies = run.final_latencies()
    summary = (
        f"-- {samples.shape[1] / rate:.1f} s of {ENCODING_NAMES[wire]} audio ({samples.shape[0]} channel(s)) in "
        f"{len(chunks)} chunks of {chunk_ms:.0f} ms, {'real time' if realtime else 'as fast as possible'}; "
        f"{len(run.results(final=False))} interim ({run.interims_before_last_chunk()} before the last chunk) and "
        f"{len(latencies)} final results"
    )
    if latencies:
        summary += (
            f"; final latency median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s "
            "(from the last audio of an utterance arriving to its final result)"
        )
    print(summary, file=sys.stderr)
