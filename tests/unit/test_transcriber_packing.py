"""Packing the speech of many calls into shared 30 s windows, and mapping words back (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from callstream.transcriber.audio import SAMPLE_RATE, ChannelAudio
from callstream.transcriber.engine import (
    _Channel,
    _Job,
    _passed_over,
    _Piece,
    _place_word,
    _Window,
    model_batches,
    pack_windows,
)
from callstream.transcriber.merge import TimedWord
from callstream.v1 import events_pb2


def channel(number: int, clip_seconds: list[float]) -> _Channel:
    """A channel whose VAD clips last clip_seconds each, 1 s apart on the call's timeline."""
    clips, speech, cursor = [], [], 0
    for seconds in clip_seconds:
        n = int(seconds * SAMPLE_RATE)
        clips.append({"start": cursor, "end": cursor + n})
        speech.append(np.full(n, 0.1, dtype=np.float32))
        cursor += n + SAMPLE_RATE
    return _Channel(ChannelAudio(number, f"role{number}", np.zeros(0, np.float32)), clips, speech)


def pieces_of(job: _Job) -> list[_Piece]:
    return [_Piece(job, ch, i) for ch in job.channels for i in range(len(ch.clips))]


def make_job(call_id: str, *channels: list[float]) -> _Job:
    job = _Job(events_pb2.CallRecorded(call_id=call_id))
    job.channels = [channel(n, clips) for n, clips in enumerate(channels)]
    return job


def test_sixteen_short_calls_share_few_windows() -> None:
    jobs = [make_job(f"c{i}", [2.0, 3.0]) for i in range(16)]  # 5 s of speech each
    pieces = [p for job in jobs for p in pieces_of(job)]
    windows = pack_windows(pieces, max_seconds=30, gap_seconds=0.5, across_channels=True)
    # 16 x 5 s of speech plus 0.5 s gaps between calls is 87.5 s: 4 windows in order (a clip never straddles
    # two windows), never over 30 s, instead of 16.
    assert len(windows) == 4
    assert all(w.samples <= 30 * SAMPLE_RATE for w in windows)
    assert sum(len(w.pieces) for w in windows) == 32
    unpacked = pack_windows(pieces, max_seconds=30, gap_seconds=0.5, across_channels=False)
    assert len(unpacked) == 16  # one channel per window, as faster-whisper chunks one file


def test_offsets_gaps_and_window_audio() -> None:
    a, b = make_job("a", [2.0, 1.0]), make_job("b", [1.5])
    (window,) = pack_windows(pieces_of(a) + pieces_of(b), max_seconds=30, gap_seconds=0.5, across_channels=True)
    # Clips of one channel follow each other directly (as faster-whisper's collect_chunks); another call's clip
    # comes after a gap of silence.
    assert [p.offset for p in window.pieces] == [0.0, 2.0, 3.5]
    audio = window.audio(int(0.5 * SAMPLE_RATE))
    assert audio.size == window.samples == int(5.0 * SAMPLE_RATE)
    assert not audio[int(3.0 * SAMPLE_RATE) : int(3.5 * SAMPLE_RATE)].any()


def test_a_clip_that_does_not_fit_starts_a_new_window() -> None:
    windows = pack_windows(
        pieces_of(make_job("a", [20.0])) + pieces_of(make_job("b", [12.0])),
        max_seconds=30,
        gap_seconds=0.5,
        across_channels=True,
    )
    assert [[p.job.call.call_id for p in w.pieces] for w in windows] == [["a"], ["b"]]
    assert windows[1].pieces[0].offset == 0.0


@pytest.mark.parametrize(("middle", "call_id"), [(0.5, "a"), (2.2, "a"), (2.4, "b"), (3.0, "b"), (40.0, "b")])
def test_a_word_belongs_to_the_clip_holding_its_midpoint_or_the_nearest(middle: float, call_id: str) -> None:
    a, b = make_job("a", [2.0]), make_job("b", [1.5])
    (window,) = pack_windows(pieces_of(a) + pieces_of(b), max_seconds=30, gap_seconds=0.5, across_channels=True)
    assert _place_word(window, middle).job.call.call_id == call_id


def test_model_batches_share_the_windows_fairly_between_workers() -> None:
    windows = [_Window(samples=n) for n in (5, 30, 10, 25, 20)]
    batches = model_batches(windows, workers=2, batch_size=8)
    # Longest first, dealt round-robin: each worker gets every other window, in one batch each.
    assert [[w.samples for w in b] for b in batches] == [[30, 20, 5], [25, 10]]
    # One worker, batches of two: faster-whisper's own order (longest first), cut by the batch size.
    assert [[w.samples for w in b] for b in model_batches(windows, workers=1, batch_size=2)] == [
        [30, 25],
        [20, 10],
        [5],
    ]
    # A lone window is one batch; no window, no batch.
    assert model_batches(windows[:1], workers=2, batch_size=8) == [[windows[0]]]
    assert model_batches([], workers=2, batch_size=8) == []


@pytest.mark.parametrize(
    ("word_spans", "passed_over"),
    [
        ([], True),  # no word at all in 4 s of speech
        ([(0.3, 0.6)], True),  # one word in 4 s: under 0.5 words a second
        ([(0.3, 0.6), (0.7, 1.0), (1.1, 1.5), (2.2, 2.6), (3.0, 3.7)], False),  # words throughout
        ([(0.3, 0.6), (0.7, 1.0), (1.1, 1.4), (1.5, 1.8), (1.9, 2.2)], True),  # the last 1.8 s uncovered
        ([(1.5, 1.8), (1.9, 2.2), (2.3, 2.6), (2.7, 3.0), (3.1, 3.7)], True),  # the first 1.5 s uncovered
    ],
)
def test_a_clip_the_decoder_passed_over_in_whole_or_in_part(
    word_spans: list[tuple[float, float]], passed_over: bool
) -> None:
    job = make_job("a", [4.0])  # one clip of 4 s at 0 s on the call's timeline
    (piece,) = pieces_of(job)
    words = [TimedWord(0, start, end, " w", 0.9) for start, end in word_spans]
    assert _passed_over(piece, words) is passed_over


def test_a_short_clip_is_never_repaired() -> None:
    (piece,) = pieces_of(make_job("a", [0.8]))
    assert _passed_over(piece, []) is False
