from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic_settings import SettingsConfigDict

from callstream.core.errors import ConfigError
from callstream.core.settings import ServiceSettings


class DemoSettings(ServiceSettings):
    section: ClassVar[str] = "demo_service"
    model_config = SettingsConfigDict(env_prefix="CALLSTREAM_DEMO_", env_nested_delimiter="__", extra="ignore")
    grpc_port: int = 1234
    threshold: float = 0.5


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLSTREAM_CONFIG", raising=False)
    s = DemoSettings()
    assert s.grpc_port == 1234 and s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.topics.dlq("calls.recorded") == "calls.recorded.dlq"


def test_file_then_shared_kafka_env_then_service_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "callstream.yaml"
    config.write_text(
        "kafka:\n  bootstrap_servers: file:9092\n  max_poll_records: 5\n"
        "demo_service:\n  grpc_port: 2000\n  threshold: 0.7\n"
    )
    monkeypatch.setenv("CALLSTREAM_CONFIG", str(config))
    s = DemoSettings()
    assert (s.grpc_port, s.threshold, s.kafka.bootstrap_servers) == (2000, 0.7, "file:9092")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("CALLSTREAM_DEMO_GRPC_PORT", "3000")
    s = DemoSettings()
    assert (s.grpc_port, s.kafka.bootstrap_servers, s.kafka.max_poll_records) == (3000, "env:9092", 5)
    monkeypatch.setenv("CALLSTREAM_DEMO_KAFKA__BOOTSTRAP_SERVERS", "service:9092")
    assert DemoSettings().kafka.bootstrap_servers == "service:9092"


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSTREAM_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml"):
        DemoSettings()
