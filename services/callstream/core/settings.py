"""Typed settings shared by every service: environment variables plus an optional YAML file.

Each service subclasses ServiceSettings with its own prefix (CALLSTREAM_ROUTER_..., and so on). Values come,
highest priority first, from: keyword arguments, environment variables, the YAML file named by
CALLSTREAM_CONFIG (its section named after the service), then defaults. docs/configuration.md lists them all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from callstream.core.errors import ConfigError


def callstream_home() -> Path:
    """Base folder for models and caches: $CALLSTREAM_HOME, else ~/.cache/callstream."""
    return Path(os.environ.get("CALLSTREAM_HOME") or "~/.cache/callstream").expanduser()


class KafkaSettings(BaseModel):
    """How a service reaches Kafka. Shared by every service through the KAFKA_* variables."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id_prefix: str = "callstream"
    # Idempotent producer: on for real Kafka and noida-db; Tansu does not support it.
    enable_idempotence: bool = True
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    # Records fetched per poll; they are processed concurrently, so this bounds in-flight work.
    max_poll_records: int = 64
    request_timeout_ms: int = 30_000
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None


class TopicSettings(BaseModel):
    """Topic names. Dead letters go to '<input topic>.dlq'."""

    calls_recorded: str = "calls.recorded"
    calls_transcribed: str = "calls.transcribed"
    tickets_created: str = "tickets.created"
    tickets_routed: str = "tickets.routed"
    tickets_summarized: str = "tickets.summarized"
    # Live calls (docs/streaming.md): audio chunks in, interim and final results out.
    calls_audio_chunks: str = "calls.audio.chunks"
    calls_transcribed_partial: str = "calls.transcribed.partial"
    dlq_suffix: str = ".dlq"

    def dlq(self, topic: str) -> str:
        return f"{topic}{self.dlq_suffix}"

    def all_topics(self) -> list[str]:
        base = [
            self.calls_recorded,
            self.calls_transcribed,
            self.tickets_created,
            self.tickets_routed,
            self.tickets_summarized,
            self.calls_audio_chunks,
            self.calls_transcribed_partial,
        ]
        return base + [
            self.dlq(t)
            for t in (
                self.calls_recorded,
                self.calls_transcribed,
                self.tickets_created,
                self.tickets_routed,
                self.calls_audio_chunks,
            )
        ]


class BatchSettings(BaseModel):
    """The dynamic batcher in front of a model: shared by the gRPC and the Kafka path."""

    max_batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=10.0, ge=0)
    # Stop collecting early once no new item has come for this long (null: wait the whole max_wait_ms). With a
    # long max_wait_ms, a burst of requests that trickles in is gathered into one batch while a lone request
    # waits only this long.
    max_idle_ms: float | None = Field(default=None, ge=0)


class _YamlSection(PydanticBaseSettingsSource):
    """Reads the service's section of the YAML file named by CALLSTREAM_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        path = os.environ.get("CALLSTREAM_CONFIG")
        if not path:
            return
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read CALLSTREAM_CONFIG={path}: {exc}") from exc
        shared = {k: v for k, v in loaded.items() if k in ("kafka", "topics")}
        self._data = {**shared, **(loaded.get(section) or {})}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class ServiceSettings(BaseSettings):
    """Base for each service's settings: gRPC port, metrics port, Kafka, topics."""

    section: ClassVar[str] = "service"

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore")

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # Prometheus metrics on http://host:metrics_port/metrics; 0 disables the endpoint.
    metrics_port: int = 0
    # Seconds that in-flight RPCs get to finish on SIGTERM.
    shutdown_grace_s: float = 10.0
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    # Consume from Kafka. Off: a gRPC-only server (for load tests of the model alone).
    consume: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _KafkaEnv(settings_cls), _YamlSection(settings_cls, cls.section))


class _KafkaEnv(PydanticBaseSettingsSource):
    """The conventional KAFKA_BOOTSTRAP_SERVERS (and KAFKA_ENABLE_IDEMPOTENCE) for every service at once."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        kafka: dict[str, Any] = {}
        for name in KafkaSettings.model_fields:
            value = os.environ.get(f"KAFKA_{name.upper()}")
            if value is not None:
                kafka[name] = value
        return {"kafka": kafka} if kafka else {}
