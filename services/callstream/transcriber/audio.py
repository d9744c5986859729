"""Reading a call's audio: URI parsing, size and length limits, decoding, channel split and roles.

Audio comes as a URI (file:// or a plain path always; s3://, gs://, http(s)://, ... through fsspec when that
protocol's fsspec package is installed, e.g. s3fs) or as inline bytes. Anything FFmpeg reads is decoded (wav,
flac, mp3, ogg/opus, m4a, wav with G.711 inside); headerless telephony audio (8 kHz mu-law or A-law, raw PCM) is
read when the call says its encoding (CallRecorded.raw_encoding) or the file name ends in .ul/.ulaw/.mulaw,
.al/.alaw or .pcm/.raw.

Every failure is raised as one of core.errors' input errors, with a message that names the call and the cause:
AudioNotFoundError (bad URI, missing or unreadable file), AudioDecodeError (not decodable audio), and
InvalidInputError (no audio given, over the configured limits). None of them can succeed on a retry.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import av
import numpy as np

from callstream.core.errors import AudioDecodeError, AudioNotFoundError, InvalidInputError, TransientError
from callstream.v1 import events_pb2

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Headerless audio: encoding -> (WAVE format tag, bits per sample, default sample rate).
RAW_ENCODINGS: dict[str, tuple[int, int, int]] = {
    "mulaw": (7, 8, 8000),
    "alaw": (6, 8, 8000),
    "linear16": (1, 16, 16000),
}
_RAW_SUFFIXES = {
    ".ul": "mulaw", ".ulaw": "mulaw", ".mulaw": "mulaw", ".mu": "mulaw", ".al": "alaw", ".alaw": "alaw",
    ".pcm": "linear16", ".raw": "linear16",
}  # fmt: skip
# Two channels whose difference is under this fraction of their level carry the same (mixed) audio.
_SAME_CHANNEL_TOLERANCE = 0.1


@dataclass
class ChannelAudio:
    channel: int
    role: str
    samples: np.ndarray  # float32 mono at SAMPLE_RATE


@dataclass
class CallAudio:
    channels: list[ChannelAudio]
    seconds: float
    source_channels: int  # channels in the file (2 for a stereo file even when it is treated as mono)


def call_label(call: events_pb2.CallRecorded) -> str:
    return f"call {call.call_id!r}" if call.call_id else "call (no call_id)"


def parse_audio_uri(uri: str, call_id: str = "") -> Path:
    """A local path from a file:// URI (file:///a/b.wav, file://localhost/a/b.wav) or a plain path.

    Raises AudioNotFoundError for other schemes (http, s3, ...) and for file URIs naming a remote host.
    """
    who = f"call {call_id!r}" if call_id else "call"
    text = uri.strip()
    if not text:
        raise AudioNotFoundError(f"{who}: audio_uri is empty")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise AudioNotFoundError(
                f"{who}: audio_uri {uri!r} names host {parts.netloc!r}; only local file:// URIs "
                "(file:///path or file://localhost/path) can be read"
            )
        if not parts.path:
            raise AudioNotFoundError(f"{who}: audio_uri {uri!r} has no path")
        return Path(unquote(parts.path))
    if scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive (C:\\...)
        raise AudioNotFoundError(f"{who}: audio_uri {uri!r} is not a local file (read remote URIs with read_remote)")
    return Path(text).expanduser()


def is_remote_uri(uri: str) -> bool:
    scheme = urlsplit(uri.strip()).scheme.lower()
    return len(scheme) > 1 and scheme != "file"


def read_remote(uri: str, max_bytes: int, who: str) -> bytes:
    """The bytes behind an fsspec URL (s3://bucket/key, gs://..., http(s)://..., memory://...).

    A missing object or a refused read is the event's fault (AudioNotFoundError, dead-lettered); a protocol whose
    fsspec package is not installed is the deployment's (AudioNotFoundError naming the package to install); any
    other I/O error may pass (TransientError: retried).
    """
    import fsspec

    scheme = urlsplit(uri.strip()).scheme.lower()
    try:
        fs, path = fsspec.core.url_to_fs(uri.strip())
    except (ImportError, ValueError) as exc:
        raise AudioNotFoundError(
            f"{who}: audio_uri {uri!r}: the {scheme}:// protocol is not available here ({exc}); install its fsspec "
            "implementation (s3fs for s3://, gcsfs for gs://, adlfs for az://, aiohttp for http://) or send a file://"
            " URI"
        ) from exc
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise InvalidInputError(f"{who}: audio {uri!r} is {size:,} bytes, over the limit of {max_bytes:,}")
        with fs.open(path, "rb") as f:
            data: bytes = f.read(max_bytes + 1)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise AudioNotFoundError(f"{who}: audio_uri {uri!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise TransientError(f"{who}: reading audio_uri {uri!r} failed: {exc}") from exc
    if len(data) > max_bytes:
        raise InvalidInputError(f"{who}: audio {uri!r} is over the limit of {max_bytes:,} bytes")
    if not data:
        raise AudioDecodeError(f"{who}: audio {uri!r} is empty (0 bytes)")
    return data


def raw_encoding_of(call: events_pb2.CallRecorded) -> str:
    """The call's headerless encoding: raw_encoding, else from the file name's suffix, else "" (has a header)."""
    if call.raw_encoding:
        encoding = call.raw_encoding.strip().lower().replace("-", "").replace("_", "")
        encoding = {"ulaw": "mulaw", "pcmu": "mulaw", "pcma": "alaw", "s16le": "linear16", "pcm": "linear16"}.get(
            encoding, encoding
        )
        if encoding not in RAW_ENCODINGS:
            raise InvalidInputError(
                f"{call_label(call)}: raw_encoding {call.raw_encoding!r} is not one of {', '.join(RAW_ENCODINGS)}"
            )
        return encoding
    if call.WhichOneof("audio") == "audio_uri":
        return _RAW_SUFFIXES.get(Path(urlsplit(call.audio_uri).path).suffix.lower(), "")
    return ""


def raw_as_wav(data: bytes, encoding: str, sample_rate: int = 0, channels: int = 1) -> bytes:
    """Headerless G.711 or 16-bit PCM wrapped in a WAVE header, so that FFmpeg decodes it like any file."""
    tag, bits, default_rate = RAW_ENCODINGS[encoding]
    rate = sample_rate or default_rate
    block = channels * bits // 8
    data = data[: len(data) - len(data) % block]
    fmt = struct.pack("<HHIIHHH", tag, channels, rate, rate * block, block, bits, 0)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def _open_source(call: events_pb2.CallRecorded, max_bytes: int) -> tuple[str | bytes, str]:
    """The audio as a path or as bytes, plus how to name it in messages."""
    who = call_label(call)
    kind = call.WhichOneof("audio")
    if kind == "audio_bytes":
        data = call.audio_bytes
        if not data:
            raise AudioDecodeError(f"{who}: audio_bytes is empty")
        if len(data) > max_bytes:
            raise InvalidInputError(f"{who}: inline audio is {len(data):,} bytes, over the limit of {max_bytes:,}")
        return data, f"inline audio ({len(data):,} bytes)"
    if kind != "audio_uri":
        raise InvalidInputError(f"{who}: no audio (set audio_uri or audio_bytes)")
    if is_remote_uri(call.audio_uri):
        return read_remote(call.audio_uri, max_bytes, who), f"audio {call.audio_uri!r}"
    path = parse_audio_uri(call.audio_uri, call.call_id)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise AudioNotFoundError(
            f"{who}: audio file {str(path)!r} does not exist (audio_uri={call.audio_uri!r})"
        ) from exc
    except OSError as exc:
        raise AudioNotFoundError(f"{who}: cannot read audio file {str(path)!r}: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise AudioNotFoundError(f"{who}: audio_uri {call.audio_uri!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise AudioNotFoundError(f"{who}: audio file {str(path)!r} is not readable (permission denied)")
    if st.st_size > max_bytes:
        raise InvalidInputError(
            f"{who}: audio file {str(path)!r} is {st.st_size:,} bytes, over the limit of {max_bytes:,}"
        )
    if st.st_size == 0:
        raise AudioDecodeError(f"{who}: audio file {str(path)!r} is empty (0 bytes)")
    return str(path), f"audio file {str(path)!r}"


def _as_input(source: str | bytes) -> str | BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def probe(source: str | bytes, who: str, what: str) -> tuple[int, float | None]:
    """(channels, duration in seconds if the container says) of the first audio stream."""
    with _open_container(source, who, what) as container:
        return _stream_info(container, who, what)


def _open_container(source: str | bytes, who: str, what: str) -> av.container.InputContainer:
    try:
        return av.open(_as_input(source), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise AudioDecodeError(f"{who}: {what} is not decodable audio ({_reason(exc)})") from exc


def _stream_info(container: av.container.InputContainer, who: str, what: str) -> tuple[int, float | None]:
    if not container.streams.audio:
        raise AudioDecodeError(f"{who}: {what} has no audio stream")
    stream = container.streams.audio[0]
    seconds: float | None = None
    if container.duration:
        seconds = container.duration / 1_000_000
    elif stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    return int(stream.channels or 0), seconds


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words without the file name that PyAV appends (the message names the source already)."""
    strerror = getattr(exc, "strerror", None)
    return str(strerror) if strerror else (str(exc) or type(exc).__name__)


def same_audio(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two channels carry the same signal (a mono mix stored twice), allowing codec noise."""
    level = max(float(np.sqrt(np.mean(a**2))) if a.size else 0.0, float(np.sqrt(np.mean(b**2))) if b.size else 0.0)
    if level < 1e-6:
        return True
    diff = float(np.sqrt(np.mean((a - b) ** 2)))
    return diff < _SAME_CHANNEL_TOLERANCE * level


def channel_roles(
    call_roles: Mapping[int, str], stereo: bool, default_roles: Mapping[int, str], mono_role: str
) -> dict[int, str]:
    """Role per channel: the call's channel_roles, else the default roles (stereo) or the mono role.

    A stereo channel missing from a non-empty channel_roles is called "channel<N>". Mono audio takes the call's
    role only when the call names exactly one role (several roles on one channel are a mix: mono_role).
    """
    roles = {int(k): v for k, v in call_roles.items() if v}
    if not stereo:
        return {0: next(iter(roles.values())) if len(roles) == 1 else mono_role}
    source = roles or {int(k): v for k, v in default_roles.items()}
    return {ch: source.get(ch) or f"channel{ch}" for ch in (0, 1)}


def _skip_invalid(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame]:
    """Frames that FFmpeg cannot decode are skipped, not fatal (as faster-whisper reads audio)."""
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _decode_container(container: av.container.InputContainer, stereo: bool) -> list[np.ndarray]:
    """16 kHz float32 samples, one array (mono) or two (left, right), decoded and resampled by FFmpeg.

    faster_whisper.decode_audio does the same but runs gc.collect() after every file to free PyAV's resampler
    (37 ms a call here, 6% of a short call's cost); the engine collects at most every 30 s instead.
    """
    resampler = av.AudioResampler(format="s16", layout="stereo" if stereo else "mono", rate=SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    for frame in _skip_invalid(container.decode(audio=0)):
        for out in resampler.resample(frame):
            pieces.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        pieces.append(out.to_ndarray().reshape(-1))
    pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    samples = pcm.astype(np.float32) / 32768.0
    return [samples[0::2].copy(), samples[1::2].copy()] if stereo else [samples]


def load_call_audio(
    call: events_pb2.CallRecorded,
    *,
    max_seconds: float,
    max_bytes: int,
    default_roles: Mapping[int, str],
    mono_role: str = "speaker",
) -> CallAudio:
    """Read, check and decode a call's audio into one 16 kHz float32 array per channel, with its role."""
    who = call_label(call)
    source, what = _open_source(call, max_bytes)
    if encoding := raw_encoding_of(call):
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        source = raw_as_wav(raw, encoding, call.raw_sample_rate_hz, call.raw_channel_count or 1)
        what = f"{what} ({encoding}, {call.raw_sample_rate_hz or RAW_ENCODINGS[encoding][2]} Hz)"
    # One open for the stream's facts and its samples (a second open costs 4 ms a call).
    with _open_container(source, who, what) as container:
        n_channels, est_seconds = _stream_info(container, who, what)
        if est_seconds is not None and est_seconds > max_seconds * 1.01:
            raise InvalidInputError(f"{who}: {what} is {est_seconds:.0f} s long, over the limit of {max_seconds:.0f} s")
        stereo = n_channels >= 2
        if n_channels > 2:
            log.warning("%s: %s has %d channels; transcribing a stereo downmix", who, what, n_channels)
        try:
            arrays = _decode_container(container, stereo)
        except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
            raise AudioDecodeError(f"{who}: {what} could not be decoded ({_reason(exc)})") from exc
    seconds = arrays[0].size / SAMPLE_RATE
    if seconds > max_seconds * 1.01:
        raise InvalidInputError(f"{who}: {what} is {seconds:.0f} s long, over the limit of {max_seconds:.0f} s")
    if stereo and same_audio(arrays[0], arrays[1]):
        # A mono mix stored on two channels: transcribing both would give every word twice.
        log.info("%s: both channels of %s carry the same audio; transcribing it as mono", who, what)
        arrays = [((arrays[0] + arrays[1]) * 0.5).astype(np.float32)]
        stereo = False
    roles = channel_roles(call.channel_roles, stereo, default_roles, mono_role)
    if not stereo and len(arrays) == 1 and n_channels >= 2:
        roles = {0: mono_role}
    return CallAudio(
        channels=[ChannelAudio(ch, roles[ch], samples) for ch, samples in enumerate(arrays)],
        seconds=seconds,
        source_channels=n_channels,
    )
