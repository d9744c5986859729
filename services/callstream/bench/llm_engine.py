"""`callstream bench llm-engine`: continuous batching against one-request-at-a-time and fixed batches, over gRPC.

The engine runs in its own process (`callstream serve llm-engine`, core.stack.ServiceProcess) and this process is
the client, speaking trtllm.TrtllmService like the summarizer does. Two engine processes run from the same settings:

- "continuous": max_sequences slots; `concurrency` closed-loop clients (each sends its next request as soon as its
  previous one finished), so requests join and leave the running batch between decode steps;
- "sequential": the same engine with max_sequences=1, same `concurrency` clients: one request at a time, the others
  wait in the engine's queue (the queue-time metric shows it);
- "static": the continuous engine, fed in fixed groups of `concurrency` requests: a group starts together and the
  next group waits until the whole group finished (finished sequences free their slot early, which is kinder to
  static batching than a real fixed-shape batch);
- "static_padded": a real fixed-shape batch as HF generate or FasterTransformer run it: every
  request of a group generates as many tokens as the group's longest; only its own length counts as output.

Workload (fixed seed): summarizer-style prompts (the summarizer's system prompt and a sample ticket or call, made
up to a target length drawn from [prompt_min, prompt_max] tokens) and output lengths drawn from
[output_min, output_max], made exact with ignore_eos. Greedy decoding. Every run takes the requests in the same
order from the same list, so the outputs of continuous and static runs are compared with the sequential run's,
request by request. Before the runs every slot serves one short request, so all modes start with warm prefix caches.

Steady state (see run_mode): each run applies load for a fixed time. Continuous and sequential throughput counts
the output tokens streamed between the end of a warm-up (the first seconds are a burst of simultaneous arrivals)
and the end of the load; a finite run's drain is not counted. Static throughput is measured over whole groups.

Reported per run: output tokens/s, client-side time to first token p50/p95, the engine's queue time (arrival to
first prefill step, from GenerateComplete.perf_metrics) p50/p95, TTFT minus queue time, time per output token,
prompt tokens computed and reused from the prefix cache, the mean decode batch occupancy (Prometheus,
callstream_llm_decode_batch_sequences) and the share of time inside llama_decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import random
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from callstream.bench import bench_app, report

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
MODES = ("continuous", "static", "sequential", "static_padded")
WORKLOAD_SIZE = 512  # requests generated; a run cycles through them from the first
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# Tolerance for "the same request alone vs inside a batch" (greedy): identical first 16 tokens and at least 90% of
# all tokens identical (as tests/unit/test_llm_engine.py). The engine is built to be batch-invariant, so the
# expected result is stricter: identical token for token; the JSON reports both counts.
SAME_PREFIX = 16
MIN_AGREEMENT = 0.9


@dataclass(frozen=True)
class BenchRequest:
    index: int
    kind: str  # "call" | "ticket"
    prompt: list[int]
    output_tokens: int


@dataclass
class Outcome:
    index: int  # position in the run's sequence of requests (the workload, cycled)
    useful: int  # output tokens that count (its own length; static_padded generates more)
    tokens: list[int] = field(default_factory=list)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (client clock, useful tokens received)
    sent: float = 0.0  # client clock (perf_counter)
    first_token: float = 0.0
    done: float = 0.0
    queue_s: float = 0.0  # engine: first_scheduled - arrival
    engine_ttft_s: float = 0.0  # engine: first_token - arrival
    cached_tokens: int = 0
    finish_reason: str = ""


# ----- workload -----


def source_texts() -> list[tuple[str, str]]:
    """(kind, text): the shipped sample tickets and sample call scripts (agent/customer turns in order)."""
    from callstream.transcriber.synth import load_script, sample_scripts

    texts: list[tuple[str, str]] = []
    with (SAMPLES / "tickets" / "tickets.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            texts.append(("ticket", f"Subject: {row['subject']}\n{row['body']}"))
    for path in sample_scripts():
        script = load_script(path)
        texts.append(("call", "\n".join(f"{t.speaker.capitalize()}: {t.text}" for t in script.turns)))
    return texts


def make_workload(
    tokenizer: Any,
    n: int,
    seed: int = 1234,
    prompt_range: tuple[int, int] = (200, 400),
    output_range: tuple[int, int] = (32, 256),
) -> list[BenchRequest]:
    """n summarizer prompts of target lengths in prompt_range (the fixed part sets the floor) and output lengths.

    Like real traffic, prompts share the summarizer's system prompt and differ right after it: each text starts
    with its own reference line (otherwise the few sample texts would repeat at the start of many prompts, and the
    prefix cache would reuse more than it can on real tickets; static groups, which pick among many free slots,
    profited most from that).
    """
    from callstream.summarizer.summarize import Kind, system_prompt, user_message

    rng = random.Random(seed)
    texts = source_texts()
    requests: list[BenchRequest] = []
    for i in range(n):
        kind, _ = rng.choice(texts)
        same_kind = [t for k, t in texts if k == kind]
        rng.shuffle(same_kind)
        reference = f"{'Call' if kind == 'call' else 'Ticket'} {rng.randint(100000, 999999)}, {rng.choice(DAYS)}"
        body = reference + "\n" + "\n\n".join(same_kind)  # long enough to cut any target length from
        k: Kind = "call" if kind == "call" else "ticket"
        messages = [{"role": "system", "content": system_prompt(k)}, {"role": "user", "content": ""}]
        messages[1]["content"] = user_message("", k)
        overhead = len(tokenizer.encode_chat(messages))
        target = rng.randint(max(prompt_range[0], overhead + 16), max(prompt_range[1], overhead + 16))
        ids = tokenizer.encode(body)[: max(1, target - overhead)]
        messages[1]["content"] = user_message(tokenizer.decode(ids), k)
        prompt = tokenizer.encode_chat(messages)
        requests.append(BenchRequest(i, k, prompt, rng.randint(*output_range)))
    return requests


# ----- the engine processes -----


@dataclass
class Engine:
    name: str
    address: str
    metrics_url: str
    process: Any


@contextlib.contextmanager
def engine_process(
    name: str, max_sequences: int, ctx_per_seq: int, threads: int, extra_env: dict[str, str], log_dir: Path
) -> Iterator[Engine]:
    from callstream.core.broker import free_port
    from callstream.core.stack import ServiceProcess

    metrics_port = free_port()
    env = {
        "CALLSTREAM_LLM_ENGINE_MAX_SEQUENCES": str(max_sequences),
        "CALLSTREAM_LLM_ENGINE_N_CTX": str(ctx_per_seq * max_sequences),
        "CALLSTREAM_LLM_ENGINE_N_THREADS": str(threads),
        "CALLSTREAM_LLM_ENGINE_MAX_QUEUED_REQUESTS": "256",
        "CALLSTREAM_LLM_ENGINE_METRICS_PORT": str(metrics_port),
        "CALLSTREAM_LOG_LEVEL": "WARNING",
        **extra_env,
    }
    service = ServiceProcess("llm-engine", env, log_dir=log_dir)
    service.start()
    try:
        service.wait_ready(180)
        yield Engine(name, service.address, f"http://127.0.0.1:{metrics_port}/metrics", service)
    finally:
        service.stop()


def scrape(url: str) -> dict[str, float]:
    """The engine's Prometheus samples (name{labels} -> value)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback URL we built
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


