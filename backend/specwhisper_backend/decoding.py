"""The one decoding loop: greedy Whisper decoding of a 30 s window, with or without a draft.

Each round, the drafter (if any) proposes up to ``K`` tokens; the main decoder scores the pending
token plus the drafts in one pass; every scored position is filtered with its own prefix and the
main model's greedy choice is taken there; drafts are kept while they equal that choice, and the
main model's choice at the first disagreement (or after the last draft) is kept too. Without a
draft ``K`` is 0 and the same round is plain greedy decoding, so both paths share every rule and
the output of the speculative path can only differ from the plain one if the main model's logits
do (float rounding differs slightly between a one-token and a multi-token pass).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.drafting import Drafter
from specwhisper_backend.logit_filters import LogitFilter, select
from specwhisper_backend.stats import DecodeStats


def accept(drafts: Sequence[int], choices: Sequence[int]) -> int:
    """How many drafts the main model agrees with: the length of the common prefix.

    ``choices[i]`` is the main model's greedy token where ``drafts[i]`` was proposed, so
    ``len(choices) == len(drafts) + 1`` and ``choices[accept(...)]`` is the main model's own token
    that follows the accepted drafts.
    """
    for i, (draft, choice) in enumerate(zip(drafts, choices, strict=False)):
        if draft != choice:
            return i
    return len(drafts)


@dataclass(frozen=True)
class WindowResult:
    tokens: list[int]  # generated ids after the prompt, without the final <|endoftext|>
    ended: bool  # <|endoftext|> was chosen (rather than running into the length limit)


def decode_window(
    main: DecoderSession,
    prompt: Sequence[int],
    filters: Sequence[LogitFilter],
    eot: int,
    max_length: int,
    stats: DecodeStats,
    drafter: Drafter | None = None,
) -> WindowResult:
    """Greedy decoding of the window whose encoder output ``main`` was started on.

    ``prompt`` ends the sequence the model continues; ``max_length`` bounds prompt plus text.
    """
    tokens = list(prompt)
    # Everything but the last prompt token goes in as prefill; the last is "pending": fed with the
    # next round's drafts, so that a round is always pending token + drafts.
    if len(tokens) > 1:
        started = time.perf_counter()
        main.forward(np.asarray([tokens[:-1]]))
        stats.add_verify(time.perf_counter() - started)
    while True:
        room = max_length - len(tokens)
        drafts = drafter.propose(tokens, min(drafter.draft_length, room - 1), filters, stats) if drafter else []

        started = time.perf_counter()
        logits = main.forward(np.asarray([[tokens[-1], *drafts]]))[0]
        verify_seconds = time.perf_counter() - started
        stats.add_verify(verify_seconds)

        choices: list[int] = []
        for i in range(len(drafts) + 1):
            choices.append(select(logits[i], tokens + drafts[:i], filters))
            if i < len(drafts) and choices[i] != drafts[i]:
                break
        accepted = accept(drafts, choices)
        new = [*drafts[:accepted], choices[accepted]]
        stats.add_round(drafted=len(drafts), accepted=accepted)
        if drafter:
            drafter.update(accepted, len(drafts), verify_seconds, stats)

        # The main cache holds the pending token and every draft; keep pending + accepted drafts.
        main.truncate(main.lengths - (len(drafts) - accepted))
        for token in new:
            if token == eot:
                stats.add_tokens(1)
                return WindowResult(tokens[len(prompt) :], ended=True)
            tokens.append(token)
            stats.add_tokens(1)
            if len(tokens) >= max_length:
                return WindowResult(tokens[len(prompt) :], ended=False)
