"""Summary quality on a small labelled set: fact coverage, schema validity, invented entities.

The set (samples/eval/summarizer.yaml by default) holds short calls and tickets, each with the facts a good summary
mentions (amounts, dates, names, ids, the product). For every item the summarizer runs exactly as in production
(the same prompt, schema, validation and one retry, through the TensorRT-LLM protocol client), then:

- schema validity: the summary validated (after at most one retry); otherwise the reason it would be dead-lettered;
- fact coverage: how many of the item's facts appear in the summary's text (summary, issue, resolution, action
  items), case-insensitive, "$" and thousands separators ignored; a fact may list alternatives;
- invented entities: numbers, dates (month and weekday names) and names (capitalized words inside a sentence) in
  the summary that do not occur in the source text. These are heuristics: they catch "$99" for "$89.99" and a
  made-up "John", not a wrong paraphrase.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from callstream.core.errors import CallstreamError, ConfigError, SummaryValidationError

DEFAULT_SET = Path(__file__).resolve().parents[1] / "samples" / "eval" / "summarizer.yaml"
MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
# Capitalized words that are not names even inside a sentence.
NOT_NAMES = frozenset(
    [
        "i",
        "i'm",
        "i've",
        "i'll",
        "agent",
        "customer",
        "the",
        "a",
        "an",
        "this",
        "that",
        "it",
        "he",
        "she",
        "they",
        "we",
        "you",
        "our",
        "your",
        "my",
        "mr",
        "mrs",
        "ms",
        "dr",
        "english",
        "json",
        "visa",
        "mastercard",
        "premium",
        "basic",
        "usd",
        "eur",
        "ok",
        "okay",
    ]
)
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


@dataclass(frozen=True)
class EvalItem:
    id: str
    kind: str  # "call" | "ticket"
    text: str
    facts: list[list[str]]  # each fact: its alternatives


@dataclass
class ItemResult:
    id: str
    kind: str
    schema_valid: bool
    error: str | None = None  # why it would be dead-lettered (or the engine error)
    attempts: int = 0
    facts_total: int = 0
    facts_found: int = 0
    missing_facts: list[str] = field(default_factory=list)
    invented: dict[str, list[str]] = field(default_factory=dict)
    latency_s: float = 0.0
    summary: dict[str, Any] | None = None

    @property
    def invented_count(self) -> int:
        return sum(len(v) for v in self.invented.values())


def load_items(path: Path = DEFAULT_SET) -> list[EvalItem]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"evaluation set {path}: {exc}") from exc
    raw = data.get("items") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"evaluation set {path}: expected a non-empty list under 'items'")
    items: list[EvalItem] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not str(entry.get("text", "")).strip():
            raise ConfigError(f"evaluation set {path}: item {i} needs 'text'")
        kind = str(entry.get("kind", "ticket"))
        if kind not in ("call", "ticket"):
            raise ConfigError(f"evaluation set {path}: item {i}: kind must be call or ticket, not {kind!r}")
        facts = [[str(a) for a in f] if isinstance(f, list) else [str(f)] for f in entry.get("facts") or []]
        items.append(EvalItem(str(entry.get("id", f"item-{i}")), kind, str(entry["text"]).strip(), facts))
    return items


def normalize(text: str) -> str:
    """Lower case; "$" and thousands separators out of amounts; whitespace collapsed."""
    text = text.lower().replace("$", " ")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return " ".join(text.split())


def mentions(text: str, alternative: str) -> bool:
    """Whether `alternative` occurs in `text` as words (not inside a longer word or number)."""
    needle = normalize(alternative)
    return re.search(rf"(?<![\w.]){re.escape(needle)}(?![\w]|\.\d)", normalize(text)) is not None


def summary_text(summary: dict[str, Any]) -> str:
    parts = [summary.get("summary", ""), summary.get("issue", ""), summary.get("resolution", "")]
    parts.extend(summary.get("action_items") or [])
    return "\n".join(str(p).strip() for p in parts if str(p).strip())


def fact_coverage(text: str, facts: list[list[str]]) -> tuple[int, list[str]]:
    """(facts found, the missing facts' first alternatives)."""
    missing = [f[0] for f in facts if not any(mentions(text, a) for a in f)]
    return len(facts) - len(missing), missing


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(text)}


