"""Render the sample support-call scripts (samples/calls/*.yaml) to stereo wav files with espeak-ng.

Each line of a script is spoken by espeak-ng with its speaker's voice and placed on that speaker's channel
(agent on channel 0, customer on channel 1 by default); the other channel is silent meanwhile, and turns are
separated by a short pause. The result looks like a dual-channel contact-center recording with known reference
text per channel, which the transcriber tests and benchmarks use to measure WER.

A script is YAML:

    id: card-lost
    channels: {agent: 0, customer: 1}        # optional, this is the default
    voices: {agent: en-us+m3, customer: en-gb+f2}   # optional, this is the default
    pause_s: 0.4                              # optional silence between turns
    speed_wpm: 165                            # optional espeak-ng speed
    turns:
      - agent: Thank you for calling ...
      - customer: Hi ...
      - agent: Could you read me the number on the back of ...
      - customer: Sorry, I only have the front.
        overlap_s: 0.8                        # optional: an interruption (see below)

A turn starts `pause_s` after the previous turns have ended, unless it has `overlap_s`: then its speech starts
that many seconds before the previous turn's speech ends (the speaker interrupts; both channels carry speech for
overlap_s seconds), and the turn after it waits for both to end. An overlapping turn must be on another channel
than the turn it interrupts.

Next to each rendered wav, a .json sidecar records the script's hash, the reference text per channel and each
turn's time span: `start`/`end` of the placed audio, and `speech_start`/`speech_end` of its speech (espeak-ng's
leading and trailing silence left out), the ground truth for talk time and interruptions (analytics.py).
`synthesize_samples` skips scripts whose wav is already rendered from the same script.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples" / "calls"
DEFAULT_CHANNELS: dict[str, int] = {"agent": 0, "customer": 1}
DEFAULT_VOICES: dict[str, str] = {"agent": "en-us+m3", "customer": "en-gb+f2"}
# Bump when the rendering changes, so that cached renders are redone. 3: overlapping turns, speech spans.
_RENDER_VERSION = "3"
# A sample louder than this (about -40 dBFS) is speech when the sidecar's speech spans are measured.
_SPEECH_LEVEL = 0.01


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed, or a call script is invalid."""


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    # > 0: this turn's speech starts this many seconds before the previous turn's speech ends (an interruption).
    overlap_s: float = 0.0


@dataclass(frozen=True)
class CallScript:
    id: str
    turns: list[Turn]
    channels: dict[str, int]
    voices: dict[str, str]
    pause_s: float = 0.4
    lead_in_s: float = 0.3
    speed_wpm: int = 165

    def references(self) -> dict[int, str]:
        """The text spoken on each channel, turns joined by spaces."""
        by_channel: dict[int, list[str]] = {}
        for turn in self.turns:
            by_channel.setdefault(self.channels[turn.speaker], []).append(turn.text)
        return {ch: " ".join(texts) for ch, texts in sorted(by_channel.items())}


