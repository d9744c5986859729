"""The sample call in which a customer reads out a card number and a phone number (samples/calls/card_payment.yaml),
and a check that neither appears in a text, in any form: written digits with any separators, or spoken digits."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from callstream.transcriber.synth import SAMPLES_DIR, synthesize_call

SCRIPT = SAMPLES_DIR / "card_payment.yaml"
# What the customer reads out (the script spells them as digits).
CARD = "4539148803436467"
PHONE = "4155550123"
_SPOKEN = {
    "zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4", "for": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9",
}  # fmt: skip
# Inside one number: "4111-1111", "415.555", "(415) 555", "four, one"
_SEPARATORS = set("-.,()+/'")


def render(tmp_dir: Path) -> Path:
    """The card payment call as a stereo wav (agent on channel 0, customer on 1), with its .json sidecar."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_dir / "card_payment.wav"
    synthesize_call(SCRIPT, wav)
    return wav


def digit_runs(text: str) -> list[str]:
    """The digits of every number in `text`, written or spoken, separators dropped."""
    runs, current = [], ""
    for token in re.findall(r"[^\W\d_]+|\d|\S", text.lower()):
        if token.isdigit():
            current += token
        elif token in _SPOKEN:
            current += _SPOKEN[token]
        elif token not in _SEPARATORS:
            runs.append(current)
            current = ""
    runs.append(current)
    return [r for r in runs if r]


def leaks(text: str, secrets: tuple[str, ...] = (CARD, PHONE), length: int = 6) -> list[str]:
    """The numbers in `text` that contain `length` consecutive digits of a secret (none: nothing leaked)."""
    pieces = {s[i : i + length] for s in secrets for i in range(len(s) - length + 1)}
    return [run for run in digit_runs(text) if any(p in run for p in pieces)]
