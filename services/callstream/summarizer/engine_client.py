"""A client for TensorRT-LLM's gRPC protocol (trtllm.TrtllmService from smg-grpc-proto), over grpc.aio.

The same client talks to `trtllm-serve MODEL --grpc` on GPU nodes and to callstream's CPU engine
(`callstream serve llm-engine`). Tokenization is client-side: messages go through the model's chat template and
tokenizer here, token ids travel, output ids come back and are decoded here.

Errors: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (engine queue full; `retry_after_s` from the
engine's `retry-after-ms` trailer) and ABORTED raise core.errors.TransientError (EngineBusyError for the queue);
INVALID_ARGUMENT and OUT_OF_RANGE raise InvalidInputError; anything else EngineError. Nothing is retried here: the
caller retries (tenacity in the Kafka path), so no loop runs forever.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

from callstream.core.errors import CallstreamError, InvalidInputError, TransientError
from callstream.summarizer.tokenizer import Message, Tokenizer

RETRY_METADATA_KEY = "retry-after-ms"
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,  # cancelled by the server (shutting down); our own cancellation raises CancelledError
}
_INVALID = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


class EngineError(CallstreamError):
    """The engine failed in a way that a retry is not expected to fix (INTERNAL, UNIMPLEMENTED, ...)."""


class EngineBusyError(TransientError):
    """The engine's admission queue is full (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" (| "abort")
    latency_s: float
    token_ids: list[int] = field(default_factory=list)
    request_id: str = ""


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    vocab_size: int
    supported_features: list[str]
    backend: str
    version: str


def map_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> CallstreamError:
    code = exc.code()
    message = f"{what}: {code.name}: {exc.details()}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = None
        for key, value in exc.trailing_metadata() or ():
            if key == RETRY_METADATA_KEY:
                try:
                    retry = int(value) / 1000.0
                except (TypeError, ValueError):
                    retry = None
        return EngineBusyError(message, retry)
    if code in _TRANSIENT:
        return TransientError(message)
    if code in _INVALID:
        return InvalidInputError(message)
    return EngineError(message)


class TrtllmClient:
    """generate(messages) -> Generation over trtllm.TrtllmService; one channel, many concurrent calls."""

    def __init__(
        self,
        address: str,
        tokenizer: Tokenizer,
        timeout_s: float = 120.0,
        *,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self._options = list(channel_options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TrtllmServiceStub | None = None

    def _client(self) -> pb_grpc.TrtllmServiceStub:
        # Created on first use, inside the event loop that uses it.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = pb_grpc.TrtllmServiceStub(self._channel)
        return self._stub

    def build_request(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        json_schema: dict[str, Any] | None,
        temperature: float,
        *,
        request_id: str,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        streaming: bool = False,
    ) -> pb.GenerateRequest:
        sampling = pb.SamplingConfig(beam_width=1, num_return_sequences=1, temperature=max(0.0, temperature))
        if temperature <= 0:
            sampling.top_k = 1  # greedy, on trtllm-serve as on the CPU engine
        if repetition_penalty is not None and repetition_penalty != 1.0:
            sampling.repetition_penalty = repetition_penalty
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateRequest(
            request_id=request_id,
            tokenized=pb.TokenizedInput(input_token_ids=prompt_ids),
            sampling_config=sampling,
            output_config=pb.OutputConfig(return_perf_metrics=True),
            max_tokens=max_tokens,
            streaming=streaming,
            stop_token_ids=self.tokenizer.eos_token_ids,
        )
        if json_schema is not None:
            request.guided_decoding.CopyFrom(
                pb.GuidedDecodingParams(
                    guide_type=pb.GuidedDecodingParams.GUIDE_TYPE_JSON_SCHEMA, guide=json.dumps(json_schema)
                )
            )
        return request

    async def generate(
        self,
        messages: list[Message],
        max_tokens: int,
        json_schema: dict[str, Any] | None = None,
        temperature: float = 0.0,
        *,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ) -> Generation:
        """One chat completion; json_schema constrains the output (guided decoding on the engine)."""
        prompt_ids = self.tokenizer.encode_chat(messages)
        request_id = uuid.uuid4().hex
        request = self.build_request(
            prompt_ids,
            max_tokens,
            json_schema,
            temperature,
            request_id=request_id,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        started = time.perf_counter()
        complete: pb.GenerateComplete | None = None
        try:
            call = self._client().Generate(request, timeout=self.timeout_s)
            async for response in call:
                if response.HasField("complete"):
                    complete = response.complete
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, f"engine {self.address} Generate") from exc
        if complete is None:
            raise EngineError(f"engine {self.address} ended Generate without a GenerateComplete")
        ids = list(complete.output_token_ids)
        return Generation(
            text=self.tokenizer.decode(ids),
            prompt_tokens=complete.prompt_tokens or len(prompt_ids),
            completion_tokens=complete.completion_tokens or len(ids),
            finish_reason=complete.finish_reason,
            latency_s=time.perf_counter() - started,
            token_ids=ids,
            request_id=request_id,
        )

    async def model_info(self) -> EngineInfo:
        try:
            model = await self._client().GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s)
            server = await self._client().GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, f"engine {self.address} GetModelInfo") from exc
        return EngineInfo(
            model_id=model.model_id,
            max_input_len=model.max_input_len,
            max_seq_len=model.max_seq_len,
            max_batch_size=model.max_batch_size,
            vocab_size=model.vocab_size,
            supported_features=list(model.supported_features),
            backend=server.backend,
            version=server.version,
        )

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when the engine answers HealthCheck with "OK"; False when it answers otherwise or not at all."""
        try:
            response = await self._client().HealthCheck(pb.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status.strip().upper() in ("OK", "HEALTHY", "SERVING"))

    async def abort(self, request_id: str) -> bool:
        try:
            response = await self._client().Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, f"engine {self.address} Abort") from exc
        return bool(response.success)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
