"""Reading a call's audio without the model: URI parsing, limits, decoding, channels, roles and error types."""

from __future__ import annotations

import io
import os
import wave
from pathlib import Path

import numpy as np
import pytest

from callstream.core.errors import AudioDecodeError, AudioNotFoundError, InvalidInputError
from callstream.transcriber.audio import (
    CallAudio,
    channel_roles,
    load_call_audio,
    parse_audio_uri,
    raw_as_wav,
    same_audio,
)
from callstream.v1 import events_pb2

DEFAULT_ROLES = {0: "agent", 1: "customer"}


def wav_bytes(channels: list[np.ndarray], rate: int = 16000) -> bytes:
    frames = np.stack(channels, axis=1) if len(channels) > 1 else channels[0][:, None]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(len(channels))
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(frames, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def tone(seconds: float, freq: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def load(call: events_pb2.CallRecorded, max_seconds: float = 3600.0, max_bytes: int = 10_000_000) -> CallAudio:
    return load_call_audio(call, max_seconds=max_seconds, max_bytes=max_bytes, default_roles=DEFAULT_ROLES)


# -- URIs -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///data/calls/a.wav", "/data/calls/a.wav"),
        ("file://localhost/data/calls/a.wav", "/data/calls/a.wav"),
        ("file:///data/my%20calls/a%23b.wav", "/data/my calls/a#b.wav"),
        ("/data/calls/a.wav", "/data/calls/a.wav"),
        ("  /data/calls/a.wav ", "/data/calls/a.wav"),
        ("relative/a.wav", "relative/a.wav"),
    ],
)
def test_parse_audio_uri(uri: str, expected: str) -> None:
    assert parse_audio_uri(uri) == Path(expected)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("s3://bucket/a.wav", "not a local file"),
        ("file://otherhost/a.wav", "names host 'otherhost'"),
        ("", "empty"),
    ],
)
def test_bad_uris_are_audio_not_found(uri: str, fragment: str) -> None:
    with pytest.raises(AudioNotFoundError, match=fragment) as info:
        parse_audio_uri(uri, "call-7")
    assert "call-7" in str(info.value)


def test_a_path_from_as_uri_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "a b#c.wav"
    assert parse_audio_uri(path.as_uri()) == path


# -- error mapping ---------------------------------------------------------------------------------------------------


def test_missing_file_is_audio_not_found_naming_call_and_file() -> None:
    call = events_pb2.CallRecorded(call_id="missing-1", audio_uri="file:///nonexistent/recordings/call-404.wav")
    with pytest.raises(AudioNotFoundError) as info:
        load(call)
    message = str(info.value)
    assert "missing-1" in message and "call-404.wav" in message and "does not exist" in message


def test_directory_is_audio_not_found(tmp_path: Path) -> None:
    with pytest.raises(AudioNotFoundError, match="not a regular file"):
        load(events_pb2.CallRecorded(call_id="d", audio_uri=str(tmp_path)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_audio_not_found(tmp_path: Path) -> None:
    path = tmp_path / "locked.wav"
    path.write_bytes(wav_bytes([tone(0.5, 440)]))
    path.chmod(0)
    with pytest.raises(AudioNotFoundError, match="not readable"):
        load(events_pb2.CallRecorded(call_id="u", audio_uri=str(path)))


@pytest.mark.parametrize(
    "data",
    [
        b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is not audio" * 20,
        np.random.default_rng(0).bytes(4096),
        b"plain text, no audio here",
    ],
)
def test_corrupt_bytes_are_audio_decode_error(data: bytes) -> None:
    with pytest.raises(AudioDecodeError) as info:
        load(events_pb2.CallRecorded(call_id="corrupt-1", audio_bytes=data))
    assert "corrupt-1" in str(info.value) and "not decodable" in str(info.value)


def test_corrupt_file_is_audio_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"not audio at all" * 100)
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        load(events_pb2.CallRecorded(call_id="c", audio_uri=path.as_uri()))


def test_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="empty"):
        load(events_pb2.CallRecorded(call_id="e", audio_bytes=b""))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="empty"):
        load(events_pb2.CallRecorded(call_id="e", audio_uri=str(empty)))
    with pytest.raises(InvalidInputError, match="no audio"):
        load(events_pb2.CallRecorded(call_id="e"))


