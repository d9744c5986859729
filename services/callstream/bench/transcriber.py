"""`callstream bench transcriber`: the transcriber service against bare faster-whisper, on the same short calls.

The workload is a fixed set of SHORT calls (a contact center's many 5-15 s calls and call fragments), all with
reference text:
- real speech: the clips in ../shared/data/audio with a reference in references.json (jfk.flac as mono; the
  two-speaker stereo_diarization.wav per channel);
- generated support calls: the sample call scripts rendered by espeak-ng (two channels), cut between turns into
  calls of at most `--max-call-seconds`, each with the reference text of its turns: mono mixes of both parties
  (`--channels mono`, the default) or stereo with one party per channel (`--channels stereo`).

In one run, on one machine:
- "bare": faster-whisper's own BatchedInferencePipeline.transcribe on each call's WAV bytes (the bytes the service
  gets) in this process, one call at a time (each channel of a stereo call separately, as faster-whisper users
  do), with the service's settings: model, compute type, threads, beam size, VAD, word timestamps, batch size.
  Its rounds alternate with the service's rounds at one call in flight, so that a drift of the machine's speed
  during the run hits both alike; `--bare-threads` adds the library given more threads;
- "service": Transcribe RPCs to a `callstream serve transcriber` child process (Kafka off, PII redaction off so that
  WER compares words), `concurrency` calls in flight, for each value of --concurrency;
- "service-unpacked": the same at the highest concurrency with pack_calls=false (one channel per 30 s window, as
  faster-whisper chunks one file), to show what packing the speech of many calls into shared windows buys.

Every run transcribes the whole workload `--rounds` times. Reported per run: audio seconds per second (and its
inverse, the real-time factor), calls per minute, p50/p95 call latency, WER on the real and on the generated calls,
and the peak resident memory of the process that ran the model. Output: a table, bench/results/transcriber.json
({"runs": [{"mode", "concurrency", "audio_seconds_per_second", "wer", ...}], "ratios": {...}}) and
transcriber.png (throughput against concurrency).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import resource
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from callstream.bench import bench_app
from callstream.bench.report import plot_lines, print_table, results_dir, write_json
from callstream.v1 import events_pb2

SAMPLE_RATE = 16000


@dataclass
class BenchCall:
    name: str
    source: str  # "real" | "generated"
    channels: list[np.ndarray]  # float32 at 16 kHz, one array per channel
    references: dict[int, str]  # channel -> reference text

    @property
    def seconds(self) -> float:
        return self.channels[0].size / SAMPLE_RATE

    def wav_bytes(self) -> bytes:
        pcm = np.stack(self.channels, axis=1) if len(self.channels) > 1 else self.channels[0][:, None]
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(pcm.shape[1])
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            wav.writeframes((np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes())
        return buffer.getvalue()


def shared_data_dir() -> Path:
    """CALLSTREAM_SHARED_DATA, else ../shared/data beside the working directory or the repository."""
    if env := os.environ.get("CALLSTREAM_SHARED_DATA"):
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def real_calls(audio_dir: Path) -> list[BenchCall]:
    """The shared real-speech clips that have reference text."""
    from faster_whisper import decode_audio

    refs = json.loads((audio_dir / "references.json").read_text())
    calls: list[BenchCall] = []
    for name, info in sorted(refs.items()):
        if not isinstance(info, dict) or not (audio_dir / name).is_file():
            continue
        if "reference_by_channel" in info:
            left, right = decode_audio(str(audio_dir / name), sampling_rate=SAMPLE_RATE, split_stereo=True)
            by_channel = {int(k): v for k, v in info["reference_by_channel"].items()}
            calls.append(BenchCall(name, "real", [left, right], by_channel))
        elif "reference" in info:
            mono = decode_audio(str(audio_dir / name), sampling_rate=SAMPLE_RATE)  # jfk.flac: one voice, 2 channels
            calls.append(BenchCall(name, "real", [mono], {0: info["reference"]}))
    return calls


def generated_calls(max_seconds: float, mono: bool = False) -> list[BenchCall]:
    """The sample support calls, rendered, cut between turns into calls of at most max_seconds: stereo (agent and
    customer on their own channels), or mono mixes of both (as many recorders deliver telephony audio)."""
    from faster_whisper import decode_audio

    from callstream.core.settings import callstream_home
    from callstream.transcriber.synth import sidecar_path, synthesize_samples

    calls: list[BenchCall] = []
    for wav_path in synthesize_samples(callstream_home() / "sample-calls"):
        meta = json.loads(sidecar_path(wav_path).read_text())
        left, right = decode_audio(str(wav_path), sampling_rate=SAMPLE_RATE, split_stereo=True)
        groups: list[list[dict[str, Any]]] = [[]]
        for turn in meta["turns"]:
            group = groups[-1]
            # Cut only where no turn is still running (turns may overlap: interruptions).
            clear = not group or turn["start"] >= max(t["end"] for t in group)
            if group and clear and turn["end"] - group[0]["start"] > max_seconds:
                groups.append([])
            groups[-1].append(turn)
        for i, group in enumerate(g for g in groups if g):
            start = max(0, int((group[0]["start"] - 0.2) * SAMPLE_RATE))
            end = int((max(t["end"] for t in group) + 0.2) * SAMPLE_RATE)
            refs: dict[int, list[str]] = {0: [], 1: []}
            for turn in sorted(group, key=lambda t: t["start"]):
                refs[int(turn["channel"])].append(turn["text"])
            if mono:
                mixed = np.clip(left[start:end] + right[start:end], -1.0, 1.0)
                in_order = " ".join(t["text"] for t in sorted(group, key=lambda t: t["start"]))
                calls.append(BenchCall(f"{wav_path.stem}#{i}", "generated", [mixed], {0: in_order}))
                continue
            calls.append(
                BenchCall(
                    f"{wav_path.stem}#{i}",
                    "generated",
                    [left[start:end].copy(), right[start:end].copy()],
                    {ch: " ".join(texts) for ch, texts in refs.items()},
                )
            )
    return calls


def _wer(calls: list[BenchCall], hypotheses: list[dict[int, str]], source: str | None) -> float | None:
    """Corpus WER (errors over reference words) over the channels of the calls from `source`."""
    import jiwer

    from callstream.transcriber.evaluation import normalize_text

    refs: list[str] = []
    hyps: list[str] = []
    for call, hyp in zip(calls, hypotheses, strict=True):
        if source is not None and call.source != source:
            continue
        for channel, reference in call.references.items():
            if normalize_text(reference):
                refs.append(normalize_text(reference))
                hyps.append(normalize_text(hyp.get(channel, "")))
    if not refs:
        return None
    return round(float(jiwer.wer(refs, hyps)), 4)


def _run_stats(
    mode: str,
    concurrency: int,
    calls: list[BenchCall],
    hypotheses: list[dict[int, str]],
    latencies: list[float],
    wall: float,
    rounds: int,
    peak_mb: float,
) -> dict[str, Any]:
    audio = sum(c.seconds for c in calls) * rounds
    return {
        "mode": mode,
        "concurrency": concurrency,
        "calls": len(calls) * rounds,
        "audio_seconds": round(audio, 1),
        "wall_seconds": round(wall, 2),
        "audio_seconds_per_second": round(audio / wall, 2),
        "real_time_factor": round(wall / audio, 4),
        "calls_per_minute": round(60 * len(calls) * rounds / wall, 1),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "wer": _wer(calls, hypotheses, None),
        "wer_real": _wer(calls, hypotheses, "real"),
        "wer_generated": _wer(calls, hypotheses, "generated"),
        "peak_memory_mb": round(peak_mb, 1),
    }


class BareFasterWhisper:
    """faster-whisper alone, one call at a time, each channel separately, with the service's settings, starting
    like the service from each call's WAV bytes (reading the audio is part of what a call costs)."""

    def __init__(self, calls: list[BenchCall], settings: Any, mode: str = "bare") -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.calls, self.settings, self.mode = calls, settings, mode
        self.payloads = [c.wav_bytes() for c in calls]
        model = WhisperModel(
            str(settings.model_path),
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            num_workers=1,
            local_files_only=True,
        )
        self.pipeline = BatchedInferencePipeline(model)
        self.language = settings.language or ("en" if not model.model.is_multilingual else None)
        self.hypotheses: list[dict[int, str]] = [{} for _ in calls]
        self.latencies: list[float] = []
        self.wall = 0.0
        self.rounds = 0
        self.transcribe(0)  # warm-up, as the service's first call

    def transcribe(self, i: int) -> dict[int, str]:
        from faster_whisper import decode_audio

        wav = io.BytesIO(self.payloads[i])
        # Mono: the file itself, as faster-whisper users call it. Stereo: its two channels one by one.
        inputs = decode_audio(wav, split_stereo=True) if len(self.calls[i].channels) > 1 else (wav,)
        texts: dict[int, str] = {}
        for channel, audio in enumerate(inputs):
            segments, _ = self.pipeline.transcribe(
                audio,
                language=self.language,
                beam_size=self.settings.beam_size,
                batch_size=self.settings.chunk_batch_size,
                word_timestamps=True,
                vad_filter=self.settings.vad_filter,
                without_timestamps=False,  # as the service decodes (engine.py)
            )
            texts[channel] = "".join(w.word for s in segments for w in s.words or [])
        return texts

    def round(self) -> None:
        """The whole workload once."""
        started = time.perf_counter()
        for i in range(len(self.calls)):
            t0 = time.perf_counter()
            self.hypotheses[i] = self.transcribe(i)
            self.latencies.append(time.perf_counter() - t0)
        self.wall += time.perf_counter() - started
        self.rounds += 1

    def stats(self) -> dict[str, Any]:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return _run_stats(self.mode, 1, self.calls, self.hypotheses, self.latencies, self.wall, self.rounds, peak_mb)