# ----- the client -----


async def one_request(stub: Any, index: int, req: BenchRequest, max_tokens: int, tag: str) -> Outcome:
    from smg_grpc_proto import trtllm_service_pb2 as pb

    request = pb.GenerateRequest(
        request_id=f"{tag}-{index}",
        tokenized=pb.TokenizedInput(input_token_ids=req.prompt),
        sampling_config=pb.SamplingConfig(beam_width=1, num_return_sequences=1, temperature=0.0, top_k=1),
        output_config=pb.OutputConfig(return_perf_metrics=True),
        max_tokens=max_tokens,
        streaming=True,
        ignore_eos=True,
    )
    out = Outcome(index, useful=req.output_tokens, sent=time.perf_counter())
    received = 0
    async for response in stub.Generate(request, timeout=1800):
        now = time.perf_counter()
        if response.HasField("chunk") and response.chunk.token_ids:
            out.first_token = out.first_token or now
            n = min(len(response.chunk.token_ids), out.useful - received)
            if n > 0:
                out.chunks.append((now, n))
                received += n
        elif response.HasField("complete"):
            c = response.complete
            out.done = now
            out.tokens = list(c.output_token_ids)[: out.useful]
            out.finish_reason = c.finish_reason
            out.cached_tokens = c.cached_tokens
            perf = c.perf_metrics
            out.queue_s = max(0.0, perf.first_scheduled_time - perf.arrival_time)
            out.engine_ttft_s = max(0.0, perf.first_token_time - perf.arrival_time)
    out.first_token = out.first_token or out.done
    return out


