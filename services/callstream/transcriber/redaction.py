"""PII redaction of transcripts: card, phone, account and national id numbers and e-mail addresses.

Every Transcript is redacted before it leaves the transcriber (Kafka, gRPC and `callstream transcribe` alike):
`Transcript.text`, each `Segment.text` and each `Word.text`, so that nothing downstream sees the digits. The
policy is `TranscriberSettings.pii_redaction`:

- `mask` (default): every digit and every letter of an e-mail address becomes `#`, separators stay
  ("####-####-####-####", "(###) ###-####", "####.#####@#######.###"); a spoken digit becomes one `#` ("four one
  five" -> "# # #"), so that word lengths do not give the digits away;
- `tag`: each span becomes its kind, `[CARD_NUMBER]`, `[PHONE]`, `[EMAIL]`, `[ACCOUNT_NUMBER]` or
  `[NATIONAL_ID]`: once in the segment text, and in every word that was part of the span;
- `off`: nothing is changed.

Speech recognition writes a spoken number in many ways ("4111 1111 1111 1111", "4111-1111-...", "four one one
one ...", mixtures, "double five", "oh" for zero, "for" for four inside a row of digits, tiny.en's "5' 7' 2'"),
so detection works on atoms of each channel's words: digit groups and spoken digits, and the separators between
them (spaces, `- . ( ) + , '`, fillers such as "uh"). A *run*
is a sequence of digit atoms with at most three separators between neighbours, at most `MAX_RUN_GAP_S` apart in
time (a number read in pieces across the other party's "okay" stays one run: the other channel's words are not
in between). A run is, in this order:

1. with a Luhn-valid stretch of 13-19 digits (on atom boundaries): `card_number`, in any context, the whole run
   (digits read on before or after the card number, such as the expiry date, go with it);
2. written like a US social security number (123-45-6789): `national_id`; written like a phone number
   ((415) 555-0123, 415-555-0123, 1 415 555 0123, +44 20 7946 0958): `phone`;
3. 6+ digits after a national id word (social security, SSN, passport, ...): `national_id`; 6+ digits after an
   account word (account, acct, member, policy, customer, reference, order, card, ...): `account_number`; 7-15
   digits after a phone word (phone, mobile, call, reach, ...): `phone`. Context is the `CONTEXT_WORDS` words
   before the run in the whole conversation, both channels, nearest keyword first (the agent asks "your account
   number?", the customer answers with digits);
4. without such context: 10 digits, or 11 starting with 1: `phone`; 8 or more digits: `account_number` (reference
   numbers, and a card number with one misheard digit, which fails the Luhn check but must not leak either);
   7 digits after the word "number": `phone`;
5. anything else stays: amounts ("$1,250", "sixty dollars", "5 percent"), thousands-grouped numbers, ISO dates,
   times, and short numbers ("3 to 5 days", "in 1813", the last four digits of a card).

E-mail addresses are found written (john.smith@example.com) and spoken ("john dot smith at example dot com"),
ending in a common top-level domain. Every redacted span is counted: `Transcript.redactions` (by kind) and the
Prometheus counter `callstream_transcriber_pii_redactions_total{kind}`.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from prometheus_client import Counter

from callstream.transcriber.merge import transcript_text
from callstream.v1 import events_pb2

Policy = Literal["mask", "tag", "off"]

CARD_NUMBER = "card_number"
PHONE = "phone"
EMAIL = "email"
ACCOUNT_NUMBER = "account_number"
NATIONAL_ID = "national_id"
KINDS = (CARD_NUMBER, PHONE, EMAIL, ACCOUNT_NUMBER, NATIONAL_ID)

PII_REDACTIONS = Counter(
    "callstream_transcriber_pii_redactions_total", "PII spans redacted from transcripts, by kind", ["kind"]
)
for _kind in KINDS:  # every kind shows up at 0 before the first redaction
    PII_REDACTIONS.labels(_kind)

# Digits further apart than this in time are separate numbers (a pause while reading a card out is shorter).
MAX_RUN_GAP_S = 4.0
# How many words before a number are searched for what the number is ("account", "phone", ...).
CONTEXT_WORDS = 12
# Separator atoms allowed between two digit atoms of one run ("4111, uh, 1111" has three).
_MAX_SEPARATORS = 3

_ONES = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9",
}  # fmt: skip
_TEENS = {
    "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
    "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19",
}  # fmt: skip
_TENS = {
    "twenty": "2", "thirty": "3", "forty": "4", "fifty": "5", "sixty": "6", "seventy": "7", "eighty": "8",
    "ninety": "9",
}  # fmt: skip
_ONES_DIGITS = set("123456789")
_MULTIPLIERS = {"double": 2, "triple": 3}
_ZERO_LETTERS = {"oh", "o"}
# Words ASR writes for a spoken digit; digits only between two single digits ("three to five" stays short).
_HOMOPHONES = {"for": "4", "to": "2", "too": "2", "won": "1", "ate": "8"}
_FILLERS = {"uh", "um", "umm", "er", "erm", "ah", "uhm", "hmm", "mm"}
# ' too: tiny.en sometimes writes spoken digits as 5' 7' 2'
_SEPARATORS = set("-.()+,'")
_CURRENCY_SIGNS = set("$€£¥")
_AMOUNT_WORDS = {
    "dollar", "dollars", "cent", "cents", "euro", "euros", "pound", "pounds", "pence", "bucks", "usd", "eur",
    "gbp", "percent", "per", "%",
}  # fmt: skip

# Context keywords (single words and word pairs), nearest to the number wins.
_CONTEXT: dict[str, str] = {
    **dict.fromkeys(
        [
            "ssn", "social security", "social insurance", "national insurance", "national id", "passport",
            "tax id", "taxpayer", "identification", "license", "licence",
        ],
        NATIONAL_ID,
    ),
    **dict.fromkeys(
        [
            "account", "acct", "member", "membership", "policy", "customer", "reference", "ref", "order", "case",
            "ticket", "confirmation", "invoice", "routing", "iban", "card", "id", "sort code", "contract",
        ],
        ACCOUNT_NUMBER,
    ),
    **dict.fromkeys(
        [
            "phone", "telephone", "mobile", "cell", "cellphone", "landline", "fax", "call", "calls", "reach",
            "dial", "extension", "contact", "text",
        ],
        PHONE,
    ),
}  # fmt: skip
_WEAK_PHONE = {"number", "digits"}

_TLDS = "com|org|net|edu|gov|mil|io|co|uk|us|ca|au|de|fr|es|it|nl|be|ch|ie|info|biz|me|tv|app|dev"
_LABEL = r"[a-z0-9]+"
_DOT = r"(?:\s*\.\s*|\s+dot\s+)"
_JOIN = rf"(?:{_DOT}|\s*[_+-]\s*|\s+(?:underscore|dash|hyphen|plus)\s+)"
_AT = r"(?:\s*@\s*|\s+at\s+)"
_EMAIL_RE = re.compile(
    rf"(?<![\w@.]){_LABEL}(?:{_JOIN}{_LABEL})*{_AT}{_LABEL}(?:{_DOT}{_LABEL})*{_DOT}(?:{_TLDS})(?![\w@])",
    re.IGNORECASE,
)
_EMAIL_SPOKEN_PARTS = {"dot", "at", "underscore", "dash", "hyphen", "plus"}
_ATOM_RE = re.compile(r"\d+|[^\W\d_]+(?:'[^\W\d_]+)?|\S")
_ALNUM_RE = re.compile(r"[^\W_]+")


class _HasWords(Protocol):
    """A Segment, or anything shaped like it (text plus words with text and times)."""

    text: str
    channel: int

    @property
    def words(self) -> Sequence[events_pb2.Word]: ...


@dataclass
class _Token:
    text: str
    glued: bool  # no space before it in its segment's text
    segment: int
    start: float | None = None
    end: float | None = None
    begin: int = 0  # offset in the channel's text
    order: int = 0  # position among all tokens of the transcript (every channel, in time order)


@dataclass
class _Atom:
    kind: str  # "digit", "sep", "filler", "word", "other"
    start: int
    end: int
    text: str
    token: int
    value: str = ""  # digits, for kind "digit"
    spoken: bool = False


@dataclass
class _Span:
    kind: str
    start: int
    end: int
    # mask mode: (start, end, replacement) within the span; what is not covered stays
    mask: list[tuple[int, int, str]] = field(default_factory=list)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact_transcript(transcript: events_pb2.Transcript, policy: Policy | str) -> dict[str, int]:
    """Redact a transcript in place (text, segments, words) and record the policy and counts on it.

    Returns the spans redacted by kind (also added to `transcript.redactions` and the Prometheus counter).
    """
    if policy not in ("mask", "tag", "off"):
        raise ValueError(f"unknown PII redaction policy {policy!r}: expected mask, tag or off")
    transcript.pii_policy = policy
    if policy == "off":
        return {}
    if transcript.segments:
        counts = redact_segments(transcript.segments, policy)
        if counts:
            transcript.text = transcript_text(transcript.segments)
    else:
        transcript.text, counts = redact_text(transcript.text, policy)
    for kind, n in counts.items():
        transcript.redactions[kind] += n
        PII_REDACTIONS.labels(kind).inc(n)
    return counts


def redact_segments(segments: Sequence[_HasWords], policy: Policy | str) -> dict[str, int]:
    """Redact segments (speaker turns, in time order) in place: their text and their words' text.

    Numbers are found per channel across segments, with context words from all segments. A segment without
    words has its text redacted as whitespace-separated words.
    """
    if policy == "off":
        return {}
    tokens: list[_Token] = []
    for index, segment in enumerate(segments):
        if segment.words:
            for word, glued in zip(segment.words, _glue_flags(segment), strict=True):
                tokens.append(_Token(word.text, glued, index, float(word.start), float(word.end)))
        else:
            tokens.extend(_Token(text, False, index) for text in segment.text.split())
    for order, token in enumerate(tokens):
        token.order = order
    channels: dict[int, list[_Token]] = {}
    for token in tokens:
        channels.setdefault(int(segments[token.segment].channel), []).append(token)
    counts: Tally[str] = Tally()
    new_words: dict[int, list[str]] = {}
    new_texts: dict[int, list[tuple[str, bool]]] = {}
    changed: set[int] = set()  # segments with something redacted; the others are left exactly as they were
    for channel_tokens in channels.values():
        text = _channel_text(channel_tokens)
        spans = _find_spans(text, channel_tokens, tokens)
        if not spans:
            continue
        counts.update(span.kind for span in spans)
        words, parts = _apply(text, channel_tokens, spans, policy)
        for token, new_word, part in zip(channel_tokens, words, parts, strict=True):
            new_words.setdefault(token.segment, []).append(new_word)
            new_texts.setdefault(token.segment, []).append(part)
            if new_word != token.text or part != (token.text, token.glued):
                changed.add(token.segment)
    for index in sorted(changed):
        segment = segments[index]
        if segment.words:
            for word, text in zip(segment.words, new_words[index], strict=True):
                word.text = text
        segment.text = _join(new_texts[index])
    return dict(counts)


def redact_text(text: str, policy: Policy | str) -> tuple[str, dict[str, int]]:
    """Redact free text (one speaker's words, or "role: text" lines); returns the text and the counts by kind."""
    if policy == "off" or not text.strip():
        return text, {}
    lines = text.split("\n")
    segments = [events_pb2.Segment(text=line) for line in lines]
    counts = redact_segments(segments, policy)
    return "\n".join(s.text if s.text.strip() else line for s, line in zip(segments, lines, strict=True)), counts


# -- tokens and the channel text -------------------------------------------------------------------------------


def _glue_flags(segment: _HasWords) -> list[bool]:
    """Which words follow the previous one without a space in the segment text (Whisper words carry their own)."""
    flags: list[bool] = []
    position = 0
    for i, word in enumerate(segment.words):
        needle = " ".join(word.text.split())
        found = segment.text.find(needle, position) if needle else -1
        if found < 0:
            flags.append(False)
            continue
        flags.append(i > 0 and found == position)
        position = found + len(needle)
    return flags


def _channel_text(tokens: Sequence[_Token]) -> str:
    parts: list[str] = []
    offset = 0
    for i, token in enumerate(tokens):
        if i and not (token.glued and token.segment == tokens[i - 1].segment):
            parts.append(" ")
            offset += 1
        token.begin = offset
        parts.append(token.text)
        offset += len(token.text)
    return "".join(parts)


def _join(parts: Iterable[tuple[str, bool]]) -> str:
    """Segment text from (word text, glued) pairs, tidied like merge.join_words."""
    return " ".join("".join(p if glued else " " + p for p, glued in parts).split())


# -- detection --------------------------------------------------------------------------------------------------


def _find_spans(text: str, tokens: Sequence[_Token], everything: Sequence[_Token]) -> list[_Span]:
    spans = _email_spans(text)
    atoms = _atoms(text, tokens, spans)
    for run in _runs(atoms, tokens):
        spans.extend(_classify_run(text, atoms, run, _context(everything, tokens[atoms[run[0]].token].order)))
    return sorted(spans, key=lambda s: s.start)


def _email_spans(text: str) -> list[_Span]:
    spans: list[_Span] = []
    for match in _EMAIL_RE.finditer(text):
        span = _Span(EMAIL, match.start(), match.end())
        for part in _ALNUM_RE.finditer(match.group(0)):
            if part.group(0).lower() not in _EMAIL_SPOKEN_PARTS:
                span.mask.append((match.start() + part.start(), match.start() + part.end(), "#" * len(part.group(0))))
        spans.append(span)
    return spans


def _atoms(text: str, tokens: Sequence[_Token], taken: Sequence[_Span]) -> list[_Atom]:
    begins = [t.begin for t in tokens]
    atoms: list[_Atom] = []
    for match in _ATOM_RE.finditer(text):
        piece, lower = match.group(0), match.group(0).lower()
        token = bisect.bisect_right(begins, match.start()) - 1
        atom = _Atom("other", match.start(), match.end(), piece, token)
        if any(s.start <= match.start() < s.end for s in taken):
            pass  # inside an e-mail address: not a number
        elif piece.isdigit():
            atom.kind, atom.value = "digit", piece
        elif lower in _ONES or lower in _TEENS:
            atom.kind, atom.value, atom.spoken = "digit", _ONES.get(lower) or _TEENS[lower], True
        elif lower in _TENS or lower in _MULTIPLIERS or lower in _ZERO_LETTERS or lower in _HOMOPHONES:
            atom.kind, atom.spoken = "maybe", True  # decided below, from the neighbours
        elif lower == "hundred":
            atom.kind, atom.spoken = "maybe", True
        elif lower in _FILLERS:
            atom.kind = "filler"
        elif piece in _SEPARATORS:
            atom.kind = "sep"
        elif piece[0].isalpha():
            atom.kind = "word"
        atoms.append(atom)
    _resolve_spoken(atoms)
    return atoms


def _neighbour_index(atoms: Sequence[_Atom], i: int, step: int) -> int | None:
    """Index of the nearest atom before (step -1) or after (+1) atom i that is not a separator or filler."""
    j = i + step
    while 0 <= j < len(atoms) and atoms[j].kind in ("sep", "filler"):
        j += step
    return j if 0 <= j < len(atoms) else None


def _neighbour(atoms: Sequence[_Atom], i: int, step: int) -> _Atom | None:
    j = _neighbour_index(atoms, i, step)
    return None if j is None else atoms[j]


def _single_digits(atoms: Sequence[_Atom], i: int, step: int) -> int:
    """How many single-digit atoms follow atom i in direction `step` (separators between them skipped)."""
    count = 0
    while (j := _neighbour_index(atoms, i, step)) is not None and atoms[j].kind == "digit":
        if len(atoms[j].value) != 1:
            break
        count, i = count + 1, j
    return count


def _resolve_spoken(atoms: list[_Atom]) -> None:
    """Give the context-dependent number words ("twenty", "double", "oh", "for", "hundred") their digits or none."""
    for i, atom in enumerate(atoms):
        lower = atom.text.lower()
        after = atoms[i + 1] if i + 1 < len(atoms) else None
        if atom.kind != "maybe":
            continue
        if lower in _TENS:
            # "twenty three" / "twenty-three" -> 2 3; "twenty" -> 2 0
            if after is not None and after.text == "-" and i + 2 < len(atoms):
                after = atoms[i + 2]
            ones = after is not None and after.kind == "digit" and after.spoken and after.value in _ONES_DIGITS
            atom.kind, atom.value = "digit", _TENS[lower] + ("" if ones else "0")
        elif lower in _MULTIPLIERS:
            nxt = _neighbour(atoms, i, 1)
            if nxt is not None and nxt.kind == "digit" and nxt.value:
                atom.kind, atom.value = "digit", nxt.value[0] * (_MULTIPLIERS[lower] - 1)
            elif nxt is not None and nxt.kind == "maybe" and nxt.text.lower() in _ZERO_LETTERS:
                atom.kind, atom.value = "digit", "0" * (_MULTIPLIERS[lower] - 1)
                nxt.kind, nxt.value = "digit", "0"
        elif lower == "hundred":
            before = _neighbour(atoms, i, -1)
            if before is not None and before.kind == "digit" and before.spoken and len(before.value) == 1:
                atom.kind, atom.value = "digit", "00"
    # "oh" is a zero next to other digits ("four oh seven", "oh oh seven"), never on its own ("Oh, I see").
    changed = True
    while changed:
        changed = False
        for i, atom in enumerate(atoms):
            if atom.kind == "maybe" and atom.text.lower() in _ZERO_LETTERS:
                near = [_neighbour(atoms, i, -1), _neighbour(atoms, i, 1)]
                if any(n is not None and n.kind == "digit" for n in near):
                    atom.kind, atom.value, changed = "digit", "0", True
    for i, atom in enumerate(atoms):
        if atom.kind == "maybe" and atom.text.lower() in _HOMOPHONES:
            left, right = _single_digits(atoms, i, -1), _single_digits(atoms, i, 1)
            # between two single digits, or at either end of a row of them ("it is for 5 7 2 1 8"); "three to
            # five" stays three digits, "wait for 5 minutes" stays as it is
            if (left and right) or max(left, right) >= 3:
                atom.kind, atom.value = "digit", _HOMOPHONES[atom.text.lower()]
    for atom in atoms:
        if atom.kind == "maybe":
            atom.kind, atom.spoken = "word", False


def _runs(atoms: Sequence[_Atom], tokens: Sequence[_Token]) -> list[list[int]]:
    """Indices of the digit atoms of each run of digits (see the module docstring)."""
    runs: list[list[int]] = []
    current: list[int] = []
    separators = 0
    for i, atom in enumerate(atoms):
        if atom.kind == "digit":
            if current and separators <= _MAX_SEPARATORS and _close_in_time(tokens, atoms[current[-1]], atom):
                current.append(i)
            else:
                if current:
                    runs.append(current)
                current = [i]
            separators = 0
        elif atom.kind in ("sep", "filler"):
            separators += 1
        else:
            if current:
                runs.append(current)
            current, separators = [], 0
    if current:
        runs.append(current)
    return runs


def _close_in_time(tokens: Sequence[_Token], a: _Atom, b: _Atom) -> bool:
    end, start = tokens[a.token].end, tokens[b.token].start
    return end is None or start is None or start - end <= MAX_RUN_GAP_S


def _context(everything: Sequence[_Token], order: int) -> tuple[str | None, bool]:
    """What the words before the number say it is: (kind or None, whether the word "number" came up)."""
    words: list[str] = []
    for token in everything[max(0, order - CONTEXT_WORDS - 1) : order]:
        words.extend(w.lower() for w in re.findall(r"[^\W\d_]+", token.text))
    weak = False
    for i in range(len(words) - 1, max(-1, len(words) - 1 - CONTEXT_WORDS), -1):
        pair = f"{words[i - 1]} {words[i]}" if i else ""
        if pair in _CONTEXT:
            return _CONTEXT[pair], weak
        if words[i] in _CONTEXT:
            return _CONTEXT[words[i]], weak
        weak = weak or words[i] in _WEAK_PHONE
    return None, weak


def _classify_run(text: str, atoms: Sequence[_Atom], run: list[int], context: tuple[str | None, bool]) -> list[_Span]:
    if not run:
        return []
    values = [atoms[i].value for i in run]
    # 1. a card number anywhere in the run (even if written like an amount: ASR may group digits in thousands).
    # The whole run goes with it: digits read on before or after it (expiry date, security code, or digits the
    # ASR repeated or split off) are part of the same reading.
    best: tuple[int, int] | None = None
    for i in range(len(run)):
        total = 0
        for j in range(i, len(run)):
            total += len(values[j])
            if total > 19:
                break
            longer = best is None or total > sum(len(v) for v in values[best[0] : best[1] + 1])
            if total >= 13 and longer and luhn_valid("".join(values[i : j + 1])):
                best = (i, j)
    if best is not None:
        return [_digit_span(CARD_NUMBER, text, atoms, run)]
    if _is_amount(text, atoms, run):
        return []
    kind = _kind_of(text, atoms, run, context)
    return [_digit_span(kind, text, atoms, run)] if kind else []


def _kind_of(text: str, atoms: Sequence[_Atom], run: list[int], context: tuple[str | None, bool]) -> str | None:
    digits = "".join(atoms[i].value for i in run)
    n = len(digits)
    written = not any(atoms[i].spoken for i in run)
    groups = tuple(len(atoms[i].value) for i in run)
    seps = [text[atoms[a].end : atoms[b].start].strip() for a, b in zip(run, run[1:], strict=False)]
    before = text[: atoms[run[0]].start].rstrip()[-1:]
    if written:
        if groups == (3, 2, 4) and all(s in ("-", "") for s in seps):
            return NATIONAL_ID
        if groups == (4, 2, 2) and all(s == "-" for s in seps):
            return None  # an ISO date
        if (groups == (3, 3, 4) or (groups == (1, 3, 3, 4) and digits[0] == "1")) and all(
            s in ("-", ".", "", ")") for s in seps
        ):
            return PHONE
        if before == "+" and 8 <= n <= 15:
            return PHONE
    kind, weak = context
    if kind in (NATIONAL_ID, ACCOUNT_NUMBER) and n >= 6:
        return kind
    if kind == PHONE and 7 <= n <= 15:
        return PHONE
    if n == 10 or (n == 11 and digits[0] == "1"):
        return PHONE
    if n >= 8:
        return ACCOUNT_NUMBER
    if weak and n == 7:
        return PHONE
    return None


def _is_amount(text: str, atoms: Sequence[_Atom], run: list[int]) -> bool:
    """Money, percentages and numbers grouped in thousands are not identifiers."""
    first, last = run[0], run[-1]
    if first > 0 and atoms[first - 1].text in _CURRENCY_SIGNS:
        return True
    after = atoms[last + 1] if last + 1 < len(atoms) else None
    if after is not None and after.text.lower() in _AMOUNT_WORDS:
        return True
    if all(not atoms[i].spoken for i in run) and len(run) > 1:
        seps = [text[atoms[a].end : atoms[b].start] for a, b in zip(run, run[1:], strict=False)]
        groups = [len(atoms[i].value) for i in run]
        # 1,250,000 (the digits after a final "." are cents)
        body = groups[:-1] if seps[-1] == "." else groups
        body_seps = seps[:-1] if seps[-1] == "." else seps
        if body_seps and all(s == "," for s in body_seps) and 1 <= body[0] <= 3 and all(g == 3 for g in body[1:]):
            return True
    return False


def _digit_span(kind: str, text: str, atoms: Sequence[_Atom], run: list[int]) -> _Span:
    start = atoms[run[0]].start
    if run[0] > 0 and atoms[run[0] - 1].text in ("(", "+") and atoms[run[0] - 1].end == start:
        start = atoms[run[0] - 1].start  # "(415) 555-0123", "+1 415 ..."
    span = _Span(kind, start, atoms[run[-1]].end)
    for i in run:
        atom = atoms[i]
        span.mask.append((atom.start, atom.end, "#" * len(atom.value)))
    return span


# -- applying a policy -----------------------------------------------------------------------------------------


def _apply(
    text: str, tokens: Sequence[_Token], spans: Sequence[_Span], policy: Policy | str
) -> tuple[list[str], list[tuple[str, bool]]]:
    """Each token's new word text, and its (text, glued) contribution to its segment's text."""
    words = list(text)  # what each character of the channel text becomes in the words
    texts = list(text)  # ... and in the segment text
    continued: set[int] = set()  # tokens inside a tag that continue it (glued to the tag in the segment text)
    begins = [t.begin for t in tokens]
    for span in spans:
        if policy == "mask":
            for start, end, replacement in span.mask:
                words[start:end] = [replacement, *[""] * (end - start - 1)]
            continue
        tag = f"[{span.kind.upper()}]"
        first = bisect.bisect_right(begins, span.start) - 1
        last = bisect.bisect_right(begins, span.end - 1) - 1
        for t in range(max(first, 0), last + 1):
            token = tokens[t]
            start = max(span.start, token.begin)
            end = min(span.end, token.begin + len(token.text))
            if start >= end:
                continue
            words[start:end] = [tag, *[""] * (end - start - 1)]
            # One tag per span in a segment's text; a span read on across segments opens each with its tag.
            opens = t == first or token.segment != tokens[t - 1].segment
            texts[start:end] = [tag if opens else "", *[""] * (end - start - 1)]
            if not opens:
                continued.add(t)
    if policy == "mask":
        texts = words
    new_words: list[str] = []
    parts: list[tuple[str, bool]] = []
    for t, token in enumerate(tokens):
        end = token.begin + len(token.text)
        new_words.append("".join(words[token.begin : end]))
        parts.append(("".join(texts[token.begin : end]), token.glued or t in continued))
    return new_words, parts
