"""Summarizer settings (CALLSTREAM_SUMMARIZER_*): which engine to call over the TensorRT-LLM gRPC protocol."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from callstream.core.settings import ServiceSettings


def default_tokenizer() -> str:
    from callstream.llm_engine.settings import default_gguf_path

    return str(default_gguf_path())


class SummarizerSettings(ServiceSettings):
    section: ClassVar[str] = "summarizer"
    model_config = SettingsConfigDict(env_prefix="CALLSTREAM_SUMMARIZER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50053
    # The engine: `callstream serve llm-engine` (CPU) or `trtllm-serve MODEL --grpc` on a GPU node.
    engine_address: str = "127.0.0.1:50054"
    # The model's own tokenizer, client-side as the protocol expects: a .gguf file or a HF tokenizer directory.
    tokenizer: str = Field(default_factory=default_tokenizer)
    max_input_tokens: int = 1536
    max_output_tokens: int = 256
    temperature: float = 0.0
    # SmolLM2 loops under plain greedy decoding; None leaves the engine's default.
    repetition_penalty: float | None = 1.1
    retry_repetition_penalty: float = 1.15
    engine_timeout_s: float = 600.0
    # Requests in flight to the engine at once; the engine batches them continuously.
    max_concurrency: int = 16
    # How long Kafka records are retried while the engine is unavailable before they are dead-lettered.
    engine_retry_s: float = 600.0
