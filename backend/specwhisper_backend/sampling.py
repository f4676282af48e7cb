"""Sampling that drafting cannot change: the Gumbel-max trick with noise fixed per text position.

A token sampled from ``softmax(scores / T)`` is ``argmax(scores / T + g)`` with ``g`` standard
Gumbel noise. If ``g`` depends only on the request's seed, the window, its fallback attempt and the
position in the text, the main model's sample at a position is a function of its scores there
alone, whichever tokens a draft proposed and however long the drafts were. So speculative decoding
verifies a sampled draft exactly as it verifies a greedy one, by agreement: the draft proposes
``argmax(draft_scores / T + g)`` with the same noise, and the main model keeps it when its own
sample is the same token. Sampled output is then token-for-token the plain sampled output for the
same seed (as greedy output is the plain greedy output), whatever the batch, the load or the
cost-aware draft lengths did; classic speculative sampling (accept with ``min(1, p/q)``, resample
from the residual) consumes random numbers in an order that depends on the draft lengths, so the
same seed could give a different transcript under another load.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PositionNoise:
    """Standard Gumbel noise over the vocabulary for each text position, drawn from ``key`` and the
    position, so every reader of a position (the draft proposing, the main model verifying) sees
    the same noise."""

    # Positions kept: a round reads at most a draft's length past the last one it kept.
    KEEP = 64

    def __init__(self, key: Sequence[int], vocab_size: int) -> None:
        self.key = tuple(int(k) for k in key)
        self.vocab_size = vocab_size
        self._noise: dict[int, np.ndarray] = {}

    def at(self, position: int) -> np.ndarray:
        noise = self._noise.get(position)
        if noise is None:
            uniform = np.random.default_rng([*self.key, position]).random(self.vocab_size)
            with np.errstate(divide="ignore"):
                noise = -np.log(-np.log(uniform))  # uniform 0 gives -inf: that id is not drawn
            if len(self._noise) >= self.KEEP:
                del self._noise[min(self._noise)]
            self._noise[position] = noise
        return noise


def choose(scores: np.ndarray, temperature: float, noise: PositionNoise | None, position: int) -> int:
    """The token at text ``position`` given its (filtered) ``scores``: the argmax at temperature 0,
    else the sample ``argmax(scores / temperature + g(position))``."""
    if temperature == 0:
        return int(scores.argmax())
    if noise is None:
        raise ValueError("sampling above temperature 0 needs noise")
    with np.errstate(over="ignore"):
        return int((scores / temperature + noise.at(position)).argmax())


def tempered(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(scores / temperature)``; filtered-out ids (-inf) get probability 0."""
    with np.errstate(over="ignore"):
        scaled = scores.astype(np.float64) / temperature
    scaled -= scaled.max()
    with np.errstate(under="ignore"):
        probs = np.exp(scaled)
    return probs / probs.sum()
