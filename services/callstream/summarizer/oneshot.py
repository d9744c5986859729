"""`callstream summarize`: one summary through the engine protocol, starting the CPU engine in-process if needed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from callstream.core.broker import free_port
from callstream.core.grpc_server import run_service
from callstream.summarizer.service import connect
from callstream.summarizer.settings import SummarizerSettings


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
        if engine_address is None:
            engine_address = await stack.enter_async_context(local_engine())
        client, summarizer = connect(settings, engine_address)
        try:
            result = await summarizer.summarize(text, kind)
        finally:
            await client.close()
    return dataclasses.asdict(result)
