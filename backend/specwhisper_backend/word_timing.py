"""Word-level timestamps from the main model's alignment heads, as openai/whisper's ``timing.py``.

Once a window's text is final, the main decoder runs once more over the whole sequence
(``alignment.onnx``: the prompt, the text and the end of text), returning the cross-attention scores
of the heads that follow the audio. Their softmax over the window's audio frames is normalised,
median-filtered, averaged over the heads, and aligned to the tokens by dynamic time warping; each
word then starts where its first token's path jumps to. The same pass gives each token's
probability. Words are split and punctuation merged as openai/whisper does, and the same
heuristics keep long words at pauses and sentence ends in bounds. The text the words come from is
whatever the decoding loop kept, so word timings are the same for plain and speculative decoding.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view

from specwhisper_backend.facts import ModelFacts
from specwhisper_backend.text import WhisperText

TOKENS_PER_SECOND = 50  # encoder frames per second
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # noqa: RUF001 - openai/whisper's, full-width marks included
SENTENCE_ENDS = ".。!！?？"  # noqa: RUF001
UNSPACED_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


@dataclass(frozen=True)
class Word:
    word: str  # as it appears in the text, with its leading space
    start: float
    end: float
    probability: float


@dataclass
class _Timing:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """A median filter of odd ``width`` along the last axis, reflecting at the edges."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.sort(sliding_window_view(padded, width, axis=-1), axis=-1)[..., pad]


