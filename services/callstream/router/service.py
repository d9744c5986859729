"""Router service — where requests enter and results leave.

Enter: gRPC Classify, and Kafka records from tickets.created (TicketCreated) and calls.transcribed (Transcript).
Model: the SetFit classifier (router/classifier.py) behind the shared dynamic batcher, then the routing
rules (router/rules.py). Leave: RoutedTicket on tickets.routed, keyed by ticket or call id.

Model versions: with `reload_interval_s` > 0 the router polls `model_dir` (an artifact or a registry's `current`
pointer) for a new version, loads and verifies it in a worker thread while the old one keeps serving, and swaps it
in under `swap_lock`, which the Kafka processor holds for a whole polled batch (handle, produce, commit): a batch
is routed by one version, and every event by exactly one. Each prediction carries the version that made it, so
RoutedTicket.classifier_version and ClassifyResponse.classifier_version name the model that really answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiokafka import ConsumerRecord

from callstream.core import codec
from callstream.core.batching import DynamicBatcher
from callstream.core.errors import InvalidInputError
from callstream.core.grpc_server import GrpcService, ServiceRuntime, abort_with
from callstream.core.kafka import OutRecord, kafka_service_runtime, now_timestamp
from callstream.router.classifier import IntentClassifier, load_classifier, read_manifest
from callstream.router.registry import resolve_model_dir
from callstream.router.rules import RouteDecision, RoutingRules
from callstream.router.settings import RouterSettings
from callstream.v1 import events_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

Ranked = list[tuple[str, float]]


@dataclass
class RoutedText:
    intents: Ranked
    decision: RouteDecision
    version: str = ""


class Router:
    """Classifier + rules; shared by the gRPC servicer and the Kafka handler."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        # Rules are validated here, at start, so a bad file stops the service with a message naming the line.
        self.rules = RoutingRules.from_file(settings.rules_path)
        self.classifier: IntentClassifier | None = None
        self.model_path: Path | None = None  # the resolved artifact directory of the loaded version
        self.swap_lock = asyncio.Lock()
        self.swaps = 0
        self._reload_task: asyncio.Task[None] | None = None
        self.batcher: DynamicBatcher[str, tuple[str, Ranked]] = DynamicBatcher(
            self._predict_batch,
            name="router",
            max_batch_size=settings.batch.max_batch_size,
            max_wait_ms=settings.batch.max_wait_ms,
            max_idle_ms=settings.batch.max_idle_ms,
        )

    @property
    def version(self) -> str:
        return self.classifier.version if self.classifier else ""

    def _load(self, model_path: Path) -> IntentClassifier:
        return load_classifier(
            model_path,
            self.settings.verify_model,
            batch_size=self.settings.batch.max_batch_size,
            backend=self.settings.backend,
        )

    async def start(self) -> None:
        self.model_path = resolve_model_dir(self.settings.model_dir)
        self.classifier = await asyncio.to_thread(self._load, self.model_path)
        log.info(
            "router: classifier %s loaded from %s (backend %s)",
            self.classifier.version,
            self.model_path,
            self.settings.backend,
        )
        await self.batcher.start()
        if self.settings.reload_interval_s > 0:
            self._reload_task = asyncio.create_task(self._reload_loop(), name="router-reload")

    async def stop(self) -> None:
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
        await self.batcher.stop()

    def _changed(self) -> Path | None:
        """The artifact directory of a version other than the loaded one, or None."""
        path = resolve_model_dir(self.settings.model_dir)
        version = read_manifest(path).version
        return path if version != self.version or path != self.model_path else None

    async def check_for_new_version(self) -> bool:
        """Load, verify and swap in a new version if model_dir names one; True when swapped. Errors keep the old."""
        try:
            path = await asyncio.to_thread(self._changed)
            if path is None:
                return False
            new = await asyncio.to_thread(self._load, path)
        except Exception as exc:  # noqa: BLE001 - a bad new version must not stop a serving router
            log.error("router: new model version not loaded, keeping %s: %s", self.version, exc)
            return False
        async with self.swap_lock:  # never in the middle of a Kafka batch
            old = self.version
            self.classifier, self.model_path = new, path
            self.swaps += 1
        log.info("router: switched classifier %s -> %s (%s)", old, new.version, path)
        return True

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            await self.check_for_new_version()

    def _predict_batch(self, texts: Sequence[str]) -> list[tuple[str, Ranked]]:
        classifier = self.classifier  # one version for the whole batch, even if a swap happens meanwhile
        assert classifier is not None
        # The full ranking: each caller cuts it to its own top_k.
        return [(classifier.version, r) for r in classifier.predict(texts, top_k=len(classifier.labels))]

    async def route(
        self, text: str, source_channel: str, customer: dict[str, str] | None = None, top_k: int = 0
    ) -> RoutedText:
        if not text.strip():
            raise InvalidInputError("nothing to classify: the text is empty")
        version, ranked = await self.batcher.submit(text)
        intents = ranked[: top_k or self.settings.top_k]
        return RoutedText(intents, self.rules.route(intents, source_channel, customer or {}), version)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Classify(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ClassifyResponse:
        try:
            routed = await asyncio.gather(
                *(self.router.route(t, request.source_channel, top_k=request.top_k) for t in request.texts)
            )
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_with(context, exc)
            raise
        return router_pb2.ClassifyResponse(
            results=[
                router_pb2.Classification(
                    intents=[events_pb2.Label(name=n, score=s) for n, s in r.intents],
                    queue=r.decision.queue,
                    needs_human=r.decision.needs_human,
                    rule=r.decision.rule,
                )
                for r in routed
            ],
            classifier_version=routed[0].version if routed else self.router.version,
        )


def _text_of_ticket(ticket: events_pb2.TicketCreated) -> str:
    return f"{ticket.subject}\n{ticket.body}".strip() if ticket.subject else ticket.body.strip()


class RouterKafkaHandler:
    def __init__(self, router: Router, settings: RouterSettings) -> None:
        self.router = router
        self.topics = settings.topics

    async def __call__(self, record: ConsumerRecord) -> list[OutRecord]:
        source: events_pb2.SourceRef
        customer: dict[str, str] = {}
        if record.topic == self.topics.tickets_created:
            ticket = codec.decode(events_pb2.TicketCreated, record.value, record.headers)
            if not ticket.ticket_id:
                raise InvalidInputError("TicketCreated without ticket_id")
            source = events_pb2.SourceRef(
                kind=events_pb2.SourceRef.KIND_TICKET, id=ticket.ticket_id, topic=record.topic
            )
            tenant, text, channel = ticket.tenant, _text_of_ticket(ticket), ticket.source_channel or "unknown"
            customer = dict(ticket.customer)
        else:
            transcript = codec.decode(events_pb2.Transcript, record.value, record.headers)
            if not transcript.call_id:
                raise InvalidInputError("Transcript without call_id")
            source = events_pb2.SourceRef(
                kind=events_pb2.SourceRef.KIND_CALL, id=transcript.call_id, topic=record.topic
            )
            tenant, text, channel = transcript.tenant, transcript.text, "call"
        routed = await self.router.route(text, channel, customer)
        message = events_pb2.RoutedTicket(
            source=source,
            tenant=tenant,
            text=text,
            intents=[events_pb2.Label(name=n, score=s) for n, s in routed.intents],
            queue=routed.decision.queue,
            needs_human=routed.decision.needs_human,
            classifier_version=routed.version,
            rule=routed.decision.rule,
            source_channel=channel,
            routed_at=now_timestamp(),
        )
        return [OutRecord(self.topics.tickets_routed, source.id.encode(), message)]


def build_runtime(settings: RouterSettings) -> ServiceRuntime:
    router = Router(settings)
    return kafka_service_runtime(
        name="router",
        settings=settings,
        model=router,
        grpc_service=GrpcService(
            router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
            RouterServicer(router),
            router_pb2_grpc.add_RouterServiceServicer_to_server,
        ),
        input_topics=[settings.topics.tickets_created, settings.topics.calls_transcribed],
        handler=RouterKafkaHandler(router, settings),
        batch_lock=router.swap_lock,
    )
