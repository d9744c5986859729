"""Where the model runs: continuous (iteration-level) batching over llama.cpp's low-level API, on CPU.

One background thread owns the llama.cpp context and loops:

1. take aborts and admit waiting requests into free sequence slots (FIFO);
2. prefill: the next chunk (at most n_batch tokens) of the oldest admitted prompt, in a llama_decode of its own
   (a long prompt is prefilled over several iterations, "chunked prefill"; with batch_invariant=False chunks
   instead fill the room left in the decode batch);
3. decode: ONE llama_batch with the last sampled token of every decoding sequence (several seq_ids, one logit row
   each), llama_decode, then sample one token per sequence at its position in the batch;
4. finished sequences (stop token, max_tokens, abort) free their slot at once, so a waiting request joins on the
   next step: requests join and leave between decode steps, as in vLLM and TensorRT-LLM's in-flight batching.

Packing: with one KV stream per slot, llama.cpp splits a batch into micro-batches of consecutive sequence ids, one
pass over the weights each; running sequences are therefore kept on the lowest slot ids (a request takes the lowest
free slot among equally good ones, and when one in the middle finishes the highest moves into its place by a KV
stream copy, see _compact), and the decode batch lists them in id order: one pass per step.

Prefix cache (prefix_cache=True, the default with kv_unified=False): a freed slot keeps the KV cells of the tokens
it holds (its last prompt and output), as llama.cpp's own server does. A new request takes the free slot whose
kept tokens share the longest prefix with its prompt, drops the cells after that prefix (llama_memory_seq_rm) and
prefills only the rest: summaries share a ~220-token system prompt, so most of each prompt is not computed again.
cached_tokens in the final message says how many prompt tokens were reused.

Times in the final message follow TensorRT-LLM's PerfMetrics: arrival, first_scheduled (the engine starts on the
request: its first prefill step), first token, last token. queue_time = first_scheduled - arrival: waiting for a
slot, then for its turn to prefill (other prompts admitted before it prefill first, FIFO).

Sampling is greedy by default (argmax on the logits). Temperature, top_k, top_p, min_p, seed and the
repetition/frequency/presence penalties use llama.cpp samplers (a per-sequence chain); the penalties look at the
last 64 tokens of the sequence, prompt tail included. Guided decoding (JSON, JSON schema, GBNF) uses a
per-sequence llama.cpp grammar sampler, applied the way llama.cpp's own server does it: sample without the
grammar first and only if the grammar rejects that token mask the whole vocabulary and sample again. For greedy
decoding this picks exactly the token that grammar-first masking would, at a fraction of the cost.

Batch invariance: a request's greedy tokens should not depend on what else runs. Measured with SmolLM2-135M Q4_1
(411-token prompts, 4 and 16 concurrent requests vs alone): bit-identical when (a) each sequence owns its KV stream
(kv_unified=False), (b) prompt chunks run in a llama_decode of their own (batch_invariant=True: llama.cpp otherwise
splits a mixed batch into equal-per-sequence micro-batches, so a prompt is cut at places chosen by its neighbours,
and small pieces take other kernels), and (c) one thread, or flash attention off (multi-threaded flash attention
splits its work by batch shape). Violating any of them flipped greedy tokens at near ties (top-2 logit margins
0.01-0.22) within 0-40 tokens; a unified KV cache moved logits by up to ~0.5. The defaults satisfy all three, and
"auto" flash attention is turned off when n_threads > 1 in batch-invariant mode. tests/unit/test_llm_engine.py
checks it. All llama.cpp calls release the GIL, so the asyncio loop keeps serving while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from callstream.core.errors import CallstreamError, ConfigError, InvalidInputError, TransientError
from callstream.llm_engine import metrics
from callstream.llm_engine.llama_runtime import init_llama, lc, meta_str
from callstream.llm_engine.settings import LlmEngineSettings

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64
_NEG_INF = float("-inf")
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # struct llama_token_data


class EngineOverloadedError(TransientError):
    """The admission queue is full. The gRPC server answers RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(TransientError):
    """The engine is not running (not started yet, stopping, or its thread died)."""


class GenerationFailedError(CallstreamError):
    """llama.cpp failed on a step, or a grammar left no token to choose."""


