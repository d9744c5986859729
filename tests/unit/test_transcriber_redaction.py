"""PII redaction of transcripts (transcriber/redaction.py): what is redacted, what is not, and how."""

from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY

from callstream.transcriber.merge import transcript_text
from callstream.transcriber.redaction import luhn_valid, redact_segments, redact_text, redact_transcript
from callstream.v1 import events_pb2

CARD = "4111111111111111"  # the Visa test number (Luhn-valid)


def segment(role: str, channel: int, text: str, start: float = 0.0, step: float = 0.4) -> events_pb2.Segment:
    """A segment whose words are `text` split on spaces, one every `step` seconds from `start`."""
    words = [
        events_pb2.Word(start=start + i * step, end=start + i * step + step * 0.8, text=w, probability=0.9)
        for i, w in enumerate(text.split())
    ]
    return events_pb2.Segment(role=role, channel=channel, start=start, end=words[-1].end, text=text, words=words)


def transcript(*segments: events_pb2.Segment) -> events_pb2.Transcript:
    t = events_pb2.Transcript(call_id="c1", segments=list(segments), audio_seconds=60.0)
    t.text = transcript_text(t.segments)
    return t


def redacted(text: str, policy: str = "mask") -> tuple[str, dict[str, int]]:
    return redact_text(text, policy)


def digit_runs(text: str) -> list[str]:
    """Digits of each number in `text`, separators dropped: '4111-1111 1111' -> ['411111111111']."""
    return [re.sub(r"\D", "", m) for m in re.findall(r"\d[\d\s().+-]*\d|\d", text)]


# -- what is redacted ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my card number is 4111 1111 1111 1111 thanks", "my card number is #### #### #### #### thanks"),
        ("card 4111-1111-1111-1111.", "card ####-####-####-####."),
        ("it is 4111111111111111", "it is ################"),
        ("it is four one one one one one one one one one one one one one one one", "it is " + " ".join("#" * 16)),
        ("4111 one one one one, 1111, one one one one", "#### # # # #, ####, # # # #"),
        ("amex 3782 822463 10005 please", "amex #### ###### ##### please"),  # 15 digits, 4-6-5
        ("visa 4222222222222 ok", "visa ############# ok"),  # 13 digits
        # ASR may group a long spoken number in thousands; a Luhn-valid one is still a card
        ("the card is 4,111,111,111,111,111", "the card is #,###,###,###,###,###"),
    ],
)
def test_card_numbers_in_every_written_and_spoken_form(text: str, expected: str) -> None:
    out, counts = redacted(text)
    assert out == expected
    assert counts == {"card_number": 1}


def test_spoken_zero_and_double_and_tens() -> None:
    # 4000 0566 5566 5556 (Luhn-valid) read with "oh", "double" and "fifty six"
    text = "four oh oh oh, oh five double six, five five six six, five five fifty six"
    out, counts = redacted(text)
    assert counts == {"card_number": 1}
    assert not re.search(r"\b(four|oh|five|six|double|fifty)\b", out), out


def test_digits_read_on_with_a_card_number_go_with_it() -> None:
    # an expiry date and a security code read right after the number, or a Whisper repetition loop around it
    out, counts = redacted("it is 4111 1111 1111 1111 12 25 123 thanks")
    assert (out, counts) == ("it is #### #### #### #### ## ## ### thanks", {"card_number": 1})
    out, counts = redacted("It is 5-4-2-5-2-3-4. 3-0-1-0-9-9-0-3-0-0-0-0-0-0")
    assert counts == {"card_number": 1} and not re.search(r"\d", out), out


def test_asr_spellings_of_spoken_digits() -> None:
    # tiny.en wrote "four five seven two one eight" like this, after the agent asked for the account number
    t = transcript(
        segment("agent", 0, "Could you please tell me your account number?", start=0.0),
        segment("customer", 1, "Yes, it is for 5' 7' 2' 1' 8'", start=4.0),
    )
    assert redact_transcript(t, "mask") == {"account_number": 1}
    assert t.segments[1].text == "Yes, it is # #' #' #' #' #'"
    # "for" and "to" are digits only in a row of digits
    assert redacted("wait for 5 minutes, then call me") == ("wait for 5 minutes, then call me", {})


def test_luhn_invalid_numbers_are_not_cards_but_long_ones_still_do_not_leak() -> None:
    assert luhn_valid(CARD) and not luhn_valid("4111111111111112") and not luhn_valid("41a1")
    out, counts = redacted("card 4111 1111 1111 1112 ok")
    assert "card_number" not in counts
    # a card number with one misheard digit must not leak the others: it goes as an account number
    assert counts == {"account_number": 1} and out == "card #### #### #### #### ok"
    out, counts = redacted("thirteen digits 1234567890123 without context")
    assert "card_number" not in counts and "1234567890123" not in out