def dtw(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost_matrix [N, M]``: its (row, column) indices.

    openai/whisper's recursion and tie-breaking (a tie moves along the columns), computed one
    anti-diagonal at a time so that each step is one NumPy operation over its cells.
    """
    rows, cols = cost_matrix.shape
    cost = np.full((rows + 1, cols + 1), np.inf)
    cost[0, 0] = 0.0
    trace = np.zeros((rows + 1, cols + 1), dtype=np.int8)
    for diagonal in range(2, rows + cols + 1):
        i = np.arange(max(1, diagonal - cols), min(rows, diagonal - 1) + 1)
        j = diagonal - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        cost[i, j] = cost_matrix[i - 1, j - 1] + np.choose(step, [c0, c1, c2])
        trace[i, j] = step
    trace[0, :], trace[:, 0] = 2, 1
    path = []
    i, j = rows, cols
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        move = trace[i, j]
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    indices = np.asarray(path[::-1]).T
    return indices[0], indices[1]


class WordAligner:
    """Runs the alignment graph and turns its scores into words."""

    def __init__(self, session: ort.InferenceSession, facts: ModelFacts, text: WhisperText) -> None:
        self.session, self.facts, self.text = session, facts, text
        self.heads = len(facts.alignment_heads)

    def sot_sequence(self, language: str, task: str) -> list[int]:
        tokens = self.facts.tokens
        if not self.facts.is_multilingual:
            return [tokens.sot]
        return [
            tokens.sot,
            self.facts.languages[language],
            tokens.translate if task == "translate" else tokens.transcribe,
        ]

    def timings(
        self, states: np.ndarray, language: str, task: str, text_tokens: list[int], audio_frames: int
    ) -> list[_Timing]:
        """openai/whisper's ``find_alignment``: each word's tokens, start, end (s, in the window) and
        probability; ``audio_frames`` are the window's encoder frames of audio."""
        if not text_tokens:
            return []
        tokens = self.facts.tokens
        sot_sequence = self.sot_sequence(language, task)
        sequence = [*sot_sequence, tokens.no_timestamps, *text_tokens, tokens.eot]
        logits, scores = self.session.run(
            None,
            {"input_ids": np.asarray([sequence], dtype=np.int64), "encoder_hidden_states": states.astype(np.float32)},
        )
        sampled = logits[0, len(sot_sequence) :, : tokens.eot].astype(np.float64)
        sampled = np.exp(sampled - sampled.max(axis=-1, keepdims=True))
        probs = sampled / sampled.sum(axis=-1, keepdims=True)
        token_probs = probs[np.arange(len(text_tokens)), text_tokens]

        weights = scores[0][:, :, :audio_frames].astype(np.float64)
        weights = np.exp(weights - weights.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        weights = (weights - weights.mean(axis=-2, keepdims=True)) / weights.std(axis=-2, keepdims=True)
        weights = median_filter(weights, MEDIAN_FILTER_WIDTH)
        matrix = weights.mean(axis=0)[len(sot_sequence) : -1]
        text_indices, time_indices = dtw(-matrix)

        words, word_tokens = self.split_words([*text_tokens, tokens.eot], language)
        if len(word_tokens) <= 1:
            return []
        boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
        jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
        jump_times = time_indices[jumps] / TOKENS_PER_SECOND
        starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
        return [
            _Timing(word, list(ids), float(start), float(end), float(np.mean(token_probs[i:j])))
            for word, ids, start, end, i, j in zip(
                words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:], strict=False
            )
        ]

    def split_words(self, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
        """openai/whisper's ``split_to_word_tokens``: at spaces and punctuation, or at every whole
        character for languages written without spaces."""
        pieces, piece_tokens = self._split_on_unicode(tokens)
        if language in UNSPACED_LANGUAGES:
            return pieces, piece_tokens
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for piece, ids in zip(pieces, piece_tokens, strict=True):
            special = ids[0] >= self.facts.tokens.eot
            if special or piece.startswith(" ") or piece.strip() in string.punctuation or not words:
                words.append(piece)
                word_tokens.append(list(ids))
            else:
                words[-1] += piece
                word_tokens[-1].extend(ids)
        return words, word_tokens

    def _split_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        full = self.text.decode(tokens)
        replacement = "\ufffd"
        words, word_tokens, current, offset = [], [], [], 0
        for token in tokens:
            current.append(token)
            decoded = self.text.decode(current)
            if replacement not in decoded or full[offset + decoded.index(replacement)] == replacement:
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def add_words(
        self,
        segments: Sequence,
        states: np.ndarray,
        language: str,
        task: str,
        audio_frames: int,
        offset: float,
        last_speech: float,
    ) -> tuple[list, float]:
        """openai/whisper's ``add_word_timestamps``: the window's segments with their words (times on
        the recording's timeline, from ``offset``), and the new end of the last speech."""
        per_segment = [[t for t in segment.tokens if t < self.facts.tokens.eot] for segment in segments]
        timings = self.timings(states, language, task, [t for ids in per_segment for t in ids], audio_frames)
        durations = np.array([t.end - t.start for t in timings])
        durations = durations[durations.nonzero()]
        median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
        longest = median * 2
        if len(durations):  # words at sentence ends no longer than twice the median
            for i in range(1, len(timings)):
                if timings[i].end - timings[i].start > longest:
                    if timings[i].word in SENTENCE_ENDS:
                        timings[i].end = timings[i].start + longest
                    elif timings[i - 1].word in SENTENCE_ENDS:
                        timings[i].start = timings[i].end - longest
        _merge_punctuations(timings)

        out, index = [], 0
        for segment, ids in zip(segments, per_segment, strict=True):
            saved, words = 0, []
            while index < len(timings) and saved < len(ids):
                timing = timings[index]
                if timing.word:
                    start, end = round(offset + timing.start, 2), round(offset + timing.end, 2)
                    words.append(Word(timing.word, start, end, round(timing.probability, 4)))
                saved += len(timing.tokens)
                index += 1
            start, end = segment.start, segment.end
            if words:
                words, start, end = _bounded(words, start, end, median, longest, last_speech)
                last_speech = end
            out.append(replace(segment, start=round(start, 3), end=round(end, 3), words=tuple(words)))
        return out, last_speech


def _bounded(
    words: list[Word], start: float, end: float, median: float, longest: float, last_speech: float
) -> tuple[list[Word], float, float]:
    """openai/whisper's heuristics at a segment's edges: the first words after a pause and the last
    word no longer than the median allows; the segment's times follow its words."""
    first = words[0]
    if first.end - last_speech > median * 4 and (
        first.end - first.start > longest or (len(words) > 1 and words[1].end - first.start > longest * 2)
    ):
        if len(words) > 1 and words[1].end - words[1].start > longest:
            boundary = max(words[1].end / 2, words[1].end - longest)
            first = replace(first, end=boundary)
            words[1] = replace(words[1], start=boundary)
        first = replace(first, start=max(0.0, first.end - longest))
    if start < first.end and start - 0.5 > first.start:
        first = replace(first, start=max(0.0, min(first.end - median, start)))
    else:
        start = first.start
    words[0] = first
    last = words[-1]
    if end > last.start and end + 0.5 < last.end:
        words[-1] = replace(last, end=max(last.start + median, end))
    else:
        end = last.end
    words = [replace(word, start=round(word.start, 2), end=round(word.end, 2)) for word in words]
    return words, round(start, 2), round(end, 2)


def _merge_punctuations(timings: list[_Timing]) -> None:
    """Leading punctuation joins the word after it, trailing punctuation the word before."""
    i, j = len(timings) - 2, len(timings) - 1
    while i >= 0:
        previous, following = timings[i], timings[j]
        if previous.word.startswith(" ") and previous.word.strip() in PREPEND_PUNCTUATIONS:
            following.word, following.tokens = previous.word + following.word, previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(timings):
        previous, following = timings[i], timings[j]
        if not previous.word.endswith(" ") and following.word in APPEND_PUNCTUATIONS:
            previous.word, previous.tokens = previous.word + following.word, previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1
