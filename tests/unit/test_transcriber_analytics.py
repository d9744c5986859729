"""Call analytics from word timestamps (transcriber/analytics.py), on hand-made words."""

from __future__ import annotations

import numpy as np
import pytest

from callstream.transcriber.analytics import (
    MIN_OVERLAP_S,
    TALK_GAP_S,
    compute_analytics,
    interruptions,
    plausible_seconds,
    snap_to_voice,
    talk_intervals,
    union_seconds,
    voiced_intervals,
)
from callstream.transcriber.postprocess import finalize_transcript
from callstream.transcriber.settings import TranscriberSettings
from callstream.v1 import events_pb2


def words(role: str, channel: int, *spans: tuple[float, float], text: str = "word") -> events_pb2.Segment:
    return events_pb2.Segment(
        role=role,
        channel=channel,
        start=spans[0][0],
        end=spans[-1][1],
        text=" ".join([text] * len(spans)),
        words=[events_pb2.Word(start=s, end=e, text=text) for s, e in spans],
    )


def by_role(analytics: events_pb2.CallAnalytics) -> dict[str, events_pb2.RoleAnalytics]:
    return {r.role: r for r in analytics.roles}


def test_the_thresholds_are_what_the_docs_say() -> None:
    assert (TALK_GAP_S, MIN_OVERLAP_S) == (1.0, 0.3)


def test_talk_intervals_bridge_short_pauses_of_one_speaker_only() -> None:
    mine = [(0.0, 0.5), (0.6, 1.0), (1.9, 2.2), (4.0, 4.5)]
    # 0.1 s and 0.9 s pauses are talk; the 1.8 s pause is not
    assert talk_intervals(mine) == [(0.0, 2.2), (4.0, 4.5)]
    # ... unless the other party says something in the pause
    assert talk_intervals(mine, others=[(1.2, 1.5)]) == [(0.0, 1.0), (1.9, 2.2), (4.0, 4.5)]
    # a longer threshold joins more; overlapping and unordered words are fine
    assert talk_intervals([(4.0, 4.5), (0.0, 0.5), (0.2, 0.4), (1.9, 2.2)], gap_s=2.0) == [(0.0, 4.5)]
    # a word whose end is before its start counts as a point
    assert talk_intervals([(1.0, 0.9)]) == [(1.0, 1.0)]
    assert talk_intervals([]) == []


def test_union_and_interruptions() -> None:
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == pytest.approx(4.0)
    assert union_seconds([]) == 0.0
    agent = [(0.0, 5.0), (10.0, 12.0)]
    # starts 0.8 s before the agent stops: an interruption; 0.1 s: a quick reply; after a pause: neither
    assert interruptions([(4.2, 6.0)], agent) == (1, pytest.approx(0.8))
    assert interruptions([(4.9, 6.0)], agent) == (0, 0.0)
    assert interruptions([(6.0, 8.0)], agent) == (0, 0.0)
    # a short remark entirely inside the other's talk: the overlap is the remark
    assert interruptions([(1.0, 1.5), (10.5, 11.0)], agent) == (2, pytest.approx(1.0))
    # starting at the very same time as the other is not interrupting them
    assert interruptions([(10.0, 11.0)], agent) == (0, 0.0)


def test_a_two_channel_call() -> None:
    transcript = events_pb2.Transcript(
        audio_seconds=20.0,
        segments=[
            words("agent", 0, (1.0, 1.5), (1.6, 2.0), (2.5, 3.0)),  # talk 1.0-3.0
            words("customer", 1, (3.6, 4.0), (4.1, 5.0), (5.1, 6.0), (6.5, 8.0)),  # talk 3.6-8.0
            # the agent cuts in at 7.0, one second before the customer stops
            words("agent", 0, (7.0, 7.5), (7.6, 9.0)),  # talk 7.0-9.0
            words("customer", 1, (15.0, 16.0)),  # after 6 s of silence
        ],
    )
    analytics = compute_analytics(transcript, trim_edges=False)
    assert [r.role for r in analytics.roles] == ["agent", "customer"]
    agent, customer = by_role(analytics)["agent"], by_role(analytics)["customer"]
    assert agent.talk_seconds == pytest.approx(2.0 + 2.0)
    assert customer.talk_seconds == pytest.approx(4.4 + 1.0)
    assert (agent.interruptions, agent.overlap_seconds) == (1, pytest.approx(1.0))
    assert (customer.interruptions, customer.overlap_seconds) == (0, 0.0)
    assert (agent.words, customer.words) == (5, 5)
    assert agent.words_per_minute == pytest.approx(5 / 4.0 * 60)
    assert customer.words_per_minute == pytest.approx(5 / 5.4 * 60)
    # talking: 1.0-3.0, 3.6-9.0, 15.0-16.0 = 8.4 s of 20
    assert analytics.duration_seconds == 20.0
    assert analytics.non_talk_seconds == pytest.approx(20.0 - 8.4)


