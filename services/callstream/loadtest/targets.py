"""What a gRPC load test sends: channels (plain or TLS), payloads, and one request builder per service.

Payloads come from callstream's own data unless a folder or file is given:
- router, summarizer, llm-engine: tickets from a CSV (`text` or `body` column, optional `subject`,
  `source_channel`); default: the package's samples/tickets/tickets.csv;
- transcriber: audio files (wav, flac, mp3, ...); default: the sample calls `callstream setup` renders.
Requests go round-robin over the payloads (request i gets payload i mod n) and over the channels.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from callstream.demo import AUDIO_SUFFIXES, SAMPLES, audio_files, tickets_from_csv
from callstream.v1 import events_pb2

SERVICES = ("transcriber", "router", "summarizer", "llm-engine")
DEFAULT_TICKETS = SAMPLES / "tickets" / "tickets.csv"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class TlsOptions:
    enabled: bool = False
    ca_cert: Path | None = None  # PEM roots; default: the system's
    client_cert: Path | None = None  # mutual TLS
    client_key: Path | None = None
    server_name: str | None = None  # the name to check the certificate against (and the :authority)
    insecure_skip_verify: bool = False  # trust what the server presents (self-signed certificates)

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "ca_cert": str(self.ca_cert) if self.ca_cert else None,
            "client_cert": str(self.client_cert) if self.client_cert else None,
            "server_name": self.server_name,
            "insecure_skip_verify": self.insecure_skip_verify,
        }


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target must be HOST:PORT, not {target!r}")
    return host.strip("[]"), int(port)


def _certificate_names(pem: str) -> list[str]:
    """DNS names (SAN, then CN) of a PEM certificate, read with the standard library."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(pem)
        f.flush()
        try:
            info = ssl._ssl._test_decode_cert(f.name)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - best effort: the caller can pass --server-name
            return []
    names = [v for k, v in info.get("subjectAltName", ()) if k == "DNS"]
    for rdn in info.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.append(v)
    return names


def channel_args(target: str, tls: TlsOptions) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Credentials (None = plaintext) and channel options for the target.

    gRPC Python cannot switch certificate verification off. --insecure-skip-verify therefore fetches the
    certificate the server presents (no verification) and trusts exactly that one, checking it under its own
    name: this works for self-signed server certificates, which is what it is for.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if not (tls.enabled or tls.ca_cert or tls.insecure_skip_verify or tls.client_cert):
        return None, options
    roots = tls.ca_cert.read_bytes() if tls.ca_cert else None
    server_name = tls.server_name
    if tls.insecure_skip_verify:
        host, port = _split_target(target)
        pem = ssl.get_server_certificate((host, port), timeout=10)
        roots = pem.encode()
        names = _certificate_names(pem)
        server_name = server_name or (names[0] if names else None)
    key = tls.client_key.read_bytes() if tls.client_key else None
    chain = tls.client_cert.read_bytes() if tls.client_cert else None
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
        options.append(("grpc.default_authority", server_name))
    return credentials, options


def open_channels(target: str, tls: TlsOptions, count: int) -> list[grpc.aio.Channel]:
    """`count` independent channels (separate HTTP/2 connections) to the target."""
    credentials, options = channel_args(target, tls)
    # A distinct option per channel keeps gRPC from sharing one subchannel (connection) between them.
    channels = []
    for n in range(max(1, count)):
        opts = [*options, ("grpc.channel_id", n)]
        if credentials is None:
            channels.append(grpc.aio.insecure_channel(target, options=opts))
        else:
            channels.append(grpc.aio.secure_channel(target, credentials, options=opts))
    return channels


def load_tickets(payloads: Path | None) -> list[events_pb2.TicketCreated]:
    """Tickets from a CSV file, or from DIR/tickets.csv; default: the package's sample tickets."""
    path = payloads or DEFAULT_TICKETS
    if path.is_dir():
        path = path / "tickets.csv"
    if not path.is_file():
        raise ValueError(f"no ticket CSV at {path} (a file, or a folder with tickets.csv)")
    tickets = [t for t in tickets_from_csv(path, tenant="loadtest") if (t.subject or t.body).strip()]
    if not tickets:
        raise ValueError(f"{path} has no tickets with text")
    return tickets


