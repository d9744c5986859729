"""Word error rate of transcripts against reference texts, after a light normalisation.

Normalisation: lower case; punctuation dropped (apostrophes kept); numbers written as words, the way the
reference scripts spell them ("$4" -> "four dollars", "3rd" -> "third", "457-218" and "457218" -> "four five
seven two one eight", "60" -> "sixty"). It only makes written forms comparable; it does not forgive recognition
errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jiwer

from callstream.v1 import events_pb2

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
    "twelve": "twelfth",
}  # fmt: skip


def number_words(n: int) -> str:
    """Cardinal number in words (English), e.g. 457 -> 'four hundred fifty seven'."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for size, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return f"{number_words(n // size)} {name}" + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    words = number_words(n).split()
    last = words[-1]
    if last in _ORDINAL:
        words[-1] = _ORDINAL[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _digits(text: str) -> str:
    return " ".join(_ONES[int(d)] for d in text if d.isdigit())


def _dollars(match: re.Match[str]) -> str:
    cents = match.group(2)
    return f"{match.group(1)} dollars" + (f" {cents} cents" if cents else "")


def normalize_text(text: str) -> str:
    t = text.lower()
    # Digit groups joined by dashes or spaces are read digit by digit (account and phone numbers).
    t = re.sub(r"\b\d+(?:[- ]\d+)+\b", lambda m: _digits(m.group(0)), t)
    # So are runs of five or more digits (an account or phone number written without separators).
    t = re.sub(r"\b\d{5,}\b", lambda m: _digits(m.group(0)), t)
    t = re.sub(r"\$(\d[\d,]*)(?:\.(\d\d))?", _dollars, t)
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal_words(int(m.group(1))), t)
    t = re.sub(r"(\d)%", r"\1 percent", t)
    t = re.sub(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\b", lambda m: number_words(int(m.group(0).replace(",", ""))), t)
    t = t.replace("-", " ")
    t = re.sub(r"[^\w\s']", " ", t)
    return " ".join(t.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of `hypothesis` against `reference`, both normalised; 0.0 when both are empty."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))


def channel_texts(transcript: events_pb2.Transcript) -> dict[int, str]:
    """The transcript's text per channel, segments in time order."""
    texts: dict[int, list[str]] = {}
    for segment in transcript.segments:
        texts.setdefault(segment.channel, []).append(segment.text)
    return {ch: " ".join(parts) for ch, parts in sorted(texts.items())}


def channel_wer(transcript: events_pb2.Transcript, references: Mapping[int, str]) -> dict[int, float]:
    """WER per channel against the reference text of each channel."""
    hyps = channel_texts(transcript)
    return {ch: word_error_rate(ref, hyps.get(ch, "")) for ch, ref in references.items()}
