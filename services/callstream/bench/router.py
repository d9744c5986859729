"""`callstream bench router`: the router's classifier through gRPC Classify and bare in-process, per back end.

For each back end (torch, onnx, onnx-int8) and batch size (1, 32, 256), in the same run:
- "bare": IntentClassifier.predict on batches of N texts in this process (what SetFit predict costs);
- "grpc": Classify requests of N texts each to a `callstream serve router` child process on the same model and
  back end (consume off, the batcher's max batch set to N; for single texts to the largest N, so that the requests
  in flight are batched), `--concurrency` requests in flight;
- latency: single-text Classify requests sent open-loop at `--rate` texts/s, p50/p95/p99;
- accuracy of each back end on `--eval-data` (when given), so that speed is compared at known accuracy.

- "kafka" (unless --no-kafka): tickets published to tickets.created and read back from tickets.routed through a
  consuming `callstream serve router` on a local noida-db broker (or KAFKA_BOOTSTRAP_SERVERS), its poll size and
  batcher size set to N; texts/s from the first publish to the last routed ticket, commits included.

Output: a table, bench/results/router.json ({"runs": [{"path", "backend", "batch", "texts_per_second"}],
"latency": [...], "accuracy": {...}}) and router.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from callstream.bench import bench_app
from callstream.bench.report import plot_lines, print_table, results_dir, write_json


def _texts(data: Path, n: int) -> list[str]:
    from callstream.router.classifier import read_examples

    texts = [e.text for e in read_examples(data)]
    return (texts * (n // max(len(texts), 1) + 1))[:n]


def _bare(model: Path, backend: str, batch: int, texts: list[str], seconds: float) -> float:
    from callstream.router.classifier import load_classifier

    classifier = load_classifier(model, batch_size=batch, backend=backend)
    classifier.predict(texts[:batch], top_k=3)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        chunk = texts[(done % len(texts)) :][:batch] or texts[:batch]
        classifier.predict(chunk, top_k=3)
        done += len(chunk)
    return done / (time.perf_counter() - started)


async def _grpc_throughput(address: str, texts: list[str], batch: int, concurrency: int, seconds: float) -> float:
    import grpc

    from callstream.v1 import router_pb2, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        await stub.Classify(router_pb2.ClassifyRequest(texts=texts[:batch], top_k=3))  # warm-up
        done = 0
        started = time.perf_counter()
        stop_at = started + seconds

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < stop_at:
                chunk = texts[(i * batch) % len(texts) :][:batch] or texts[:batch]
                await stub.Classify(router_pb2.ClassifyRequest(texts=chunk, top_k=3))
                done += len(chunk)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.perf_counter() - started)


async def _grpc_latency(address: str, texts: list[str], rate: float, seconds: float) -> dict[str, float]:
    import grpc

    from callstream.v1 import router_pb2, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        await stub.Classify(router_pb2.ClassifyRequest(texts=texts[:1], top_k=3))
        latencies: list[float] = []

        async def one(text: str) -> None:
            t0 = time.perf_counter()
            await stub.Classify(router_pb2.ClassifyRequest(texts=[text], top_k=3))
            latencies.append(time.perf_counter() - t0)

        tasks = []
        n = max(1, int(rate * seconds))
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(texts[i % len(texts)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "rate": rate,
        "achieved_rate": round(n / elapsed, 1),
        "requests": n,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


async def _kafka_throughput(bootstrap: str, idempotent: bool, texts: list[str], n: int, run_id: str) -> float:
    """Publish n tickets to tickets.created and wait for their n RoutedTickets on tickets.routed: texts/s from the
    first publish to the last routed ticket (the router commits each poll only after its results are acked)."""
    from aiokafka import AIOKafkaConsumer

    from callstream.core import codec
    from callstream.core.kafka import connection_kwargs, make_producer
    from callstream.core.settings import KafkaSettings, TopicSettings
    from callstream.v1 import events_pb2

    kafka = KafkaSettings(bootstrap_servers=bootstrap, enable_idempotence=idempotent)
    topics = TopicSettings()
    consumer = AIOKafkaConsumer(
        topics.tickets_routed, topics.dlq(topics.tickets_created),
        group_id=f"bench-router-{run_id}", auto_offset_reset="latest", enable_auto_commit=False,
        **connection_kwargs(kafka),
    )  # fmt: skip
    await consumer.start()
    producer = make_producer(kafka, f"bench-router-{run_id}")
    await producer.start()
    try:
        while not consumer.assignment():  # joined: "latest" is now fixed, before anything is published
            await consumer.getmany(timeout_ms=200)
        for tp in consumer.assignment():
            await consumer.position(tp)
        started = time.perf_counter()
        acks = []
        for i in range(n):
            ticket = events_pb2.TicketCreated(
                ticket_id=f"{run_id}-{i}", source_channel="email", body=texts[i % len(texts)]
            )
            acks.append(
                await producer.send(
                    topics.tickets_created, codec.encode(ticket), key=ticket.ticket_id.encode(),
                    headers=codec.headers_for(ticket),
                )
            )  # fmt: skip
        await asyncio.gather(*acks)
        seen: set[str] = set()
        last = started
        deadline = time.monotonic() + 300
        while len(seen) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    key = (record.key or b"").decode()
                    if key.startswith(f"{run_id}-"):
                        seen.add(key)
                        last = time.perf_counter()
        if len(seen) < n:
            raise RuntimeError(f"only {len(seen)} of {n} tickets came out of the router within 300 s")
        return n / (last - started)
    finally:
        await producer.stop()
        await consumer.stop()


@dataclass
class _KafkaTarget:
    bootstrap_servers: str
    supports_idempotence: bool
    broker: Any = None  # the local broker this benchmark started, if any

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()


def _start_broker() -> _KafkaTarget:
    """KAFKA_BOOTSTRAP_SERVERS when set, else a local noida-db broker; topics created."""
    from callstream.core.broker import LocalBroker
    from callstream.core.kafka import ensure_topics
    from callstream.core.settings import KafkaSettings, TopicSettings

    if external := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        target = _KafkaTarget(external, os.environ.get("KAFKA_ENABLE_IDEMPOTENCE", "true") != "false")
    else:
        broker = LocalBroker("noida").start()
        target = _KafkaTarget(broker.bootstrap_servers, broker.supports_idempotence, broker)
    settings = KafkaSettings(bootstrap_servers=target.bootstrap_servers, enable_idempotence=target.supports_idempotence)
    asyncio.run(ensure_topics(settings, TopicSettings().all_topics()))
    return target


def _kafka_runs(
    broker: _KafkaTarget, model: Path, backend: str, sizes: list[int], texts: list[str], n_texts: int
) -> list[dict[str, Any]]:
    """texts/s through Kafka at each batch size: the router's poll size and batcher size set to the batch."""
    import uuid

    from callstream.core.stack import ServiceProcess, stack_env

    runs: list[dict[str, Any]] = []
    for batch in sizes:
        env = stack_env(broker.bootstrap_servers, broker.supports_idempotence, {
            "CALLSTREAM_ROUTER_MODEL_DIR": str(model),
            "CALLSTREAM_ROUTER_BACKEND": backend,
            "CALLSTREAM_ROUTER_BATCH__MAX_BATCH_SIZE": str(batch),
            "KAFKA_MAX_POLL_RECORDS": str(batch),
            "KAFKA_CLIENT_ID_PREFIX": f"bench-{uuid.uuid4().hex[:6]}",  # a fresh group: starts at the end
        })  # fmt: skip
        server = ServiceProcess("router", env).start()
        try:
            server.wait_ready(300)
            n = max(32, n_texts // 10) if batch == 1 else n_texts
            asyncio.run(_kafka_throughput(broker.bootstrap_servers, broker.supports_idempotence, texts, 16,
                                          uuid.uuid4().hex[:8]))  # warm-up (and the group has joined)  # fmt: skip
            tps = asyncio.run(
                _kafka_throughput(broker.bootstrap_servers, broker.supports_idempotence, texts, n, uuid.uuid4().hex[:8])
            )
        finally:
            server.stop()
        runs.append({"path": "kafka", "backend": backend, "batch": batch, "texts_per_second": round(tps, 1)})
    return runs


def _accuracy(model: Path, backend: str, data: Path) -> float:
    from callstream.router.classifier import evaluate, load_classifier

    metrics = evaluate(load_classifier(model, batch_size=64, backend=backend), data)
    return float(metrics.get("accuracy", metrics.get("micro_f1", 0.0)))


@bench_app.command("router")
def bench_router(
    model: Annotated[
        Path | None, typer.Option("--model", help="Classifier artifact with onnx/ files (default: the starter).")
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="CSV whose texts are sent (default: starter).")] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Labelled CSV: accuracy of each back end.")
    ] = None,
    backends: Annotated[str, typer.Option("--backends")] = "torch,onnx,onnx-int8",
    batches: Annotated[str, typer.Option("--batches")] = "1,32,256",
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds per throughput measurement.")] = 4.0,
    concurrency: Annotated[int, typer.Option("--concurrency", help="gRPC requests in flight (batch 1: x32).")] = 2,
    rate: Annotated[float, typer.Option("--rate", help="Texts/s for the latency run (0 = skip).")] = 20.0,
    latency_seconds: Annotated[float, typer.Option("--latency-seconds")] = 5.0,
    kafka: Annotated[
        bool, typer.Option(help="Also measure the Kafka path (a local noida-db broker, or KAFKA_BOOTSTRAP_SERVERS).")
    ] = True,
    kafka_texts: Annotated[
        int, typer.Option(help="Tickets published per Kafka measurement (batch 1: a tenth).")
    ] = 1024,
    out: Annotated[Path | None, typer.Option("--out", help="JSON path (default bench/results/router.json).")] = None,
) -> None:
    """Texts/s of the router's classifier: gRPC Classify vs bare predict, torch vs ONNX vs ONNX int8."""
    from callstream.core.stack import ServiceProcess
    from callstream.router.classifier import read_manifest
    from callstream.router.cli import ensure_default_classifier
    from callstream.router.onnx_backend import ONNX_FP32
    from callstream.router.registry import resolve_model_dir
    from callstream.router.settings import starter_data_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = resolve_model_dir(model or ensure_default_classifier())
    manifest = read_manifest(model)
    if ONNX_FP32 not in manifest.files and backends != "torch":
        from callstream.router.classifier import add_onnx_to_artifact

        typer.echo(f"exporting {model} to ONNX first", err=True)
        manifest = add_onnx_to_artifact(model)
    sizes = [int(b) for b in batches.split(",")]
    texts = _texts(data or starter_data_path(), 2048)
    runs: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    accuracy: dict[str, float] = {}
    kafka_broker = _start_broker() if kafka else None
    try:
        for backend in [b.strip() for b in backends.split(",") if b.strip()]:
            if eval_data is not None:
                accuracy[backend] = round(_accuracy(model, backend, eval_data), 4)
            for batch in sizes:
                # A server whose batcher makes model batches of `batch` texts (single texts: merged up to the
                # largest size), so that two requests in flight are not merged into one bigger, more padded batch.
                server = ServiceProcess(
                    "router",
                    {
                        "CALLSTREAM_ROUTER_MODEL_DIR": str(model),
                        "CALLSTREAM_ROUTER_BACKEND": backend,
                        "CALLSTREAM_ROUTER_CONSUME": "false",
                        "CALLSTREAM_ROUTER_BATCH__MAX_BATCH_SIZE": str(batch if batch > 1 else max(sizes)),
                    },
                ).start()
                try:
                    server.wait_ready(300)
                    # Bare first, while the (idle) server waits; then gRPC, while this process only sends.
                    bare = _bare(model, backend, batch, texts, seconds)
                    flight = concurrency * (32 if batch == 1 else 1)
                    grpc_tps = asyncio.run(_grpc_throughput(server.address, texts, batch, flight, seconds))
                    for path, tps in (("bare", bare), ("grpc", grpc_tps)):
                        runs.append(
                            {"path": path, "backend": backend, "batch": batch, "texts_per_second": round(tps, 1)}
                        )
                    runs[-1]["grpc_over_bare"] = round(grpc_tps / bare, 3)
                    if rate > 0 and batch == sizes[0]:
                        latency.append(
                            {
                                "backend": backend,
                                **asyncio.run(_grpc_latency(server.address, texts, rate, latency_seconds)),
                            }
                        )
                finally:
                    server.stop()
            if kafka_broker is not None:
                # After the gRPC server stopped: a consuming router of its own on the local broker.
                runs += _kafka_runs(kafka_broker, model, backend, sizes, texts, kafka_texts)
    finally:
        if kafka_broker is not None:
            kafka_broker.stop()
    torch_by = {(r["path"], r["batch"]): r["texts_per_second"] for r in runs if r["backend"] == "torch"}
    for r in runs:
        base = torch_by.get((r["path"], r["batch"]))
        if base and r["backend"] != "torch":
            r["speedup_vs_torch"] = round(r["texts_per_second"] / base, 2)
    meta = {
        "model": manifest.version,
        "model_dir": str(model),
        "texts": str(data or starter_data_path()),
        "seconds": seconds,
        "concurrency": concurrency,
        "load_average_at_end": os.getloadavg(),
        "kafka": kafka,
    }
    json_path = write_json("router", runs, {**meta, "accuracy": accuracy}, out)
    payload = json.loads(json_path.read_text())
    payload["latency"] = latency
    payload["accuracy"] = accuracy
    json_path.write_text(json.dumps(payload, indent=2))
    print_table(
        "router: texts/s",
        runs,
        ["path", "backend", "batch", "texts_per_second", "grpc_over_bare", "speedup_vs_torch"],
    )
    if latency:
        print_table(f"router: latency at {rate:g} texts/s", latency, list(latency[0]))
    if accuracy:
        typer.echo("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    series = [{**r, "series": f"{r['path']} {r['backend']}"} for r in runs]
    png = plot_lines(
        (out or results_dir() / "router.json").with_suffix(".png"),
        series,
        x="batch",
        y="texts_per_second",
        series="series",
        title=f"router classifier texts/s ({manifest.version})",
        logx=True,
    )
    typer.echo(f"wrote {json_path} and {png}")
