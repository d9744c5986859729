"""`callstream loadtest kafka` on a real broker with the real services: end-to-end latency and consumer lag."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from callstream.cli import app
from tests.conftest import shared
from tests.integration.conftest import TOPICS, Broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(broker: Broker, starter_classifier: str) -> Iterator[Broker]:
    engine = broker.start_service("llm-engine")
    broker.start_service("transcriber")
    broker.start_service("router", CALLSTREAM_ROUTER_MODEL_DIR=starter_classifier)
    broker.start_service("summarizer", CALLSTREAM_SUMMARIZER_ENGINE_ADDRESS=engine.address)
    yield broker


def test_kafka_loadtest_reports_end_to_end_latency_and_lag_per_stage(
    stack: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = shared("audio", "jfk.flac")  # 11 s, mono
    monkeypatch.setenv("KAFKA_ENABLE_IDEMPOTENCE", "true" if stack.idempotent else "false")
    out = tmp_path / "kafka.json"
    result = CliRunner().invoke(
        app,
        [
            "loadtest",
            "kafka",
            "--bootstrap",
            stack.bootstrap,
            "--tickets",
            "2",
            "--calls",
            "1",
            "--tickets-rate",
            "1",
            "--calls-rate",
            "1",
            "--audio",
            str(audio),
            "--drain-timeout",
            "150",
            "--quiet",
            "--out",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "e2e p50 / p95" in result.output
    data = json.loads(out.read_text())
    s = data["summary"]
    assert (s["published_calls"], s["published_tickets"]) == (1, 2)
    assert s["completed"] == 3 and s["missing"] == 0 and s["dead_lettered"] == 0, data["status_counts"]
    e2e = s["e2e_ms"]
    assert e2e["count"] == 3 and 0 < e2e["p50"] <= e2e["p95"] <= e2e["max"]
    assert s["e2e_ms_by_kind"]["call"]["count"] == 1 and s["e2e_ms_by_kind"]["ticket"]["count"] == 2
    stages = data["stages"]
    assert stages[TOPICS.calls_transcribed]["count"] == 1
    assert stages[TOPICS.tickets_routed]["count"] == 3 and stages[TOPICS.tickets_summarized]["count"] == 3
    # Each event's outputs arrive in pipeline order, all after its event time.
    for event in data["samples"]["events"]:
        times = event["stages_s"]
        order = [TOPICS.calls_transcribed, TOPICS.tickets_routed, TOPICS.tickets_summarized]
        seen = [times[t] for t in order if t in times]
        assert seen == sorted(seen) and seen[0] > event["scheduled_s"], event
    call = next(e for e in data["samples"]["events"] if e["kind"] == "call")
    assert e2e["max"] >= (call["stages_s"][TOPICS.tickets_summarized] - call["scheduled_s"]) * 1000 - 1e-3
    # Consumer lag of every service group, sampled during the run; the summarizer holds its records for seconds.
    lag = data["lag"]
    assert set(lag["groups"]) == {"callstream-transcriber", "callstream-router", "callstream-summarizer"}
    assert all(len(v) == len(lag["t_s"]) >= 3 for v in lag["groups"].values())
    assert all(any(x is not None for x in v) for v in lag["groups"].values()), data["warnings"]
    assert lag["max"]["callstream-summarizer"] >= 1
    page = out.with_suffix(".html").read_text()
    assert "Consumer lag over time" in page and "data:image/png;base64," in page