class DuplicateRequestError(InvalidInputError):
    """A request with this id is already queued or running."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature <= 0 is greedy (the default)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: random
    min_tokens: int = 0  # stop tokens are masked until this many tokens were generated
    ignore_eos: bool = False  # do not stop at the model's end-of-generation tokens
    bad_token_ids: tuple[int, ...] = ()  # never generated

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class TokenDelta:
    """New output tokens since the previous item of the stream."""

    token_ids: list[int]


@dataclass(frozen=True)
class GenerationResult:
    """The final item of a generate() stream. Times are unix seconds; durations are seconds."""

    request_id: str
    output_token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    matched_stop_token_id: int | None
    prompt_tokens: int
    completion_tokens: int
    arrival_time: float
    first_scheduled_time: float  # its first prefill step; 0 when it never got that far
    first_token_time: float  # 0 when no token was generated
    last_token_time: float
    queue_time_s: float
    time_to_first_token_s: float | None
    time_per_output_token_s: float | None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # Only with trace_margins=True: top-1 minus top-2 logit at each generated token (after masking).
    logit_margins: list[float] | None = None


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # the GGUF file name
    path: str
    sha256: str
    description: str  # llama.cpp's, e.g. "llama 256M Q4_1"
    vocab_size: int
    n_ctx: int  # KV cells over all slots
    n_ctx_per_seq: int  # most tokens (prompt + output) one request can hold
    n_ctx_train: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_params: int
    max_sequences: int
    n_batch: int
    kv_unified: bool
    eos_token_ids: list[int]  # the model's end-of-generation tokens
    bos_token_id: int | None
    metadata: dict[str, str] = field(default_factory=dict)


Item = TokenDelta | GenerationResult


class _Request:
    """One generation; the engine thread owns everything below `seq` once it is admitted."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        grammar: Any,
        stop_ids: frozenset[int],
        include_stop_token: bool,
        emit: Callable[[object], None],
        trace_margins: bool,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.grammar = grammar  # llama_sampler* or None; freed by the engine
        self.stop_ids = stop_ids
        self.include_stop_token = include_stop_token
        self.emit = emit
        self.margins: list[float] | None = [] if trace_margins else None
        self.arrival = time.time()
        self.seq = -1
        self.chain: Any = None  # llama_sampler* chain (penalties, top-k/p, temperature, dist), or None: argmax
        self.n_prefilled = 0
        self.n_cached = 0  # prompt tokens taken from the slot's prefix cache
        self.n_fed = 0  # output tokens fed back through a decode step (their KV cells exist)
        self.admitted = 0.0
        self.output: list[int] = []
        self.scheduled = 0.0
        self.first_token = 0.0
        self.last_token = 0.0
        self.done = False
        self.mask: np.ndarray | None = None  # token ids never allowed (bad tokens)
        self.stop_mask: np.ndarray | None = None  # stop ids, masked while output < min_tokens

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.max_tokens


@dataclass
class _Planned:
    """What one step feeds for a request: a prompt chunk and/or its pending token, and where its logits land."""

    req: _Request
    prefill: int = 0  # prompt tokens in this step
    out_index: int = -1  # batch position whose logits are sampled, -1: none


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def grammar_for(guided_json_schema: dict[str, Any] | str | None, grammar: str | None) -> str | None:
    """The GBNF grammar for a JSON schema (dict or JSON text; "" or {} means any JSON object) or GBNF as given."""
    if grammar is not None and guided_json_schema is not None:
        raise InvalidInputError("give a JSON schema or a grammar, not both")
    if grammar is not None:
        return grammar
    if guided_json_schema is None:
        return None
    if isinstance(guided_json_schema, str):
        if not guided_json_schema.strip():
            return JSON_GBNF
        try:
            guided_json_schema = json.loads(guided_json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"guided decoding: the JSON schema is not JSON: {exc}") from exc
    if not isinstance(guided_json_schema, dict):
        raise InvalidInputError("guided decoding: a JSON schema must be an object")
    if not guided_json_schema:
        return JSON_GBNF
    try:
        return str(json_schema_to_gbnf(json.dumps(guided_json_schema)))
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions on unsupported schemas
        raise InvalidInputError(f"guided decoding: unsupported JSON schema: {exc}") from exc