def test_limits_are_invalid_input(tmp_path: Path) -> None:
    data = wav_bytes([tone(3.0, 440)])
    with pytest.raises(InvalidInputError, match="over the limit of 1,000") as info:
        load(events_pb2.CallRecorded(call_id="big", audio_bytes=data), max_bytes=1000)
    assert not isinstance(info.value, AudioNotFoundError | AudioDecodeError)
    path = tmp_path / "long.wav"
    path.write_bytes(data)
    with pytest.raises(InvalidInputError, match="3 s long, over the limit of 2 s"):
        load(events_pb2.CallRecorded(call_id="long", audio_uri=str(path)), max_seconds=2.0)
    with pytest.raises(InvalidInputError, match="over the limit"):
        load(events_pb2.CallRecorded(call_id="big-file", audio_uri=str(path)), max_bytes=1000)


# -- decoding, channels and roles --------------------------------------------------------------------------------------


def test_stereo_is_split_per_channel_with_default_roles() -> None:
    left, right = tone(1.0, 300), np.zeros(16000, dtype=np.float32)
    right[8000:] = tone(0.5, 700)
    audio = load(events_pb2.CallRecorded(call_id="s", audio_bytes=wav_bytes([left, right])))
    assert [(c.channel, c.role) for c in audio.channels] == [(0, "agent"), (1, "customer")]
    assert audio.seconds == pytest.approx(1.0, abs=0.01)
    ch0, ch1 = (c.samples for c in audio.channels)
    assert np.abs(ch1[:7000]).max() < 0.01 < np.abs(ch0[:7000]).max()


def test_stereo_at_another_rate_is_resampled_to_16k() -> None:
    audio = load(events_pb2.CallRecorded(call_id="s", audio_bytes=wav_bytes([tone(2.0, 300, 8000)] * 2, 8000)))
    assert audio.channels[0].samples.size == pytest.approx(32000, abs=200)


def test_call_roles_override_defaults() -> None:
    data = wav_bytes([tone(1.0, 300), tone(1.0, 900)])
    call = events_pb2.CallRecorded(call_id="r", audio_bytes=data, channel_roles={0: "customer", 1: "agent"})
    assert [c.role for c in load(call).channels] == ["customer", "agent"]


def test_mono_is_one_speaker_channel() -> None:
    audio = load(events_pb2.CallRecorded(call_id="m", audio_bytes=wav_bytes([tone(1.0, 300)])))
    assert [(c.channel, c.role) for c in audio.channels] == [(0, "speaker")]


def test_identical_channels_are_transcribed_once_as_mono() -> None:
    data = wav_bytes([tone(1.0, 300), tone(1.0, 300)])
    audio = load(events_pb2.CallRecorded(call_id="dup", audio_bytes=data, channel_roles={0: "agent", 1: "customer"}))
    assert [(c.channel, c.role) for c in audio.channels] == [(0, "speaker")]
    assert audio.source_channels == 2


def test_channel_roles_rules() -> None:
    assert channel_roles({}, True, DEFAULT_ROLES, "speaker") == {0: "agent", 1: "customer"}
    assert channel_roles({1: "caller"}, True, DEFAULT_ROLES, "speaker") == {0: "channel0", 1: "caller"}
    assert channel_roles({}, False, DEFAULT_ROLES, "speaker") == {0: "speaker"}
    assert channel_roles({0: "customer"}, False, DEFAULT_ROLES, "speaker") == {0: "customer"}
    # Two roles on a mono recording: it is a mix of both.
    assert channel_roles({0: "agent", 1: "customer"}, False, DEFAULT_ROLES, "speaker") == {0: "speaker"}