def load_script(path: Path) -> CallScript:
    """Parse and check a call script (see the module docstring for the format)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SynthesisError(f"cannot read call script {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("turns"), list) or not data["turns"]:
        raise SynthesisError(f"call script {path}: expected a mapping with a non-empty 'turns' list")
    channels = {str(k): int(v) for k, v in (data.get("channels") or DEFAULT_CHANNELS).items()}
    voices = {**DEFAULT_VOICES, **{str(k): str(v) for k, v in (data.get("voices") or {}).items()}}
    turns: list[Turn] = []
    for i, item in enumerate(data["turns"]):
        pairs = {k: v for k, v in item.items() if k != "overlap_s"} if isinstance(item, dict) else {}
        if len(pairs) != 1:
            raise SynthesisError(
                f"call script {path}: turn {i} must be one 'speaker: text' pair (and optionally overlap_s), "
                f"got {item!r}"
            )
        ((speaker, text),) = pairs.items()
        speaker = str(speaker)
        if speaker not in channels:
            raise SynthesisError(f"call script {path}: turn {i} speaker {speaker!r} has no channel in {channels}")
        if speaker not in voices:
            raise SynthesisError(f"call script {path}: turn {i} speaker {speaker!r} has no voice")
        if not str(text).strip():
            raise SynthesisError(f"call script {path}: turn {i} is empty")
        overlap = _overlap(path, i, item.get("overlap_s", 0.0))
        if overlap and (not turns or channels[turns[-1].speaker] == channels[speaker]):
            raise SynthesisError(
                f"call script {path}: turn {i} overlaps, but there is no previous turn on another channel to interrupt"
            )
        turns.append(Turn(speaker, " ".join(str(text).split()), overlap))
    return CallScript(
        id=str(data.get("id") or Path(path).stem),
        turns=turns,
        channels=channels,
        voices=voices,
        pause_s=float(data.get("pause_s", 0.4)),
        lead_in_s=float(data.get("lead_in_s", 0.3)),
        speed_wpm=int(data.get("speed_wpm", 165)),
    )


def _overlap(path: Path, index: int, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0.0:  # also refuses NaN
        raise SynthesisError(
            f"call script {path}: turn {index} overlap_s must be a number of seconds >= 0, not {value!r}"
        )
    return seconds


def speech_span(samples: np.ndarray, level: float = _SPEECH_LEVEL) -> tuple[int, int]:
    """[first, last + 1) sample above `level`: a clip without espeak-ng's leading and trailing silence."""
    loud = np.flatnonzero(np.abs(samples) > level)
    if loud.size == 0:
        return 0, int(samples.size)
    return int(loud[0]), int(loud[-1]) + 1


