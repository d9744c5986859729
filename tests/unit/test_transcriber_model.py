"""The real faster-whisper engine (tiny.en, int8, CPU) on real and synthesized stereo calls.

Shared audio is read from ../shared/data/audio next to the repository (or CALLSTREAM_SHARED_DATA); the tests that
need it skip with the path they looked at when it is absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from callstream.core.errors import AudioDecodeError, AudioNotFoundError
from callstream.transcriber.engine import FasterWhisperEngine
from callstream.transcriber.evaluation import channel_wer, word_error_rate
from callstream.transcriber.settings import TranscriberSettings
from callstream.transcriber.synth import SAMPLES_DIR, load_script, synthesize_call
from callstream.v1 import events_pb2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_AUDIO = Path(os.environ.get("CALLSTREAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "audio"


def shared_audio(name: str) -> Path:
    path = SHARED_AUDIO / name
    if not path.is_file():
        pytest.skip(f"shared test audio not found: {path} (expected ../shared/data/audio next to the repository)")
    return path


@pytest.fixture(scope="module")
def engine() -> Iterator[FasterWhisperEngine]:
    yield FasterWhisperEngine(TranscriberSettings())


def silent_stereo_wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.zeros(int(seconds * 16000) * 2, dtype="<i2").tobytes())
    return buf.getvalue()


def check_well_formed(transcript: events_pb2.Transcript) -> None:
    starts = [s.start for s in transcript.segments]
    assert starts == sorted(starts), "segments are not in time order"
    for a, b in zip(transcript.segments, transcript.segments[1:], strict=False):
        assert a.channel != b.channel, "consecutive segments of one channel should be one segment"
    for segment in transcript.segments:
        assert segment.words and all(w.end >= w.start for w in segment.words)
        assert segment.start == segment.words[0].start
    assert transcript.text == "\n".join(f"{s.role}: {s.text}" for s in transcript.segments)


def test_stereo_diarization_per_channel_wer(engine: FasterWhisperEngine) -> None:
    audio = shared_audio("stereo_diarization.wav")
    references = json.loads(shared_audio("references.json").read_text())["stereo_diarization.wav"]
    by_channel = {int(ch): text for ch, text in references["reference_by_channel"].items()}
    call = events_pb2.CallRecorded(call_id="stereo-1", tenant="t1", audio_uri=audio.resolve().as_uri())
    call.started_at.FromSeconds(1_700_000_000)
    transcript = engine.transcribe(call)

    wers = channel_wer(transcript, by_channel)
    assert all(w <= 0.05 for w in wers.values()), (wers, transcript.text)
    assert {(s.channel, s.role) for s in transcript.segments} == {(0, "agent"), (1, "customer")}
    assert (transcript.call_id, transcript.tenant, transcript.started_at.seconds) == ("stereo-1", "t1", 1_700_000_000)
    assert transcript.language == "en" and transcript.language_probability == pytest.approx(1.0)
    assert transcript.model_id == engine.model_id and transcript.model_id.endswith(":int8")
    assert transcript.audio_seconds == pytest.approx(5.0, abs=0.05)
    assert transcript.processing_seconds > 0
    check_well_formed(transcript)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_synthesized_support_call(engine: FasterWhisperEngine, tmp_path: Path) -> None:
    script_path = SAMPLES_DIR / "card_lost.yaml"
    wav = tmp_path / "card_lost.wav"
    references = synthesize_call(script_path, wav)
    call = events_pb2.CallRecorded(call_id="synth-1", audio_uri=str(wav), channel_roles={0: "agent", 1: "customer"})
    transcript = engine.transcribe(call)

    wers = channel_wer(transcript, references)
    assert all(w <= 0.20 for w in wers.values()), (wers, transcript.text)
    # Merged by word time, the turns come out in the script's order.
    script = load_script(script_path)
    assert [s.role for s in transcript.segments] == [t.speaker for t in script.turns], transcript.text
    assert 20 <= transcript.audio_seconds <= 40
    check_well_formed(transcript)


def test_bad_calls_fail_alone_with_their_error_types(engine: FasterWhisperEngine) -> None:
    jfk = shared_audio("jfk.flac")
    reference = json.loads(shared_audio("references.json").read_text())["jfk.flac"]["reference"]
    calls = [
        events_pb2.CallRecorded(call_id="corrupt-1", audio_bytes=b"RIFF\x00\x00\x00\x00WAVEfmt not audio" * 20),
        events_pb2.CallRecorded(call_id="missing-1", audio_uri="file:///nonexistent/recordings/call-404.wav"),
        events_pb2.CallRecorded(call_id="good-1", audio_bytes=jfk.read_bytes()),
        events_pb2.CallRecorded(call_id="silent-1", audio_bytes=silent_stereo_wav(2.0)),
    ]
    corrupt, missing, good, silent = engine.transcribe_batch(calls)

    assert isinstance(corrupt, AudioDecodeError) and "corrupt-1" in str(corrupt)
    assert isinstance(missing, AudioNotFoundError)
    assert "missing-1" in str(missing) and "call-404.wav" in str(missing)
    # jfk.flac holds the same mono speech on both channels: one "speaker", not the speech twice.
    assert isinstance(good, events_pb2.Transcript), good
    assert {s.role for s in good.segments} == {"speaker"}
    assert word_error_rate(reference, " ".join(s.text for s in good.segments)) <= 0.10, good.text
    # Silence is an empty transcript, not an error.
    assert isinstance(silent, events_pb2.Transcript), silent
    assert (len(silent.segments), silent.text) == (0, "")
    assert silent.audio_seconds == pytest.approx(2.0, abs=0.01)


def mono_wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes())
    return buf.getvalue()


def test_silence_and_white_noise_give_empty_transcripts(engine: FasterWhisperEngine) -> None:
    """No invented text: 5 s of silence and 5 s of loud white noise, alone and packed with speech."""
    rng = np.random.default_rng(7)
    silence = events_pb2.CallRecorded(call_id="silence", audio_bytes=mono_wav(np.zeros(5 * 16000, np.float32)))
    noise = events_pb2.CallRecorded(
        call_id="noise", audio_bytes=mono_wav(rng.normal(0.0, 0.2, 5 * 16000).astype(np.float32))
    )
    jfk = events_pb2.CallRecorded(call_id="jfk", audio_bytes=shared_audio("jfk.flac").read_bytes())
    for batch in ([silence], [noise], [silence, noise, jfk]):
        results = engine.transcribe_batch(batch)
        for call, result in zip(batch, results, strict=True):
            assert isinstance(result, events_pb2.Transcript), result
            if call.call_id != "jfk":
                assert (len(result.segments), result.text) == (0, ""), (call.call_id, result.text)
                assert result.audio_seconds == pytest.approx(5.0, abs=0.01)
            else:
                assert "country" in result.text


def test_short_calls_packed_into_shared_windows_keep_their_own_words(engine: FasterWhisperEngine) -> None:
    """Five real clips in one batch share one 30 s window; each call gets back its own words, on its own
    timeline, as accurately as when it is transcribed alone."""
    references = json.loads(shared_audio("references.json").read_text())
    names = ["jfk.flac", "ljspeech-LJ002-0020.wav", "ljspeech-LJ002-0035.wav", "librispeech-2412-153948-0000.flac"]
    calls = [events_pb2.CallRecorded(call_id=n, audio_bytes=shared_audio(n).read_bytes()) for n in names]
    stereo = events_pb2.CallRecorded(call_id="stereo", audio_bytes=shared_audio("stereo_diarization.wav").read_bytes())
    packed = engine.transcribe_batch([*calls, stereo])
    alone = [engine.transcribe(call) for call in [*calls, stereo]]
    for name, together, single in zip(names, packed, alone, strict=False):
        assert isinstance(together, events_pb2.Transcript), together
        reference = references[name]["reference"]
        wer_together = word_error_rate(reference, " ".join(s.text for s in together.segments))
        wer_alone = word_error_rate(reference, " ".join(s.text for s in single.segments))
        assert wer_together <= wer_alone + 0.05, (name, together.text, single.text)
        words = [w for s in together.segments for w in s.words]
        assert words and all(0 <= w.start <= w.end <= together.audio_seconds + 0.01 for w in words), name
        # Word times agree with the clip transcribed alone (same clip, another place in the window).
        first_alone = single.segments[0].words[0].start
        assert abs(words[0].start - first_alone) < 0.5, (name, words[0].start, first_alone)
    by_channel = {int(ch): t for ch, t in references["stereo_diarization.wav"]["reference_by_channel"].items()}
    assert isinstance(packed[-1], events_pb2.Transcript)
    assert all(w <= 0.05 for w in channel_wer(packed[-1], by_channel).values()), packed[-1].text
