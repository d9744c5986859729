"""Prometheus metrics shared by every service (served on metrics_port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_CONSUMED = Counter(
    "callstream_events_consumed_total", "Kafka records taken from an input topic", ["service", "topic"]
)
EVENTS_PRODUCED = Counter(
    "callstream_events_produced_total", "Results acknowledged by the broker", ["service", "topic"]
)
EVENTS_DEAD_LETTERED = Counter(
    "callstream_events_dead_lettered_total", "Records sent to a dead-letter topic", ["service", "topic", "error_type"]
)
EVENT_SECONDS = Histogram(
    "callstream_event_processing_seconds",
    "Time from taking a record to its result",
    ["service"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RPC_SECONDS = Histogram("callstream_rpc_seconds", "gRPC handler time", ["service", "method", "code"])
BATCH_SIZE = Histogram(
    "callstream_batch_size", "Items per model batch", ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_SECONDS = Histogram("callstream_batch_seconds", "Model time per batch", ["batcher"])
BATCH_QUEUE_SECONDS = Histogram("callstream_batch_queue_seconds", "Time an item waited for its batch", ["batcher"])
BATCH_QUEUE_DEPTH = Gauge("callstream_batch_queue_depth", "Items waiting for a batch", ["batcher"])

# Live calls (transcriber/streaming.py); source is "grpc" or "kafka", kind "interim" or "final".
STREAMING_SESSIONS = Gauge("callstream_streaming_sessions", "Live calls open", ["source"])
STREAMING_RESULTS = Counter("callstream_streaming_results_total", "Live-call results sent", ["source", "kind"])
STREAMING_RESULT_SECONDS = Histogram(
    "callstream_streaming_result_latency_seconds",
    "From the arrival of the last audio a live-call result covers to the result being sent",
    ["source", "kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
STREAMING_INTERIMS_SKIPPED = Counter(
    "callstream_streaming_interims_skipped_total",
    "Interim results not started because the channel's previous interim was still running",
    ["source"],
)
STREAMING_CHUNKS_OUT_OF_ORDER = Counter(
    "callstream_streaming_chunks_out_of_order_total",
    "AudioChunks with a repeated (duplicate) or skipped (gap) sequence number",
    ["kind"],
)

# Cross-call batching (transcriber/engine.py): how much speech went through shared windows, and how many clips the
# decoder passed over there and had to decode again (a rising share means packing costs more than it saves).
TRANSCRIBER_WINDOWS = Counter(
    "callstream_transcriber_windows_total", "30 s windows run through the speech model", ["packed"]
)
TRANSCRIBER_CLIPS_REDECODED = Counter(
    "callstream_transcriber_clips_redecoded_total", "Speech clips of a shared window that were decoded again"
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