class ContinuousBatchingEngine:
    """A llama.cpp model behind one scheduling thread; async API for the gRPC server (a core Component)."""

    def __init__(self, settings: LlmEngineSettings) -> None:
        self.settings = settings
        self._info: ModelInfo | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._n_vocab = 0
        self._n_ctx_seq = 0
        self._eog: frozenset[int] = frozenset()
        # Shared with the asyncio side, guarded by _cv.
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}
        self._abort_ids: set[str] = set()
        self._free_seqs: list[int] = []
        self._prefix_cache = settings.prefix_cache and not settings.kv_unified
        self._slot_tokens: dict[int, list[int]] = {}  # free slot -> tokens whose KV cells it keeps (prefix cache)
        self._reserved = 0  # unified KV: cells promised to admitted requests
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._latency_ema = 2.0  # seconds per request, for the retry hint
        # Engine thread only.
        self._active: dict[int, _Request] = {}
        self._prefilling: deque[_Request] = deque()
        self._cand: np.ndarray | None = None
        self._cand_arr: Any = None
        self._ids: np.ndarray | None = None
        self._one = lc.llama_token_data(0, 0.0, 0.0)
        self._one_arr = lc.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    # ----- lifecycle -----

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._info = await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()
        log.info(
            "llm engine: %s (%s), %d slots x %d tokens, n_batch %d, %d threads, kv_unified=%s",
            self._info.model_id,
            self._info.description,
            self._info.max_sequences,
            self._info.n_ctx_per_seq,
            self._info.n_batch,
            self.settings.n_threads,
            self._info.kv_unified,
        )

    async def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        await asyncio.to_thread(thread.join)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _load(self) -> ModelInfo:
        s = self.settings
        path = Path(s.model_path)
        if not path.is_file():
            raise ConfigError(f"llm engine: model file not found: {path}")
        started = time.perf_counter()
        digest = file_sha256(path)
        log.info("llm engine: model %s sha256=%s (%.1f s to hash)", path, digest, time.perf_counter() - started)
        if s.model_sha256 and s.model_sha256.strip().lower() != digest:
            raise ConfigError(f"llm engine: {path.name} has sha256 {digest}, but model_sha256 pins {s.model_sha256}")
        init_llama()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ConfigError(f"llm engine: llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = s.n_ctx
        cparams.n_batch = s.n_batch
        cparams.n_ubatch = s.n_batch
        cparams.n_seq_max = s.max_sequences
        cparams.n_threads = s.n_threads
        cparams.n_threads_batch = s.n_threads
        cparams.kv_unified = s.kv_unified
        cparams.no_perf = True
        flash_attn = s.flash_attn
        if flash_attn == "auto" and s.batch_invariant and s.n_threads > 1:
            flash_attn = "off"  # multi-threaded flash attention splits work by batch shape: outputs would drift
        cparams.flash_attn_type = {
            "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lc.llama_model_free(model)
            raise ConfigError(
                f"llm engine: llama.cpp could not create a context (n_ctx={s.n_ctx}, max_sequences={s.max_sequences})"
            )
        self._model, self._ctx = model, ctx
        self._vocab = lc.llama_model_get_vocab(model)
        self._mem = lc.llama_get_memory(ctx)
        self._n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._n_ctx_seq = int(lc.llama_n_ctx_seq(ctx))
        self._eog = frozenset(t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t))
        self._batch = lc.llama_batch_init(s.n_batch, 0, 1)
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._cand = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
        self._cand_arr = lc.llama_token_data_array(
            self._cand.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), self._n_vocab, -1, False
        )
        self._free_seqs = list(range(s.max_sequences - 1, -1, -1))
        self._slot_tokens = {}
        self._reserved = 0
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(model, desc, 256)
        bos = int(lc.llama_vocab_bos(self._vocab))
        metadata = {
            k: v
            for k in (
                "general.name",
                "general.architecture",
                "general.license",
                "general.size_label",
                "tokenizer.chat_template",
            )
            if (v := meta_str(model, k)) is not None
        }
        return ModelInfo(
            model_id=path.name,
            path=str(path),
            sha256=digest,
            description=desc.value.decode("utf-8", errors="replace"),
            vocab_size=self._n_vocab,
            n_ctx=int(lc.llama_n_ctx(ctx)),
            n_ctx_per_seq=self._n_ctx_seq,
            n_ctx_train=int(lc.llama_model_n_ctx_train(model)),
            n_layer=int(lc.llama_model_n_layer(model)),
            n_embd=int(lc.llama_model_n_embd(model)),
            n_head=int(lc.llama_model_n_head(model)),
            n_head_kv=int(lc.llama_model_n_head_kv(model)),
            n_params=int(lc.llama_model_n_params(model)),
            max_sequences=s.max_sequences,
            n_batch=s.n_batch,
            kv_unified=s.kv_unified,
            eos_token_ids=sorted(self._eog),
            bos_token_id=bos if bos >= 0 else None,
            metadata=metadata,
        )

    def _free_llama(self) -> None:
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None

    # ----- public API -----

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineStoppedError("the llm engine has not loaded its model yet")
        return self._info

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def health(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, f"engine thread failed: {self._fatal!r}"
        if self._info is None:
            return False, "model not loaded"
        if not self.running:
            return False, "engine stopped"
        return True, "OK"

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams | None = None,
        guided_json_schema: dict[str, Any] | str | None = None,
        stop_token_ids: Sequence[int] = (),
        *,
        grammar: str | None = None,
        include_stop_token: bool = False,
        trace_margins: bool = False,
    ) -> AsyncGenerator[Item, None]:
        """Stream TokenDelta items as tokens come, then one GenerationResult.

        The model's end-of-generation tokens always stop (unless sampling.ignore_eos); stop_token_ids add more.
        max_tokens is clamped to the room left in a sequence slot (finish_reason "length" there).
        Raises InvalidInputError (bad prompt, schema, grammar), EngineOverloadedError (queue full),
        EngineStoppedError. Leaving the iteration early (client cancellation) aborts the request and frees its slot.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        req = self._submit(
            request_id,
            prompt_token_ids,
            max_tokens,
            sampling or SamplingParams(),
            grammar_for(guided_json_schema, grammar),
            stop_token_ids,
            include_stop_token,
            emit,
            trace_margins,
        )
        finished = False
        try:
            while True:
                item = await queue.get()
                tokens: list[int] = []
                while isinstance(item, int):
                    tokens.append(item)
                    item = queue.get_nowait() if not queue.empty() else None
                if tokens:
                    yield TokenDelta(tokens)
                if item is None:
                    continue
                if isinstance(item, GenerationResult):
                    finished = True
                    yield item
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
        finally:
            if not finished:
                self._abort(req.request_id, req)

    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request: True if it was found. Its stream ends with finish_reason "abort"."""
        return self._abort(request_id, None)

    def _abort(self, request_id: str, only: _Request | None) -> bool:
        with self._cv:
            req = self._requests.get(request_id)
            if req is None or req.done or (only is not None and req is not only):
                return False
            if req.seq < 0:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(req)
                metrics.QUEUED_REQUESTS.set(len(self._waiting))
                self._finish_unscheduled(req, "abort")
                return True
            self._abort_ids.add(request_id)
            self._cv.notify_all()
            return True

    # ----- admission (caller's thread) -----

    def _submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        grammar_text: str | None,
        stop_token_ids: Sequence[int],
        include_stop_token: bool,
        emit: Callable[[object], None],
        trace_margins: bool,
    ) -> _Request:
        if self._info is None or not self.running:
            raise EngineStoppedError("the llm engine is not running")
        prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            self._reject("invalid")
            raise InvalidInputError("the prompt has no tokens")
        bad = [t for t in prompt_ids if t < 0 or t >= self._n_vocab]
        if bad:
            self._reject("invalid")
            raise InvalidInputError(f"prompt token ids out of range [0, {self._n_vocab}): {bad[:5]}")
        if len(prompt_ids) >= self._n_ctx_seq:
            self._reject("too_long")
            raise InvalidInputError(
                f"the prompt has {len(prompt_ids)} tokens; this engine holds at most {self._n_ctx_seq} per request "
                "(prompt + output)"
            )
        if max_tokens < 1:
            self._reject("invalid")
            raise InvalidInputError("max_tokens must be at least 1")
        for ids, what in ((stop_token_ids, "stop"), (sampling.bad_token_ids, "bad")):
            if any(t < 0 or t >= self._n_vocab for t in ids):
                self._reject("invalid")
                raise InvalidInputError(f"{what} token ids out of range [0, {self._n_vocab})")
        stop_ids = frozenset(int(t) for t in stop_token_ids) | (frozenset() if sampling.ignore_eos else self._eog)
        max_tokens = min(max_tokens, self._n_ctx_seq - len(prompt_ids))
        grammar = None
        if grammar_text is not None:
            grammar = lc.llama_sampler_init_grammar(self._vocab, grammar_text.encode(), b"root")
            if not grammar:
                self._reject("invalid")
                raise InvalidInputError("guided decoding: llama.cpp could not parse the grammar")
        req = _Request(
            request_id, prompt_ids, max_tokens, sampling, grammar, stop_ids, include_stop_token, emit, trace_margins
        )
        if sampling.bad_token_ids:
            req.mask = np.array(sorted(set(sampling.bad_token_ids)), dtype=np.int64)
        if sampling.min_tokens > 0 and stop_ids:
            req.stop_mask = np.array(sorted(stop_ids), dtype=np.int64)
        with self._cv:
            problem: CallstreamError | None = None
            if request_id in self._requests:
                problem = DuplicateRequestError(f"request {request_id!r} is already running")
            elif len(self._waiting) - len(self._free_seqs) >= self.settings.max_queued_requests:
                retry = self._retry_after_locked()
                problem = EngineOverloadedError(
                    f"llm engine queue is full ({len(self._waiting)} waiting, {len(self._active)} running); "
                    f"retry in {retry:.1f} s",
                    retry,
                )
            elif self._stopping:
                problem = EngineStoppedError("the llm engine is stopping")
            if problem is None:
                self._requests[request_id] = req
                self._waiting.append(req)
                metrics.QUEUED_REQUESTS.set(len(self._waiting))
                self._cv.notify_all()
        if problem is not None:
            if grammar:
                lc.llama_sampler_free(grammar)
            self._reject("queue_full" if isinstance(problem, EngineOverloadedError) else "invalid")
            raise problem
        return req

    @staticmethod
    def _reject(reason: str) -> None:
        metrics.REQUESTS_REJECTED.labels(reason).inc()

    def _retry_after_locked(self) -> float:
        """Seconds until a slot is likely free for a newcomer: queue ahead of it in rounds of max_sequences."""
        rounds = 1 + len(self._waiting) // max(1, self.settings.max_sequences)
        return round(min(60.0, max(0.5, self._latency_ema * rounds)), 1)

    # ----- the engine thread -----

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._abort_ids and not self._active:
                        self._cv.wait()
                    if self._stopping:
                        break
                    aborts, self._abort_ids = self._abort_ids, set()
                    admitted = self._admit_locked()
                for request_id in aborts:
                    self._abort_active(request_id)
                for req in admitted:
                    self._setup(req)
                if self._active:
                    self._compact()
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - reported to every caller, then the thread ends
            log.exception("llm engine thread failed")
            self._fatal = exc
        finally:
            error = EngineStoppedError(
                "the llm engine stopped" if self._fatal is None else f"the llm engine failed: {self._fatal!r}"
            )
            for req in list(self._active.values()):
                self._release(req)
                self._fail(req, error)
            with self._cv:
                self._stopping = True
                waiting = list(self._waiting)
                self._waiting.clear()
            for req in waiting:
                self._fail(req, error)
            metrics.QUEUED_REQUESTS.set(0)
            metrics.ACTIVE_SEQUENCES.set(0)
            self._free_llama()

    def _admit_locked(self) -> list[_Request]:
        admitted: list[_Request] = []
        while self._waiting and self._free_seqs:
            req = self._waiting[0]
            if self.settings.kv_unified and self._reserved + req.reserved > self._n_ctx_seq and self._active:
                break  # wait until running sequences give back KV cells (FIFO: no overtaking)
            self._waiting.popleft()
            req.seq = self._pick_slot_locked(req.prompt)
            self._reserved += req.reserved
            admitted.append(req)
        metrics.QUEUED_REQUESTS.set(len(self._waiting))
        return admitted

    def _pick_slot_locked(self, prompt: list[int]) -> int:
        """The free slot whose kept tokens share the longest prefix with the prompt; on a tie the lowest id (the
        running sequences stay packed at the low ids, see _compact)."""
        best, key = 0, (-1, 0)
        for i, seq in enumerate(self._free_seqs):
            n = common_prefix(self._slot_tokens.get(seq, ()), prompt) if self._prefix_cache else 0
            if (n, -seq) > key:
                best, key = i, (n, -seq)
        return self._free_seqs.pop(best)

    def _compact(self) -> None:
        """Keep the running sequences on the lowest slot ids, with no holes (engine thread).

        With one KV stream per slot (kv_unified=False) llama.cpp cuts a batch into micro-batches of consecutive
        sequence ids (llama_batch_allocr::split_equal, "sequential"), and each micro-batch is a full pass over the
        weights: sequences 0-7 decode in one pass, sequences 0,2,4,...,14 in eight (measured: 79 vs 114 ms per
        step on 1 thread). So the highest running sequence moves into the lowest free slot: llama_memory_seq_cp
        copies its whole KV stream (a memcpy before the next step; the values are the same, so outputs are too),
        and the old slot keeps those cells as its prefix cache.
        """
        if self.settings.kv_unified:
            return
        while self._active:
            with self._cv:
                low = min(self._free_seqs, default=None)
            high = max(self._active)
            if low is None or low > high:
                return
            req = self._active.pop(high)
            lc.llama_memory_seq_cp(self._mem, high, low, -1, -1)
            kept = req.prompt[: req.n_prefilled]
            if req.n_prefilled == len(req.prompt):
                kept = kept + req.output[: req.n_fed]
            self._slot_tokens.pop(low, None)
            if self._prefix_cache and kept:
                self._slot_tokens[high] = kept
            else:
                lc.llama_memory_seq_rm(self._mem, high, -1, -1)
            with self._cv:
                self._free_seqs.remove(low)
                self._free_seqs.append(high)
            req.seq = low
            self._active[low] = req
            metrics.SEQUENCE_MOVES.inc()

    def _setup(self, req: _Request) -> None:
        req.admitted = time.time()
        sp = req.sampling
        if sp.penalized or not sp.greedy:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            if sp.penalized:
                lc.llama_sampler_chain_add(
                    chain,
                    lc.llama_sampler_init_penalties(
                        self._n_vocab, PENALTY_LAST_N, sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
                    ),
                )
            if sp.greedy:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            else:
                if sp.top_k > 0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(sp.top_k))
                if 0.0 < sp.top_p < 1.0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(sp.top_p, 1))
                if sp.min_p > 0.0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(sp.min_p, 1))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(sp.temperature))
                seed = lc.LLAMA_DEFAULT_SEED if sp.seed is None else int(sp.seed) & 0xFFFFFFFF
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
            if sp.penalized:  # the penalty window starts over the prompt's tail
                for t in req.prompt[-PENALTY_LAST_N:]:
                    lc.llama_sampler_accept(chain, t)
            req.chain = chain
        kept = self._slot_tokens.pop(req.seq, [])
        # At least the prompt's last token is computed again: its logits give the first output token.
        cached = min(common_prefix(kept, req.prompt), len(req.prompt) - 1) if self._prefix_cache else 0
        if cached > 0 and not lc.llama_memory_seq_rm(self._mem, req.seq, cached, -1):
            cached = 0  # a memory that cannot drop a tail (recurrent models): start over
        if cached == 0:
            lc.llama_memory_seq_rm(self._mem, req.seq, -1, -1)
        req.n_prefilled = req.n_cached = cached
        if cached:
            metrics.PROMPT_CACHED_TOKENS.inc(cached)
        self._active[req.seq] = req
        self._prefilling.append(req)
        metrics.ACTIVE_SEQUENCES.set(len(self._active))

    def _step(self) -> None:
        """One scheduling iteration. Batch-invariant mode (the default) runs each prompt chunk in a llama_decode
        of its own, then one llama_decode with one token of every decoding sequence; otherwise prompt chunks fill
        the room left in the decode batch (llama.cpp server style, fewer calls for many short prompts)."""
        if self.settings.batch_invariant:
            if self._prefilling:
                plan, n = self._plan_prefill(self._prefilling[0], self.settings.n_batch, 0)
                self._run_batch([plan], n)
            plans, n = self._plan_decode()
            if plans:
                metrics.DECODE_BATCH_SEQUENCES.observe(len(plans))
                self._run_batch(plans, n)
            return
        plans, n = self._plan_decode()
        if plans:
            metrics.DECODE_BATCH_SEQUENCES.observe(len(plans))
        for req in list(self._prefilling):
            room = self.settings.n_batch - n
            if room <= 0:
                break
            plan, n = self._plan_prefill(req, room, n)
            plans.append(plan)
        self._run_batch(plans, n)

    def _plan_decode(self) -> tuple[list[_Planned], int]:
        """The last sampled token of every sequence past its prompt, each with its own logit row."""
        plans: list[_Planned] = []
        n = 0
        for _, req in sorted(self._active.items()):  # ascending ids: one micro-batch (see _compact)
            if req.n_prefilled < len(req.prompt) or not req.output:
                continue
            self._put(self._batch, n, req.output[-1], len(req.prompt) + len(req.output) - 1, req.seq, True)
            plans.append(_Planned(req, 0, n))
            n += 1
        return plans, n

    def _plan_prefill(self, req: _Request, room: int, n: int) -> tuple[_Planned, int]:
        """The next chunk of req's prompt (at most `room` tokens) from batch position n; logits on its last token."""
        start = req.n_prefilled
        if not req.scheduled:
            req.scheduled = time.time()
            metrics.QUEUE_SECONDS.observe(req.scheduled - req.arrival)
        take = min(room, len(req.prompt) - start)
        last = start + take == len(req.prompt)
        for j in range(take):
            self._put(self._batch, n + j, req.prompt[start + j], start + j, req.seq, last and j == take - 1)
        return _Planned(req, take, n + take - 1 if last else -1), n + take

    def _run_batch(self, plans: list[_Planned], n: int) -> None:
        self._batch.n_tokens = n
        started = time.perf_counter()
        rc = lc.llama_decode(self._ctx, self._batch)
        elapsed = time.perf_counter() - started
        if rc != 0:
            self._decode_failed(rc, plans)
            return
        metrics.STEP_SECONDS.observe(elapsed)
        metrics.STEP_TOKENS.observe(n)
        for p in plans:
            if p.prefill:
                p.req.n_prefilled += p.prefill
                metrics.PROMPT_TOKENS.inc(p.prefill)
                if p.req.n_prefilled == len(p.req.prompt):
                    self._prefilling.remove(p.req)
            elif p.out_index >= 0:
                p.req.n_fed += 1  # its last output token is in the KV cache now
        for p in plans:
            if p.out_index >= 0:
                self._sample(p.req, p.out_index)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0

    def _decode_failed(self, rc: int, plan: list[_Planned]) -> None:
        if rc == 1 and len(plan) > 1:
            # No KV slot for the whole batch: give up the most recently admitted request, keep the others.
            victim = max((p.req for p in plan), key=lambda r: r.admitted)
            log.warning(
                "llm engine: llama_decode found no KV room (%d sequences); failing %s", len(plan), victim.request_id
            )
            self._release(victim, keep_cache=False)
            self._fail(victim, TransientError("the llm engine ran out of KV cache; retry"))
            return
        log.error("llm engine: llama_decode returned %d for %d sequences", rc, len(plan))
        for p in plan:
            self._release(p.req, keep_cache=False)
            self._fail(p.req, GenerationFailedError(f"llama_decode failed with code {rc}"))

    def _sample(self, req: _Request, index: int) -> None:
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        if req.mask is not None:
            logits[req.mask] = _NEG_INF
        if req.stop_mask is not None and len(req.output) < req.sampling.min_tokens:
            logits[req.stop_mask] = _NEG_INF
        if req.margins is not None:
            top2 = np.partition(logits, -2)[-2:]
            req.margins.append(float(top2[1] - top2[0]))
        try:
            token = self._choose(req, logits)
        except GenerationFailedError as exc:
            self._release(req)
            self._fail(req, exc)
            return
        now = time.time()
        if not req.first_token:
            req.first_token = now
            metrics.TTFT_SECONDS.observe(now - req.arrival)
        req.last_token = now
        if token in req.stop_ids:
            if req.include_stop_token:
                req.output.append(token)
                req.emit(token)
            self._finish(req, "stop", token)
            return
        if req.chain is not None:
            lc.llama_sampler_accept(req.chain, token)
        if req.grammar is not None:
            lc.llama_sampler_accept(req.grammar, token)
        req.output.append(token)
        metrics.GENERATION_TOKENS.inc()
        req.emit(token)
        if len(req.output) >= req.max_tokens:
            self._finish(req, "length", None)

    def _choose(self, req: _Request, logits: np.ndarray) -> int:
        if req.chain is None:
            token = int(np.argmax(logits))
            if req.grammar is None or self._grammar_allows(req.grammar, token):
                return token
            self._fill_candidates(logits)
            lc.llama_sampler_apply(req.grammar, ctypes.byref(self._cand_arr))
            assert self._cand is not None
            best = int(np.argmax(self._cand["logit"]))
            if not math.isfinite(float(self._cand["logit"][best])):
                raise GenerationFailedError("guided decoding: the grammar allows no token here")
            return int(self._cand["id"][best])
        arr = self._cand_arr
        self._fill_candidates(logits)
        lc.llama_sampler_apply(req.chain, ctypes.byref(arr))
        token = int(arr.data[arr.selected].id)
        if req.grammar is None or self._grammar_allows(req.grammar, token):
            return token
        self._fill_candidates(logits)
        lc.llama_sampler_apply(req.grammar, ctypes.byref(arr))
        lc.llama_sampler_apply(req.chain, ctypes.byref(arr))
        chosen = arr.data[arr.selected]
        if not math.isfinite(float(chosen.logit)):
            raise GenerationFailedError("guided decoding: the grammar allows no token here")
        return int(chosen.id)

    def _fill_candidates(self, logits: np.ndarray) -> None:
        cand, arr = self._cand, self._cand_arr
        assert cand is not None
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        arr.data = cand.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
        arr.size = self._n_vocab
        arr.selected = -1
        arr.sorted = False

    def _grammar_allows(self, grammar: Any, token: int) -> bool:
        self._one.id = token
        self._one.logit = 0.0
        self._one.p = 0.0
        self._one_arr.size = 1
        self._one_arr.selected = -1
        self._one_arr.sorted = False
        lc.llama_sampler_apply(grammar, ctypes.byref(self._one_arr))
        return math.isfinite(self._one.logit)

    def _abort_active(self, request_id: str) -> None:
        with self._cv:
            req = self._requests.get(request_id)
        if req is None or req.done or req.seq < 0 or self._active.get(req.seq) is not req:
            return
        self._finish(req, "abort", None)

    def _release(self, req: _Request, keep_cache: bool = True) -> None:
        """Give back the slot and samplers (engine thread). With the prefix cache the slot keeps the KV cells of
        the tokens computed so far (prompt, then output fed back), for the next request that shares a prefix."""
        if req.seq >= 0 and self._active.get(req.seq) is req:
            del self._active[req.seq]
            kept = req.prompt[: req.n_prefilled]
            if req.n_prefilled == len(req.prompt):
                kept = kept + req.output[: req.n_fed]
            if self._prefix_cache and keep_cache and kept:
                lc.llama_memory_seq_rm(self._mem, req.seq, len(kept), -1)
                self._slot_tokens[req.seq] = kept
            else:
                lc.llama_memory_seq_rm(self._mem, req.seq, -1, -1)
            with contextlib.suppress(ValueError):
                self._prefilling.remove(req)
            with self._cv:
                self._free_seqs.append(req.seq)
                self._reserved -= req.reserved
            metrics.ACTIVE_SEQUENCES.set(len(self._active))
        if req.chain is not None:
            lc.llama_sampler_free(req.chain)
            req.chain = None
        if req.grammar is not None:
            lc.llama_sampler_free(req.grammar)
            req.grammar = None

    def _finish(self, req: _Request, reason: str, matched: int | None) -> None:
        self._release(req)
        now = time.time()
        completion = len(req.output)
        ttft = req.first_token - req.arrival if req.first_token else None
        tpot = ((req.last_token - req.first_token) / (completion - 1)) if completion > 1 else None
        if tpot is not None:
            metrics.TPOT_SECONDS.observe(tpot)
        metrics.REQUEST_SECONDS.observe(now - req.arrival)
        self._latency_ema = 0.8 * self._latency_ema + 0.2 * (now - req.arrival)
        self._complete(req, reason, matched, ttft, tpot)

    def _finish_unscheduled(self, req: _Request, reason: str) -> None:
        """A request that never got a slot (aborted while queued). Caller holds _cv."""
        if req.grammar is not None:
            lc.llama_sampler_free(req.grammar)
            req.grammar = None
        self._complete(req, reason, None, None, None, locked=True)

    def _complete(
        self,
        req: _Request,
        reason: str,
        matched: int | None,
        ttft: float | None,
        tpot: float | None,
        locked: bool = False,
    ) -> None:
        if locked:
            req.done = True
            self._requests.pop(req.request_id, None)
        else:
            with self._cv:
                if req.done:
                    return
                req.done = True
                self._requests.pop(req.request_id, None)
        metrics.REQUESTS_FINISHED.labels(reason).inc()
        if reason == "abort":
            metrics.ABORTED_REQUESTS.inc()
        req.emit(
            GenerationResult(
                request_id=req.request_id,
                output_token_ids=list(req.output),
                finish_reason=reason,
                matched_stop_token_id=matched,
                prompt_tokens=len(req.prompt),
                completion_tokens=len(req.output),
                arrival_time=req.arrival,
                first_scheduled_time=req.scheduled,
                first_token_time=req.first_token,
                last_token_time=req.last_token,
                queue_time_s=(req.scheduled - req.arrival) if req.scheduled else time.time() - req.arrival,
                time_to_first_token_s=ttft,
                time_per_output_token_s=tpot,
                cached_tokens=req.n_cached,
                logit_margins=req.margins,
            )
        )

    def _fail(self, req: _Request, error: BaseException) -> None:
        with self._cv:
            if req.done:
                return
            req.done = True
            self._requests.pop(req.request_id, None)
            if req.grammar is not None:
                lc.llama_sampler_free(req.grammar)
                req.grammar = None
        metrics.REQUESTS_FINISHED.labels("error").inc()
        req.emit(error)