def espeak_binary() -> str:
    """Path of espeak-ng, or a SynthesisError that says how to install it."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise SynthesisError(
            "espeak-ng is not installed (not on PATH); it is needed to synthesize sample calls: "
            "apt-get install espeak-ng (Debian/Ubuntu) or brew install espeak-ng (macOS)"
        )
    return found


def _read_wav_mono(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SynthesisError(f"espeak-ng wrote {wav.getsampwidth() * 8}-bit audio, expected 16-bit")
        rate = wav.getframerate()
        channels = wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling through the FFT (no aliasing; fine for clips of a few seconds)."""
    if rate_in == rate_out or samples.size == 0:
        return samples
    n_out = max(1, round(samples.size * rate_out / rate_in))
    spectrum = np.fft.rfft(samples)
    keep = min(spectrum.size, n_out // 2 + 1)
    resized = np.zeros(n_out // 2 + 1, dtype=spectrum.dtype)
    resized[:keep] = spectrum[:keep]
    return (np.fft.irfft(resized, n_out) * (n_out / samples.size)).astype(np.float32)


def _speak(espeak: str, text: str, voice: str, speed_wpm: int, sample_rate: int, tmp: Path) -> np.ndarray:
    out = tmp / "line.wav"
    cmd = [espeak, "-v", voice, "-s", str(speed_wpm), "-w", str(out), "--", text]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SynthesisError(f"espeak-ng failed on {text!r}: {exc}") from exc
    if proc.returncode != 0 or not out.is_file():
        raise SynthesisError(f"espeak-ng (voice {voice}) failed on {text!r}: {proc.stderr.strip() or proc.returncode}")
    samples, rate = _read_wav_mono(out)
    out.unlink()
    return _resample(samples, rate, sample_rate)


def script_hash(script_path: Path, sample_rate: int = 16000) -> str:
    """Identifies one rendering: the script's bytes, the sample rate and the renderer version."""
    digest = hashlib.sha256(Path(script_path).read_bytes())
    digest.update(f"|{sample_rate}|{_RENDER_VERSION}".encode())
    return digest.hexdigest()


def sidecar_path(out_wav: Path) -> Path:
    return Path(out_wav).with_suffix(".json")


def synthesize_call(script_path: Path, out_wav: Path, sample_rate: int = 16000) -> dict[int, str]:
    """Render one call script to a 16-bit stereo wav; returns the reference text per channel.

    Also writes `out_wav` with a .json suffix: {"script_sha256", "references", "turns": [{speaker, channel,
    start, end, speech_start, speech_end, text, overlap_s (only when set)}], "seconds"}.
    """
    script = load_script(Path(script_path))
    espeak = espeak_binary()
    n_channels = max(2, max(script.channels.values()) + 1)
    pieces: list[tuple[int, int, np.ndarray]] = []  # (channel, start sample, samples)
    timeline: list[dict[str, Any]] = []
    cursor = int(script.lead_in_s * sample_rate)  # where the next turn starts unless it interrupts
    pause = int(script.pause_s * sample_rate)
    previous: tuple[int, int] | None = None  # the previous turn's start and speech end, in samples
    with tempfile.TemporaryDirectory(prefix="callstream-synth-") as tmp:
        for turn in script.turns:
            samples = _speak(espeak, turn.text, script.voices[turn.speaker], script.speed_wpm, sample_rate, Path(tmp))
            channel = script.channels[turn.speaker]
            first, last = speech_span(samples)
            start = cursor
            if turn.overlap_s > 0 and previous is not None:
                # Speech starts overlap_s before the previous speech ends, but not before the previous turn.
                start = max(previous[0], previous[1] - int(turn.overlap_s * sample_rate) - first)
            pieces.append((channel, start, samples))
            entry: dict[str, Any] = {
                "speaker": turn.speaker,
                "channel": channel,
                "start": round(start / sample_rate, 3),
                "end": round((start + samples.size) / sample_rate, 3),
                "speech_start": round((start + first) / sample_rate, 3),
                "speech_end": round((start + last) / sample_rate, 3),
                "text": turn.text,
            }
            if turn.overlap_s > 0:
                entry["overlap_s"] = turn.overlap_s
            timeline.append(entry)
            previous = (start, start + last)
            cursor = max(cursor, start + samples.size + pause)
    total = cursor - pause + int(script.lead_in_s * sample_rate)
    audio = np.zeros((total, n_channels), dtype=np.float32)
    for channel, start, samples in pieces:
        audio[start : start + samples.size, channel] += samples
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")

    out_wav = Path(out_wav)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    partial = out_wav.with_name(out_wav.name + ".partial")
    with wave.open(str(partial), "wb") as wav:
        wav.setnchannels(n_channels)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    partial.replace(out_wav)
    references = script.references()
    meta = {
        "script": Path(script_path).name,
        "script_sha256": script_hash(Path(script_path), sample_rate),
        "sample_rate": sample_rate,
        "seconds": round(total / sample_rate, 3),
        "channels": {speaker: ch for speaker, ch in script.channels.items()},
        "references": {str(ch): text for ch, text in references.items()},
        "turns": timeline,
    }
    sidecar_path(out_wav).write_text(json.dumps(meta, indent=2) + "\n")
    return references


def load_references(wav_path: Path) -> dict[int, str]:
    """The reference text per channel recorded next to a wav rendered by `synthesize_call`."""
    meta = json.loads(sidecar_path(Path(wav_path)).read_text())
    refs: Mapping[str, str] = meta["references"]
    return {int(ch): text for ch, text in refs.items()}


def sample_scripts(scripts_dir: Path = SAMPLES_DIR) -> list[Path]:
    return sorted(Path(scripts_dir).glob("*.yaml"))


def synthesize_samples(out_dir: Path, scripts_dir: Path = SAMPLES_DIR, sample_rate: int = 16000) -> list[Path]:
    """Render every sample script to `out_dir/<script stem>.wav`; returns the wav paths.

    A script whose wav and sidecar already exist with the same script hash is not rendered again.
    """
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for script in sample_scripts(scripts_dir):
        wav_path = out_dir / f"{script.stem}.wav"
        if not _is_current(wav_path, script, sample_rate):
            synthesize_call(script, wav_path, sample_rate)
        paths.append(wav_path)
    return paths


def _is_current(wav_path: Path, script: Path, sample_rate: int) -> bool:
    try:
        meta = json.loads(sidecar_path(wav_path).read_text())
    except (OSError, ValueError):
        return False
    return wav_path.is_file() and meta.get("script_sha256") == script_hash(script, sample_rate)
