"""WER normalisation used to score transcripts against reference scripts."""

from __future__ import annotations

import pytest

from callstream.transcriber.evaluation import channel_texts, channel_wer, normalize_text, number_words, word_error_rate
from callstream.v1 import events_pb2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("You're right.", "you're right"),
        ("Yes, it is 457-218.", "yes it is four five seven two one eight"),
        ("for $4 and $60.50", "for four dollars and sixty dollars fifty cents"),
        ("on the 3rd of March, the 21st", "on the third of march the twenty first"),
        ("1,250 items, 100%", "one thousand two hundred fifty items one hundred percent"),
        ("log-in", "log in"),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_number_words() -> None:
    assert number_words(0) == "zero"
    assert number_words(40) == "forty"
    assert number_words(1813) == "one thousand eight hundred thirteen"
    assert number_words(2_000_005) == "two million five"


def test_word_error_rate() -> None:
    assert word_error_rate("Ask not what your country can do.", "ask not what your country can do") == 0.0
    assert word_error_rate("one two three four", "one two four") == pytest.approx(0.25)
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "noise") == 1.0


def test_channel_texts_and_wer() -> None:
    transcript = events_pb2.Transcript(
        segments=[
            events_pb2.Segment(channel=0, text="Hello there."),
            events_pb2.Segment(channel=1, text="Hi."),
            events_pb2.Segment(channel=0, text="Bye."),
        ]
    )
    assert channel_texts(transcript) == {0: "Hello there. Bye.", 1: "Hi."}
    assert channel_wer(transcript, {0: "hello there bye", 1: "hi", 2: "silent"}) == {0: 0.0, 1: 0.0, 2: 1.0}