@pytest.mark.parametrize(
    "text",
    [
        "call me at (415) 555-0123 please",
        "it's 415-555-0123",
        "it's 415.555.0123",
        "my number is +1 415 555 0123.",
        "London +44 20 7946 0958",
        "reach me on four one five five five five oh one two three",
        "my mobile is four one five, five five five, zero one two three",
        "it is 4155550123",
        "try 1 415 555 0123",
    ],
)
def test_phone_numbers(text: str) -> None:
    out, counts = redacted(text)
    assert counts == {"phone": 1}, out
    assert not any(len(d) >= 4 for d in digit_runs(out)), out
    assert "five five" not in out and "one two three" not in out


def test_a_short_local_phone_number_needs_a_phone_word() -> None:
    assert redacted("my phone number is 555 0123")[1] == {"phone": 1}
    assert redacted("the number is 555 0123")[1] == {"phone": 1}
    assert redacted("we had 555 0123 visitors")[1] == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at john.smith@example.com today", "mail me at ####.#####@#######.### today"),
        ("it is john dot smith at example dot com", "it is #### dot ##### at ####### dot ###"),
        ("it is john.smith at example.com", "it is ####.##### at #######.###"),
        ("jane underscore doe at mail dot co dot uk", "#### underscore ### at #### dot ## dot ##"),
    ],
)
def test_email_addresses_written_and_spoken(text: str, expected: str) -> None:
    out, counts = redacted(text)
    assert (out, counts) == (expected, {"email": 1})


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("my account number is 45721888", "account_number"),
        ("acct 457218", "account_number"),
        ("member id four five seven two one eight", "account_number"),
        ("the policy number is AB-7745120", "account_number"),
        ("my social security number is 123-45-6789", "national_id"),
        ("it is 123-45-6789", "national_id"),
        ("social security one two three four five six seven eight nine", "national_id"),
        ("passport 533380006", "national_id"),
        ("reference 98765432101234567", "account_number"),  # long, Luhn-invalid
    ],
)
def test_account_and_national_id_numbers(text: str, kind: str) -> None:
    out, counts = redacted(text)
    assert counts == {kind: 1}, out
    assert not any(len(d) >= 4 for d in digit_runs(out)), out


# -- what is not redacted ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "It usually takes three to five working days.",
        "It usually takes 3 to 5 days.",
        "I can see two payments of sixty dollars on the third of March.",
        "two payments of $60 on March 3rd",
        "the total was $1,250,000.00 last year",
        "we have 1,250,000 customers",
        "a refund of 1250 dollars",
        "interest of 12.5 percent",
        "In 1813.",
        "the meeting is at 10:30 on 2024-03-15",
        "the card ending in 1111",
        "Oh, I see. I was at home all morning.",
        "one or two of them, one at a time",
        "my account has 3 cards",
        "I was at the station at nine",
        "Thank you for calling Northwind Bank, my name is Daniel.",
    ],
)
def test_ordinary_numbers_and_words_stay(text: str) -> None:
    assert redacted(text) == (text, {})


def test_a_number_read_with_long_pauses_is_two_numbers() -> None:
    # 8 digits close together are one number; 4 + 4 digits ten seconds apart are two short ones
    close = transcript(segment("customer", 1, "it is 1234 5678"))
    assert redact_transcript(close, "mask") == {"account_number": 1}
    far = transcript(segment("customer", 1, "it is 1234", start=0.0), segment("customer", 1, "5678", start=12.0))
    assert redact_transcript(far, "mask") == {}


# -- transcripts: words, segments, text, counts, metric ------------------------------------------------------


def test_context_comes_from_the_other_channel_and_words_are_redacted() -> None:
    t = transcript(
        segment("agent", 0, "Could you please tell me your account number?", start=0.0),
        segment("customer", 1, "Yes, it is four five seven two one eight.", start=4.0),
    )
    assert redact_transcript(t, "mask") == {"account_number": 1}
    customer = t.segments[1]
    assert customer.text == "Yes, it is # # # # # #."
    assert [w.text for w in customer.words] == ["Yes,", "it", "is", "#", "#", "#", "#", "#", "#."]
    assert t.text.splitlines()[1] == "customer: Yes, it is # # # # # #."
    assert t.segments[0].text == "Could you please tell me your account number?"
    assert dict(t.redactions) == {"account_number": 1} and t.pii_policy == "mask"
    # times, roles and probabilities are untouched
    assert [w.start for w in customer.words] == [4.0 + i * 0.4 for i in range(9)]
    assert all(w.probability == pytest.approx(0.9) for w in customer.words)


