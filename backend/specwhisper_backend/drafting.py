"""The assistant's side of speculative decoding: proposing tokens and learning how many to propose."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.logit_filters import LogitFilter
from specwhisper_backend.stats import DecodeStats


@dataclass(frozen=True)
class DraftPolicy:
    """How the draft length adapts (transformers' heuristic: +2 on full acceptance, -1 otherwise)
    and when a window stops drafting."""

    start: int = 5
    minimum: int = 1
    maximum: int = 16
    grow: int = 2
    shrink: int = 1
    # Stop drafting for the rest of a window once, after this many rounds, the measured speed of
    # drafting (tokens per round over the round's cost in main passes) falls below plain decoding.
    judge_after_rounds: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.start <= self.maximum:
            raise ValueError(f"draft lengths must satisfy 1 <= minimum <= start <= maximum, got {self}")


class Drafter:
    """Greedy drafting with the assistant decoder, whose cache always holds a prefix of the text."""

    def __init__(self, session: DecoderSession, eot: int, policy: DraftPolicy | None = None) -> None:
        self.session = session
        self.eot = eot
        self.policy = policy or DraftPolicy()
        self.draft_length = self.policy.start
        self.active = True
        self._proposed_after = 0  # text length when the last proposal was made
        self._rounds = 0
        self._produced = 0  # tokens kept per round, summed
        self._cost = 0.0  # rounds' cost in main passes, summed

    def reset_window(self) -> None:
        """A new window: the session was restarted on new audio; drafting gets a fresh chance."""
        self.active = True
        self._rounds = self._produced = 0
        self._cost = 0.0

    def propose(
        self, tokens: Sequence[int], count: int, filters: Sequence[LogitFilter], stats: DecodeStats
    ) -> list[int]:
        """Up to ``count`` greedy tokens following ``tokens``; fewer if the draft ends the text."""
        if count <= 0 or not self.active:
            return []
        session = self.session
        self._proposed_after = len(tokens)
        fresh = list(tokens[int(session.lengths[0]) :])
        started = time.perf_counter()
        logits = session.forward(np.asarray([fresh]))[0, -1]
        stats.add_draft(time.perf_counter() - started)
        drafts: list[int] = []
        context = list(tokens)
        while True:
            scores = np.array(logits, dtype=np.float32, copy=True)
            for rule in filters:
                rule.apply(scores, context)
            token = int(scores.argmax())
            drafts.append(token)
            context.append(token)
            if token == self.eot or len(drafts) == count:
                return drafts
            started = time.perf_counter()
            logits = session.forward(np.asarray([[token]]))[0, 0]
            stats.add_draft(time.perf_counter() - started)

    def update(self, accepted: int, drafted: int, stats: DecodeStats) -> None:
        """Roll the cache back to the accepted text, adapt the draft length, judge whether drafting pays."""
        if not drafted:
            return
        # The session consumed the text and all drafts but the last; keep text + accepted drafts.
        keep = self._proposed_after + min(accepted, max(drafted - 1, 0))
        self.session.truncate(np.minimum(self.session.lengths, keep))
        policy = self.policy
        if accepted == drafted:
            self.draft_length = min(policy.maximum, self.draft_length + policy.grow)
        else:
            self.draft_length = max(policy.minimum, self.draft_length - policy.shrink)

        self._rounds += 1
        self._produced += accepted + 1
        draft_cost = stats.seconds_draft / max(stats.assistant_passes, 1)
        verify_cost = stats.seconds_verify / max(stats.main_passes, 1)
        self._cost += 1.0 + drafted * draft_cost / max(verify_cost, 1e-9)
        if self._rounds >= policy.judge_after_rounds and self._produced < self._cost:
            self.active = False
            stats.fallback_windows += 1
