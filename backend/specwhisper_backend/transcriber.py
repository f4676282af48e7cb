"""Whisper transcription over the exported graphs: language detection, tasks, timestamps, long form.

Long-form audio is decoded in 30 s windows advanced by the last timestamp (or by a whole window
without timestamps), with the previous text as prompt when asked, as openai/whisper and
faster-whisper do, and with openai/whisper's ``transcribe`` rules and defaults for the rest: a
window whose text is too repetitive (compression ratio) or too unlikely (average log-probability)
is decoded again at the next temperature of the schedule, and a window the model judges silent
(``<|nospeech|>`` likely and the text unlikely) is skipped.

A request's windows go one after another (:class:`RequestDecode`), each as a row of the batch
decoder (:mod:`specwhisper_backend.decoding`): alone here, among other requests' windows under the
scheduler (:mod:`specwhisper_backend.scheduler`), through the same loop. Segments are produced
lazily, so a caller can stream them.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from specwhisper_backend import features
from specwhisper_backend.decoding import BatchDecoder, Window, WindowResult
from specwhisper_backend.drafting import DraftPolicy, RowDraft, SeenAcceptance
from specwhisper_backend.errors import AudioError, OptionError, RequestCancelled
from specwhisper_backend.load_policy import Probes, StepCosts, measure_step_costs, shared_step_costs
from specwhisper_backend.logit_filters import (
    ApplyTimestampRules,
    LogitFilter,
    SuppressAtBegin,
    SuppressTokens,
)
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.sampling import PositionNoise
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.text import WhisperText
from specwhisper_backend.vad import VAD_FILE, SileroVad, SpeechMap
from specwhisper_backend.word_timing import Word, WordAligner

TIME_PER_TIMESTAMP = 0.02  # seconds per timestamp token step
FRAMES_PER_TIMESTAMP = 2  # mel frames per timestamp token step
# Tokens per row of the main passes timed when costs are measured (interpolated between).
MEASURED_TOKENS = (1, 2, 3, 5, 9, 17)


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # ISO code such as "en"; None detects it from the first window
    task: Literal["transcribe", "translate"] = "transcribe"
    timestamps: bool = False  # segment times from Whisper's timestamp tokens
    speculative: bool = True  # False: the main model alone (the baseline), through the same loop
    initial_prompt: str | None = None  # text that conditions the first window (names, spelling)
    condition_on_previous_text: bool = False  # prompt each window with the text decoded so far
    # Temperature fallback, as openai/whisper's transcribe: a window is decoded at the first
    # temperature, and again at the next while its text is too repetitive or too unlikely.
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4  # gzip ratio above this: too repetitive
    logprob_threshold: float | None = -1.0  # average log-probability below this: too unlikely
    no_speech_threshold: float | None = 0.6  # <|nospeech|> above this (and text unlikely): silence, skipped
    seed: int = 0  # sampling above temperature 0 is reproducible per request, drafting or not
    word_timestamps: bool = False  # each segment's words, with start, end and probability
    vad_filter: bool = False  # decode only the speech a voice activity detector finds

    def __post_init__(self) -> None:
        if not self.temperatures or any(not 0 <= t <= 2 for t in self.temperatures):
            raise OptionError(f"temperatures must be one or more values in [0, 2], got {self.temperatures}")
        if self.no_speech_threshold is not None and not 0 <= self.no_speech_threshold <= 1:
            raise OptionError(f"no_speech_threshold must be in [0, 1], got {self.no_speech_threshold}")
        if self.compression_ratio_threshold is not None and self.compression_ratio_threshold <= 0:
            raise OptionError(f"compression_ratio_threshold must be positive, got {self.compression_ratio_threshold}")


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    words: tuple[Word, ...] = ()
    # Its window's decoding, as openai/whisper reports it: the temperature that was kept, and what
    # the fallback judged it by.
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float | None = None


def compression_ratio(text: str) -> float:
    """How much gzip shrinks the text: high for repetition loops (openai/whisper's measure)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass
class Transcription:
    text: str
    language: str
    segments: list[Segment]
    stats: DecodeStats = field(default_factory=DecodeStats)


class RequestDecode:
    """One request's windows, in order: the next one to decode, and the segments of each decoded one."""

    def __init__(self, transcriber: Transcriber, audio: np.ndarray, options: TranscribeOptions, stats: DecodeStats):
        self.transcriber, self.options, self.stats = transcriber, options, stats
        self.speech: SpeechMap | None = None
        if options.vad_filter:  # decode the speech alone; times go back to the recording's timeline
            started = time.perf_counter()
            runs = transcriber.vad.speech(audio)
            stats.seconds_vad += time.perf_counter() - started
            stats.speech_seconds += sum(end - start for start, end in runs) / features.SAMPLE_RATE
            self.speech = SpeechMap(runs)
            audio = np.concatenate([audio[start:end] for start, end in runs]) if runs else audio[:0]
        started = time.perf_counter()
        self.mel = features.log_mel(audio, transcriber.mel_filters)
        stats.seconds_features += time.perf_counter() - started
        self.content_frames = len(audio) // features.HOP_LENGTH
        self.seek = 0
        facts = transcriber.facts
        self.language = options.language if facts.is_multilingual else "en"
        text = transcriber.text
        self.context: list[int] = text.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        self.drafting = None
        if options.speculative:
            self.drafting = RowDraft(transcriber.draft_policy, transcriber.seen_acceptance, options.task)
        self.segments: list[Segment] = []
        self.last_speech = 0.0  # where the last word ended (word timestamps' heuristics)
        self.attempt = 0  # the current window's place in the temperature schedule
        self.retrying = False  # the current window is to be decoded again (no new encoder pass)
        self.earlier: tuple[tuple[int, ...], ...] = ()  # the current window's failed attempts' text
        self._encoded: tuple[np.ndarray, np.ndarray | None] | None = None  # the current window's encoder output

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames

    def features(self) -> np.ndarray:
        """The next window's log-mel ``[1, n_mels, 3000]``."""
        return features.window(self.mel, self.seek)

    def window(self, states: np.ndarray, draft_states: np.ndarray | None) -> Window:
        """The next window to decode, given its encoder output (and the draft's)."""
        self.stats.windows += 1
        self._encoded = (states, draft_states)
        return self.retry()

    def retry(self) -> Window:
        """The current window again, at the temperature its attempt has reached."""
        transcriber, options = self.transcriber, self.options
        states, draft_states = self._encoded
        window_frames = min(features.N_FRAMES, self.content_frames - self.seek)
        context = self.context
        temperature = options.temperatures[self.attempt]
        noise = None
        if temperature > 0:
            noise = PositionNoise((options.seed, self.seek, self.attempt), transcriber.facts.vocab_size)
        return Window(
            states=states,
            audio_frames=features.encoder_frames(window_frames, states.shape[1]),
            language=self.language,
            prompt=lambda language: transcriber.prompt(language, options, context),
            filters=lambda prompt_length: transcriber.logit_filters(options, prompt_length),
            stats=self.stats,
            drafting=self.drafting,
            draft_states=draft_states if self.drafting is not None else None,
            temperature=temperature,
            noise=noise,
            earlier=self.earlier if self.drafting is not None else (),
        )

    def needs_fallback(self, result: WindowResult, ratio: float) -> bool:
        """openai/whisper's rule: too repetitive (``ratio``, the text's compression ratio) or too
        unlikely, unless it is silence."""
        options = self.options
        unlikely = options.logprob_threshold is not None and result.avg_logprob < options.logprob_threshold
        repetitive = options.compression_ratio_threshold is not None and ratio > options.compression_ratio_threshold
        silence = self._silent(result) and unlikely
        return (repetitive or unlikely) and not silence

    def _ratio(self, result: WindowResult) -> float:
        return compression_ratio(self.transcriber.text.decode(result.tokens))

    def _silent(self, result: WindowResult) -> bool:
        threshold = self.options.no_speech_threshold
        return threshold is not None and result.no_speech_prob is not None and result.no_speech_prob > threshold

    def finish(self, result: WindowResult) -> list[Segment]:
        """The decoded window's segments (those with text); the request moves on to its next window,
        unless this one is to be decoded again at a higher temperature (:attr:`retrying`)."""
        self.language = result.language
        options = self.options
        ratio = self._ratio(result)
        if self.attempt + 1 < len(options.temperatures) and self.needs_fallback(result, ratio):
            self.attempt += 1
            self.retrying = True
            self.earlier = (*self.earlier, tuple(result.tokens))  # what the next attempt may copy
            self.stats.fallback_decodes += 1
            return []
        states = self._encoded[0]  # the main encoder's output, for word timestamps
        self.attempt, self.retrying, self._encoded, self.earlier = 0, False, None, ()
        self.stats.temperatures.append(result.temperature)
        window_frames = min(features.N_FRAMES, self.content_frames - self.seek)
        skip = self._silent(result)
        if skip and options.logprob_threshold is not None and result.avg_logprob > options.logprob_threshold:
            skip = False  # likely text despite <|nospeech|>: kept, as openai/whisper does
        if skip:
            self.seek += window_frames
            self.stats.windows_skipped += 1
            return []
        offset = self.seek / features.FRAMES_PER_SECOND
        produced, advance = self.transcriber.split(result.tokens, offset, window_frames, options.timestamps)
        judged = {
            "temperature": result.temperature,
            "avg_logprob": round(result.avg_logprob, 4),
            "compression_ratio": round(ratio, 4),
            "no_speech_prob": None if result.no_speech_prob is None else round(result.no_speech_prob, 4),
        }
        produced = [replace(segment, **judged) for segment in produced]
        if options.word_timestamps and produced:
            audio_frames = features.encoder_frames(window_frames, states.shape[1])
            produced, self.last_speech = self.transcriber.aligner.add_words(
                produced, states, self.language, options.task, audio_frames, offset, self.last_speech
            )
            # As openai/whisper: the next window starts where the last word ended, unless the text
            # ended on a lone timestamp (then the window was done).
            begin = self.transcriber.facts.tokens.timestamp_begin
            lone_ending = options.timestamps and [t >= begin for t in result.tokens[-2:]] == [False, True]
            last_word_end = max((w.end for s in produced for w in s.words), default=None)
            if not lone_ending and last_word_end is not None and last_word_end > offset:
                advance = round(last_word_end * features.FRAMES_PER_SECOND) - self.seek
        self.seek += max(advance, 1)  # a window always moves on, whatever the model emitted
        # Without conditioning, the initial prompt shapes the first window only (as openai/whisper);
        # text sampled at a high temperature does not condition the next window either.
        conditioned = options.condition_on_previous_text and result.temperature <= 0.5
        self.context = self.context + result.tokens if conditioned else []
        kept = [self._on_recording(segment) for segment in produced if segment.text.strip()]
        self.segments += kept
        return kept

    def _on_recording(self, segment: Segment) -> Segment:
        """The segment's times on the recording's timeline (they are on the speech's under VAD)."""
        speech = self.speech
        if speech is None:
            return segment
        if segment.words:
            words = []
            for word in segment.words:  # a word's start and end map through the same run of speech
                run = speech.chunk((word.start + word.end) / 2)
                words.append(replace(word, start=speech.original(word.start, run), end=speech.original(word.end, run)))
            return replace(segment, start=words[0].start, end=words[-1].end, words=tuple(words))
        start, end = speech.span(segment.start, segment.end)
        return replace(segment, start=start, end=end)

    def transcription(self) -> Transcription:
        text = "".join(segment.text for segment in self.segments).strip()
        return Transcription(text=text, language=self.language or "", segments=self.segments, stats=self.stats)


class Transcriber:
    """One exported model. :meth:`transcribe` and :meth:`segments` decode one request at a time on the
    model's sessions; the scheduler decodes many at once on the same sessions (one user at a time)."""

    def __init__(
        self, model: ExportedModel, draft_policy: DraftPolicy | None = None, shared_costs: Path | None = None
    ) -> None:
        """``shared_costs``: a file through which the instances of one server share their measured step
        costs (:func:`~specwhisper_backend.load_policy.server_costs_file`); None: this one measures."""
        self.model = model
        self.shared_costs = shared_costs
        self.facts = model.facts
        self.text = WhisperText(model.directory / "processor" / "tokenizer.json", model.facts)
        self.mel_filters = np.load(model.directory / features.MEL_FILTERS_FILE)
        self.draft_policy = draft_policy or DraftPolicy()
        self._aligner: WordAligner | None = None
        self._vad: SileroVad | None = None
        self._costs: dict[int, StepCosts] = {}
        # What this instance learnt of drafting outlives each request's decoder: how often drafts
        # were accepted (where a request's estimate starts) and when to probe a plain batch.
        self.forget_traffic()
        # Held by whoever decodes on the model's sessions: segments() for a request, a scheduler for its life.
        self.lock = threading.Lock()

    def forget_traffic(self) -> None:
        """Drop what decoding taught this instance of drafting (the acceptance seen, the probes' waits):
        what a warm-up ran is not traffic. (A tone's rejected round lowered where every request of its
        detected language starts, to about where one row's drafting stops paying.)"""
        self.seen_acceptance = SeenAcceptance(self.measured_acceptance())
        self._probes = Probes()

    def measured_acceptance(self) -> dict[str, float]:
        """By language, the held-out acceptance of the draft that serves it, where its export says."""
        facts = self.model.facts
        drafts = {language: facts.draft(language) for language in facts.languages or ("en",)}
        return {
            language: draft.acceptance[language]
            for language, draft in drafts.items()
            if draft is not None and language in draft.acceptance
        }

    @property
    def aligner(self) -> WordAligner | None:
        """Word timing on the export's alignment graph (opened on first use), if it has one."""
        if self._aligner is None and self.model.alignment is not None:
            self._aligner = WordAligner(self.model.alignment, self.facts, self.text)
        return self._aligner

    @property
    def vad(self) -> SileroVad:
        """Silero VAD from the export (loaded on first use)."""
        if self._vad is None:
            self._vad = SileroVad(self.model.directory / VAD_FILE)
        return self._vad

    def check(self, options: TranscribeOptions) -> None:
        """Refuse options this model cannot honour, before any audio is processed."""
        facts = self.facts
        if options.task not in ("transcribe", "translate"):
            raise OptionError(f"unknown task {options.task!r}: use 'transcribe' or 'translate'")
        if options.language is not None:
            if facts.is_multilingual and options.language not in facts.languages:
                known = sorted(facts.languages)
                raise OptionError(
                    f"unknown language {options.language!r}: use one of this model's {len(known)} language codes"
                    f" ({', '.join(known[:8])}, ...), or none to detect it"
                )
            if not facts.is_multilingual and options.language != "en":
                raise OptionError(f"this model is English-only; language {options.language!r} is not available")
        if options.task == "translate" and not facts.is_multilingual:
            raise OptionError("this model is English-only and cannot translate")
        if options.speculative and self.model.assistant is None:
            raise OptionError("speculative decoding needs an assistant: export the model with --assistant")
        if options.vad_filter and not (self.model.directory / VAD_FILE).is_file():
            raise OptionError("the VAD filter needs Silero VAD beside the graphs: re-export the model")
        if options.word_timestamps and not self.facts.main.alignment_file:
            raise OptionError("word timestamps need the alignment graph: re-export the model (specwhisper-export)")

    def start(self, audio: np.ndarray, options: TranscribeOptions, stats: DecodeStats) -> RequestDecode:
        """A request ready to decode, once its options and audio are checked."""
        self.check(options)
        if len(audio) < features.HOP_LENGTH:
            raise AudioError(
                f"audio is {len(audio)} samples long at {features.SAMPLE_RATE} Hz: Whisper needs at least one "
                f"feature frame ({features.HOP_LENGTH} samples, 10 ms)"
            )
        return RequestDecode(self, audio, options, stats)

    def encode(self, requests: Sequence[RequestDecode]) -> list[Window]:
        """The next window of each request, through one encoder pass over all of them."""
        started = time.perf_counter()
        batch = np.concatenate([request.features() for request in requests])
        states = self.model.encode(batch)
        draft_states = None
        if self.model.assistant is not None and any(request.drafting for request in requests):
            draft_states = self.model.encode_for_assistant(batch, states)
        share = (time.perf_counter() - started) / len(requests)
        windows = []
        for index, request in enumerate(requests):
            request.stats.seconds_encoder += share
            draft = None if draft_states is None else draft_states[index : index + 1]
            windows.append(request.window(states[index : index + 1], draft))
        return windows

    def step_costs(self, max_rows: int = 1) -> StepCosts:
        """The measured costs of main passes and draft passes for up to ``max_rows`` rows (measured once,
        on this model's own sessions, which must not be decoding meanwhile)."""
        if max_rows not in self._costs:
            rows = sorted({1, *(2**i for i in range(1, max_rows.bit_length()) if 2**i <= max_rows), max_rows})
            main, draft = self.model.main, self.model.assistant
            frames = self.facts.n_audio_ctx  # a draft's costs over a whole window: it never costs more
            states = np.zeros((1, frames, main.encoder_width), dtype=np.float32)
            draft_states = None if draft is None else np.zeros((1, frames, draft.encoder_width), np.float32)
            tokens = tuple(t for t in MEASURED_TOKENS if t <= self.draft_policy.maximum + 1)
            self._costs[max_rows] = shared_step_costs(
                self.shared_costs,
                f"rows {rows}, tokens {tokens}",
                lambda: measure_step_costs(main, draft, states, draft_states, rows, tokens),
            )
        return self._costs[max_rows]

    def batch_decoder(self, costs: StepCosts | None) -> BatchDecoder:
        """A batch decoder on this model's sessions (``costs`` for a cost-aware drafting policy)."""
        model, policy = self.model, self.draft_policy
        return BatchDecoder(self.facts, model.main, model.assistant, policy, costs, self._probes, model.routes)

    def transcribe(
        self, audio: np.ndarray, options: TranscribeOptions, cancelled: Callable[[], bool] | None = None
    ) -> Transcription:
        """Decode 16 kHz mono float32 audio completely (see :meth:`segments` for ``cancelled``)."""
        stats = DecodeStats()
        language_box: list[str] = []
        segments = list(self.segments(audio, options, stats, language_box, cancelled))
        text = "".join(segment.text for segment in segments).strip()
        language = language_box[0] if language_box else options.language or ""  # no speech: none detected
        return Transcription(text=text, language=language, segments=segments, stats=stats)

    def segments(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        stats: DecodeStats,
        language_out: list[str],
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[Segment]:
        """Segments as they are decoded; the language (given or detected) is appended to ``language_out``.

        ``cancelled`` is asked before each 30 s window; when it says yes, :class:`RequestCancelled` is
        raised and the rest of the audio is never decoded.
        """
        request = self.start(audio, options, stats)
        with self.lock:
            costs = self.step_costs(1) if self.draft_policy.cost_aware and self.model.assistant else None
            decoder = self.batch_decoder(costs)
            while not request.done:
                if cancelled is not None and cancelled():
                    raise RequestCancelled(f"cancelled after {request.seek / features.FRAMES_PER_SECOND:.1f} s")
                (window,) = [request.retry()] if request.retrying else self.encode([request])
                decoder.join(window, request)
                ((_, result),) = decoder.drain()
                segments = request.finish(result)
                if not language_out and not request.retrying:
                    language_out.append(result.language)
                yield from segments

    # The rules of one window, public so that a draft's training targets are decoded exactly as served.

    def detect_language(self, stats: DecodeStats) -> str:
        """The main model's likeliest language token after <|startoftranscript|> (one decoder pass
        over the window the main decoder was started on)."""
        started = time.perf_counter()
        logits = self.model.main.forward(np.asarray([[self.facts.tokens.sot]]))[0, 0]
        stats.add_verify(time.perf_counter() - started)
        self.model.main.truncate(np.zeros(1, dtype=np.int64))
        codes = list(self.facts.languages)
        ids = np.asarray([self.facts.languages[code] for code in codes])
        return codes[int(np.argmax(logits[ids]))]

    def prompt(self, language: str, options: TranscribeOptions, context: list[int]) -> list[int]:
        tokens = self.facts.tokens
        prompt: list[int] = []
        if context:
            # As openai/whisper: at most half the text context for previous text.
            prompt = [tokens.sot_prev, *context[-(self.facts.n_text_ctx // 2 - 1) :]]
        prompt.append(tokens.sot)
        if self.facts.is_multilingual:
            task = tokens.translate if options.task == "translate" else tokens.transcribe
            prompt += [self.facts.languages[language], task]
        if not options.timestamps:
            prompt.append(tokens.no_timestamps)
        return prompt

    def logit_filters(self, options: TranscribeOptions, prompt_length: int) -> list[LogitFilter]:
        facts = self.facts
        filters: list[LogitFilter] = [
            SuppressAtBegin(facts.begin_suppress_tokens, prompt_length),
            SuppressTokens(facts.suppress_tokens),
        ]
        if options.timestamps:
            filters.append(
                ApplyTimestampRules(
                    facts.tokens.timestamp_begin,
                    facts.tokens.eot,
                    facts.tokens.no_timestamps,
                    prompt_length,
                    facts.max_initial_timestamp_index,
                )
            )
        return filters

    def split(self, ids: list[int], offset: float, window_frames: int, timestamps: bool) -> tuple[list[Segment], int]:
        """Segments of one window's tokens and how many frames to advance (openai/whisper's rules)."""
        window_seconds = window_frames / features.FRAMES_PER_SECOND
        if not timestamps:
            return [self._segment(offset, offset + window_seconds, ids)], window_frames
        begin = self.facts.tokens.timestamp_begin
        is_time = [t >= begin for t in ids]
        single_ending = is_time[-2:] == [False, True]
        cuts = [i for i in range(1, len(ids)) if is_time[i - 1] and is_time[i]]
        if cuts:
            segments = []
            last = 0
            if single_ending:
                cuts.append(len(ids))
            for cut in cuts:
                piece = ids[last:cut]
                start = offset + (piece[0] - begin) * TIME_PER_TIMESTAMP
                end = offset + (piece[-1] - begin) * TIME_PER_TIMESTAMP
                segments.append(self._segment(start, end, piece))
                last = cut
            if single_ending:
                return segments, window_frames
            return segments, (ids[last - 1] - begin) * FRAMES_PER_TIMESTAMP
        times = [t for t in ids if t >= begin]
        duration = window_seconds
        if times and times[-1] != begin:
            duration = (times[-1] - begin) * TIME_PER_TIMESTAMP
        return [self._segment(offset, offset + duration, ids)], window_frames

    def _segment(self, start: float, end: float, ids: list[int]) -> Segment:
        return Segment(start=round(start, 3), end=round(end, 3), text=self.text.decode(ids), tokens=tuple(ids))
