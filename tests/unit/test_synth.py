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
