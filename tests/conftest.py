"""Shared test helpers: where the shared data lives, and the reduced/full switch for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CALLSTREAM_SHARED_DATA", ROOT.parent / "shared" / "data"))
FULL = os.environ.get("CALLSTREAM_FULL_TESTS") == "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set CALLSTREAM_SHARED_DATA)")
    return path


def normalize_text(text: str) -> str:
    """Lower case, letters/digits/apostrophes only: how WER is compared against references."""
    import re

    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return float(jiwer.wer(normalize_text(reference), normalize_text(hypothesis)))
