"""Call analytics of generated two-channel calls against the ground truth of their scripts (real tiny.en model).

Every sample call script is rendered by espeak-ng (synth.py), which records in the .json sidecar where each turn's
speech starts and ends; one of the calls has an interruption (overlap_s). The transcript's talk time per role,
non-talk time and interruptions must be within 0.5 s of what those turn spans give. No Kafka: FasterWhisperEngine
directly, all calls in one batch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from callstream.transcriber.analytics import union_seconds
from callstream.transcriber.engine import FasterWhisperEngine
from callstream.transcriber.settings import TranscriberSettings
from callstream.transcriber.synth import sample_scripts, sidecar_path, synthesize_call
from callstream.v1 import events_pb2

pytestmark = pytest.mark.integration

TOLERANCE_S = 0.5


def ground_truth(turns: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Talk and non-talk time and interruptions as the script rendered them: each turn's speech span is talk."""
    roles: dict[str, dict[str, float]] = {}
    for turn in turns:
        role = roles.setdefault(turn["speaker"], {"talk": 0.0, "interruptions": 0, "overlap": 0.0})
        role["talk"] += turn["speech_end"] - turn["speech_start"]
        if turn.get("overlap_s"):
            role["interruptions"] += 1
            role["overlap"] += turn["overlap_s"]
    talking = union_seconds((t["speech_start"], t["speech_end"]) for t in turns)
    return {"roles": roles, "non_talk": seconds - talking}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = tmp_path_factory.mktemp("calls")
    wavs = []
    for script in sample_scripts():
        wav = out / f"{script.stem}.wav"
        synthesize_call(script, wav)
        wavs.append(wav)
    return wavs


def test_talk_time_non_talk_time_and_interruptions_match_the_script(rendered: list[Path]) -> None:
    engine = FasterWhisperEngine(TranscriberSettings())
    calls = [
        events_pb2.CallRecorded(call_id=w.stem, audio_uri=str(w), channel_roles={0: "agent", 1: "customer"})
        for w in rendered
    ]
    results = engine.transcribe_batch(calls)
    report, problems = [], []
    interrupted = 0
    for wav, transcript in zip(rendered, results, strict=True):
        assert isinstance(transcript, events_pb2.Transcript), transcript
        meta = json.loads(sidecar_path(wav).read_text())
        truth = ground_truth(meta["turns"], meta["seconds"])
        analytics = transcript.analytics
        assert analytics.duration_seconds == pytest.approx(meta["seconds"], abs=0.01)
        got = {r.role: r for r in analytics.roles}
        assert set(got) == set(truth["roles"]) == {"agent", "customer"}
        line = [f"{wav.stem}: non-talk {analytics.non_talk_seconds:.2f} (truth {truth['non_talk']:.2f})"]
        if abs(analytics.non_talk_seconds - truth["non_talk"]) > TOLERANCE_S:
            problems.append(f"{wav.stem} non-talk")
        for role, expected in truth["roles"].items():
            r = got[role]
            line.append(
                f"{role} talk {r.talk_seconds:.2f} (truth {expected['talk']:.2f}), interruptions {r.interruptions} "
                f"(truth {expected['interruptions']:.0f}), overlap {r.overlap_seconds:.2f} "
                f"(truth {expected['overlap']:.2f}), {r.words_per_minute:.0f} wpm"
            )
            if abs(r.talk_seconds - expected["talk"]) > TOLERANCE_S:
                problems.append(f"{wav.stem} {role} talk")
            if r.interruptions != expected["interruptions"]:
                problems.append(f"{wav.stem} {role} interruptions")
            if abs(r.overlap_seconds - expected["overlap"]) > TOLERANCE_S:
                problems.append(f"{wav.stem} {role} overlap")
            assert 100 <= r.words_per_minute <= 260, r  # espeak-ng speaks at 165 wpm
            interrupted += r.interruptions
        report.append("; ".join(line))
    print("\n".join(report))
    assert not problems, (problems, report)
    assert interrupted >= 1, "no sample call has an interruption to check"
