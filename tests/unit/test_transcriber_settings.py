"""Transcriber settings: defaults, the CALLSTREAM_TRANSCRIBER_ prefix, nested batch settings, YAML section."""

from __future__ import annotations

from pathlib import Path

import pytest

from callstream.transcriber.settings import TranscriberSettings, default_model_path


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLSTREAM_CONFIG", raising=False)
    s = TranscriberSettings()
    assert s.section == "transcriber"
    assert s.grpc_port == 50051
    assert s.model_path == default_model_path() and (s.model_path / "model.bin").is_file()
    assert (s.device, s.compute_type, s.cpu_threads) == ("cpu", "int8", 1)
    assert s.vad_filter is True and s.beam_size >= 1
    assert (s.batch.max_batch_size, s.batch.max_wait_ms, s.batch.max_idle_ms) == (16, 50, 5)
    assert s.model_workers == 2
    assert s.pack_calls is True and s.pack_gap_s == 1.0
    assert s.default_roles == {0: "agent", 1: "customer"}
    assert s.max_audio_seconds == 3600 and s.max_audio_bytes == 200 * 1024 * 1024


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CALLSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("CALLSTREAM_TRANSCRIBER_DEVICE", "cuda")
    monkeypatch.setenv("CALLSTREAM_TRANSCRIBER_COMPUTE_TYPE", "float16")
    monkeypatch.setenv("CALLSTREAM_TRANSCRIBER_MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("CALLSTREAM_TRANSCRIBER_BATCH__MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("CALLSTREAM_TRANSCRIBER_DEFAULT_ROLES", '{"0": "customer", "1": "agent"}')
    s = TranscriberSettings()
    assert (s.device, s.compute_type, s.model_path) == ("cuda", "float16", tmp_path)
    assert s.batch.max_batch_size == 32 and s.batch.max_wait_ms == 50  # the other fields keep their defaults
    assert s.default_roles == {0: "customer", 1: "agent"}


def test_yaml_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "callstream.yaml"
    config.write_text("transcriber:\n  beam_size: 2\n  grpc_port: 6000\nrouter:\n  grpc_port: 7000\n")
    monkeypatch.setenv("CALLSTREAM_CONFIG", str(config))
    s = TranscriberSettings()
    assert (s.beam_size, s.grpc_port) == (2, 6000)