def test_talking_over_each_other_is_one_interruption_not_many() -> None:
    # merged by word time, the customer's words interleave with the agent's while both talk (card_payment.yaml)
    transcript = events_pb2.Transcript(
        audio_seconds=30.0,
        segments=[
            words("agent", 0, (20.0, 21.0), (21.1, 22.0), (22.1, 23.0), (23.1, 24.0)),
            words("customer", 1, (23.73, 23.99)),
            words("agent", 0, (24.05, 24.3)),
            words("customer", 1, (24.31, 24.53)),
            words("agent", 0, (24.33, 25.0)),
            words("customer", 1, (24.53, 25.5), (25.6, 26.77)),
        ],
    )
    agent, customer = compute_analytics(transcript, trim_edges=False).roles
    assert (agent.talk_seconds, agent.interruptions) == (pytest.approx(5.0), 0)
    assert (customer.talk_seconds, customer.interruptions) == (pytest.approx(26.77 - 23.73), 1)
    assert customer.overlap_seconds == pytest.approx(25.0 - 23.73)


def test_roles_come_in_channel_order_and_a_mono_call_has_one() -> None:
    transcript = events_pb2.Transcript(
        segments=[words("customer", 1, (0.0, 1.0)), words("agent", 0, (2.0, 3.0)), words("customer", 1, (4.0, 5.0))]
    )
    assert [r.role for r in compute_analytics(transcript).roles] == ["agent", "customer"]
    mono = compute_analytics(
        events_pb2.Transcript(audio_seconds=10.0, segments=[words("speaker", 0, (2.0, 4.0))]), trim_edges=False
    )
    (speaker,) = mono.roles
    assert (speaker.role, speaker.talk_seconds, speaker.interruptions) == ("speaker", pytest.approx(2.0), 0)
    assert mono.non_talk_seconds == pytest.approx(8.0)


def test_no_words_and_no_duration() -> None:
    empty = compute_analytics(events_pb2.Transcript(audio_seconds=3.0))
    assert (empty.duration_seconds, empty.non_talk_seconds, len(empty.roles)) == (3.0, 3.0, 0)
    # without audio_seconds, the call lasts until its last word
    unknown = compute_analytics(events_pb2.Transcript(segments=[words("agent", 0, (1.0, 2.0))]), trim_edges=False)
    assert (unknown.duration_seconds, unknown.non_talk_seconds) == (2.0, pytest.approx(1.0))


def test_stretched_edge_words_are_cut_to_a_plausible_length() -> None:
    assert plausible_seconds("I") == pytest.approx(0.19) and plausible_seconds("there.") == pytest.approx(0.47)
    assert plausible_seconds("42") == pytest.approx(0.12 + 0.07 * 8)  # digits are read as words ("four two")
    # Whisper often starts the first word of an utterance early and ends the last one late
    words_ = [(4.0, 4.8), (4.9, 5.2), (5.3, 6.3)]
    assert talk_intervals(words_, texts=["I", "was", "there."]) == [(pytest.approx(4.61), pytest.approx(5.77))]
    # short edge words stay; one stretched word keeps a plausible length around its middle
    assert talk_intervals([(1.0, 1.15), (1.3, 1.45)], texts=["a", "b"]) == [(1.0, 1.45)]
    ((start, end),) = talk_intervals([(1.0, 2.0)], texts=["I"])
    assert (start, end) == (pytest.approx(1.405), pytest.approx(1.595))


