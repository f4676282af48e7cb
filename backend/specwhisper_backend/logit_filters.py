"""Whisper's greedy-decoding logit rules, each a small class.

The same filters run on the plain and the speculative path; when several positions are scored in
one pass, each is filtered with its own prefix, so a draft token is judged on exactly the logits
plain greedy decoding would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class LogitFilter(Protocol):
    def apply(self, logits: np.ndarray, tokens: Sequence[int]) -> None:
        """Edit ``logits [V]`` in place for the next token after ``tokens`` (prompt included)."""


def filtered(logits: np.ndarray, tokens: Sequence[int], filters: Sequence[LogitFilter]) -> np.ndarray:
    """A copy of ``logits [V]`` with the filters applied for the token after ``tokens``."""
    scores = np.array(logits, dtype=np.float32, copy=True)
    for rule in filters:
        rule.apply(scores, tokens)
    return scores


def select(logits: np.ndarray, tokens: Sequence[int], filters: Sequence[LogitFilter]) -> int:
    """The greedy choice after ``tokens``: the argmax of the filtered logits.

    The main model's verification and the draft's proposals both choose through the same filters,
    so a draft is built under exactly the rules it will be judged by.
    """
    return int(filtered(logits, tokens, filters).argmax())


class SuppressTokens:
    """Never emit these ids (Whisper's ``suppress_tokens``: symbols and non-speech annotations)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = np.asarray(sorted(set(ids)), dtype=np.int64)

    def apply(self, logits: np.ndarray, tokens: Sequence[int]) -> None:
        logits[self.ids] = -np.inf


class SuppressAtBegin:
    """Ids that may not open the text (blank and end-of-text), as Whisper's ``begin_suppress_tokens``."""

    def __init__(self, ids: Sequence[int], prompt_length: int) -> None:
        self.ids = np.asarray(sorted(set(ids)), dtype=np.int64)
        self.prompt_length = prompt_length

    def apply(self, logits: np.ndarray, tokens: Sequence[int]) -> None:
        if len(tokens) == self.prompt_length:
            logits[self.ids] = -np.inf


class ApplyTimestampRules:
    """openai/whisper's timestamp rules, so segment times come out well-formed.

    Timestamps come in pairs (end, then start of the next segment) except right before the end of
    text; they never decrease; the text opens with a timestamp no later than
    ``max_initial_timestamp_index`` steps; and when the timestamps together are likelier than any
    single text token, a timestamp is chosen.
    """

    def __init__(
        self, timestamp_begin: int, eot: int, no_timestamps: int, prompt_length: int, max_initial_timestamp_index: int
    ) -> None:
        self.timestamp_begin = timestamp_begin
        self.eot = eot
        self.no_timestamps = no_timestamps
        self.prompt_length = prompt_length
        self.max_initial_timestamp_index = max_initial_timestamp_index

    def apply(self, logits: np.ndarray, tokens: Sequence[int]) -> None:
        begin = self.timestamp_begin
        logits[self.no_timestamps] = -np.inf
        sampled = tokens[self.prompt_length :]
        last_was_timestamp = len(sampled) >= 1 and sampled[-1] >= begin
        penultimate_was_timestamp = len(sampled) < 2 or sampled[-2] >= begin
        if last_was_timestamp:
            if penultimate_was_timestamp:  # a pair just closed: text must follow
                logits[begin:] = -np.inf
            else:  # a segment just ended: its partner timestamp or the end of text
                logits[: self.eot] = -np.inf

        timestamps = [t for t in sampled if t >= begin]
        if timestamps:
            # Never go back in time, and give every segment a nonzero length (no infinite loops).
            last = timestamps[-1] if last_was_timestamp and not penultimate_was_timestamp else timestamps[-1] + 1
            logits[begin:last] = -np.inf

        if not sampled:
            logits[:begin] = -np.inf
            logits[begin + self.max_initial_timestamp_index + 1 :] = -np.inf

        # Compare in probability space shifted by the maximum; both sides share the normaliser.
        top = logits.max()
        text_best = logits[:begin].max() - top
        if np.isfinite(text_best):
            with np.errstate(divide="ignore"):  # log(0) when every timestamp is suppressed: -inf, fine
                timestamp_mass = np.log(np.exp(logits[begin:] - top).sum())
            if timestamp_mass > text_best:
                logits[:begin] = -np.inf
