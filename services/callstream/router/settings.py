"""Router settings: CALLSTREAM_ROUTER_* environment variables, the `router:` section of CALLSTREAM_CONFIG, defaults."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from callstream.core.settings import BatchSettings, ServiceSettings, callstream_home

STARTER_MODEL_NAME = "starter-intents"
_SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def default_model_dir() -> Path:
    """Where the starter intent classifier lives (trained on first use by `ensure_default_classifier`)."""
    return callstream_home() / "models" / STARTER_MODEL_NAME


def default_rules_path() -> Path:
    """The routing rules shipped with the package (samples/routing_rules.yaml)."""
    return _SAMPLES / "routing_rules.yaml"


def starter_data_path() -> Path:
    """The starter intent examples shipped with the package (samples/intents/starter.csv)."""
    return _SAMPLES / "intents" / "starter.csv"


class RouterBatchSettings(BatchSettings):
    """The router's batcher: small texts, so bigger batches and a shorter wait than the shared defaults."""

    max_batch_size: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)


class RouterSettings(ServiceSettings):
    section: ClassVar[str] = "router"

    model_config = SettingsConfigDict(env_prefix="CALLSTREAM_ROUTER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50052
    # A classifier artifact directory (manifest.json + SetFit model), as written by `callstream classifier train`,
    # or a model registry (versions/<version>/ + a `current` pointer; `callstream classifier publish`).
    model_dir: Path = Field(default_factory=default_model_dir)
    # Where the sentence-transformer body runs: torch, or ONNX Runtime on the artifact's onnx/ files.
    backend: Literal["torch", "onnx", "onnx-int8"] = "torch"
    # Seconds between checks of model_dir for a new version (registry pointer or manifest); 0 = never reload.
    reload_interval_s: float = Field(default=0.0, ge=0)
    rules_path: Path = Field(default_factory=default_rules_path)
    # Intent labels returned per text when a request does not say.
    top_k: int = Field(default=3, ge=1)
    # A subclass so that overriding one field (CALLSTREAM_ROUTER_BATCH__MAX_BATCH_SIZE) keeps the other's default.
    batch: RouterBatchSettings = RouterBatchSettings()
    # Check every model file's sha256 against manifest.json before loading (the head is a pickle).
    verify_model: bool = True
