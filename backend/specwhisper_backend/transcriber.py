"""Whisper transcription over the exported graphs: language detection, tasks, timestamps, long form.

Long-form audio is decoded in 30 s windows advanced by the last timestamp (or by a whole window
without timestamps), with the previous text as prompt when asked, as openai/whisper and
faster-whisper do. Segments are produced lazily, so a caller can stream them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from specwhisper_backend import features
from specwhisper_backend.decoding import decode_window
from specwhisper_backend.drafting import Drafter, DraftPolicy
from specwhisper_backend.errors import OptionError
from specwhisper_backend.logit_filters import (
    ApplyTimestampRules,
    LogitFilter,
    SuppressAtBegin,
    SuppressTokens,
)
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.text import WhisperText

TIME_PER_TIMESTAMP = 0.02  # seconds per timestamp token step
FRAMES_PER_TIMESTAMP = 2  # mel frames per timestamp token step


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # ISO code such as "en"; None detects it from the first window
    task: Literal["transcribe", "translate"] = "transcribe"
    timestamps: bool = False  # segment times from Whisper's timestamp tokens
    speculative: bool = True  # False: the main model alone (the baseline), through the same loop
    initial_prompt: str | None = None  # text that conditions the first window (names, spelling)
    condition_on_previous_text: bool = False  # prompt each window with the text decoded so far


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]


@dataclass
class Transcription:
    text: str
    language: str
    segments: list[Segment]
    stats: DecodeStats = field(default_factory=DecodeStats)


class Transcriber:
    """One exported model; requests are served one at a time (decoder caches are per request)."""

    def __init__(self, model: ExportedModel, draft_policy: DraftPolicy | None = None) -> None:
        self.model = model
        self.facts = model.facts
        self.text = WhisperText(model.directory / "processor" / "tokenizer.json", model.facts)
        self.mel_filters = np.load(model.directory / features.MEL_FILTERS_FILE)
        self.draft_policy = draft_policy or DraftPolicy()
        self._lock = threading.Lock()

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

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        """Decode 16 kHz mono float32 audio completely."""
        stats = DecodeStats()
        language_box: list[str] = []
        segments = list(self.segments(audio, options, stats, language_box))
        text = "".join(segment.text for segment in segments).strip()
        return Transcription(text=text, language=language_box[0], segments=segments, stats=stats)

    def segments(
        self, audio: np.ndarray, options: TranscribeOptions, stats: DecodeStats, language_out: list[str]
    ) -> Iterator[Segment]:
        """Segments as they are decoded; the language (given or detected) is appended to ``language_out``."""
        self.check(options)
        with self._lock:
            yield from self._segments(audio, options, stats, language_out)

    def _segments(
        self, audio: np.ndarray, options: TranscribeOptions, stats: DecodeStats, language_out: list[str]
    ) -> Iterator[Segment]:
        facts, tokens = self.facts, self.facts.tokens
        started = time.perf_counter()
        mel = features.log_mel(audio, self.mel_filters)
        stats.seconds_features += time.perf_counter() - started
        content_frames = len(audio) // features.HOP_LENGTH

        drafter = None
        if options.speculative:
            drafter = Drafter(self.model.assistant, tokens.eot, self.draft_policy)
        language = options.language if facts.is_multilingual else "en"
        context: list[int] = self.text.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        seek = 0
        while seek < content_frames:
            window = features.window(mel, seek)
            window_frames = min(features.N_FRAMES, content_frames - seek)
            offset = seek / features.FRAMES_PER_SECOND
            started = time.perf_counter()
            states = self.model.encode(window)
            stats.seconds_encoder += time.perf_counter() - started
            stats.windows += 1
            self.model.main.start(states)
            if language is None:
                language = self.detect_language(stats)
            if not language_out:
                language_out.append(language)

            prompt = self.prompt(language, options, context)
            if drafter is not None:
                started = time.perf_counter()
                assistant_states = self.model.encode_for_assistant(window, states)
                audio_frames = features.encoder_frames(window_frames, assistant_states.shape[1])
                drafter.start_window(assistant_states, audio_frames)
                stats.seconds_encoder += time.perf_counter() - started
            result = decode_window(
                self.model.main,
                prompt,
                self.logit_filters(options, len(prompt)),
                tokens.eot,
                facts.n_text_ctx,
                stats,
                drafter,
            )
            produced, advance = self._split(result.tokens, offset, window_frames, options.timestamps)
            seek += max(advance, 1)  # a window always moves on, whatever the model emitted
            # Without conditioning, the initial prompt shapes the first window only (as openai/whisper).
            context = context + result.tokens if options.condition_on_previous_text else []
            yield from (segment for segment in produced if segment.text.strip())

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

    def _split(self, ids: list[int], offset: float, window_frames: int, timestamps: bool) -> tuple[list[Segment], int]:
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
