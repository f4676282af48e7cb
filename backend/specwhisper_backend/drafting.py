"""The assistant's side of speculative decoding: proposing tokens and learning how many to propose."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.logit_filters import LogitFilter, filtered
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
    # Stop drafting for the rest of a window once, after this many rounds, the tokens it produced
    # took longer (drafting plus verification, measured) than plain steps would have: the first
    # round of each window is a plain step, which measures that cost on this machine, now. Not after
    # 4 rounds: a window's first rounds are its hardest (its opening timestamps), and judged that
    # early, drafting stopped in fr and es long-form windows where it paid (decode speed-up side by
    # side, base's draft: fr 1.51x after 4 rounds, 1.65x after 12; es long-form 1.39x and 1.56x).
    judge_after_rounds: int = 12
    # The draft's cross-attention reads the window's audio and this many encoder frames (20 ms each)
    # after it, not all 1500: over a short clip's padding it is a fifth of base's int8 draft step.
    # The draft trained here reads the same cut (see draft_training); the main decoder reads all.
    frames_after_audio: int = 50
    # A round stops drafting after a token the draft itself gives less than this probability (under
    # the logit filters), as transformers' ``assistant_confidence_threshold`` does: the drafts after
    # an unsure one would mostly be drafted and verified in vain. Base's trained draft, held out, agrees
    # with the main model on 63 % of the tokens it gives 0.4-0.6 and on 99 % of those above 0.97.
    # 0 turns it off.
    confidence: float = 0.6

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.start <= self.maximum:
            raise ValueError(f"draft lengths must satisfy 1 <= minimum <= start <= maximum, got {self}")
        if self.frames_after_audio < 0:
            raise ValueError(f"frames_after_audio must be >= 0, got {self.frames_after_audio}")
        if not 0 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}")


def attended_frames(audio_frames: int, frames_after_audio: int, total: int) -> int:
    """How many leading encoder frames a draft reads for a window with ``audio_frames`` of audio."""
    return max(1, min(total, audio_frames + frames_after_audio))


class Drafter:
    """Greedy drafting with the assistant decoder, whose cache always holds a prefix of the text."""

    def __init__(self, session: DecoderSession, eot: int, policy: DraftPolicy | None = None) -> None:
        self.session = session
        self.eot = eot
        self.policy = policy or DraftPolicy()
        self.draft_length = self.policy.start
        self.active = True
        self._proposed_after = 0  # text length when the last proposal was made
        self._reset()

    def start_window(self, encoder_states: np.ndarray, audio_frames: int) -> None:
        """A new window: the session restarts on its first ``audio_frames`` encoder frames of audio
        (and the policy's margin after them); drafting gets a fresh chance."""
        frames = attended_frames(audio_frames, self.policy.frames_after_audio, encoder_states.shape[1])
        self.session.start(encoder_states[:, :frames])
        self._reset()

    def _reset(self) -> None:
        self.active = True
        self._plain_step: float | None = None  # seconds of one plain main step, measured this window
        self._rounds = self._produced = 0  # drafting rounds, and the tokens they produced
        self._spent = 0.0  # seconds those rounds took, drafting and verification
        self._draft_seconds = 0.0  # drafting time of the current round

    def propose(
        self, tokens: Sequence[int], count: int, filters: Sequence[LogitFilter], stats: DecodeStats
    ) -> list[int]:
        """Up to ``count`` greedy tokens following ``tokens``; fewer if the draft ends the text."""
        if count <= 0 or not self.active or self._plain_step is None:
            return []
        session = self.session
        self._proposed_after = len(tokens)
        fresh = list(tokens[int(session.lengths[0]) :])
        round_started = started = time.perf_counter()
        logits = session.forward(np.asarray([fresh]))[0, -1]
        stats.add_draft(time.perf_counter() - started)
        drafts: list[int] = []
        context = list(tokens)
        while True:
            scores = filtered(logits, context, filters)
            token = int(scores.argmax())
            drafts.append(token)
            context.append(token)
            if token == self.eot or len(drafts) == count or self._unsure(scores, token):
                self._draft_seconds = time.perf_counter() - round_started
                return drafts
            started = time.perf_counter()
            logits = session.forward(np.asarray([[token]]))[0, 0]
            stats.add_draft(time.perf_counter() - started)

    def _unsure(self, scores: np.ndarray, token: int) -> bool:
        """Whether the draft's probability for ``token`` (the argmax of ``scores``) is below the policy's
        confidence: ``1 / sum(exp(scores - scores[token])) < confidence``, with no division."""
        if not self.policy.confidence:
            return False
        with np.errstate(over="ignore", under="ignore"):
            return float(np.exp(scores - scores[token]).sum()) * self.policy.confidence > 1.0

    def update(self, accepted: int, drafted: int, verify_seconds: float, stats: DecodeStats) -> None:
        """Roll the cache back to the accepted text, adapt the draft length, judge whether drafting pays."""
        if not drafted:
            if self._plain_step is None:
                self._plain_step = verify_seconds
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
        self._spent += self._draft_seconds + verify_seconds
        plain_cost = self._produced * (self._plain_step or 0.0)
        if self._rounds >= policy.judge_after_rounds and plain_cost < self._spent:
            self.active = False
            stats.fallback_windows += 1