def test_same_audio() -> None:
    a = tone(1.0, 300)
    assert same_audio(a, a + np.float32(0.001))
    assert not same_audio(a, np.zeros_like(a))
    assert not same_audio(a, tone(1.0, 310))
    assert same_audio(np.zeros(10, np.float32), np.zeros(10, np.float32))


# -- URIs through fsspec, telephony and compressed formats --------------------------------------------------------


def test_fsspec_uri_is_read_and_a_missing_object_is_audio_not_found() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/calls/tone.wav", wav_bytes([tone(1.0, 300)]))
    try:
        audio = load(events_pb2.CallRecorded(call_id="mem", audio_uri="memory://calls/tone.wav"))
        assert audio.seconds == pytest.approx(1.0, abs=0.01)
        with pytest.raises(AudioNotFoundError, match="cannot be read") as info:
            load(events_pb2.CallRecorded(call_id="mem-2", audio_uri="memory://calls/missing.wav"))
        assert "mem-2" in str(info.value)
        with pytest.raises(InvalidInputError, match="over the limit"):
            load(events_pb2.CallRecorded(call_id="mem-3", audio_uri="memory://calls/tone.wav"), max_bytes=1000)
    finally:
        fs.rm("/calls", recursive=True)


def test_a_protocol_without_its_package_names_what_to_install() -> None:
    with pytest.raises(AudioNotFoundError, match="not available here") as info:
        load(events_pb2.CallRecorded(call_id="s3", audio_uri="s3://bucket/call.wav"))
    assert "s3fs" in str(info.value)


def _g711(samples: np.ndarray, codec: str) -> bytes:
    """Headerless G.711 made by FFmpeg (not by the code under test)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=codec) as container:
        stream = container.add_stream(f"pcm_{codec}", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype("<i2")[None, :], format="s16", layout="mono")
        frame.rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("codec", ["mulaw", "alaw"])
def test_headerless_telephony_audio_by_field_and_by_suffix(codec: str, tmp_path: Path) -> None:
    signal = tone(2.0, 440, rate=8000)
    data = _g711(signal, codec)
    by_field = load(events_pb2.CallRecorded(call_id="g711", audio_bytes=data, raw_encoding=codec))
    path = tmp_path / f"call.{'ul' if codec == 'mulaw' else 'al'}"
    path.write_bytes(data)
    by_suffix = load(events_pb2.CallRecorded(call_id="g711", audio_uri=str(path)))
    for audio in (by_field, by_suffix):
        assert audio.seconds == pytest.approx(2.0, abs=0.01)
        decoded = audio.channels[0].samples
        # Same level as the original tone (G.711 keeps it within a few percent), resampled to 16 kHz.
        assert np.sqrt(np.mean(decoded**2)) == pytest.approx(np.sqrt(np.mean(signal**2)), rel=0.05)
    with pytest.raises(InvalidInputError, match="raw_encoding 'gsm'"):
        load(events_pb2.CallRecorded(call_id="g", audio_bytes=data, raw_encoding="gsm"))


def test_raw_as_wav_header_is_read_by_the_wave_module() -> None:
    pcm = (tone(0.5, 300) * 32767).astype("<i2").tobytes()
    with wave.open(io.BytesIO(raw_as_wav(pcm, "linear16", 16000, 1))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (16000, 1, 8000)


@pytest.mark.parametrize(("fmt", "codec"), [("mp3", "mp3"), ("ogg", "libopus"), ("flac", "flac")])
def test_compressed_formats_decode(fmt: str, codec: str) -> None:
    import av

    rate = 48000 if codec == "libopus" else 16000
    signal = tone(1.5, 440, rate=rate)
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((signal * 32767).astype("<i2")[None, :], format="s16", layout="mono")
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    audio = load(events_pb2.CallRecorded(call_id=fmt, audio_bytes=out.getvalue()))
    assert audio.seconds == pytest.approx(1.5, abs=0.1)
    assert np.sqrt(np.mean(audio.channels[0].samples ** 2)) > 0.1
