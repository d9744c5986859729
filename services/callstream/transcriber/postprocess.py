"""What every transcript gets before it leaves the engine: call analytics, then PII redaction.

`FasterWhisperEngine._assemble` calls `finalize_transcript` once per call, so that Kafka (calls.transcribed),
gRPC (Transcribe) and `callstream transcribe` all publish the same analytics under the same redaction policy.
Analytics come first: they only need word times (and the audio), and the word count must not depend on the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from callstream.transcriber.analytics import compute_analytics, voiced_intervals
from callstream.transcriber.redaction import redact_transcript
from callstream.transcriber.settings import TranscriberSettings
from callstream.v1 import events_pb2


def finalize_transcript(
    transcript: events_pb2.Transcript,
    settings: TranscriberSettings,
    speech: Mapping[int, Sequence[tuple[float, np.ndarray]]] | None = None,
) -> events_pb2.Transcript:
    """Fill `analytics`, then redact PII by `settings.pii_redaction` (in place; returned for convenience).

    `speech`: per channel, its speech clips as (start in seconds, 16 kHz samples), which place the start and end
    of talk more precisely than word timestamps do; without it, analytics use the word timestamps alone.
    """
    voiced = {channel: voiced_intervals(clips) for channel, clips in speech.items()} if speech else None
    transcript.analytics.CopyFrom(compute_analytics(transcript, voiced))
    redact_transcript(transcript, settings.pii_redaction)
    return transcript