@dataclass
class RunResult:
    mode: str
    outcomes: list[Outcome]  # in request order
    window: tuple[float, float]  # the client-clock span over which throughput is measured
    tokens_in_window: int
    started: float
    ended: float  # the last request done (in-flight requests finish after the measuring window)


async def run_mode(
    address: str,
    mode: str,
    workload: Sequence[BenchRequest],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    tag: str,
) -> RunResult:
    """Serve requests (the workload in order, cycled) in `mode` for duration_s, in steady state.

    continuous / sequential: `concurrency` closed-loop clients until duration_s; throughput counts the output
    tokens received between warmup_s (the start is a burst of simultaneous arrivals) and duration_s. Requests in
    flight at the end finish (for latency and the output check) but their later tokens are not counted.
    static / static_padded: groups of `concurrency` start together until duration_s; every group runs to its end
    and throughput is all tokens over the span of whole groups (each group's ramp-up and tail is what static
    batching costs).
    """
    import grpc
    from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

    n = len(workload)
    outcomes: list[Outcome] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TrtllmServiceStub(channel)
        started = time.perf_counter()
        deadline = started + duration_s
        counter = iter(range(1 << 30))

        async def one(i: int, padded_to: int | None = None) -> None:
            req = workload[i % n]
            outcomes.append(await one_request(stub, i, req, padded_to or req.output_tokens, tag))

        if mode in ("static", "static_padded"):
            while time.perf_counter() < deadline:
                group = [next(counter) for _ in range(concurrency)]
                longest = max(workload[i % n].output_tokens for i in group)
                await asyncio.gather(*(one(i, longest if mode == "static_padded" else None) for i in group))
            ended = time.perf_counter()
            window = (started, ended)
        else:

            async def client() -> None:
                while time.perf_counter() < deadline:
                    await one(next(counter))

            await asyncio.gather(*(client() for _ in range(concurrency)))
            ended = time.perf_counter()
            window = (started + warmup_s, deadline)
    outcomes.sort(key=lambda o: o.index)
    tokens = sum(k for o in outcomes for t, k in o.chunks if window[0] <= t <= window[1])
    return RunResult(mode, outcomes, window, tokens, started, ended)


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def agreement(reference: list[int], tokens: list[int]) -> tuple[bool, bool]:
    """(identical, within tolerance) for one request's greedy output against its one-at-a-time output."""
    if tokens == reference:
        return True, True
    n = max(len(reference), len(tokens), 1)
    same = sum(a == b for a, b in zip(reference, tokens, strict=False)) / n
    return False, tokens[:SAME_PREFIX] == reference[:SAME_PREFIX] and same >= MIN_AGREEMENT