def test_the_audio_places_the_edges_of_talk() -> None:
    rate = 16000
    # voice from 1.00 to 2.50 s and from 2.70 to 3.00 s (a 0.2 s stop inside speech), a click at 5.0 s
    samples = np.zeros(6 * rate, dtype=np.float32)
    samples[rate : int(2.5 * rate)] = 0.3
    samples[int(2.7 * rate) : 3 * rate] = 0.2
    samples[5 * rate : 5 * rate + 160] = 0.5
    noise = np.random.default_rng(0).normal(0, 0.001, samples.size).astype(np.float32)
    # given as two VAD clips with padding, as the engine has them
    clips = [(0.5, (samples + noise)[rate // 2 : int(3.4 * rate)]), (4.6, (samples + noise)[int(4.6 * rate) :])]
    ((start, end),) = voiced_intervals(clips, rate)
    assert (start, end) == (pytest.approx(1.0, abs=0.011), pytest.approx(3.0, abs=0.011))
    assert voiced_intervals([]) == [] and voiced_intervals([(0.0, np.zeros(100, np.float32))]) == []
    voice = [(1.0, 3.0), (6.0, 7.0)]
    # words stretched into silence shrink to the voice; words that start late grow back, by 0.5 s at most
    assert snap_to_voice([(0.7, 3.3), (8.0, 9.0)], voice) == [(1.0, 3.0), (8.0, 9.0)]
    assert snap_to_voice([(1.2, 2.5), (6.8, 6.9)], voice) == [(1.0, 3.0), (6.3, 7.0)]
    # in compute_analytics, per channel of each role
    transcript = events_pb2.Transcript(audio_seconds=10.0, segments=[words("agent", 0, (0.6, 1.5), (1.6, 3.4))])
    (agent,) = compute_analytics(transcript, voiced={0: [(1.0, 3.0)], 1: [(4.0, 9.0)]}).roles
    assert agent.talk_seconds == pytest.approx(2.0)


def test_finalize_computes_analytics_before_redacting() -> None:
    segment = events_pb2.Segment(
        role="customer",
        channel=1,
        start=0.0,
        end=2.0,
        text="card 4111 1111 1111 1111",
        words=[
            events_pb2.Word(start=i * 0.4, end=i * 0.4 + 0.3, text=t)
            for i, t in enumerate(["card", "4111", "1111", "1111", "1111"])
        ],
    )
    transcript = events_pb2.Transcript(audio_seconds=5.0, segments=[segment], text="customer: card 4111 1111 1111 1111")
    finalize_transcript(transcript, TranscriberSettings(pii_redaction="tag"))
    (customer,) = transcript.analytics.roles
    assert customer.words == 5 and customer.talk_seconds == pytest.approx(1.9)
    assert transcript.text == "customer: card [CARD_NUMBER]"
    assert dict(transcript.redactions) == {"card_number": 1} and transcript.pii_policy == "tag"
    # the default policy masks
    again = events_pb2.Transcript(audio_seconds=5.0, segments=[segment])
    finalize_transcript(again, TranscriberSettings())
    assert again.pii_policy == "mask" and again.segments[0].text == "card #### #### #### ####"


def test_callstream_transcribe_prints_the_analytics_in_one_line() -> None:
    from callstream.transcriber.cli import format_analytics

    transcript = events_pb2.Transcript(
        audio_seconds=10.0,
        segments=[words("agent", 0, (0.0, 1.0), (1.2, 2.0)), words("customer", 1, (1.5, 3.0))],
        redactions={"phone": 1, "card_number": 2},
        pii_policy="mask",
    )
    transcript.analytics.CopyFrom(compute_analytics(transcript, trim_edges=False))
    assert format_analytics(transcript) == (
        "-- agent talks 2.0 s (60 wpm), 0 interruptions; customer talks 1.5 s (40 wpm), 1 interruption; "
        "non-talk 7.0 s; PII (mask): 2 card_number, 1 phone redacted"
    )
    assert format_analytics(events_pb2.Transcript()).endswith("no speech; non-talk 0.0 s; PII (off): nothing redacted")
