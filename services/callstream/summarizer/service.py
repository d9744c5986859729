"""Summarizer service — where requests enter and results leave.

Enter: gRPC Summarize, and Kafka records from tickets.routed (RoutedTicket).
Model: none here. The summarizer is a client of an LLM engine over TensorRT-LLM's gRPC protocol
(summarizer/engine_client.py); the engine (CPU llm_engine or trtllm-serve on GPU) batches in flight.
Leave: Summary on tickets.summarized, keyed by ticket or call id.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiokafka import ConsumerRecord

from callstream.core import codec
from callstream.core.errors import InvalidInputError
from callstream.core.grpc_server import GrpcService, ServiceRuntime, abort_with
from callstream.core.kafka import OutRecord, kafka_service_runtime, now_timestamp
from callstream.summarizer.engine_client import TrtllmClient
from callstream.summarizer.settings import SummarizerSettings
from callstream.summarizer.summarize import Summarizer, SummaryResult
from callstream.summarizer.tokenizer import load_tokenizer
from callstream.v1 import events_pb2, summarizer_pb2, summarizer_pb2_grpc

log = logging.getLogger(__name__)


def summary_message(
    result: SummaryResult, source: events_pb2.SourceRef, tenant: str = "", queue: str = "", intent: str = ""
) -> events_pb2.Summary:
    return events_pb2.Summary(
        source=source,
        tenant=tenant,
        summary=result.summary,
        issue=result.issue,
        resolution=result.resolution,
        action_items=result.action_items,
        customer_sentiment=result.customer_sentiment,
        follow_up_needed=result.follow_up_needed,
        engine=result.engine,
        model_id=result.model_id,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_seconds=result.latency_s,
        queue=queue,
        intent=intent,
        summarized_at=now_timestamp(),
    )


def _kind(source: events_pb2.SourceRef) -> str:
    return "call" if source.kind == events_pb2.SourceRef.KIND_CALL else "ticket"


def connect(settings: SummarizerSettings, engine_address: str | None = None) -> tuple[TrtllmClient, Summarizer]:
    """The engine client (with the model's own tokenizer) and the summarizer, as the settings describe them."""
    tokenizer = load_tokenizer(settings.tokenizer)
    client = TrtllmClient(engine_address or settings.engine_address, tokenizer, timeout_s=settings.engine_timeout_s)
    summarizer = Summarizer(
        client,
        max_input_tokens=settings.max_input_tokens,
        max_output_tokens=settings.max_output_tokens,
        temperature=settings.temperature,
        repetition_penalty=settings.repetition_penalty,
        retry_repetition_penalty=settings.retry_repetition_penalty,
    )
    return client, summarizer


class SummarizerComponent:
    """Holds the engine client; connects at start and checks that the engine answers."""

    def __init__(self, settings: SummarizerSettings) -> None:
        self.settings = settings
        self.client: TrtllmClient | None = None
        self.summarizer: Summarizer | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    async def start(self) -> None:
        self.client, self.summarizer = await asyncio.to_thread(connect, self.settings)
        log.info("summarizer: engine at %s", self.settings.engine_address)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def summarize(self, text: str, kind: str) -> SummaryResult:
        if not text.strip():
            raise InvalidInputError("nothing to summarize: the text is empty")
        assert self.summarizer is not None
        async with self._slots:
            return await self.summarizer.summarize(text, kind)


class SummarizerServicer(summarizer_pb2_grpc.SummarizerServiceServicer):
    def __init__(self, component: SummarizerComponent) -> None:
        self.component = component

    async def Summarize(  # noqa: N802 - gRPC method name
        self, request: summarizer_pb2.SummarizeRequest, context: grpc.aio.ServicerContext
    ) -> summarizer_pb2.SummarizeResponse:
        try:
            result = await self.component.summarize(request.text, _kind(request.source))
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_with(context, exc)
            raise
        return summarizer_pb2.SummarizeResponse(summary=summary_message(result, request.source))


class SummarizerKafkaHandler:
    def __init__(self, component: SummarizerComponent, settings: SummarizerSettings) -> None:
        self.component = component
        self.topics = settings.topics

    async def __call__(self, record: ConsumerRecord) -> list[OutRecord]:
        routed = codec.decode(events_pb2.RoutedTicket, record.value, record.headers)
        if not routed.source.id:
            raise InvalidInputError("RoutedTicket without source id")
        result = await self.component.summarize(routed.text, _kind(routed.source))
        intent = routed.intents[0].name if routed.intents else ""
        message = summary_message(result, routed.source, routed.tenant, routed.queue, intent)
        return [OutRecord(self.topics.tickets_summarized, routed.source.id.encode(), message)]


def build_runtime(settings: SummarizerSettings) -> ServiceRuntime:
    component = SummarizerComponent(settings)
    return kafka_service_runtime(
        name="summarizer",
        settings=settings,
        model=component,
        grpc_service=GrpcService(
            summarizer_pb2.DESCRIPTOR.services_by_name["SummarizerService"].full_name,
            SummarizerServicer(component),
            summarizer_pb2_grpc.add_SummarizerServiceServicer_to_server,
        ),
        input_topics=[settings.topics.tickets_routed],
        handler=SummarizerKafkaHandler(component, settings),
        transient_retry_s=settings.engine_retry_s,
    )
