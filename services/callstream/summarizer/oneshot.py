"""`callstream summarize`: one summary through the engine protocol, starting the CPU engine in-process if needed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from callstream.core.broker import free_port
from callstream.core.grpc_server import run_service
from callstream.summarizer.engine_client import TrtllmClient
from callstream.summarizer.settings import SummarizerSettings
from callstream.summarizer.summarize import Summarizer
from callstream.summarizer.tokenizer import load_tokenizer


@contextlib.asynccontextmanager
async def local_engine() -> AsyncIterator[str]:
    """The CPU engine on a free loopback port for the duration of the block."""
    from callstream.llm_engine.server import build_runtime
    from callstream.llm_engine.settings import LlmEngineSettings

    settings = LlmEngineSettings(grpc_port=free_port(), grpc_host="127.0.0.1", metrics_port=0)
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(build_runtime(settings), ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the engine's start-up error
    try:
        yield f"127.0.0.1:{settings.grpc_port}"
    finally:
        stop.set()
        await task


async def summarize_once(text: str, kind: str, engine_address: str | None) -> dict[str, Any]:
    settings = SummarizerSettings()
    async with contextlib.AsyncExitStack() as stack:
        address = engine_address or await stack.enter_async_context(local_engine())
        client = TrtllmClient(address, load_tokenizer(settings.tokenizer), timeout_s=settings.engine_timeout_s)
        try:
            summarizer = Summarizer(
                client, max_input_tokens=settings.max_input_tokens, max_output_tokens=settings.max_output_tokens
            )
            result = await summarizer.summarize(text, kind)
        finally:
            await client.close()
    return dataclasses.asdict(result)
