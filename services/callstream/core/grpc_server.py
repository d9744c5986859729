"""gRPC server plumbing for every service: health checking, reflection, metrics, graceful shutdown.

Follows grpc's Python examples: grpc.health.v1 reports SERVING per service once models are loaded and
the Kafka consumer runs, NOT_SERVING while shutting down; reflection lists the services so that grpcurl works
without .proto files; SIGTERM/SIGINT stop accepting RPCs and give in-flight ones `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from callstream.core import metrics
from callstream.core.settings import ServiceSettings

log = logging.getLogger(__name__)


class Component(Protocol):
    """Something a service starts before serving and stops after (batchers, Kafka processors, engines)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class GrpcService:
    """A servicer and how to register it."""

    full_name: str  # e.g. "callstream.v1.RouterService"
    servicer: Any
    register: Callable[[Any, grpc.aio.Server], None]


@dataclass
class ServiceRuntime:
    """Everything one `callstream serve X` process runs."""

    name: str
    settings: ServiceSettings
    grpc_services: Sequence[GrpcService]
    components: Sequence[Component] = field(default_factory=list)
    # Awaitables whose completion (or failure) means the service can no longer work, e.g. the Kafka loop.
    watch: Callable[[], Sequence[Awaitable[Any]]] = lambda: []


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        service = self.service

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            loop = asyncio.get_running_loop()
            started = loop.time()
            code = "OK"
            try:
                return await inner(request, context)
            except Exception:
                code = "ERROR"
                raise
            finally:
                if context.code() not in (None, grpc.StatusCode.OK):
                    code = str(context.code().name)
                metrics.RPC_SECONDS.labels(service, method, code).observe(loop.time() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def build_server(
    name: str, grpc_services: Sequence[GrpcService], options: Sequence[tuple[str, Any]] = ()
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(
        interceptors=[_MetricsInterceptor(name)],
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024), *options],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for svc in grpc_services:
        svc.register(svc.servicer, server)
    names = [svc.full_name for svc in grpc_services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    return server, health_servicer


async def set_health(health_servicer: health.aio.HealthServicer, names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for n in ["", *names]:
        await health_servicer.set(n, status)


async def run_service(
    runtime: ServiceRuntime, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Start components and the gRPC server, serve until SIGTERM/SIGINT (or `stop`), then shut down cleanly."""
    settings = runtime.settings
    metrics.serve_metrics(settings.metrics_port, settings.grpc_host)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible outside the main thread (tests run services in-process).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    server, health_servicer = build_server(runtime.name, runtime.grpc_services)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    server.add_insecure_port(address)
    names = [s.full_name for s in runtime.grpc_services]
    await set_health(health_servicer, names, serving=False)
    await server.start()  # health answers NOT_SERVING while models load
    started: list[Component] = []
    try:
        for component in runtime.components:
            await component.start()
            started.append(component)
        await set_health(health_servicer, names, serving=True)
        log.info("%s serving gRPC on %s", runtime.name, address)
        if ready is not None:
            ready.set()
        waiters = [asyncio.ensure_future(stop.wait()), *(asyncio.ensure_future(w) for w in runtime.watch())]
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            if w not in done:
                w.cancel()
        for w in done:
            if not w.cancelled() and w.exception() is not None:
                log.error("%s: a component failed: %r", runtime.name, w.exception())
                raise w.exception()  # type: ignore[misc]
    finally:
        log.info("%s shutting down", runtime.name)
        await set_health(health_servicer, names, serving=False)
        await server.stop(settings.shutdown_grace_s)
        for component in reversed(started):
            try:
                await component.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                log.exception("%s: error while stopping %r", runtime.name, component)


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Answer an RPC with the status that fits the error (see core.errors): never a bare UNKNOWN."""
    from callstream.core.errors import InvalidInputError, TransientError

    if isinstance(exc, InvalidInputError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, TransientError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
    log.exception("unexpected error in RPC", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
