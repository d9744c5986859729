"""Rendering the sample call scripts with espeak-ng into stereo wavs (no model)."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from callstream.transcriber import synth
from callstream.transcriber.synth import (
    SynthesisError,
    load_references,
    load_script,
    sample_scripts,
    synthesize_call,
    synthesize_samples,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

SHORT = """
id: short
voices: {agent: en-us+m3, customer: en-gb+f2}
pause_s: 0.3
turns:
  - agent: Hello, how can I help?
  - customer: My card is lost.
  - agent: I will block it.
"""


def test_the_sample_scripts_are_valid_two_speaker_calls() -> None:
    scripts = sample_scripts()
    assert len(scripts) >= 3
    for path in scripts:
        script = load_script(path)
        assert {t.speaker for t in script.turns} == {"agent", "customer"}, path
        assert script.channels == {"agent": 0, "customer": 1}
        assert script.voices["agent"] != script.voices["customer"]
        words = sum(len(t.text.split()) for t in script.turns)
        assert 50 <= words <= 130, f"{path.name}: {words} words is not a 20-40 s call"


def test_bad_scripts_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("turns: []\n")
    with pytest.raises(SynthesisError, match="non-empty 'turns'"):
        load_script(bad)
    bad.write_text("turns:\n  - supervisor: hi\n")
    with pytest.raises(SynthesisError, match="speaker 'supervisor' has no channel"):
        load_script(bad)
    with pytest.raises(SynthesisError, match="cannot read"):
        load_script(tmp_path / "missing.yaml")


def test_missing_espeak_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "short.yaml"
    script.write_text(SHORT)
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(SynthesisError, match="espeak-ng is not installed"):
        synthesize_call(script, tmp_path / "short.wav")


@needs_espeak
def test_synthesize_call_writes_stereo_with_one_speaker_per_channel(tmp_path: Path) -> None:
    script = tmp_path / "short.yaml"
    script.write_text(SHORT)
    out = tmp_path / "out" / "short.wav"
    references = synthesize_call(script, out, sample_rate=16000)
    assert references == {0: "Hello, how can I help? I will block it.", 1: "My card is lost."}
    assert load_references(out) == references

    with wave.open(str(out), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 16000)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seconds"] == pytest.approx(len(pcm) / 16000, abs=0.01)
    turns = meta["turns"]
    assert [t["channel"] for t in turns] == [0, 1, 0]
    for turn in turns:
        start, end = int(turn["start"] * 16000), int(turn["end"] * 16000)
        speaking, other = pcm[start:end, turn["channel"]], pcm[start:end, 1 - turn["channel"]]
        assert np.abs(speaking).max() > 1000, turn
        assert np.abs(other).max() == 0, f"the other channel must be silent while {turn['speaker']} speaks"
    # Pauses between turns: each turn starts after the previous one ended.
    assert all(b["start"] - a["end"] >= 0.29 for a, b in zip(turns, turns[1:], strict=False))


@needs_espeak
def test_synthesize_samples_renders_once(tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "short.yaml").write_text(SHORT)
    (wav,) = synthesize_samples(tmp_path / "out", scripts_dir=scripts)
    assert wav == tmp_path / "out" / "short.wav" and wav.is_file()
    first = wav.stat().st_mtime_ns
    assert synthesize_samples(tmp_path / "out", scripts_dir=scripts) == [wav]
    assert wav.stat().st_mtime_ns == first, "an unchanged script must not be rendered again"
    (scripts / "short.yaml").write_text(SHORT.replace("lost", "stolen"))
    synthesize_samples(tmp_path / "out", scripts_dir=scripts)
    assert load_references(wav)[1] == "My card is stolen."


def fake_speech(monkeypatch: pytest.MonkeyPatch, lengths: dict[str, float]) -> None:
    """Replace espeak-ng with clips of known speech length: 0.05 s of silence, speech, 0.2 s of silence."""

    def speak(espeak: str, text: str, voice: str, speed_wpm: int, sample_rate: int, tmp: Path) -> np.ndarray:
        lead, tail = int(0.05 * sample_rate), int(0.2 * sample_rate)
        speech = np.full(int(lengths[text] * sample_rate), 0.5, dtype=np.float32)
        return np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(tail, np.float32)])

    monkeypatch.setattr(synth, "espeak_binary", lambda: "espeak-ng")
    monkeypatch.setattr(synth, "_speak", speak)


INTERRUPTED = """
lead_in_s: 0.5
pause_s: 0.4
turns:
  - agent: one
  - customer: two
  - agent: three
  - customer: four
    overlap_s: 0.8
  - agent: five
