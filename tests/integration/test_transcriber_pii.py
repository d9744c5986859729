"""`callstream transcribe FILE --json` redacts a card number and a phone number read out in a call, by default.

The real command in a subprocess, with the real tiny.en model; the Kafka path (calls.recorded to
tickets.summarized) is checked in test_pipeline.py on its running stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.card_call import leaks, render

pytestmark = pytest.mark.integration


def test_the_leak_check_sees_every_form() -> None:
    assert leaks("card 4539 1488 0343 6467.") and leaks("4539-1488-0343-6467") and leaks("it's 453 91488 03436 467")
    assert leaks("four five three nine one four eight eight") and leaks("(415) 555-0123")
    assert leaks("four one five 555 oh 1") and leaks("it's 5' 3' 9' 1' 4' 8'")
    assert not leaks("#### #### #### ####, (###) ###-####, # # # #") and not leaks("sixty dollars, 3 to 5 days")
    assert not leaks("one thing, one more thing, one one")


def test_callstream_transcribe_json_redacts_by_default(tmp_path: Path) -> None:
    wav = render(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "CALLSTREAM_TRANSCRIBER_PII_REDACTION"}
    result = subprocess.run(
        [sys.executable, "-m", "callstream", "transcribe", str(wav), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    transcript = json.loads(result.stdout)
    assert transcript["pii_policy"] == "mask"
    # the customer's turns were recognized, and the numbers found in them (a card number with a digit misheard
    # fails the Luhn check and is redacted as an account number: tiny.en does that in some batch contexts)
    counts = transcript["redactions"]
    assert counts.get("card_number", 0) + counts.get("account_number", 0) == 1, transcript["text"]
    assert counts.get("phone") == 1, transcript["text"]
    texts = [transcript["text"]]
    for segment in transcript["segments"]:
        texts.append(segment["text"])
        texts.extend(word["text"] for word in segment["words"])
    leaked = [t for t in texts if leaks(t)]
    assert not leaked, leaked
    assert "#" in transcript["text"]
    assert {r["role"] for r in transcript["analytics"]["roles"]} == {"agent", "customer"}
