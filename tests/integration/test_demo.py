"""`callstream demo --inputs DIR --json`: any folder of calls and tickets through a real broker, one result each."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared

pytestmark = pytest.mark.integration


def test_demo_runs_a_users_folder_and_prints_one_json_result_per_input(tmp_path: Path) -> None:
    shutil.copy(shared("audio", "stereo_diarization.wav"), tmp_path / "two-speakers.wav")
    shutil.copy(shared("audio", "ljspeech-LJ002-0035.wav"), tmp_path / "mono.wav")
    with (tmp_path / "tickets.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerow(["My new card has not arrived yet, it has been two weeks."])
        writer.writerow(["I want to cancel my subscription at the end of this month."])
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    result = subprocess.run(
        [sys.executable, "-m", "callstream", "demo", "--inputs", str(tmp_path), "--json", "--timeout", "600"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["id"] for r in rows) == ["call-mono", "call-two-speakers", "ticket-001", "ticket-002"]
    for row in rows:
        assert row["kind"] in ("call", "ticket")
        assert row["summary"], row
        assert row["queue"] and row["intent"] and 0.0 <= row["confidence"] <= 1.0
        assert isinstance(row["needs_human"], bool)
        assert row["text"]
    by_id = {r["id"]: r for r in rows}
    assert "agent:" in by_id["call-two-speakers"]["text"] and "customer:" in by_id["call-two-speakers"]["text"]
    assert by_id["ticket-001"]["text"].startswith("My new card")