"""


def test_turns_follow_each_other_or_interrupt_with_overlap_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_speech(monkeypatch, {"one": 1.0, "two": 2.0, "three": 3.0, "four": 1.5, "five": 0.5})
    script = tmp_path / "call.yaml"
    script.write_text(INTERRUPTED)
    assert [t.overlap_s for t in load_script(script).turns] == [0, 0, 0, 0.8, 0]
    out = tmp_path / "call.wav"
    synthesize_call(script, out)
    meta = json.loads(out.with_suffix(".json").read_text())
    turns = meta["turns"]
    clip = {"one": 1.25, "two": 2.25, "three": 3.25, "four": 1.75, "five": 0.75}  # with 0.05 s lead, 0.2 s tail
    # without overlap_s, as before: each clip starts a pause after the previous one ends
    assert [t["start"] for t in turns[:3]] == pytest.approx([0.5, 0.5 + 1.25 + 0.4, 0.5 + 1.25 + 0.4 + 2.25 + 0.4])
    for turn in turns:
        assert turn["end"] - turn["start"] == pytest.approx(clip[turn["text"]], abs=0.001)
        assert turn["speech_start"] == pytest.approx(turn["start"] + 0.05, abs=0.001)
        assert turn["speech_end"] == pytest.approx(turn["end"] - 0.2, abs=0.001)
    # the customer's speech starts 0.8 s before the agent's ends
    agent, customer = turns[2], turns[3]
    assert customer["overlap_s"] == 0.8 and "overlap_s" not in agent
    assert agent["speech_end"] - customer["speech_start"] == pytest.approx(0.8, abs=0.001)
    # the next turn waits for both, then the pause; the call ends lead_in_s after the last clip
    assert turns[4]["start"] == pytest.approx(max(agent["end"], customer["end"]) + 0.4, abs=0.001)
    assert meta["seconds"] == pytest.approx(turns[4]["end"] + 0.5, abs=0.001)
    with wave.open(str(out), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    both = pcm[int((customer["speech_start"] + 0.01) * 16000) : int((agent["speech_end"] - 0.01) * 16000)]
    assert both.size and (np.abs(both) > 1000).all(), "both channels carry speech during the overlap"


def test_scripts_without_overlap_render_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The placement of render version 2 (no overlap_s anywhere) is unchanged: same audio, same start/end."""
    fake_speech(monkeypatch, {"Hello, how can I help?": 1.1, "My card is lost.": 0.9, "I will block it.": 0.7})
    script = tmp_path / "short.yaml"
    script.write_text(SHORT)
    synthesize_call(script, tmp_path / "short.wav")
    turns = json.loads((tmp_path / "short.json").read_text())["turns"]
    cursor, expected = int(0.3 * 16000), []
    for length in (1.1, 0.9, 0.7):
        size = int(0.05 * 16000) + int(length * 16000) + int(0.2 * 16000)
        expected.append((round(cursor / 16000, 3), round((cursor + size) / 16000, 3)))
        cursor += size + int(0.3 * 16000)
    assert [(t["start"], t["end"]) for t in turns] == expected
    with wave.open(str(tmp_path / "short.wav"), "rb") as wav:
        # the last pause is not there, lead_in_s (0.3 s) of silence closes the call instead
        assert wav.getnframes() == cursor - int(0.3 * 16000) + int(0.3 * 16000)


@pytest.mark.parametrize(
    ("turns", "error"),
    [
        ("  - customer: hi\n    overlap_s: 0.5\n", "no previous turn on another channel"),
        ("  - agent: hi\n  - agent: again\n    overlap_s: 0.5\n", "no previous turn on another channel"),
        ("  - agent: hi\n  - customer: yes\n    overlap_s: -1\n", "overlap_s must be a number of seconds >= 0"),
        ("  - agent: hi\n  - customer: yes\n    overlap_s: soon\n", "overlap_s must be a number of seconds >= 0"),
        ("  - agent: hi\n    customer: yes\n", "must be one 'speaker: text' pair"),
        ("  - overlap_s: 0.5\n", "must be one 'speaker: text' pair"),
    ],
)
def test_bad_overlaps_are_refused(tmp_path: Path, turns: str, error: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("turns:\n" + turns)
    with pytest.raises(SynthesisError, match=error):
        load_script(bad)


def test_a_sample_call_has_an_interruption() -> None:
    overlapping = [t for path in sample_scripts() for t in load_script(path).turns if t.overlap_s > 0]
    assert overlapping, "no sample call exercises interruptions (overlap_s)"


@needs_espeak
def test_an_interruption_rendered_with_espeak(tmp_path: Path) -> None:
    script = tmp_path / "short.yaml"
    script.write_text(SHORT + "  - customer: Wait, please do not block it yet.\n    overlap_s: 0.6\n")
    out = tmp_path / "short.wav"
    synthesize_call(script, out)
    turns = json.loads(out.with_suffix(".json").read_text())["turns"]
    agent, customer = turns[2], turns[3]
    assert agent["speech_end"] - customer["speech_start"] == pytest.approx(0.6, abs=0.002)
    for turn in turns:
        assert turn["start"] <= turn["speech_start"] < turn["speech_end"] <= turn["end"]
