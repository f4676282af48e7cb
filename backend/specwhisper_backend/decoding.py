"""The decoding loop over an ONNX decoder session."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.logit_filters import LogitFilter


def select(logits: np.ndarray, tokens: Sequence[int], filters: Sequence[LogitFilter]) -> int:
    """The greedy choice after ``tokens``: filters applied to a copy of ``logits [V]``, then argmax."""
    scores = logits.astype(np.float32, copy=True)
    for rule in filters:
        rule.apply(scores, tokens)
    return int(scores.argmax())


def greedy_decode(
    decoder: DecoderSession,
    encoder_hidden_states: np.ndarray,
    prompt: Sequence[int],
    filters: Sequence[LogitFilter],
    eot: int,
    max_length: int,
) -> list[int]:
    """Greedy decoding of one audio window; returns the generated ids (prompt excluded, no EOT)."""
    decoder.start(encoder_hidden_states)
    tokens = list(prompt)
    logits = decoder.forward(np.asarray([tokens]))[0, -1]
    while True:
        token = select(logits, tokens, filters)
        if token == eot:
            break
        tokens.append(token)
        if len(tokens) >= max_length:
            break
        logits = decoder.forward(np.asarray([[token]]))[0, -1]
    return tokens[len(prompt) :]
