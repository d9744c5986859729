"""Router settings: defaults, CALLSTREAM_HOME, CALLSTREAM_ROUTER_* overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from callstream.router.settings import RouterSettings, default_model_dir, default_rules_path, starter_data_path


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CALLSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("CALLSTREAM_HOME", str(tmp_path))
    s = RouterSettings()
    assert s.grpc_port == 50052
    assert s.model_dir == tmp_path / "models" / "starter-intents" == default_model_dir()
    assert s.rules_path == default_rules_path() and s.rules_path.is_file()
    assert starter_data_path().is_file()
    assert (s.top_k, s.verify_model) == (3, True)
    assert (s.batch.max_batch_size, s.batch.max_wait_ms) == (32, 5)


def test_home_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLSTREAM_HOME", raising=False)
    assert default_model_dir() == Path.home() / ".cache" / "callstream" / "models" / "starter-intents"


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CALLSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("CALLSTREAM_ROUTER_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("CALLSTREAM_ROUTER_TOP_K", "5")
    monkeypatch.setenv("CALLSTREAM_ROUTER_BATCH__MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CALLSTREAM_ROUTER_GRPC_PORT", "6000")
    s = RouterSettings()
    assert (s.model_dir, s.top_k, s.batch.max_batch_size, s.batch.max_wait_ms, s.grpc_port) == (
        tmp_path / "m",
        5,
        8,
        5,
        6000,
    )


def test_yaml_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "callstream.yaml"
    config.write_text("router:\n  top_k: 2\n  verify_model: false\n")
    monkeypatch.setenv("CALLSTREAM_CONFIG", str(config))
    s = RouterSettings()
    assert (s.top_k, s.verify_model) == (2, False)
