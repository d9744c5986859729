"""Where requests enter the CPU engine: TensorRT-LLM's own gRPC protocol (trtllm.TrtllmService, smg-grpc-proto).

The same client (summarizer/engine_client.py) talks to this server on CPU nodes and to `trtllm-serve MODEL --grpc`
on GPU nodes. Implemented: Generate (server streaming; token-id deltas when streaming=true, then GenerateComplete),
Abort, HealthCheck, GetModelInfo, GetServerInfo. Embed, GetTokenizer and SubscribeKvEvents answer UNIMPLEMENTED.

Errors: a full admission queue answers RESOURCE_EXHAUSTED with trailing metadata `retry-after-ms` (and the hint in
the message); bad input INVALID_ARGUMENT; an engine that is not running UNAVAILABLE; a failed step INTERNAL.
A client that cancels its call (or lets its deadline pass) aborts the request and frees its sequence slot at once.
Features TRT-LLM has and this engine does not (stop/bad strings, which TRT-LLM tokenizes server-side; beam search;
n > 1; logprobs; LoRA; multimodal; regex guides) are refused with INVALID_ARGUMENT rather than silently ignored.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

import callstream
from callstream.core.errors import InvalidInputError, TransientError
from callstream.core.grpc_server import GrpcService, ServiceRuntime
from callstream.llm_engine.engine import (
    ContinuousBatchingEngine,
    EngineOverloadedError,
    GenerationResult,
    SamplingParams,
    TokenDelta,
)
from callstream.llm_engine.settings import LlmEngineSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrtllmService"].full_name  # "trtllm.TrtllmService"
BACKEND = "llama.cpp-cpu"
SUPPORTED_FEATURES = [
    "streaming",
    "continuous_batching",
    "abort",
    "guided_decoding",
    "guided_decoding:json",
    "guided_decoding:json_schema",
    "guided_decoding:ebnf_grammar(gbnf)",
    "stop_token_ids",
    "bad_token_ids",
    "min_tokens",
    "ignore_eos",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "top_k",
    "top_p",
    "min_p",
    "seed",
]
RETRY_METADATA_KEY = "retry-after-ms"

_Guide = pb.GuidedDecodingParams


def sampling_from_proto(request: pb.GenerateRequest) -> SamplingParams:
    """TRT-LLM's SamplingConfig to ours. No temperature (or 0, or top_k == 1) means greedy."""
    sc = request.sampling_config
    if sc.beam_width > 1 or len(sc.beam_width_array) > 0:
        raise InvalidInputError("beam search is not supported by the CPU engine")
    if sc.num_return_sequences > 1:
        raise InvalidInputError("num_return_sequences > 1 is not supported by the CPU engine")
    temperature = sc.temperature if sc.HasField("temperature") else 0.0
    top_k = sc.top_k if sc.HasField("top_k") else 0
    if top_k == 1:
        temperature = 0.0
    if temperature < 0:
        raise InvalidInputError("temperature must be >= 0")
    repetition = sc.repetition_penalty if sc.HasField("repetition_penalty") else 1.0
    if repetition <= 0:
        raise InvalidInputError("repetition_penalty must be > 0")
    return SamplingParams(
        temperature=temperature,
        top_k=max(0, top_k),
        top_p=sc.top_p if sc.HasField("top_p") and sc.top_p > 0 else 1.0,
        min_p=sc.min_p if sc.HasField("min_p") else 0.0,
        repetition_penalty=repetition,
        frequency_penalty=sc.frequency_penalty if sc.HasField("frequency_penalty") else 0.0,
        presence_penalty=sc.presence_penalty if sc.HasField("presence_penalty") else 0.0,
        seed=sc.seed if sc.HasField("seed") else None,
        min_tokens=sc.min_tokens if sc.HasField("min_tokens") else 0,
        ignore_eos=request.ignore_eos,
        bad_token_ids=tuple(request.bad_token_ids),
    )


def guide_from_proto(request: pb.GenerateRequest) -> tuple[str | None, str | None]:
    """(JSON schema text, GBNF grammar) from GuidedDecodingParams; "" as schema means any JSON object."""
    if not request.HasField("guided_decoding"):
        return None, None
    guide = request.guided_decoding
    kind = guide.guide_type
    if kind == _Guide.GUIDE_TYPE_JSON:
        return "", None
    if kind == _Guide.GUIDE_TYPE_JSON_SCHEMA:
        if not guide.guide.strip():
            raise InvalidInputError("GUIDE_TYPE_JSON_SCHEMA needs a schema in `guide`")
        return guide.guide, None
    if kind == _Guide.GUIDE_TYPE_EBNF_GRAMMAR:
        return None, guide.guide
    if kind == _Guide.GUIDE_TYPE_UNSPECIFIED and not guide.guide:
        return None, None
    raise InvalidInputError(
        f"guided decoding type {_Guide.GuideType.Name(kind)} is not supported by the CPU engine "
        "(JSON, JSON_SCHEMA and EBNF_GRAMMAR in llama.cpp's GBNF are)"
    )


