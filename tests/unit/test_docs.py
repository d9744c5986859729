"""docs/ must describe the settings and topics that the code actually uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from callstream.core.settings import KafkaSettings, TopicSettings
from callstream.llm_engine.settings import LlmEngineSettings
from callstream.router.settings import RouterSettings
from callstream.summarizer.settings import SummarizerSettings
from callstream.transcriber.settings import TranscriberSettings

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(
    "settings",
    [TranscriberSettings, RouterSettings, SummarizerSettings, LlmEngineSettings, KafkaSettings, TopicSettings],
)
def test_every_setting_is_documented(settings: type[BaseModel]) -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [name for name in settings.model_fields if f"`{name}`" not in text]
    assert not missing, f"{settings.__name__} fields missing from docs/configuration.md: {missing}"


def test_every_topic_and_message_is_documented() -> None:
    text = (DOCS / "topics.md").read_text()
    for topic in TopicSettings().all_topics():
        assert f"`{topic}`" in text
    from callstream.v1 import events_pb2

    for message in events_pb2.DESCRIPTOR.message_types_by_name:
        if message not in ("Word", "Segment", "Label", "Header", "SourceRef"):
            assert f"**{message}**" in text, message
