"""Merging the words of a call's channels into speaker turns, by word time (no model)."""

from __future__ import annotations

import pytest

from callstream.transcriber.merge import TimedWord, join_words, merge_words, transcript_text

ROLES = {0: "agent", 1: "customer"}


def w(channel: int, start: float, text: str, end: float | None = None) -> TimedWord:
    return TimedWord(channel=channel, start=start, end=start + 0.3 if end is None else end, text=text)


def test_words_are_interleaved_by_word_time_and_split_at_speaker_changes() -> None:
    # Channel order in the input must not matter: all of channel 0 first, then all of channel 1.
    words = [
        w(0, 0.0, " Hello,"), w(0, 0.4, " how"), w(0, 0.7, " can"), w(0, 1.0, " I"), w(0, 1.2, " help?"),
        w(0, 5.0, " Sure."),
        w(1, 2.0, " My"), w(1, 2.3, " card"), w(1, 2.6, " is"), w(1, 2.9, " lost."),
    ]  # fmt: skip
    segments = merge_words(words, ROLES)
    assert [(s.role, s.channel, s.text) for s in segments] == [
        ("agent", 0, "Hello, how can I help?"),
        ("customer", 1, "My card is lost."),
        ("agent", 0, "Sure."),
    ]
    first = segments[0]
    assert first.start == 0.0 and first.end == 1.5
    assert [x.text for x in first.words] == ["Hello,", "how", "can", "I", "help?"]
    assert segments[1].start == 2.0 and segments[1].end == pytest.approx(3.2)


def test_segment_times_would_mislead_but_word_times_do_not() -> None:
    # A customer's short reply inside the agent's long turn lands between the agent's words.
    words = [w(0, 0.0, " Your"), w(0, 0.3, " order"), w(1, 0.9, " Mhm."), w(0, 1.5, " shipped"), w(0, 1.8, " today.")]
    segments = merge_words(words, ROLES)
    assert [(s.role, s.text) for s in segments] == [
        ("agent", "Your order"),
        ("customer", "Mhm."),
        ("agent", "shipped today."),
    ]


def test_ties_keep_channel_order_and_word_order() -> None:
    words = [w(1, 1.0, " b"), w(0, 1.0, " a"), w(0, 1.0, " a2")]
    segments = merge_words(words, ROLES)
    assert [(s.channel, s.text) for s in segments] == [(0, "a a2"), (1, "b")]


def test_empty_words_and_unknown_channels() -> None:
    assert merge_words([], ROLES) == []
    segments = merge_words([w(0, 0.0, " "), w(3, 0.5, " hi")], ROLES)
    assert [(s.role, s.channel, s.text) for s in segments] == [("channel3", 3, "hi")]


def test_end_is_the_latest_word_end() -> None:
    segments = merge_words([w(0, 0.0, " long", end=2.0), w(0, 0.5, " short", end=0.8)], ROLES)
    assert segments[0].end == 2.0


def test_probability_is_kept() -> None:
    (segment,) = merge_words([TimedWord(0, 0.0, 0.5, " yes", 0.25)], ROLES)
    assert abs(segment.words[0].probability - 0.25) < 1e-6


def test_transcript_text_is_role_lines() -> None:
    segments = merge_words([w(0, 0.0, " Hi."), w(1, 1.0, " Hello."), w(0, 2.0, " Bye.")], ROLES)
    assert transcript_text(segments) == "agent: Hi.\ncustomer: Hello.\nagent: Bye."
    assert transcript_text([]) == ""


def test_join_words() -> None:
    assert join_words([" Hello,", " world", "!"]) == "Hello, world!"
    assert join_words(["你好", "世界"]) == "你好世界"