def summarize_run(
    result: RunResult,
    concurrency: int,
    threads: int,
    metrics_before: dict[str, float],
    metrics_after: dict[str, float],
    load: tuple[float, float],
) -> dict[str, Any]:
    lo, hi = result.window
    span = hi - lo
    # Latency over the requests sent inside the window (static: all of them).
    sample = [o for o in result.outcomes if lo <= o.sent <= hi] or result.outcomes
    ttft = [o.first_token - o.sent for o in sample]
    queue = [o.queue_s for o in sample]
    service = [t - q for t, q in zip(ttft, queue, strict=True)]  # prefill and first step after the queue
    tpot = [(o.done - o.first_token) / (len(o.tokens) - 1) for o in sample if len(o.tokens) > 1]

    def delta(name: str) -> float:
        return metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0)

    steps = delta("callstream_llm_decode_batch_sequences_count")
    elapsed = result.ended - result.started
    return {
        "mode": result.mode,
        "concurrency": concurrency,
        "threads": threads,
        "requests": len(result.outcomes),
        "window_s": round(span, 2),
        "output_tokens_in_window": result.tokens_in_window,
        "output_tokens_per_second": round(result.tokens_in_window / span, 2) if span > 0 else None,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "queue_p50_s": pct(queue, 50),
        "queue_p95_s": pct(queue, 95),
        "ttft_minus_queue_p95_s": pct(service, 95),
        "engine_ttft_p95_s": pct([o.engine_ttft_s for o in sample], 95),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p95_s": pct(tpot, 95),
        # Engine counters over the whole run (window and the in-flight requests' ends).
        "mean_decode_batch": round(delta("callstream_llm_decode_batch_sequences_sum") / steps, 2) if steps else None,
        "prompt_tokens_computed": int(delta("callstream_llm_prompt_tokens_total")),
        "prompt_tokens_cached": int(delta("callstream_llm_prompt_cached_tokens_total")),
        # Share of the run spent inside llama_decode (the rest: sampling, Python, gRPC, idle).
        "engine_busy_fraction": round(delta("callstream_llm_step_seconds_sum") / elapsed, 3) if elapsed > 0 else None,
        "load_before": round(load[0], 2),
        "load_after": round(load[1], 2),
    }


def machine_load() -> dict[str, Any]:
    """Load averages and the busiest processes: what else ran on the machine."""
    info: dict[str, Any] = {"loadavg": list(os.getloadavg()), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        ps = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        )
        info["top_processes"] = [line[:160] for line in ps.stdout.splitlines()[1:9]]
    return info


async def _warm_up(address: str, requests: Sequence[BenchRequest]) -> None:
    """Every slot serves one short request first, so that every mode starts with warm prefix caches (an empty
    slot computes the whole shared system prompt once; without this the first mode measured would pay for it)."""
    import grpc
    from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TrtllmServiceStub(channel)
        await asyncio.gather(*(one_request(stub, i, r, 4, "warm") for i, r in enumerate(requests)))