async def _service_run(
    address: str, calls: list[BenchCall], concurrency: int, rounds: int, seed: int | None = None
) -> tuple[list[dict[int, str]], list[float], float]:
    import grpc

    from callstream.transcriber.evaluation import channel_texts
    from callstream.v1 import transcriber_pb2, transcriber_pb2_grpc

    payloads = [c.wav_bytes() for c in calls]
    roles = {0: "agent", 1: "customer"}

    def request(i: int) -> Any:
        call = calls[i]
        return transcriber_pb2.TranscribeRequest(
            call=events_pb2.CallRecorded(
                call_id=f"bench-{i}",
                audio_bytes=payloads[i],
                channel_roles=roles if len(call.channels) > 1 else {},
                language="en",
            )
        )

    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = transcriber_pb2_grpc.TranscriberServiceStub(channel)
        await stub.Transcribe(request(0), timeout=600)  # warm-up
        hypotheses: list[dict[int, str]] = [{} for _ in calls]
        latencies: list[float] = []
        queue = [i for _ in range(rounds) for i in range(len(calls))]
        if seed is not None:  # another order: other batch-mates for every call
            random.Random(seed).shuffle(queue)
        position = 0

        async def worker() -> None:
            nonlocal position
            while position < len(queue):
                i = queue[position]
                position += 1
                t0 = time.perf_counter()
                response = await stub.Transcribe(request(i), timeout=600)
                latencies.append(time.perf_counter() - t0)
                hypotheses[i] = channel_texts(response.transcript)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return hypotheses, latencies, time.perf_counter() - started


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident memory (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def service_counters(metrics_port: int) -> dict[str, float]:
    """The transcriber's batch, window and re-decoding counters so far, from its Prometheus endpoint."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    totals = {"calls": 0.0, "batches": 0.0, "windows": 0.0, "packed_windows": 0.0, "clips_redecoded": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("batcher") == "transcriber":
                if sample.name == "callstream_batch_size_sum":
                    totals["calls"] = sample.value
                elif sample.name == "callstream_batch_size_count":
                    totals["batches"] = sample.value
            elif sample.name == "callstream_transcriber_windows_total":
                totals["windows"] += sample.value
                if sample.labels.get("packed") == "true":
                    totals["packed_windows"] = sample.value
            elif sample.name == "callstream_transcriber_clips_redecoded_total":
                totals["clips_redecoded"] = sample.value
    return totals


def run_service(
    calls: list[BenchCall],
    settings_env: dict[str, str],
    concurrencies: list[int],
    rounds: int,
    mode: str,
    wer_shuffles: int = 0,
    paired: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """The service at each concurrency. `paired` (the bare library's round) runs before each of the service's
    rounds at concurrency 1, so that the two alternate and any drift of the machine's speed hits both alike."""
    from callstream.core.broker import free_port
    from callstream.core.stack import ServiceProcess

    metrics_port = free_port()
    server = ServiceProcess(
        "transcriber", {**settings_env, "CALLSTREAM_TRANSCRIBER_METRICS_PORT": str(metrics_port)}
    ).start()
    runs: list[dict[str, Any]] = []
    try:
        server.wait_ready(600)
        assert server.proc is not None
        for concurrency in concurrencies:
            before = service_counters(metrics_port)
            hypotheses: list[dict[int, str]]
            latencies: list[float]
            if concurrency == 1 and paired is not None:
                hypotheses, latencies, wall = [], [], 0.0
                for _ in range(rounds):
                    paired()
                    hypotheses, round_latencies, round_wall = asyncio.run(
                        _service_run(server.address, calls, concurrency, 1)
                    )
                    latencies += round_latencies
                    wall += round_wall
            else:
                hypotheses, latencies, wall = asyncio.run(_service_run(server.address, calls, concurrency, rounds))
            peak = _peak_rss_mb(server.proc.pid)
            runs.append(_run_stats(mode, concurrency, calls, hypotheses, latencies, wall, rounds, peak))
            done = {k: v - before[k] for k, v in service_counters(metrics_port).items()}
            # Calls per engine batch (the warm-up call included): how full the batches the service formed were;
            # windows through the model, and clips that a shared window passed over and were decoded again.
            runs[-1]["mean_batch_calls"] = round(done["calls"] / max(done["batches"], 1), 2)
            runs[-1]["model_windows"] = int(done["windows"])
            runs[-1]["clips_redecoded"] = int(done["clips_redecoded"])
            typer.echo(
                f"{mode:>16} c={concurrency:<3} {runs[-1]['audio_seconds_per_second']:7.1f} audio s/s  "
                f"WER {runs[-1]['wer']}  {runs[-1]['mean_batch_calls']} calls per batch, "
                f"{runs[-1]['model_windows']} windows, {runs[-1]['clips_redecoded']} clips re-decoded",
                err=True,
            )
        if wer_shuffles and max(concurrencies) > 1:
            # Which calls share a window changes the words a little: WER over other batch compositions.
            top = max(concurrencies)
            wers = []
            for seed in range(wer_shuffles):
                hypotheses, _, _ = asyncio.run(_service_run(server.address, calls, top, 1, seed))
                wers.append(_wer(calls, hypotheses, None))
            run = next(r for r in runs if r["concurrency"] == top)
            run["wer_shuffled"] = wers
            typer.echo(f"{mode:>16} c={top:<3} WER in {wer_shuffles} other call orders: {wers}", err=True)
    finally:
        server.stop()
    return runs


@bench_app.command("transcriber")
def bench_transcriber(
    concurrency: Annotated[str, typer.Option(help="Calls in flight through gRPC, comma-separated.")] = "1,4,16",
    rounds: Annotated[int, typer.Option(min=1, help="Times each run transcribes the whole workload.")] = 2,
    max_call_seconds: Annotated[
        float, typer.Option(help="Generated calls are cut between turns into calls of at most this length.")
    ] = 12.0,
    unpacked: Annotated[
        bool, typer.Option(help="Also run the service with pack_calls=false at the highest concurrency.")
    ] = True,
    channels: Annotated[
        str,
        typer.Option(
            help="Generated calls as 'mono' mixes of both parties or 'stereo' (one party per channel; a one-call "
            "batch then already packs its two channels into one window)."
        ),
    ] = "mono",
    data: Annotated[Path | None, typer.Option(help="Shared data folder with audio/ (default: ../shared/data).")] = None,
    bare_threads: Annotated[
        str,
        typer.Option(
            help="Also run bare faster-whisper with these cpu_threads (comma-separated): one call at a time given "
            "more threads, to check that the service's one-call baseline is the library's best on this machine."
        ),
    ] = "",
    wer_shuffles: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also transcribe the workload this many times more at the highest concurrency, in shuffled orders "
            "(other batch-mates per call), and report the WER of each: what packing does to accuracy on average.",
        ),
    ] = 0,
    quick: Annotated[bool, typer.Option(help="A smoke run: concurrency 1,4, one round, 8 calls.")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON file (default bench/results/transcriber.json).")] = None,
) -> None:
    """Throughput, latency, WER and memory of the transcriber at 1 / 4 / 16 concurrent calls through gRPC, against
    bare faster-whisper on the same calls and settings, in one run. Writes JSON, a table and a PNG.

    The model and its settings come from the transcriber's own settings (CALLSTREAM_TRANSCRIBER_*), so that
    `CALLSTREAM_TRANSCRIBER_DEVICE=cuda CALLSTREAM_TRANSCRIBER_COMPUTE_TYPE=float16` measures a GPU node.
    """
    from callstream.transcriber.settings import TranscriberSettings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = TranscriberSettings()
    levels = sorted({int(c) for c in concurrency.split(",") if c.strip()})
    audio_dir = (data or shared_data_dir()) / "audio"
    if channels not in ("mono", "stereo"):
        raise typer.BadParameter("--channels takes mono or stereo")
    real = real_calls(audio_dir) if (audio_dir / "references.json").is_file() else []
    calls = real + generated_calls(max_call_seconds, mono=channels == "mono")
    if quick:
        levels, rounds, calls = [c for c in levels if c <= 4] or [1], 1, calls[:8]
    if not calls:
        raise typer.BadParameter("no calls to transcribe (shared audio not found and no sample calls)")
    n_real = sum(c.source == "real" for c in calls)
    typer.echo(
        f"workload: {len(calls)} calls ({n_real} real, {len(calls) - n_real} generated), "
        f"{sum(c.seconds for c in calls):.0f} s of audio, x{rounds} per run; model {settings.model_path} "
        f"{settings.device}/{settings.compute_type}, beam {settings.beam_size}",
        err=True,
    )
    env = {
        "CALLSTREAM_TRANSCRIBER_CONSUME": "false",
        "CALLSTREAM_TRANSCRIBER_PII_REDACTION": "off",  # WER compares words; digits would be masked
        "CALLSTREAM_TRANSCRIBER_BATCH__MAX_BATCH_SIZE": str(max(max(levels), settings.batch.max_batch_size)),
    }
    runs: list[dict[str, Any]] = []
    for threads in sorted({int(t) for t in bare_threads.split(",") if t.strip()} - {settings.cpu_threads}):
        more = BareFasterWhisper(calls, settings.model_copy(update={"cpu_threads": threads}), f"bare-{threads}-threads")
        for _ in range(rounds):
            more.round()
        runs.append(more.stats())
        typer.echo(f"{more.mode:>16} c=1   {runs[-1]['audio_seconds_per_second']:7.1f} audio s/s", err=True)
        del more
    # The bare library's rounds alternate with the service's at one call in flight (run_service's `paired`).
    bare = BareFasterWhisper(calls, settings)
    service_runs = run_service(
        calls, env, levels, rounds, "service", 0 if quick else wer_shuffles, paired=bare.round if 1 in levels else None
    )
    while bare.rounds < rounds:  # no one-call service run to alternate with
        bare.round()
    runs.insert(0, bare.stats())
    typer.echo(
        f"{'bare':>16} c=1   {runs[0]['audio_seconds_per_second']:7.1f} audio s/s  WER {runs[0]['wer']}", err=True
    )
    runs += service_runs
    if unpacked and not quick:
        runs += run_service(
            calls, {**env, "CALLSTREAM_TRANSCRIBER_PACK_CALLS": "false"}, [max(levels)], rounds, "service-unpacked"
        )

    by = {(r["mode"], r["concurrency"]): r["audio_seconds_per_second"] for r in runs}
    top = max(levels)
    ratios: dict[str, float] = {}
    if ("service", 1) in by:
        ratios["service_c1_over_bare"] = round(by[("service", 1)] / by[("bare", 1)], 3)
        ratios[f"service_c{top}_over_service_c1"] = round(by[("service", top)] / by[("service", 1)], 3)
    if ("service-unpacked", top) in by:
        ratios[f"packed_over_unpacked_c{top}"] = round(by[("service", top)] / by[("service-unpacked", top)], 3)
    meta = {
        "model_path": str(settings.model_path),
        "device": settings.device,
        "compute_type": settings.compute_type,
        "cpu_threads": settings.cpu_threads,
        "model_workers": settings.model_workers,
        "batch": settings.batch.model_dump(),
        "beam_size": settings.beam_size,
        "chunk_batch_size": settings.chunk_batch_size,
        "calls": [{"name": c.name, "source": c.source, "seconds": round(c.seconds, 2)} for c in calls],
        "rounds": rounds,
        "generated_calls": channels,
        "load_average_at_end": os.getloadavg(),
    }
    json_path = write_json("transcriber", runs, meta, out)
    payload = json.loads(json_path.read_text())
    payload["ratios"] = ratios
    json_path.write_text(json.dumps(payload, indent=2))
    print_table(
        "transcriber: short calls",
        runs,
        [
            "mode", "concurrency", "audio_seconds_per_second", "real_time_factor", "calls_per_minute",
            "latency_p50_s", "latency_p95_s", "mean_batch_calls", "model_windows", "clips_redecoded",
            "wer_real", "wer_generated", "peak_memory_mb",
        ],
    )  # fmt: skip
    typer.echo("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    png = plot_lines(
        (out or results_dir() / "transcriber.json").with_suffix(".png"),
        runs,
        x="concurrency",
        y="audio_seconds_per_second",
        series="mode",
        title=f"transcriber throughput ({settings.device}/{settings.compute_type}, beam {settings.beam_size})",
        ylabel="audio seconds per second",
        logx=True,
    )
    typer.echo(f"wrote {json_path} and {png}")