def _refuse_unsupported(request: pb.GenerateRequest) -> None:
    unsupported = []
    if request.stop or request.bad:
        unsupported.append("stop/bad strings (send stop_token_ids / bad_token_ids)")
    if request.embedding_bias:
        unsupported.append("embedding_bias")
    for name in ("lora_config", "prompt_tuning_config", "multimodal_input", "disaggregated_params", "lookahead_config"):
        if request.HasField(name):
            unsupported.append(name)
    oc = request.output_config
    if (oc.HasField("logprobs") and oc.logprobs > 0) or (oc.HasField("prompt_logprobs") and oc.prompt_logprobs > 0):
        unsupported.append("logprobs")
    if oc.return_context_logits or oc.return_generation_logits or oc.return_encoder_output:
        unsupported.append("logits/encoder outputs")
    if unsupported:
        raise InvalidInputError("not supported by the CPU engine: " + ", ".join(unsupported))


def complete_message(result: GenerationResult) -> pb.GenerateComplete:
    complete = pb.GenerateComplete(
        output_token_ids=result.output_token_ids,
        sequence_index=0,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_tokens=result.cached_tokens,
        perf_metrics=pb.PerfMetrics(
            arrival_time=result.arrival_time,
            first_scheduled_time=result.first_scheduled_time,
            first_token_time=result.first_token_time,
            last_token_time=result.last_token_time,
        ),
    )
    if result.matched_stop_token_id is not None:
        complete.matched_token_id = result.matched_stop_token_id
    return complete


class TrtllmServicer(pb_grpc.TrtllmServiceServicer):
    """trtllm.TrtllmService over the continuous-batching llama.cpp engine (grpc.aio)."""

    def __init__(self, engine: ContinuousBatchingEngine) -> None:
        self.engine = engine

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        try:
            if not request.HasField("tokenized") or not request.tokenized.input_token_ids:
                raise InvalidInputError("GenerateRequest.tokenized.input_token_ids is required")
            if request.max_tokens < 1:
                raise InvalidInputError("GenerateRequest.max_tokens is required (>= 1)")
            _refuse_unsupported(request)
            sampling = sampling_from_proto(request)
            schema, grammar = guide_from_proto(request)
            prompt = list(request.tokenized.input_token_ids)
            stream = self.engine.generate(
                request_id,
                prompt,
                request.max_tokens,
                sampling,
                schema,
                list(request.stop_token_ids),
                grammar=grammar,
                include_stop_token=request.include_stop_token_in_output,
            )
            completion = 0
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, TokenDelta):
                        completion += len(item.token_ids)
                        if request.streaming:
                            yield pb.GenerateResponse(
                                request_id=request_id,
                                chunk=pb.GenerateStreamChunk(
                                    token_ids=item.token_ids, prompt_tokens=len(prompt), completion_tokens=completion
                                ),
                            )
                    elif isinstance(item, GenerationResult):
                        yield pb.GenerateResponse(request_id=request_id, complete=complete_message(item))
        except EngineOverloadedError as exc:
            context.set_trailing_metadata(((RETRY_METADATA_KEY, str(int(exc.retry_after_s * 1000))),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TransientError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never a bare UNKNOWN
            log.exception("Generate %s failed", request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    async def Abort(  # noqa: N802 - gRPC method name
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        found = self.engine.abort(request.request_id)
        return pb.AbortResponse(
            success=found, message=f"request {request.request_id} {'aborted' if found else 'not found'}"
        )

    async def HealthCheck(  # noqa: N802 - gRPC method name
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        _, message = self.engine.health()
        return pb.HealthCheckResponse(status=message)

    async def GetModelInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            info = self.engine.model_info
        except TransientError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        return pb.GetModelInfoResponse(
            model_id=info.model_id,
            max_input_len=info.n_ctx_per_seq - 1,
            max_seq_len=info.n_ctx_per_seq,
            max_batch_size=info.max_sequences,
            vocab_size=info.vocab_size,
            hidden_size=info.n_embd,
            num_layers=info.n_layer,
            num_heads=info.n_head,
            supported_features=SUPPORTED_FEATURES,
        )

    async def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            version=callstream.__version__,
            backend=BACKEND,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            context_parallel_size=1,
            world_size=1,
        )


def build_runtime(settings: LlmEngineSettings) -> ServiceRuntime:
    """The `callstream serve llm-engine` process: the engine (a component) behind trtllm.TrtllmService."""
    engine = ContinuousBatchingEngine(settings)
    servicer = TrtllmServicer(engine)
    register: Any = pb_grpc.add_TrtllmServiceServicer_to_server
    return ServiceRuntime(
        name="llm-engine",
        settings=settings,
        grpc_services=[GrpcService(SERVICE_NAME, servicer, register)],
        components=[engine],
    )
