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
