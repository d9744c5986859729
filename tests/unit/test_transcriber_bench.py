"""`callstream bench transcriber --quick` end to end: the JSON the issue asks for, the table, the plot.

No speed is asserted (speed is the benchmark's to measure); this checks that the runs are there, that the service
really batched concurrent calls, and that the words are right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_AUDIO = Path(os.environ.get("CALLSTREAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "audio"

pytestmark = pytest.mark.timeout(600)


def test_quick_benchmark_writes_runs_ratios_table_and_plot(tmp_path: Path) -> None:
    if not (SHARED_AUDIO / "references.json").is_file():
        pytest.skip(f"shared test audio not found: {SHARED_AUDIO}")
    out = tmp_path / "transcriber.json"
    env = {**os.environ, "CALLSTREAM_SHARED_DATA": str(SHARED_AUDIO.parent), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "callstream", "bench", "transcriber", "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    runs = {(r["mode"], r["concurrency"]): r for r in payload["runs"]}
    assert set(runs) == {("bare", 1), ("service", 1), ("service", 4)}
    for run in runs.values():
        assert run["audio_seconds_per_second"] > 0 and run["real_time_factor"] > 0
        assert 0 <= run["wer"] < 0.25, run  # tiny.en on clean speech: about 6-10%
        assert run["calls"] == 8 and run["peak_memory_mb"] > 0
    # One call at a time is one call per batch; four in flight are batched together.
    assert runs[("service", 1)]["mean_batch_calls"] == 1.0
    assert runs[("service", 4)]["mean_batch_calls"] > 1.5
    # Packed: four calls in flight need fewer 30 s windows than one at a time.
    assert 0 < runs[("service", 4)]["model_windows"] < runs[("service", 1)]["model_windows"]
    assert runs[("service", 1)]["clips_redecoded"] == 0  # a lone mono call shares its windows with nobody
    assert set(payload["ratios"]) == {"service_c1_over_bare", "service_c4_over_service_c1"}
    assert payload["meta"]["model_workers"] >= 1 and payload["meta"]["batch"]["max_batch_size"] >= 4
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "audio_seconds_per_second" in done.stdout and "ratios:" in done.stdout
