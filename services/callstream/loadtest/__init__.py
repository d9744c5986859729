"""Load tests: `callstream loadtest grpc|kafka|compare|report`.

- `grpc`: a load generator for any callstream service's gRPC API (transcriber, router, summarizer, llm-engine),
  closed-loop (N clients) or open-loop (a fixed rate, latency counted from each request's SCHEDULED send time,
  so a server that falls behind cannot hide its queueing: no coordinated omission).
- `kafka`: calls and tickets published at a fixed rate into a running stack; end-to-end latency from event time to
  each output topic, and the consumer lag of every service group while it runs.
- `compare`: two result files side by side, the ratio per metric, regressions over a threshold flagged.
- `report`: the self-contained HTML report (PNG charts inline) of one result file.

The result format (JSON) and usage: docs/loadtest.md.
"""

from __future__ import annotations

SCHEMA = "callstream-loadtest/1"
