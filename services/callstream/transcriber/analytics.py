"""Call analytics from word timestamps: talk time, non-talk time, interruptions and speaking rate per role.

Definitions (docs/topics.md repeats them for consumers of `Transcript.analytics`):

- **talk intervals** of a role: its words' [start, end] intervals, where two consecutive words are joined into one
  interval when the pause between them is shorter than `TALK_GAP_S` and no other role says a word in that pause.
  So a speaker's short pauses (commas, breathing, sentence ends) are talk, and a pause in which the other party
  answers is not;
- **talk_seconds**: the total length of a role's talk intervals;
- **non_talk_seconds**: the call's duration (`Transcript.audio_seconds`) minus the time in which at least one role
  talks (the union of all talk intervals): silence, hold, and the lead-in and tail of the recording;
- **interruption**: a talk interval of one role that starts while another role is talking (inside one of its
  talk intervals) and overlaps it by at least `MIN_OVERLAP_S`. Counted for the role that starts talking, with the
  overlap (both talking) in its `overlap_seconds`. Shorter overlaps are not counted: word timestamps are only
  accurate to about a tenth of a second, so a quick reply would otherwise look like an interruption;
- **words_per_minute**: the role's words divided by its talk time.

Tuned on the synthesized sample calls (samples/calls, rendered by synth.py with each turn's speech span in the
sidecar): see tests/integration/test_transcriber_analytics.py for the comparison with that ground truth.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from callstream.v1 import events_pb2

# Pauses shorter than this within one role's speech count as talk (espeak-ng's sentence pauses are ~0.4-0.7 s;
# in real calls, pauses over a second are hesitations or waiting, not talk).
TALK_GAP_S = 1.0
# A role talking into another's speech for less than this is a quick reply, not an interruption.
MIN_OVERLAP_S = 0.3

Interval = tuple[float, float]


def talk_intervals(
    words: Sequence[Interval], others: Sequence[Interval] = (), gap_s: float = TALK_GAP_S
) -> list[Interval]:
    """One role's talk intervals from its word intervals; `others` are the other roles' word intervals."""
    others_sorted = sorted(others)
    starts = [s for s, _ in others_sorted]
    # Running maximum of the other roles' word ends: "does any word that starts before t end after u?"
    max_end: list[float] = []
    for _, end in others_sorted:
        max_end.append(max(end, max_end[-1]) if max_end else end)

    def someone_else_talks(start: float, end: float) -> bool:
        i = bisect.bisect_left(starts, end)
        return i > 0 and max_end[i - 1] > start

    intervals: list[Interval] = []
    for start, end in sorted((s, max(s, e)) for s, e in words):
        if intervals:
            last_start, last_end = intervals[-1]
            if start <= last_end or (start - last_end < gap_s and not someone_else_talks(last_end, start)):
                intervals[-1] = (last_start, max(last_end, end))
                continue
        intervals.append((start, end))
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
    transcript: events_pb2.Transcript, talk_gap_s: float = TALK_GAP_S, min_overlap_s: float = MIN_OVERLAP_S
) -> events_pb2.CallAnalytics:
    """The CallAnalytics of a transcript, from its segments' word timestamps (roles in channel order)."""
    words: dict[str, list[Interval]] = {}
    channel_of: dict[str, int] = {}
    for segment in transcript.segments:
        channel_of.setdefault(segment.role, segment.channel)
        words.setdefault(segment.role, []).extend((w.start, w.end) for w in segment.words)
    roles = sorted(words, key=lambda r: (channel_of[r], r))
    intervals: dict[str, list[Interval]] = {}
    for role in roles:
        others = [iv for r in roles if r != role for iv in words[r]]
        intervals[role] = talk_intervals(words[role], others, talk_gap_s)
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