def ticket_text(ticket: events_pb2.TicketCreated) -> str:
    """What the router classifies and the summarizer summarizes: the subject and the body."""
    return f"{ticket.subject}\n{ticket.body}".strip() if ticket.subject else ticket.body.strip()


def default_audio() -> list[Path]:
    """The sample calls that `callstream setup` renders (rendered now if missing)."""
    from callstream.core.settings import callstream_home
    from callstream.transcriber.synth import synthesize_samples

    return synthesize_samples(callstream_home() / "sample-calls")


def load_audio(payloads: Path | None) -> list[Path]:
    if payloads is None:
        files = default_audio()
    elif payloads.is_file():
        files = [payloads]
    else:
        files = audio_files(payloads)
    files = [f for f in files if f.suffix.lower() in AUDIO_SUFFIXES]
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {payloads}")
    return files


@dataclass
class ServiceTarget:
    """Builds request i and sends it on channel i mod n; subclasses per service."""

    channels: Sequence[grpc.aio.Channel]
    payload_names: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"payloads": len(self.payload_names), "payload_examples": self.payload_names[:5]}

    async def __call__(self, i: int, timeout_s: float | None) -> Mapping[str, float] | None:
        raise NotImplementedError

    async def close(self) -> None:
        for channel in self.channels:
            with contextlib.suppress(Exception):
                await channel.close()


class RouterTarget(ServiceTarget):
    def __init__(self, channels: Sequence[grpc.aio.Channel], payloads: Path | None, texts_per_request: int = 1):
        from callstream.v1 import router_pb2, router_pb2_grpc

        tickets = load_tickets(payloads)
        super().__init__(channels, [t.ticket_id for t in tickets])
        self._pb = router_pb2
        self.stubs = [router_pb2_grpc.RouterServiceStub(c) for c in channels]
        self.tickets = tickets
        self.texts_per_request = max(1, texts_per_request)

    def request(self, i: int) -> Any:
        k, n = self.texts_per_request, len(self.tickets)
        picked = [self.tickets[(i * k + j) % n] for j in range(k)]
        return self._pb.ClassifyRequest(
            texts=[ticket_text(t) for t in picked], source_channel=picked[0].source_channel or "email"
        )

    async def __call__(self, i: int, timeout_s: float | None) -> Mapping[str, float] | None:
        await self.stubs[i % len(self.stubs)].Classify(self.request(i), timeout=timeout_s)
        return None


class SummarizerTarget(ServiceTarget):
    def __init__(self, channels: Sequence[grpc.aio.Channel], payloads: Path | None):
        from callstream.v1 import summarizer_pb2, summarizer_pb2_grpc

        tickets = load_tickets(payloads)
        super().__init__(channels, [t.ticket_id for t in tickets])
        self._pb = summarizer_pb2
        self.stubs = [summarizer_pb2_grpc.SummarizerServiceStub(c) for c in channels]
        self.tickets = tickets

    def request(self, i: int) -> Any:
        ticket = self.tickets[i % len(self.tickets)]
        source = events_pb2.SourceRef(kind=events_pb2.SourceRef.KIND_TICKET, id=f"loadtest-{i}")
        return self._pb.SummarizeRequest(text=ticket_text(ticket), source=source)

    async def __call__(self, i: int, timeout_s: float | None) -> Mapping[str, float] | None:
        response = await self.stubs[i % len(self.stubs)].Summarize(self.request(i), timeout=timeout_s)
        s = response.summary
        return {"prompt_tokens": float(s.prompt_tokens), "completion_tokens": float(s.completion_tokens)}


class TranscriberTarget(ServiceTarget):
    def __init__(self, channels: Sequence[grpc.aio.Channel], payloads: Path | None, inline_audio: bool = True):
        from callstream.demo import call_from_audio
        from callstream.v1 import transcriber_pb2, transcriber_pb2_grpc

        files = load_audio(payloads)
        super().__init__(channels, [f.name for f in files])
        self._pb = transcriber_pb2
        self.stubs = [transcriber_pb2_grpc.TranscriberServiceStub(c) for c in channels]
        self.calls = []
        for path in files:
            call = call_from_audio(path, tenant="loadtest")
            if inline_audio:  # works against a remote server; audio_uri needs the server to see the file
                call.audio_bytes = path.read_bytes()
            self.calls.append(call)

    def request(self, i: int) -> Any:
        call = events_pb2.CallRecorded()
        call.CopyFrom(self.calls[i % len(self.calls)])
        call.call_id = f"loadtest-{i}"
        return self._pb.TranscribeRequest(call=call)

    async def __call__(self, i: int, timeout_s: float | None) -> Mapping[str, float] | None:
        response = await self.stubs[i % len(self.stubs)].Transcribe(self.request(i), timeout=timeout_s)
        t = response.transcript
        return {"audio_seconds": float(t.audio_seconds), "processing_seconds": float(t.processing_seconds)}