def test_a_number_read_across_the_other_partys_interjection_is_one_number() -> None:
    t = transcript(
        segment("customer", 1, "my card is 4111 1111", start=0.0),
        segment("agent", 0, "okay", start=1.7),
        segment("customer", 1, "1111 1111", start=2.2),
    )
    assert redact_transcript(t, "tag") == {"card_number": 1}
    assert [s.text for s in t.segments] == ["my card is [CARD_NUMBER]", "okay", "[CARD_NUMBER]"]
    assert [w.text for w in t.segments[2].words] == ["[CARD_NUMBER]", "[CARD_NUMBER]"]
    assert t.text == "customer: my card is [CARD_NUMBER]\nagent: okay\ncustomer: [CARD_NUMBER]"


def test_tag_policy_tags_every_word_of_a_span_and_the_text_once() -> None:
    t = transcript(segment("customer", 1, "It is four one one one, one one one one, 1111 1111, thanks."))
    assert redact_transcript(t, "tag") == {"card_number": 1}
    s = t.segments[0]
    assert s.text == "It is [CARD_NUMBER], thanks."
    # a word inside the span is all tag (its commas too); the comma after the span stays
    assert [w.text for w in s.words] == ["It", "is"] + ["[CARD_NUMBER]"] * 9 + ["[CARD_NUMBER],", "thanks."]
    assert t.pii_policy == "tag"


def test_words_glued_without_spaces_keep_their_glue() -> None:
    # Whisper words carry their own spaces: "4111" "-1111" ... make "4111-1111-..." in the segment text
    words = [("My", 0.0), (" card", 0.3), (" 4111", 0.6), ("-1111", 0.9), ("-1111", 1.2), ("-1111.", 1.5)]
    seg = events_pb2.Segment(
        role="customer",
        channel=1,
        text="My card 4111-1111-1111-1111.",
        words=[events_pb2.Word(start=s, end=s + 0.25, text=w.strip()) for w, s in words],
    )
    assert redact_segments([seg], "mask") == {"card_number": 1}
    assert seg.text == "My card ####-####-####-####."
    assert [w.text for w in seg.words] == ["My", "card", "####", "-####", "-####", "-####."]
    seg2 = events_pb2.Segment(
        role="customer",
        channel=1,
        text="My card 4111-1111-1111-1111.",
        words=[events_pb2.Word(start=s, end=s + 0.25, text=w.strip()) for w, s in words],
    )
    redact_segments([seg2], "tag")
    assert seg2.text == "My card [CARD_NUMBER]."


def test_nothing_downstream_sees_the_digits() -> None:
    t = transcript(
        segment("agent", 0, "Please read me the card number and your phone number.", start=0.0),
        segment("customer", 1, "4111 1111 1111 1111 and four one five five five five zero one two three", start=5),
    )
    redact_transcript(t, "mask")
    everything = [t.text, *(s.text for s in t.segments), *(w.text for s in t.segments for w in s.words)]
    for text in everything:
        assert not re.search(r"\d", text), text
        assert not re.search(r"\b(one|two|three|four|five|zero)\b", text), text
    assert dict(t.redactions) == {"card_number": 1, "phone": 1}


def test_off_leaves_everything_and_redaction_is_idempotent() -> None:
    original = transcript(segment("customer", 1, "card 4111 1111 1111 1111 and john@example.com"))
    t = events_pb2.Transcript()
    t.CopyFrom(original)
    assert redact_transcript(t, "off") == {}
    assert t.pii_policy == "off" and not t.redactions
    t.pii_policy = ""
    assert t == original
    assert redact_transcript(t, "mask") == {"card_number": 1, "email": 1}
    once = events_pb2.Transcript()
    once.CopyFrom(t)
    assert redact_transcript(t, "mask") == {} and t == once
    assert redact_transcript(t, "tag") == {}


def test_counts_go_to_the_transcript_and_the_metric() -> None:
    def metric(kind: str) -> float:
        return REGISTRY.get_sample_value("callstream_transcriber_pii_redactions_total", {"kind": kind}) or 0.0

    before = {k: metric(k) for k in ("card_number", "phone", "email")}
    t = transcript(
        segment("customer", 1, "cards 4111111111111111 and 5555 5555 5555 4444, call 415-555-0123", start=0.0),
        segment("customer", 1, "or write to a@b.io", start=20.0),
    )
    assert redact_transcript(t, "tag") == {"card_number": 2, "phone": 1, "email": 1}
    assert dict(t.redactions) == {"card_number": 2, "phone": 1, "email": 1}
    assert metric("card_number") - before["card_number"] == 2
    assert metric("phone") - before["phone"] == 1 and metric("email") - before["email"] == 1
    assert REGISTRY.get_sample_value("callstream_transcriber_pii_redactions_total", {"kind": "national_id"}) == 0


def test_a_transcript_without_segments_has_its_text_redacted() -> None:
    t = events_pb2.Transcript(text="speaker: my number is 415 555 0123\nspeaker: bye")
    assert redact_transcript(t, "tag") == {"phone": 1}
    assert t.text == "speaker: my number is [PHONE]\nspeaker: bye"


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown PII redaction policy"):
        redact_transcript(events_pb2.Transcript(), "hide")
