"""Call analytics from word timestamps (and the audio): talk and non-talk time, interruptions, speaking rate.

Definitions (docs/topics.md repeats them for consumers of `Transcript.analytics`):

- **talk intervals** of a role: its words' [start, end] intervals, where two consecutive words are joined into one
  interval when the pause between them is shorter than `TALK_GAP_S` and no other role starts talking in that
  pause (begins a stretch of its own words). So a speaker's short pauses (commas, breathing, sentence ends) are
  talk, also while the other party talks over them, and a pause in which the other party answers is not;
- **edges**: Whisper's word timestamps are only accurate to a few tenths of a second at the start and end of an
  utterance (the first and last word are often stretched into the silence around them, sometimes they start
  late). When the engine passes the audio (it does), each talk interval's start and end are moved to the start
  of the first and the end of the last stretch of the channel's audio louder than its speech level minus
  `VOICE_RELATIVE_DB` that the interval overlaps (earlier or later by at most `SNAP_WINDOW_S`). Without audio,
  the first and last word of each interval are cut to a plausible duration for their length instead
  (`EDGE_BASE_S`);
- **talk_seconds**: the total length of a role's talk intervals;
- **non_talk_seconds**: the call's duration (`Transcript.audio_seconds`) minus the time in which at least one role
  talks (the union of all talk intervals): silence, hold, and the lead-in and tail of the recording;
- **interruption**: a talk interval of one role that starts while another role is talking (inside one of its
  talk intervals) and overlaps it by at least `MIN_OVERLAP_S`. Counted for the role that starts talking, with the
  overlap (both talking) in its `overlap_seconds`. Shorter overlaps are not counted: word timestamps are only
  accurate to about a tenth of a second, so a quick reply would otherwise look like an interruption;
- **words_per_minute**: the role's words divided by its talk time.

Measured on the four synthesized sample calls (samples/calls, rendered by synth.py with each turn's speech span in
the sidecar as ground truth; tiny.en): talk time per role and non-talk time within 0.08 s of the ground truth with
the audio, within 0.64 s with edge words cut (no audio), within 2.05 s from raw word timestamps; the scripted
interruption found (overlap 1.22 s for 1.20 s), no false ones. tests/integration/test_transcriber_analytics.py
checks the 0.5 s bound.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from callstream.v1 import events_pb2

# Pauses shorter than this within one role's speech count as talk (espeak-ng's sentence pauses are ~0.4-0.7 s;
# in real calls, pauses over a second are hesitations or waiting, not talk).
TALK_GAP_S = 1.0
# A role talking into another's speech for less than this is a quick reply, not an interruption.
MIN_OVERLAP_S = 0.3
# Whisper's word timestamps stretch the first and last word of an utterance into the silence around it (by up to
# 0.4-0.5 s on the sample calls). A talk interval's edge word is therefore cut to a plausible duration for its
# length: EDGE_BASE_S + EDGE_PER_LETTER_S per letter (a digit counts as DIGIT_LETTERS letters, "seven").
EDGE_BASE_S = 0.12
EDGE_PER_LETTER_S = 0.07
DIGIT_LETTERS = 4
# Audio louder than a channel's speech level (95th percentile of its 10 ms frames) minus this is voice.
VOICE_RELATIVE_DB = -30.0
VOICE_FRAME_S = 0.01
# Quieter stretches shorter than this inside speech (stop consonants) do not split it; voice shorter than
# VOICE_MIN_S (a click) is not speech.
VOICE_MERGE_GAP_S = 0.25
VOICE_MIN_S = 0.05
# How far the audio may move a talk interval's start or end.
SNAP_WINDOW_S = 0.5

Interval = tuple[float, float]


def voiced_intervals(clips: Iterable[tuple[float, np.ndarray]], sample_rate: int = 16000) -> list[Interval]:
    """Where one channel's audio is voice, from its speech clips: (start in seconds, samples) each.

    The engine passes its VAD clips (speech with some padding); everything outside them is silence anyway.
    """
    frame = max(1, int(sample_rate * VOICE_FRAME_S))
    levels: list[tuple[float, np.ndarray]] = []
    for start, samples in clips:
        n = samples.size // frame
        if n:
            blocks = samples[: n * frame].astype(np.float64).reshape(n, frame)
            levels.append((start, np.sqrt(np.mean(blocks**2, axis=1))))
    if not levels:
        return []
    every = np.concatenate([rms for _, rms in levels])
    # relative to the speech level, and above the noise floor of the clips (their quietest frames)
    threshold = max(
        float(np.percentile(every, 95)) * 10 ** (VOICE_RELATIVE_DB / 20), 4 * float(np.percentile(every, 10)), 1e-4
    )
    step = frame / sample_rate
    runs: list[Interval] = []
    for start, rms in levels:
        loud = np.flatnonzero(rms > threshold)
        if not loud.size:
            continue
        breaks = np.flatnonzero(np.diff(loud) > 1)
        for first, last in zip(np.r_[loud[0], loud[breaks + 1]], np.r_[loud[breaks], loud[-1]], strict=True):
            runs.append((start + float(first) * step, start + float(last + 1) * step))
    merged: list[Interval] = []
    for run in sorted(runs):
        if merged and run[0] - merged[-1][1] < VOICE_MERGE_GAP_S:
            merged[-1] = (merged[-1][0], max(merged[-1][1], run[1]))
        else:
            merged.append(run)
    return [run for run in merged if run[1] - run[0] >= VOICE_MIN_S]


def snap_to_voice(
    intervals: Sequence[Interval], voiced: Sequence[Interval], window_s: float = SNAP_WINDOW_S
) -> list[Interval]:
    """Talk intervals with their edges moved to the voice they overlap (by at most `window_s`)."""
    starts = [v[0] for v in voiced]
    snapped: list[Interval] = []
    for start, end in intervals:
        # the voiced stretches that overlap (start, end)
        first = bisect.bisect_left(starts, end)
        near = [v for v in voiced[:first] if v[1] > start]
        if not near:
            snapped.append((start, end))
            continue
        new_start = max(near[0][0], start - window_s)
        new_end = min(near[-1][1], end + window_s)
        snapped.append((new_start, max(new_start, new_end)))
    return snapped


def plausible_seconds(word: str) -> float:
    """How long a word of this length takes to say, at most: what an edge word is cut to."""
    letters = sum(1 for ch in word if ch.isalpha()) + DIGIT_LETTERS * sum(1 for ch in word if ch.isdigit())
    return EDGE_BASE_S + EDGE_PER_LETTER_S * max(1, letters)


def talk_intervals(
    words: Sequence[Interval],
    others: Sequence[Interval] = (),
    gap_s: float = TALK_GAP_S,
    texts: Sequence[str] | None = None,
) -> list[Interval]:
    """One role's talk intervals from its word intervals; `others` are the other roles' talk stretches (their
    words joined over short pauses, `talk_intervals(their_words)`): a pause in which one of them starts is not
    bridged.

    With the words' `texts`, each interval's first and last word are cut to `plausible_seconds` (see EDGE_BASE_S).
    """
    starts = sorted(s for s, _ in others)

    def someone_else_starts(start: float, end: float) -> bool:
        """Does another role start talking in (start, end): an answer in the pause, not talk over it?"""
        i = bisect.bisect_right(starts, start)
        return i < len(starts) and starts[i] < end

    # [start, end, index of the first word, index of the last word (the one that ends last)]
    found: list[list[Any]] = []
    for i in sorted(range(len(words)), key=lambda i: (words[i][0], words[i][1])):
        start, end = words[i][0], max(words[i])
        if found:
            current = found[-1]
            if start <= current[1] or (start - current[1] < gap_s and not someone_else_starts(current[1], start)):
                if end >= current[1]:
                    current[1], current[3] = end, i
                continue
        found.append([start, end, i, i])
    if texts is None:
        return [(start, end) for start, end, _, _ in found]
    intervals: list[Interval] = []
    for start, end, first, last in found:
        if first == last:  # one word: keep a plausible duration around its middle
            half = min(end - start, plausible_seconds(texts[first])) / 2
            intervals.append(((start + end) / 2 - half, (start + end) / 2 + half))
            continue
        trimmed_start = max(start, max(words[first]) - plausible_seconds(texts[first]))
        trimmed_end = min(end, words[last][0] + plausible_seconds(texts[last]))
        intervals.append((trimmed_start, max(trimmed_start, trimmed_end)))
    return intervals


def union_seconds(intervals: Iterable[Interval]) -> float:
    """Total length of a set of intervals, overlaps counted once."""
    total = 0.0
    current: Interval | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        total += current[1] - current[0]
    return total


def interruptions(
    intervals: Sequence[Interval], others: Sequence[Interval], min_overlap_s: float = MIN_OVERLAP_S
) -> tuple[int, float]:
    """(count, overlap seconds) of the talk intervals in `intervals` that start inside one of `others`."""
    count, overlap = 0, 0.0
    for start, end in intervals:
        best = 0.0
        for other_start, other_end in others:
            if other_start < start < other_end:
                best = max(best, min(end, other_end) - start)
        if best >= min_overlap_s:
            count += 1
            overlap += best
    return count, overlap


def compute_analytics(
    transcript: events_pb2.Transcript,
    voiced: Mapping[int, Sequence[Interval]] | None = None,
    talk_gap_s: float = TALK_GAP_S,
    min_overlap_s: float = MIN_OVERLAP_S,
    trim_edges: bool = True,
) -> events_pb2.CallAnalytics:
    """The CallAnalytics of a transcript, from its segments' word timestamps (roles in channel order).

    `voiced`: per channel, where its audio is voice (`voiced_intervals`), to refine the edges of talk intervals.
    `trim_edges=False` takes word timestamps as they are (no cut of stretched edge words).
    """
    words: dict[str, list[Interval]] = {}
    texts: dict[str, list[str]] = {}
    channels: dict[str, set[int]] = {}
    for segment in transcript.segments:
        channels.setdefault(segment.role, set()).add(segment.channel)
        words.setdefault(segment.role, []).extend((w.start, w.end) for w in segment.words)
        texts.setdefault(segment.role, []).extend(w.text for w in segment.words)
    roles = sorted(words, key=lambda r: (min(channels[r]), r))
    # Each role's words joined over every short pause: when the others start talking. Someone who talks on while
    # the other cuts in keeps talking; a pause in which the other starts and answers ends a talk interval.
    stretches = {role: talk_intervals(words[role], (), talk_gap_s) for role in roles}
    intervals: dict[str, list[Interval]] = {}
    for role in roles:
        others = [iv for r in roles if r != role for iv in stretches[r]]
        voice = sorted(v for channel in channels[role] for v in (voiced or {}).get(channel, ()))
        if voice:  # the audio places the edges; cutting edge words first would only limit how far they can move
            intervals[role] = snap_to_voice(talk_intervals(words[role], others, talk_gap_s), voice)
        else:
            intervals[role] = talk_intervals(words[role], others, talk_gap_s, texts[role] if trim_edges else None)
    last_word = max((end for ivs in intervals.values() for _, end in ivs), default=0.0)
    duration = transcript.audio_seconds or last_word
    talking = union_seconds(iv for ivs in intervals.values() for iv in ivs)
    analytics = events_pb2.CallAnalytics(duration_seconds=duration, non_talk_seconds=max(0.0, duration - talking))
    for role in roles:
        talk = union_seconds(intervals[role])
        others = [iv for r in roles if r != role for iv in intervals[r]]
        count, overlap = interruptions(intervals[role], others, min_overlap_s)
        n_words = len(words[role])
        analytics.roles.append(
            events_pb2.RoleAnalytics(
                role=role,
                talk_seconds=talk,
                interruptions=count,
                overlap_seconds=overlap,
                words_per_minute=n_words / talk * 60.0 if talk > 0 else 0.0,
                words=n_words,
            )
        )
    return analytics
