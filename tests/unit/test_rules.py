"""Routing rules: validation errors name file and line; first match wins; low confidence needs a human."""

from __future__ import annotations

from pathlib import Path

import pytest

from callstream.core.errors import ConfigError
from callstream.router.rules import RoutingRules
from callstream.router.settings import default_rules_path

VALID = """\
default_queue: general
confidence_threshold: 0.5
human_triage_queue: triage
rules:
  - name: lost-card
    when: {intent: [card_lost, card_stolen], min_score: 0.3, source_channel: [call, email]}
    queue: cards
    priority: high
  - name: billing
    when:
      intent: billing_dispute
    queue: billing
  - name: vip-cancel
    when: {intent: [cancel_subscription], customer: {tier: [gold, platinum]}}
    queue: retention
    priority: urgent
  - name: cancel
    when: {intent: [cancel_subscription]}
    queue: retention
"""


def rules(text: str = VALID) -> RoutingRules:
    return RoutingRules.from_text(text, "routing_rules.yaml")


def test_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(VALID)
    loaded = RoutingRules.from_file(path)
    assert [r.name for r in loaded.rules] == ["lost-card", "billing", "vip-cancel", "cancel"]
    assert loaded.rules[1].when.intent == ["billing_dispute"]  # a single string is accepted as a list
    assert loaded.rules[1].priority == "normal"
    assert loaded.rule_line("billing") == 9
    assert loaded.spec.human_triage_queue == "triage"


def test_shipped_rules_load_and_name_only_starter_intents() -> None:
    import csv

    from callstream.router.settings import starter_data_path

    loaded = RoutingRules.from_file(default_rules_path())
    with starter_data_path().open() as f:
        labels = {row["category"] for row in csv.DictReader(f)}
    assert len(labels) == 10
    loaded.check_intents(labels)
    queues = {r.queue for r in loaded.rules}
    assert {"billing", "cards", "accounts", "logistics", "tech_support", "retention"} <= queues


def test_unknown_field_names_file_line_and_rule() -> None:
    text = VALID.replace("    queue: billing\n", "    queeu: billing\n")
    with pytest.raises(ConfigError) as info:
        rules(text)
    message = str(info.value)
    assert "routing_rules.yaml line 12: rule 'billing': unknown field 'queeu'" in message
    assert "missing required field 'queue'" in message  # and line 9, where the rule starts
    assert "line 9: rule 'billing'" in message


def test_unknown_field_inside_when() -> None:
    text = VALID.replace("      intent: billing_dispute\n", "      intent: billing_dispute\n      chanel: email\n")
    with pytest.raises(ConfigError, match=r"routing_rules.yaml line 12: rule 'billing': unknown field 'chanel'"):
        rules(text)


def test_bad_type_names_line_of_the_value() -> None:
    text = VALID.replace("min_score: 0.3", "min_score: high")
    with pytest.raises(ConfigError, match=r"^routing_rules.yaml line 6: rule 'lost-card': field 'when.min_score'"):
        rules(text)
    with pytest.raises(ConfigError, match=r"^routing_rules.yaml line 2: field 'confidence_threshold'"):
        rules(VALID.replace("confidence_threshold: 0.5", "confidence_threshold: 1.5"))
    with pytest.raises(ConfigError, match=r"^routing_rules.yaml line 8: rule 'lost-card': field 'priority'"):
        rules(VALID.replace("priority: high", "priority: asap"))


def test_unknown_top_level_field_and_missing_default_queue() -> None:
    with pytest.raises(ConfigError, match=r"^routing_rules.yaml line 1: unknown field 'default_queu'"):
        rules(VALID.replace("default_queue:", "default_queu:"))


def test_duplicate_rule_name_points_at_the_duplicate() -> None:
    with pytest.raises(ConfigError, match=r"line 17: rule 'cancel'.*duplicate rule name 'cancel'"):
        rules(VALID.replace("name: vip-cancel", "name: cancel"))


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(VALID.replace("    queue: cards\n", "    queue: [cards\n"))
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: YAML syntax error") as info:
        RoutingRules.from_file(path)
    line = int(str(info.value).split(" line ")[1].split(":")[0])
    assert 7 <= line <= 9
    with pytest.raises(ConfigError, match=r"routing_rules.yaml line 2: YAML syntax error"):
        rules("default_queue: general\n  bad: indent: here\n")


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        rules("- a\n- b\n")
    with pytest.raises(ConfigError, match="empty"):
        rules("")
    with pytest.raises(ConfigError, match="cannot read"):
        RoutingRules.from_file(tmp_path / "missing.yaml")


def test_first_matching_rule_wins() -> None:
    r = rules()
    # Both "lost-card" (card_stolen is 2nd at 0.35 >= 0.3) and "billing" could match: the first rule wins.
    d = r.route([("billing_dispute", 0.55), ("card_stolen", 0.35)], "call", {})
    assert (d.queue, d.rule, d.priority, d.needs_human) == ("cards", "lost-card", "high", False)
    assert "card_stolen" in d.reason and "source_channel" in d.reason
    # Same intents from chat: lost-card needs call/email, so billing matches.
    d = r.route([("billing_dispute", 0.55), ("card_stolen", 0.35)], "chat", {})
    assert (d.queue, d.rule) == ("billing", "billing")
    # Customer conditions: the VIP rule comes first, then the general one.
    d = r.route([("cancel_subscription", 0.9)], "email", {"tier": "Gold"})
    assert (d.queue, d.rule, d.priority) == ("retention", "vip-cancel", "urgent")
    d = r.route([("cancel_subscription", 0.9)], "email", {"tier": "bronze"})
    assert d.rule == "cancel"


def test_unnamed_intent_goes_to_default_queue() -> None:
    d = rules().route([("general_question", 0.8)], "email", {})
    assert (d.queue, d.rule, d.needs_human) == ("general", "default", False)


def test_low_confidence_needs_human() -> None:
    r = rules()
    # No rule matches (billing needs >= threshold 0.5 by default): human triage queue.
    d = r.route([("billing_dispute", 0.42), ("refund_request", 0.3)], "email", {})
    assert (d.queue, d.rule, d.needs_human) == ("triage", "default", True)
    assert "0.42 < threshold 0.50" in d.reason
    # A rule with a lower min_score still routes, but the item is flagged for a human.
    d = r.route([("card_lost", 0.4)], "call", {})
    assert (d.queue, d.rule, d.needs_human) == ("cards", "lost-card", True)
    # Nothing at all from the classifier.
    d = r.route([], "call", {})
    assert (d.queue, d.needs_human) == ("triage", True)


def test_check_intents_names_rule_and_line() -> None:
    with pytest.raises(ConfigError, match=r"routing_rules.yaml line 5: rule 'lost-card': intent\(s\) 'card_stolen'"):
        rules().check_intents(["card_lost", "billing_dispute", "cancel_subscription"])
