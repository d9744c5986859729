"""`callstream eval summarizer`: the set loads, and facts and invented entities are scored as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from callstream.core.errors import ConfigError
from callstream.evaluation.summarizer import (
    DEFAULT_SET,
    EvalItem,
    ItemResult,
    aggregate,
    fact_coverage,
    invented_entities,
    load_items,
    mentions,
    score_item,
)


def test_the_shipped_set_loads() -> None:
    items = load_items(DEFAULT_SET)
    assert len(items) >= 8 and {i.kind for i in items} == {"call", "ticket"}
    assert len({i.id for i in items}) == len(items)
    for item in items:
        assert item.facts, item.id
        for fact in item.facts:  # every fact is in its own source: the set is consistent
            assert any(mentions(item.text, a) for a in fact), (item.id, fact)


def test_bad_sets_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "set.yaml"
    path.write_text("items: []\n")
    with pytest.raises(ConfigError):
        load_items(path)
    path.write_text("items:\n  - id: x\n    kind: email\n    text: hi\n")
    with pytest.raises(ConfigError):
        load_items(path)


def test_mentions_and_fact_coverage() -> None:
    text = "Refunded $1,200.50 for order #55810 on Friday."
    assert mentions(text, "1200.50") and mentions(text, "55810") and mentions(text, "friday")
    assert not mentions(text, "5581") and not mentions(text, "1200") and not mentions("refunds", "refund")
    found, missing = fact_coverage(text, [["55810"], ["refund", "refunded"], ["Monday"]])
    assert found == 2 and missing == ["Monday"]


def test_invented_entities() -> None:
    source = "Customer: My card ending 4421 was charged 89.99 on Friday. Agent: Maria here, I blocked it."
    summary = "The customer, helped by Maria, was charged 99.00 on Monday in March.\nJohn may march to card 4421."
    invented = invented_entities(summary, source)
    assert invented == {"numbers": ["99.00"], "dates": ["March", "Monday"], "names": []}
    # Mid-sentence capitalized words not in the source are names; sentence starts and prompt words are not.
    invented = invented_entities("The card was blocked by Kevin and Call Transcript.", source, "call transcript")
    assert invented["names"] == ["Kevin"]


def test_score_and_aggregate() -> None:
    item = EvalItem("t", "ticket", "Order 55810 was charged twice, 89.99 each.", [["55810"], ["twice"], ["89.99"]])
    summary = {
        "summary": "Order 55810 charged twice.",
        "issue": "Charged 100 dollars",
        "resolution": "",
        "action_items": [],
    }
    found, missing, invented = score_item(item, summary)
    assert (found, missing, invented["numbers"]) == (2, ["89.99"], ["100"])
    results = [
        ItemResult("a", "ticket", True, attempts=1, facts_total=3, facts_found=2, invented={"numbers": ["100"]}),
        ItemResult("b", "call", False, error="schema: ...", attempts=2, facts_total=2),
    ]
    agg = aggregate(results)
    assert agg["schema_valid_rate"] == 0.5 and agg["fact_coverage"] == 0.4 and agg["invented_entities"] == 1
