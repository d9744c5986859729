"""Prometheus metrics of the LLM engine (callstream_llm_*), served with the others on metrics_port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

QUEUE_SECONDS = Histogram(
    "callstream_llm_queue_seconds",
    "Arrival to the request's first prefill step (waiting for a sequence slot, then for its turn to prefill)",
    buckets=_LATENCY_BUCKETS,
)
TTFT_SECONDS = Histogram(
    "callstream_llm_time_to_first_token_seconds", "Arrival to first output token", buckets=_LATENCY_BUCKETS
)
TPOT_SECONDS = Histogram(
    "callstream_llm_time_per_output_token_seconds",
    "Mean time between output tokens of a request (after the first)",
    buckets=_TOKEN_BUCKETS,
)
REQUEST_SECONDS = Histogram("callstream_llm_request_seconds", "Arrival to the last token", buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("callstream_llm_prompt_tokens_total", "Prompt tokens prefilled (computed)")
PROMPT_CACHED_TOKENS = Counter(
    "callstream_llm_prompt_cached_tokens_total", "Prompt tokens taken from a slot's prefix cache (not computed)"
)
GENERATION_TOKENS = Counter("callstream_llm_generation_tokens_total", "Output tokens generated")
REQUESTS_FINISHED = Counter(
    "callstream_llm_requests_finished_total", "Requests that ended, by finish reason", ["finish_reason"]
)
REQUESTS_REJECTED = Counter("callstream_llm_requests_rejected_total", "Requests refused before queueing", ["reason"])
ABORTED_REQUESTS = Counter(
    "callstream_llm_aborted_requests_total", "Requests aborted (Abort RPC, client cancellation or shutdown)"
)
ACTIVE_SEQUENCES = Gauge("callstream_llm_active_sequences", "Sequence slots in use (batch occupancy)")
QUEUED_REQUESTS = Gauge("callstream_llm_queued_requests", "Requests waiting for a sequence slot")
STEP_SECONDS = Histogram(
    "callstream_llm_step_seconds", "Time of one llama_decode step (all sequences)", buckets=_TOKEN_BUCKETS
)
STEP_TOKENS = Histogram(
    "callstream_llm_step_tokens",
    "Tokens in one llama_decode step (prompt chunks plus one per decoding sequence)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
DECODE_BATCH_SEQUENCES = Histogram(
    "callstream_llm_decode_batch_sequences",
    "Sequences in one decode step (batch occupancy as the model sees it)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256),
)
SEQUENCE_MOVES = Counter(
    "callstream_llm_sequence_moves_total",
    "Running sequences moved to a lower slot (KV stream copy) to keep the batch in one llama.cpp micro-batch",
)
