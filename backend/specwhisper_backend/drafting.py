"""The draft's side of speculative decoding: each row's draft length, and proposing for a batch.

Every row keeps its own drafting state (:class:`RowDraft`): a draft length that grows after a round
the main model accepted whole and shrinks after one it cut short (transformers' heuristic), and an
estimate of how often it accepts a drafted token. That estimate starts from how often the rows of the
same task and language accepted drafts lately on this instance (:class:`SeenAcceptance`), not from
a fixed guess: the policy drafts only where the estimate says drafting pays, and a request that
started from a guess too low for its instance would decode plainly, learn nothing, and hand the
same guess to the next. For the same reason, while the policy keeps a row plain its estimate drifts
back toward the instance's (:meth:`RowDraft.rest`): a hard stretch of audio that pulled it down
would otherwise keep the row plain for the rest of its request.

A round stops early after a token the draft itself is unsure of. How sure is not the draft's own
probability as it stands: a draft can be over- or under-confident, by a different amount in every
language (a draft trained on spoken texts is unsure of tokens the main model mostly accepts; in a
language it barely knows, sure of tokens it mostly rejects), so the instance keeps how often drafts
of each probability were accepted, by kind, and the stop reads that (:meth:`SeenAcceptance.chance`).
How many tokens a row actually drafts in a step is also capped by what the batch can afford
(:mod:`specwhisper_backend.load_policy`).

The draft decoder's cache always holds a prefix of each row's text; proposing first feeds it what it
has not seen (the tokens accepted since), then one token per step for every row still drafting, all
rows in one batched pass per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.load_policy import expected_tokens
from specwhisper_backend.logit_filters import LogitFilter, filtered
from specwhisper_backend.normalizer import probability
from specwhisper_backend.sampling import PositionNoise, choose

# The most tokens a row feeds the draft in one pass while catching up (see propose).
CATCH_UP_CHUNK = 32


@dataclass(frozen=True)
class DraftPolicy:
    """How draft lengths adapt, and what the draft reads."""

    start: int = 5
    minimum: int = 1
    maximum: int = 16
    grow: int = 2
    shrink: int = 1
    # Cap every step's drafts at what the batch can afford, from the measured cost of verification
    # passes and draft steps and each row's acceptance (load_policy), down to plain decoding when
    # drafting does not pay. False: draft as the lengths say whatever it costs (to measure a draft).
    cost_aware: bool = True
    # The draft's cross-attention reads the window's audio and this many encoder frames (20 ms each)
    # after it, not all 1500, since over a short clip's padding they would be most of a draft step.
    # The drafts trained here read the same cut (specwhisper_training); the main decoder reads all.
    # Rows of a batch read as many frames as the row that reads most.
    frames_after_audio: int = 50
    # A round stops drafting after a token whose chance of being accepted is below this, as
    # transformers' ``assistant_confidence_threshold`` does with the draft's probability: the drafts
    # after an unsure one would mostly be drafted and verified in vain. The chance is the draft's
    # probability (under the logit filters) as the instance has seen drafts of that probability
    # accepted (SeenAcceptance.chance). 0 turns it off. Why 0.6: docs/experiments.md.
    confidence: float = 0.6
    # Where a row's last tokens occurred before (an earlier attempt at its window, its prompt, its
    # text), it may copy what followed them instead of drafting (specwhisper_backend.copying).
    copies: bool = True

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


# Where a row's acceptance estimate starts with nothing seen: two accepted drafts to one rejection.
PRIOR_ACCEPTED, PRIOR_REJECTED = 2.0, 1.0
# Where a row's estimate for copied drafts starts with nothing seen: one to one. A copy is a guess
# from the text alone, right about half the time where windows fall back; in a busy batch a hopeful
# start widens every row's pass for copies that do not pay it back (experiments.md, 2026-12-06).
COPY_PRIOR_ACCEPTED, COPY_PRIOR_REJECTED = 1.0, 1.0


class SeenAcceptance:
    """How often one instance's rows accepted drafts lately, by task and language: the evidence of
    every verified round (accepted drafts, and whether one was rejected), each round fading by
    ``MEMORY`` for every later round of its kind. A new request's estimate starts here
    (:meth:`RowDraft.begin`). Kinds are kept apart because a draft's acceptance differs far more
    between languages (and between transcribing and translating) than between requests of one.

    It also keeps, by kind, how often a greedy draft token was accepted given the probability the
    draft gave it (in ``BINS`` equal bins; each bin's evidence fades by ``BIN_MEMORY`` a token of
    that bin), which calibrates the confidence stop (:meth:`chance`)."""

    # Slower than a row's own memory: this follows the instance's traffic, a row its audio.
    MEMORY = 0.98
    BINS = 10
    BIN_MEMORY = 0.99
    # What the draft's own probability weighs against a bin's evidence, in draft tokens: with none
    # seen, the chance is that probability.
    BIN_PRIOR = 8.0
    # What a draft's measured acceptance weighs as a prior, in rounds' evidence: a measurement over a
    # few hundred held-out tokens, not the default's guess (weighing three), so one unlucky first round
    # does not undo it; the instance's own rounds outweigh it within a few requests.
    MEASURED_WEIGHT = 8.0

    def __init__(self, measured: Mapping[str, float] | None = None) -> None:
        """``measured``: by language, how often the draft that serves it was accepted on held-out
        recordings when it shipped (:attr:`DecoderFacts.acceptance`): a transcribing row in such a
        language starts there instead of at the default prior. The default guess is a close call at
        one row on a CPU, and the first rounds' evidence weighs as much as the prior: a fresh instance
        kept a language the draft speaks well plain for clip after clip (docs/experiments.md,
        2026-12-06)."""
        self._measured = dict(measured or {})
        self._sums: dict[tuple[str, str], tuple[float, float]] = {}
        self._bins: dict[tuple[str, str], np.ndarray] = {}  # [BINS, 2]: accepted, verified

    def observe(self, kind: tuple[str, str], accepted: int, rejected: bool) -> None:
        """A verified round of a row of ``kind`` (task, language)."""
        accepted_sum, rejected_sum = self._sums.get(kind, (0.0, 0.0))
        self._sums[kind] = (self.MEMORY * accepted_sum + accepted, self.MEMORY * rejected_sum + rejected)

    def prior(self, kind: tuple[str, str], accepted: float = PRIOR_ACCEPTED, rejected: float = PRIOR_REJECTED) -> float:
        """Where a new row's estimate for ``kind`` starts: the default prior (``accepted`` to
        ``rejected``) with the evidence seen added, so an instance that has seen little starts near
        the default (the draft's measured acceptance where it has one for ``kind``)."""
        measured = self._measured_for(kind)
        if measured is not None:
            accepted, rejected = self.MEASURED_WEIGHT * measured, self.MEASURED_WEIGHT * (1 - measured)
        accepted_sum, rejected_sum = self._sums.get(kind, (0.0, 0.0))
        return (accepted + accepted_sum) / (accepted + rejected + accepted_sum + rejected_sum)

    def weight(self, kind: tuple[str, str], default: float) -> float:
        """What a new row's prior for ``kind`` weighs: ``default``, or more where the draft was measured."""
        return default if self._measured_for(kind) is None else self.MEASURED_WEIGHT

    def _measured_for(self, kind: tuple[str, str]) -> float | None:
        task, language = kind
        return self._measured.get(language) if task == "transcribe" else None  # measured transcribing

    def observe_drafts(self, kind: tuple[str, str], probabilities: Sequence[float], accepted: int) -> None:
        """A verified greedy round's draft tokens, with the probability the draft gave each: the first
        ``accepted`` were accepted, the next (if any) rejected; the rest were never judged on the
        right text and say nothing."""
        bins = self._bins.setdefault(kind, np.zeros((self.BINS, 2)))
        for index, drafted_probability in enumerate(probabilities[: accepted + 1]):
            row = bins[self._bin(drafted_probability)]
            row *= self.BIN_MEMORY
            row += (index < accepted, 1.0)

    def chance(self, kind: tuple[str, str], probability: float) -> float:
        """The chance a draft token the draft gave ``probability`` is accepted (the ones before it
        were), as this instance has seen for ``kind``: its probability where little is seen."""
        bins = self._bins.get(kind)
        if bins is None:
            return probability
        accepted, verified = bins[self._bin(probability)]
        return float((self.BIN_PRIOR * probability + accepted) / (self.BIN_PRIOR + verified))

    def _bin(self, probability: float) -> int:
        return min(int(probability * self.BINS), self.BINS - 1)


class Acceptance:
    """A row's estimate of how often one kind of proposal is accepted (the draft model's, or copies):
    the evidence of its verified rounds, each fading by ``memory`` a round, over a prior of
    ``accepted`` to ``rejected``. Until the row has rounds of its own, it starts from what the
    instance saw of ``kind`` (:meth:`begin`), and it tells the instance of every round."""

    def __init__(self, accepted: float, rejected: float, memory: float, seen: SeenAcceptance | None) -> None:
        self._prior = (accepted, rejected)
        self._accepted, self._rejected = accepted, rejected
        self._memory, self._seen = memory, seen
        self.kind: tuple[str, str] = ("", "")
        self.rounds = 0  # verified rounds of its own

    def begin(self, kind: tuple[str, str]) -> None:
        self.kind = kind
        if self._seen is not None and not self.rounds:
            prior = self._seen.prior(kind, *self._prior)
            weight = self._seen.weight(kind, sum(self._prior))
            self._accepted, self._rejected = weight * prior, weight * (1 - prior)

    @property
    def value(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def rest(self, memory: float) -> None:
        """A step in which the row did not propose: its own evidence fades by ``memory``, and what
        fades is replaced by what the instance saw of the kind lately (the weight stays), so the
        estimate drifts toward the instance's, up or down: the row's evidence grows old with the text
        it decodes, drafted or not. Without this, a row whose estimate fell in a hard stretch stayed
        below what drafting needs for the rest of its request, since only its rounds move it and the
        policy gave it none, and probes are too rare to lift it (docs/experiments.md, 2026-12-06).
        Where the instance saw the kind accepted as seldom, the row stays plain. With no instance to
        ask, nothing moves."""
        if self._seen is None or not self.kind[0]:
            return
        prior = self._seen.prior(self.kind, *self._prior)
        faded = (1 - memory) * (self._accepted + self._rejected)
        self._accepted = memory * self._accepted + faded * prior
        self._rejected = memory * self._rejected + faded * (1 - prior)

    def observe(self, accepted: int, rejected: bool) -> None:
        self._accepted = self._memory * self._accepted + accepted
        self._rejected = self._memory * self._rejected + rejected
        self.rounds += 1
        if self._seen is not None:
            self._seen.observe(self.kind, accepted, rejected)


class RowDraft:
    """One row's drafting: its draft length and acceptance, carried across a request's windows."""

    # Evidence about acceptance fades by this factor a round, so a row follows its audio.
    MEMORY = 0.9
    # ... and by this factor a step in which the policy kept the row plain, toward what the instance
    # saw (Acceptance.rest): about a round's fading over a round's two or three tokens.
    REST_MEMORY = 0.96

    def __init__(self, policy: DraftPolicy, seen: SeenAcceptance | None = None, task: str = "transcribe") -> None:
        """``seen``: the instance's acceptance lately, which the estimate starts from and is told each
        round (None: the default prior, and nothing told); ``task`` with the language, its kind."""
        self.policy = policy
        self.length = policy.start
        self._drafts = Acceptance(PRIOR_ACCEPTED, PRIOR_REJECTED, self.MEMORY, seen)
        # Copied drafts (specwhisper_backend.copying) are judged apart, as a kind of their own: how
        # often a copy is right says nothing of the draft model.
        self._copies = Acceptance(COPY_PRIOR_ACCEPTED, COPY_PRIOR_REJECTED, self.MEMORY, seen)
        self._seen, self._task = seen, task
        self.proposed_after = 0  # text length when the current round's drafts were proposed
        self.probabilities: list[float] = []  # the draft's probability of each of the round's drafts (greedy)

    def begin(self, language: str) -> None:
        """A window of this row's request starts in ``language``. Until the row has evidence of its
        own, its estimates are the instance's for this kind, with the default priors' weight."""
        self._drafts.begin((self._task, language))
        self._copies.begin((f"{self._task}, copied", language))

    @property
    def untried(self) -> bool:
        """No round of this row's request has drafted yet: its estimate is the instance's alone."""
        return not self._drafts.rounds

    @property
    def acceptance(self) -> float:
        """Estimated chance that the main model accepts the next drafted token, given the previous."""
        return self._drafts.value

    @property
    def copy_acceptance(self) -> float:
        """Estimated chance that the main model accepts the next copied token, given the previous."""
        return self._copies.value

    def prefers_copy(self, copied: int, length: int) -> bool:
        """Whether ``copied`` tokens at hand promise as many tokens as the draft model's ``length``
        would: a copy costs no draft pass, so where it promises as much it is the cheaper draft."""
        return bool(
            expected_tokens(np.asarray(self.copy_acceptance), np.asarray(copied))
            >= expected_tokens(np.asarray(self.acceptance), np.asarray(length))
        )

    def rest(self) -> None:
        """A step the policy kept this row plain: its draft estimate drifts back toward its
        instance's (:meth:`Acceptance.rest`)."""
        self._drafts.rest(self.REST_MEMORY)

    def update_copied(self, accepted: int, copied: int) -> None:
        """After a verified round of ``copied`` tokens: weigh the evidence about copies."""
        if copied:
            self._copies.observe(accepted, accepted < copied)

    def chance(self, probability: float) -> float:
        """The chance a draft token the draft gave ``probability`` is accepted, as the instance has seen
        for this row's kind (the probability itself with no instance to ask)."""
        return probability if self._seen is None else self._seen.chance(self._drafts.kind, probability)

    def update(self, accepted: int, drafted: int) -> None:
        """After a verified round: adapt the length, weigh the evidence (and tell the instance)."""
        if not drafted:
            return
        policy = self.policy
        if accepted == drafted:
            self.length = min(policy.maximum, self.length + policy.grow)
        else:
            self.length = max(policy.minimum, self.length - policy.shrink)
        self._drafts.observe(accepted, accepted < drafted)
        if self._seen is not None:
            self._seen.observe_drafts(self._drafts.kind, self.probabilities, accepted)

    def kept_after(self, accepted: int, drafted: int) -> int:
        """How much of the draft cache to keep after a round: the text and the accepted drafts (the
        cache consumed the text and every draft but the last)."""
        return self.proposed_after + min(accepted, max(drafted - 1, 0))


@dataclass
class Proposal:
    """What one row asks of a batched proposal: ``count`` drafts after ``tokens``, with its filters;
    drafted greedily, or sampled at ``temperature`` with the row's per-position ``noise``
    (:mod:`specwhisper_backend.sampling`), the noise the main model's choice will read. ``chance``
    turns the draft's probability of a token into the chance it is accepted (the confidence stop
    reads it; None: the probability as it is). :func:`propose` fills in ``probabilities`` where
    ``chance`` is given and the stop is on."""

    slot: int  # the row's row in the draft session
    tokens: list[int]
    count: int
    filters: Sequence[LogitFilter]
    temperature: float = 0.0
    noise: PositionNoise | None = None
    chance: Callable[[float], float] | None = None
    probabilities: list[float] = field(default_factory=list)  # the draft's, of each token drafted


def propose(
    session: DecoderSession,
    proposals: Sequence[Proposal],
    eot: int,
    confidence: float,
    pass_seconds: list[float] | None = None,
    catch_up_seconds: list[float] | None = None,
) -> list[list[int]]:
    """Drafts for every proposal, in batched draft steps (greedy, or sampled at the proposal's
    temperature); returns each one's drafts.

    A row drafts until it has ``count`` tokens, ends the text, or is unsure of a token. Rows of the
    session with no proposal take no part (their lengths do not move). The tokens a row decoded since
    the draft last ran are fed first, at most ``CATCH_UP_CHUNK`` a pass before the pass whose scores
    are read (the graph scores every fed position, so an unbounded pass would hold hundreds of MB of
    scores at once). Each of those passes' seconds are appended to ``catch_up_seconds``, and the
    others' (the first that is read and one per drafted token) to ``pass_seconds``, when given.
    """
    if not proposals:
        return []
    rows = session.batch_size
    fresh = [p.tokens[int(session.lengths[p.slot]) :] for p in proposals]
    while max(len(f) for f in fresh) > CATCH_UP_CHUNK:
        feed, counts = np.zeros((rows, CATCH_UP_CHUNK), dtype=np.int64), np.zeros(rows, dtype=np.int64)
        for index, (proposal, tokens) in enumerate(zip(proposals, fresh, strict=True)):
            if len(tokens) > CATCH_UP_CHUNK:
                feed[proposal.slot], counts[proposal.slot] = tokens[:CATCH_UP_CHUNK], CATCH_UP_CHUNK
                fresh[index] = tokens[CATCH_UP_CHUNK:]
        _timed_forward(session, feed, counts, catch_up_seconds)
    width = max(len(f) for f in fresh)
    feed = np.zeros((rows, width), dtype=np.int64)
    counts = np.zeros(rows, dtype=np.int64)
    for proposal, tokens in zip(proposals, fresh, strict=True):
        feed[proposal.slot, : len(tokens)] = tokens
        counts[proposal.slot] = len(tokens)
    logits = _timed_forward(session, feed, counts, pass_seconds)
    last = {p.slot: logits[p.slot] for p in proposals}
    drafts: list[list[int]] = [[] for _ in proposals]
    going = list(range(len(proposals)))
    while going:
        feed, counts = np.zeros((rows, 1), dtype=np.int64), np.zeros(rows, dtype=np.int64)
        still = []
        for index in going:
            proposal, mine = proposals[index], drafts[index]
            scores = filtered(last[proposal.slot], [*proposal.tokens, *mine], proposal.filters)
            temperature = proposal.temperature
            token = choose(scores, temperature, proposal.noise, len(proposal.tokens) + len(mine))
            doubtful = False
            if confidence:  # with the stop off, no probability is needed (a pass over the vocabulary)
                with np.errstate(over="ignore"):
                    sure = probability(scores / temperature if temperature else scores, token)
                if proposal.chance is not None:
                    proposal.probabilities.append(sure)
                    sure = proposal.chance(sure)
                doubtful = sure < confidence
            mine.append(token)
            if token != eot and len(mine) < proposal.count and not doubtful:
                feed[proposal.slot, 0], counts[proposal.slot] = token, 1
                still.append(index)
        going = still
        if going:
            logits = _timed_forward(session, feed, counts, pass_seconds)
            last = {proposals[i].slot: logits[proposals[i].slot] for i in going}
    return drafts


def _timed_forward(session: DecoderSession, feed: np.ndarray, counts: np.ndarray, seconds: list[float] | None):
    started = time.perf_counter()
    logits = session.forward(feed, counts, last_only=True)
    if seconds is not None:
        seconds.append(time.perf_counter() - started)
    return logits


@dataclass(frozen=True)
class ProposalTiming:
    """What a batched proposal took: all of it, and its passes of one token a row apart from the
    first, which also feeds each row what it accepted since it last drafted (after a stretch of
    plain steps, many tokens): only those say what one more drafted token costs."""

    seconds: float
    passes: int
    step_seconds: float
    step_passes: int

    @staticmethod
    def total(timings: Sequence[ProposalTiming]) -> ProposalTiming:
        """What several drafts' proposals in one step took, one after the other."""
        return ProposalTiming(
            sum(t.seconds for t in timings),
            sum(t.passes for t in timings),
            sum(t.step_seconds for t in timings),
            sum(t.step_passes for t in timings),
        )


def timed_propose(
    session: DecoderSession, proposals: Sequence[Proposal], eot: int, confidence: float
) -> tuple[list[list[int]], ProposalTiming]:
    """:func:`propose`, with what it took."""
    started = time.perf_counter()
    passes: list[float] = []
    catching_up: list[float] = []
    drafts = propose(session, proposals, eot, confidence, passes, catching_up)
    timing = ProposalTiming(
        time.perf_counter() - started, len(passes) + len(catching_up), sum(passes[1:]), max(len(passes) - 1, 0)
    )
    return drafts, timing
