"""Router service — where requests enter and results leave.

Enter: gRPC Classify, and Kafka records from tickets.created (TicketCreated) and calls.transcribed (Transcript).
Model: the SetFit classifier (router/classifier.py) behind the shared dynamic batcher, then the routing
rules (router/rules.py). Leave: RoutedTicket on tickets.routed, keyed by ticket or call id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from aiokafka import ConsumerRecord

from callstream.core import codec
from callstream.core.batching import DynamicBatcher
from callstream.core.errors import InvalidInputError
from callstream.core.grpc_server import GrpcService, ServiceRuntime, abort_with
from callstream.core.kafka import OutRecord, kafka_service_runtime, now_timestamp
from callstream.router.classifier import IntentClassifier, load_classifier
from callstream.router.rules import RouteDecision, RoutingRules
from callstream.router.settings import RouterSettings
from callstream.v1 import events_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

Ranked = list[tuple[str, float]]


@dataclass
class RoutedText:
    intents: Ranked
    decision: RouteDecision


class Router:
    """Classifier + rules; shared by the gRPC servicer and the Kafka handler."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        # Rules are validated here, at start, so a bad file stops the service with a message naming the line.
        self.rules = RoutingRules.from_file(settings.rules_path)
        self.classifier: IntentClassifier | None = None
        self.batcher: DynamicBatcher[str, Ranked] = DynamicBatcher(
            self._predict_batch,
            name="router",
            max_batch_size=settings.batch.max_batch_size,
            max_wait_ms=settings.batch.max_wait_ms,
        )

    @property
    def version(self) -> str:
        return self.classifier.version if self.classifier else ""

    async def start(self) -> None:
        self.classifier = await asyncio.to_thread(load_classifier, self.settings.model_dir, self.settings.verify_model)
        log.info("router: classifier %s loaded from %s", self.classifier.version, self.settings.model_dir)
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def _predict_batch(self, texts: Sequence[str]) -> list[Ranked]:
        assert self.classifier is not None
        # The full ranking: each caller cuts it to its own top_k.
        return self.classifier.predict(texts, top_k=len(self.classifier.labels))

    async def route(
        self, text: str, source_channel: str, customer: dict[str, str] | None = None, top_k: int = 0
    ) -> RoutedText:
        if not text.strip():
            raise InvalidInputError("nothing to classify: the text is empty")
        intents = (await self.batcher.submit(text))[: top_k or self.settings.top_k]
        return RoutedText(intents, self.rules.route(intents, source_channel, customer or {}))


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
            classifier_version=self.router.version,
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
            classifier_version=self.router.version,
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
    )