def invented_entities(summary: str, source: str, prompt: str = "") -> dict[str, list[str]]:
    """Numbers, dates and names in the summary that the source does not contain. Words of the prompt's own text
    (`prompt`: "call transcript", "support ticket", ...) are not names."""
    src_numbers = _numbers(source)
    src_words = {w.lower() for w in _WORD.findall(source + "\n" + prompt)}
    numbers = sorted({n for n in _numbers(summary) if n not in src_numbers})
    dates: set[str] = set()
    names: set[str] = set()
    for line in summary.split("\n"):
        for match in _WORD.finditer(line):
            word = match.group(0)
            lower = word.lower()
            if lower in src_words:
                continue
            if (lower in MONTHS or lower in WEEKDAYS) and word[0].isupper():  # "may", "march": verbs
                dates.add(word)
                continue
            before = line[: match.start()]
            sentence_start = not before.strip() or _SENTENCE_END.search(before) is not None
            if word[0].isupper() and not sentence_start and lower not in NOT_NAMES and not word.isupper():
                names.add(word)
    return {"numbers": numbers, "dates": sorted(dates), "names": sorted(names)}


def score_item(item: EvalItem, summary: dict[str, Any]) -> tuple[int, list[str], dict[str, list[str]]]:
    from callstream.summarizer.summarize import Kind, system_prompt, user_message

    kind: Kind = "call" if item.kind == "call" else "ticket"
    text = summary_text(summary)
    found, missing = fact_coverage(text, item.facts)
    return found, missing, invented_entities(text, item.text, system_prompt(kind) + user_message("", kind))


async def evaluate(
    items: list[EvalItem], engine_address: str | None = None, concurrency: int = 8
) -> tuple[list[ItemResult], dict[str, str]]:
    """Summarize every item through the engine (the CPU engine in-process unless engine_address) and score it."""
    from callstream.summarizer.oneshot import local_engine
    from callstream.summarizer.service import connect
    from callstream.summarizer.settings import SummarizerSettings

    settings = SummarizerSettings()
    async with contextlib.AsyncExitStack() as stack:
        if engine_address is None:
            engine_address = await stack.enter_async_context(local_engine())
        client, summarizer = connect(settings, engine_address)
        slots = asyncio.Semaphore(concurrency)

        async def one(item: EvalItem) -> ItemResult:
            async with slots:
                try:
                    result = await summarizer.summarize(item.text, item.kind)
                except SummaryValidationError as exc:
                    return ItemResult(
                        item.id, item.kind, False, error=str(exc), attempts=2, facts_total=len(item.facts)
                    )
                except CallstreamError as exc:
                    return ItemResult(
                        item.id, item.kind, False, error=f"{type(exc).__name__}: {exc}", facts_total=len(item.facts)
                    )
            summary = asdict(result)
            found, missing, invented = score_item(item, summary)
            return ItemResult(
                item.id,
                item.kind,
                True,
                attempts=result.attempts,
                facts_total=len(item.facts),
                facts_found=found,
                missing_facts=missing,
                invented=invented,
                latency_s=round(result.latency_s, 3),
                summary={
                    k: summary[k]
                    for k in (
                        "summary",
                        "issue",
                        "resolution",
                        "action_items",
                        "customer_sentiment",
                        "follow_up_needed",
                    )
                },
            )

        try:
            results = list(await asyncio.gather(*(one(item) for item in items)))
            info = await summarizer.engine_info()
        finally:
            await client.close()
    return results, {"engine": f"trtllm/{info.backend}", "model_id": info.model_id, "address": engine_address}


def aggregate(results: list[ItemResult]) -> dict[str, Any]:
    n = len(results)
    valid = [r for r in results if r.schema_valid]
    facts_total = sum(r.facts_total for r in results)
    facts_found = sum(r.facts_found for r in results)
    return {
        "items": n,
        "schema_valid": len(valid),
        "schema_valid_rate": round(len(valid) / n, 3) if n else None,
        "fact_coverage": round(facts_found / facts_total, 3) if facts_total else None,
        "facts_found": facts_found,
        "facts_total": facts_total,
        "invented_entities": sum(r.invented_count for r in valid),
        "items_with_invented_entities": sum(1 for r in valid if r.invented_count),
        "retried": sum(1 for r in valid if r.attempts > 1),
    }


def report(results: list[ItemResult], engine: dict[str, str]) -> dict[str, Any]:
    items = []
    for r in results:
        row = asdict(r)
        row["invented_count"] = r.invented_count
        items.append(row)
    return {**engine, "aggregate": aggregate(results), "items": items}