class LlmEngineTarget(ServiceTarget):
    """TrtllmService.Generate, streaming, with prompts tokenized client-side as the summarizer does it.

    Extra metrics per request: ttft_ms (time to the first streamed tokens, from the scheduled time in open
    loop like the latency), completion_tokens, prompt_tokens.
    """

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        payloads: Path | None,
        *,
        tokenizer: str | None = None,
        max_tokens: int = 64,
        guided: bool = True,
    ):
        from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

        from callstream.summarizer.engine_client import TrtllmClient
        from callstream.summarizer.settings import default_tokenizer
        from callstream.summarizer.summarize import SUMMARY_SCHEMA, Summarizer
        from callstream.summarizer.tokenizer import load_tokenizer

        tickets = load_tickets(payloads)
        super().__init__(channels, [t.ticket_id for t in tickets])
        tok = load_tokenizer(tokenizer or default_tokenizer())
        # The summarizer's own request builder: same prompt, sampling, stop tokens and schema as production.
        self.client = TrtllmClient("unused", tok)
        summarizer = Summarizer(self.client, max_output_tokens=max(32, max_tokens))
        self.prompts = [tok.encode_chat(summarizer.messages(ticket_text(t), "ticket")) for t in tickets]
        self.stubs = [pb_grpc.TrtllmServiceStub(c) for c in channels]
        self.max_tokens = max_tokens
        self.schema = SUMMARY_SCHEMA if guided else None

    def describe(self) -> dict[str, Any]:
        lengths = [len(p) for p in self.prompts]
        return {
            **super().describe(),
            "max_tokens": self.max_tokens,
            "guided_json": self.schema is not None,
            "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
        }

    def request(self, i: int) -> Any:
        return self.client.build_request(
            self.prompts[i % len(self.prompts)],
            self.max_tokens,
            self.schema,
            0.0,
            request_id=f"loadtest-{i}-{time.monotonic_ns()}",
            repetition_penalty=1.1,
            streaming=True,
        )

    async def __call__(self, i: int, timeout_s: float | None) -> Mapping[str, float] | None:
        started = time.perf_counter()
        first: float | None = None
        completion = prompt = 0
        call = self.stubs[i % len(self.stubs)].Generate(self.request(i), timeout=timeout_s)
        async for response in call:
            if first is None and (response.HasField("chunk") or response.HasField("complete")):
                first = time.perf_counter()
            if response.HasField("complete"):
                completion = response.complete.completion_tokens or len(response.complete.output_token_ids)
                prompt = response.complete.prompt_tokens
        extra = {"completion_tokens": float(completion), "prompt_tokens": float(prompt)}
        if first is not None:
            # From the actual send; the runner shifts it to the scheduled time (see grpc_load.py).
            extra["ttft_service_ms"] = (first - started) * 1000.0
        return extra


def make_target(
    service: str,
    target: str,
    *,
    tls: TlsOptions,
    connections: int = 1,
    payloads: Path | None = None,
    texts_per_request: int = 1,
    inline_audio: bool = True,
    tokenizer: str | None = None,
    max_tokens: int = 64,
    guided: bool = True,
) -> ServiceTarget:
    if service not in SERVICES:
        raise ValueError(f"service must be one of {', '.join(SERVICES)}")
    channels = open_channels(target, tls, connections)
    if service == "router":
        return RouterTarget(channels, payloads, texts_per_request)
    if service == "summarizer":
        return SummarizerTarget(channels, payloads)
    if service == "transcriber":
        return TranscriberTarget(channels, payloads, inline_audio)
    return LlmEngineTarget(channels, payloads, tokenizer=tokenizer, max_tokens=max_tokens, guided=guided)
