"""`RoutingRules.explain`: every rule tried in order, with its line and why it matched or did not."""

from __future__ import annotations

from tests.unit.test_rules import rules


def test_explain_names_the_rule_that_fired_and_why_earlier_ones_did_not() -> None:
    r = rules()
    decision, trace = r.explain([("cancel_subscription", 0.9), ("billing_dispute", 0.05)], "email", {"tier": "gold"})
    assert (decision.rule, decision.queue) == ("vip-cancel", "retention")
    assert [t.rule for t in trace] == ["lost-card", "billing", "vip-cancel"]
    assert [t.matched for t in trace] == [False, False, True]
    assert trace[0].line == 5 and trace[2].line == r.rule_line("vip-cancel")
    assert "card_lost" in trace[0].reason and "none of them among the candidates" in trace[0].reason
    assert "billing_dispute 0.05" in trace[1].reason  # named, but under min_score
    assert "customer tier='gold'" in trace[2].reason


def test_explain_failing_conditions_are_named() -> None:
    r = rules()
    decision, trace = r.explain([("card_lost", 0.9)], "chat")
    assert decision.rule == "default"
    assert "source_channel 'chat' not in" in trace[0].reason
    decision, trace = r.explain([("cancel_subscription", 0.9)], "email", {"tier": "bronze"})
    assert decision.rule == "cancel"
    assert "customer tier is 'bronze'" in trace[2].reason and trace[3].matched


def test_explain_agrees_with_route() -> None:
    r = rules()
    for intents, channel in [
        ([("card_lost", 0.35)], "call"),
        ([("x", 0.2)], "email"),
        ([("billing_dispute", 0.7)], ""),
    ]:
        decision, trace = r.explain(intents, channel)
        assert decision == r.route(intents, channel)
        assert (trace[-1].matched and trace[-1].rule == decision.rule) or decision.rule == "default"