def run_benchmark(
    concurrencies: Sequence[int],
    threads_list: Sequence[int],
    duration_s: float | None,
    warmup_s: float | None,
    seed: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    prefix_cache: bool,
    modes: Sequence[str],
    model: Path | None,
    n_batch: int,
    console: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from callstream.llm_engine.settings import default_gguf_path
    from callstream.summarizer.tokenizer import load_tokenizer

    model_path = Path(model or default_gguf_path())
    tokenizer = load_tokenizer(model_path)
    max_c = max(concurrencies)
    durations = {c: duration_s or float(max(45, 6 * c)) for c in concurrencies}
    warmups = {c: warmup_s if warmup_s is not None else min(10.0, durations[c] / 5) for c in concurrencies}
    workload = make_workload(tokenizer, WORKLOAD_SIZE, seed, prompt_range, output_range)
    ctx_per_seq = max(len(r.prompt) for r in workload) + max(output_range) + 64
    ctx_per_seq = 256 * ((ctx_per_seq + 255) // 256)
    extra = {
        "CALLSTREAM_LLM_ENGINE_MODEL_PATH": str(model_path),
        "CALLSTREAM_LLM_ENGINE_PREFIX_CACHE": "true" if prefix_cache else "false",
        "CALLSTREAM_LLM_ENGINE_N_BATCH": str(n_batch),
    }
    meta: dict[str, Any] = {
        "model": model_path.name,
        "seed": seed,
        "prompt_tokens": {
            "min": min(len(r.prompt) for r in workload),
            "max": max(len(r.prompt) for r in workload),
            "mean": round(float(np.mean([len(r.prompt) for r in workload])), 1),
        },
        "output_tokens_range": list(output_range),
        "duration_s": durations,
        "warmup_s": warmups,
        "engine": {"max_sequences": max_c, "ctx_per_sequence": ctx_per_seq, "n_batch": n_batch},
        "prefix_cache": prefix_cache,
        "sampling": "greedy (top_k=1), ignore_eos, streaming",
        "tolerance": f"identical first {SAME_PREFIX} tokens and >= {MIN_AGREEMENT:.0%} tokens identical "
        "to the sequential run's output of the same request",
        "load_at_start": machine_load(),
    }
    runs: list[dict[str, Any]] = []
    log_dir = Path(tempfile.mkdtemp(prefix="callstream-bench-llm-"))
    start_load = meta["load_at_start"]
    console.print(f"load average {start_load['loadavg']} on {start_load['cpus']} CPUs; busiest processes:")
    for line in start_load.get("top_processes", [])[:5]:
        console.print(f"  {line}")
    if start_load["loadavg"][0] > 0.5 * (start_load["cpus"] or 1):
        console.print("[yellow]the machine is not quiet: the numbers will be lower and noisier[/yellow]")
    console.print(f"workload: {meta['prompt_tokens']} prompt tokens, outputs {output_range}, engine logs in {log_dir}")
    for threads in threads_list:
        with (
            engine_process("continuous", max_c, ctx_per_seq, threads, extra, log_dir) as cont,
            engine_process("sequential", 1, ctx_per_seq, threads, extra, log_dir) as seq,
        ):
            asyncio.run(_warm_up(cont.address, (workload * max_c)[:max_c]))
            asyncio.run(_warm_up(seq.address, workload[:1]))
            for c in concurrencies:
                reference: dict[int, list[int]] = {}
                order = sorted((m for m in MODES if m in modes), key=lambda m: m != "sequential")
                for mode in order:
                    engine = seq if mode == "sequential" else cont
                    console.print(f"threads={threads} c={c:>2} {mode:<13} {durations[c]:.0f} s ...", end="\r")
                    before, load_before = scrape(engine.metrics_url), os.getloadavg()[0]
                    result = asyncio.run(
                        run_mode(engine.address, mode, workload, c, durations[c], warmups[c], f"{mode}-{c}-{threads}")
                    )
                    after, load_after = scrape(engine.metrics_url), os.getloadavg()[0]
                    run = summarize_run(result, c, threads, before, after, (load_before, load_after))
                    if mode == "sequential":
                        reference = {o.index: o.tokens for o in result.outcomes}
                    elif reference:
                        checks = [
                            agreement(reference[o.index], o.tokens) for o in result.outcomes if o.index in reference
                        ]
                        run["compared_to_sequential"] = len(checks)
                        run["identical_to_sequential"] = sum(1 for same, _ in checks if same)
                        run["within_tolerance"] = sum(1 for _, ok in checks if ok)
                    runs.append(run)
                    console.print(
                        f"threads={threads} c={c:>2} {mode:<13} {run['output_tokens_per_second']:>7.1f} tok/s  "
                        f"ttft p95 {run['ttft_p95_s']:.2f} s  queue p95 {run['queue_p95_s']:.2f} s  "
                        f"load {load_before:.1f}->{load_after:.1f}"
                    )
    meta["load_at_end"] = machine_load()
    meta["ratios"] = ratios(runs)
    return runs, meta


def ratios(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Continuous throughput over the other modes', per (threads, concurrency)."""
    out: list[dict[str, Any]] = []
    keys = sorted({(r["threads"], r["concurrency"]) for r in runs})
    for threads, c in keys:
        by_mode = {r["mode"]: r for r in runs if r["threads"] == threads and r["concurrency"] == c}
        cont = by_mode.get("continuous")
        if not cont or not cont["output_tokens_per_second"]:
            continue
        row: dict[str, Any] = {"threads": threads, "concurrency": c}
        for other in ("sequential", "static", "static_padded"):
            if other in by_mode and by_mode[other]["output_tokens_per_second"]:
                row[f"continuous_over_{other}"] = round(
                    cont["output_tokens_per_second"] / by_mode[other]["output_tokens_per_second"], 3
                )
        out.append(row)
    return out


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise typer.BadParameter("values must be >= 1")
    return values


@bench_app.command("llm-engine")
def bench_llm_engine(
    concurrency: Annotated[str, typer.Option(help="Concurrent gRPC streams, comma-separated.")] = "1,4,8,16",
    threads: Annotated[
        str, typer.Option(help="The engine's n_threads; a comma-separated list runs everything for each.")
    ] = "2",
    duration: Annotated[
        float | None, typer.Option(help="Seconds of load per run (default: max(45, 6 x concurrency)).")
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option(
            help="Seconds at the start of continuous/sequential runs not counted (default: duration/5, <= 10)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Workload seed (prompts and output lengths).")] = 1234,
    output_min: Annotated[int, typer.Option(help="Shortest output (tokens).")] = 32,
    output_max: Annotated[int, typer.Option(help="Longest output (tokens).")] = 256,
    prompt_min: Annotated[int, typer.Option(help="Shortest prompt (tokens; the system prompt sets a floor).")] = 200,
    prompt_max: Annotated[int, typer.Option(help="Longest prompt (tokens).")] = 400,
    prefix_cache: Annotated[bool, typer.Option(help="The engine's prefix cache (reuse of the system prompt).")] = True,
    modes: Annotated[
        str,
        typer.Option(
            help="Comma-separated: continuous, static, sequential (the reference for the output check), "
            "static_padded (fixed-shape batches: every request runs to its group's longest)."
        ),
    ] = ",".join(MODES),
    n_batch: Annotated[int, typer.Option(help="The engine's n_batch (largest prefill chunk).")] = 512,
    model: Annotated[Path | None, typer.Option(help="A GGUF file (default: SmolLM2-135M-Instruct Q4_1).")] = None,
    quick: Annotated[
        bool, typer.Option(help="A small smoke run: concurrency 1,4, 15 s per run, 16-48 tokens.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="JSON file (default bench/results/llm_engine.json).")] = None,
) -> None:
    """Output tokens/s and time to first token of the CPU engine at 1, 4, 8, 16 concurrent gRPC streams: continuous
    batching against one request at a time and against fixed batches, all in one run. Writes JSON, a table and a PNG.
    """
    from rich.console import Console

    console = Console()
    concurrencies = _ints(concurrency)
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list or set(mode_list) - set(MODES):
        raise typer.BadParameter(f"--modes takes {', '.join(MODES)}")
    threads_list = _ints(threads)
    if quick:
        concurrencies = [c for c in concurrencies if c <= 4] or [1]
        duration = duration or 15.0
        warmup = 3.0 if warmup is None else warmup
        output_min, output_max = 16, 48
    runs, meta = run_benchmark(
        concurrencies,
        threads_list,
        duration,
        warmup,
        seed,
        (prompt_min, prompt_max),
        (output_min, output_max),
        prefix_cache,
        mode_list,
        model,
        n_batch,
        console,
    )
    meta["command"] = "callstream bench llm-engine " + " ".join(
        f"--{k}={v}"
        for k, v in {
            "concurrency": ",".join(map(str, concurrencies)),
            "threads": ",".join(map(str, threads_list)),
            "seed": seed,
        }.items()
    )
    path = report.write_json("llm_engine", runs, meta, out)
    columns = [
        "threads",
        "concurrency",
        "mode",
        "output_tokens_per_second",
        "ttft_p50_s",
        "ttft_p95_s",
        "queue_p95_s",
        "ttft_minus_queue_p95_s",
        "tpot_p50_s",
        "mean_decode_batch",
        "compared_to_sequential",
        "identical_to_sequential",
    ]
    report.print_table("LLM engine: continuous batching vs sequential vs static", runs, columns, console)
    report.print_table(
        "continuous throughput over",
        meta["ratios"],
        [
            "threads",
            "concurrency",
            "continuous_over_sequential",
            "continuous_over_static",
            "continuous_over_static_padded",
        ],
        console,
    )
    plot_runs = [{**r, "series": f"{r['mode']} ({r['threads']} thr)"} for r in runs]
    png = report.plot_lines(
        path.with_suffix(".png"),
        plot_runs,
        x="concurrency",
        y="output_tokens_per_second",
        series="series",
        title=f"CPU engine ({meta['model']}): output tokens/s",
        xlabel="concurrent gRPC streams",
        ylabel="output tokens/s",
        logx=True,
    )
    png_ttft = report.plot_lines(
        path.with_name(path.stem + "_ttft.png"),
        plot_runs,
        x="concurrency",
        y="ttft_p95_s",
        series="series",
        title="p95 time to first token",
        xlabel="concurrent gRPC streams",
        ylabel="seconds",
        logx=True,
    )
    console.print(f"JSON: {path}\nPNG: {png}, {png_ttft}")


def markdown_table(data: dict[str, Any]) -> str:
    """The results of one run (the JSON this benchmark writes) as markdown, for docs/benchmarks.md."""
    meta = data.get("meta", {})
    runs = data.get("runs", [])

    def f(value: Any, digits: int = 2) -> str:
        return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = [
        f"`{meta.get('command', 'callstream bench llm-engine')}` — {data.get('machine', {}).get('time', '')}, "
        f"model {meta.get('model', '')}, prompts {meta.get('prompt_tokens', {})} tokens, outputs "
        f"{meta.get('output_tokens_range', '')} tokens, load average at start "
        f"{[round(x, 2) for x in meta.get('load_at_start', {}).get('loadavg', [])]}",
        "",
        "| threads | streams | mode | output tok/s | TTFT p50 (s) | TTFT p95 (s) | queue p95 (s) "
        "| TTFT − queue p95 (s) | TPOT p50 (s) | mean decode batch | identical to sequential | load (start → end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        same = f"{r['identical_to_sequential']}/{r['compared_to_sequential']}" if "compared_to_sequential" in r else ""
        lines.append(
            f"| {r['threads']} | {r['concurrency']} | {r['mode']} | {f(r['output_tokens_per_second'], 1)} "
            f"| {f(r['ttft_p50_s'])} | {f(r['ttft_p95_s'])} | {f(r['queue_p95_s'])} | {f(r['ttft_minus_queue_p95_s'])} "
            f"| {f(r['tpot_p50_s'], 3)} | {f(r['mean_decode_batch'], 1)} | {same} "
            f"| {f(r['load_before'])} → {f(r['load_after'])} |"
        )
    ratio_rows = meta.get("ratios", [])
    if ratio_rows:
        lines += [
            "",
            "| threads | streams | continuous / sequential | continuous / static | continuous / static_padded |",
            "|---|---|---|---|---|",
        ]
        for r in ratio_rows:
            lines.append(
                f"| {r['threads']} | {r['concurrency']} | {f(r.get('continuous_over_sequential'))} "
                f"| {f(r.get('continuous_over_static'))} | {f(r.get('continuous_over_static_padded'))} |"
            )
    return "\n".join(lines)
