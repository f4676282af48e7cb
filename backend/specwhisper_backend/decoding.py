"""The one decoding loop: greedy Whisper decoding of 30 s windows as the rows of one batch.

Each window is a row of the main decoder (and, when it drafts, of the draft decoder). A row joins
at a step boundary once its window is encoded and leaves when its text ends, so the windows of many
requests are decoded together, each at its own length. A step, for every row at once:

1. rows that may draft propose up to their draft length, capped by what the step can afford
   (:mod:`specwhisper_backend.load_policy`), in batched draft passes; a row whose last tokens
   occurred before (in an earlier attempt at its window, above all) may copy what followed them
   instead, which needs no draft pass (:mod:`specwhisper_backend.copying`);
2. one main pass scores each row's pending token and its drafts (a row that detects its language or
   fills in its prompt brings those tokens instead);
3. every scored position is filtered with its own prefix and the main model's greedy choice is
   taken there; drafts are kept while they equal that choice, and the main model's choice at the
   first disagreement (or after the last draft) is kept too;
4. each row's rejected drafts are rolled back by moving its length.

Each row drafts with the draft of its language: the assistant, or a draft the export routed its
language to (``ModelFacts.routes``). Every draft keeps its rows in a session of its own (a
:class:`Lane`) and proposes for them in passes of its own; one main pass verifies them all. The load
policy prices a step's drafting as one draft's passes over all the drafting rows; what a batch of
several languages' drafts costs beyond that is in the steps' measured overrun, which it then weighs
(:class:`~specwhisper_backend.load_policy.Overruns`).

A row that does not draft is plain greedy decoding through the same rules, so speculative output
can only differ from plain if the main model's logits do (float rounding differs slightly between
one-token and multi-token passes, and between batch sizes); a batch of one row is the same loop.

A row decoded at a temperature above 0 (a fallback, :mod:`specwhisper_backend.transcriber`) samples
through the same rules: its choice at each position is ``argmax(scores / T + g)`` with Gumbel noise
``g`` fixed by the request's seed and the position (:mod:`specwhisper_backend.sampling`), and its
draft proposes with the same noise. What it keeps is distributed as the main model's tempered
distribution, and is the plain sampled output for that seed, as greedy output is plain greedy
output. Every row also records the log-probability of each token it keeps and, at its
``<|startoftranscript|>``, the probability of ``<|nospeech|>``, which the fallback reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from specwhisper_backend.copying import CopyIndex
from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.drafting import (
    DraftPolicy,
    Proposal,
    ProposalTiming,
    RowDraft,
    attended_frames,
    timed_propose,
)
from specwhisper_backend.facts import ModelFacts
from specwhisper_backend.load_policy import Probes, StepCosts, choose_cap, prefill_chunk, probe_price
from specwhisper_backend.logit_filters import LogitFilter, filtered
from specwhisper_backend.normalizer import log_normalizer
from specwhisper_backend.sampling import PositionNoise, choose, tempered
from specwhisper_backend.stats import DecodeStats

# The most prompt tokens a row feeds in a step: a long prompt (previous text) is spread over a few
# steps rather than padding every row of one step to its length (and fewer where the measured costs
# say so: load_policy.prefill_chunk).
PREFILL_CHUNK = 16
NO_PROPOSAL = ProposalTiming(0.0, 0, 0.0, 0)


@dataclass(eq=False)
class Window:
    """A 30 s window to decode, with what its request asks of it."""

    states: np.ndarray  # [1, n_audio_ctx, d]: the main encoder's output
    audio_frames: int  # encoder frames that cover the window's audio
    language: str | None  # None: detect it (from the main model's first pass)
    prompt: Callable[[str], list[int]]  # the prompt, once the language is known
    filters: Callable[[int], list[LogitFilter]]  # Whisper's rules for a prompt of this length
    stats: DecodeStats  # the request's, added to
    drafting: RowDraft | None = None  # the request's drafting state; None decodes plainly
    draft_states: np.ndarray | None = None  # [1, frames, d]: what the draft reads
    temperature: float = 0.0  # 0: greedy; above, sampled with ``noise``
    noise: PositionNoise | None = None
    earlier: tuple[tuple[int, ...], ...] = ()  # the text of earlier attempts at it (fallbacks): copied from


@dataclass(frozen=True)
class WindowResult:
    tokens: list[int]  # generated ids after the prompt, without the final <|endoftext|>
    language: str
    sum_logprob: float = 0.0  # log-probabilities of the tokens kept, <|endoftext|> included
    no_speech_prob: float | None = None  # of <|nospeech|> at <|startoftranscript|>
    temperature: float = 0.0

    @property
    def avg_logprob(self) -> float:
        """As openai/whisper: over the text tokens and the end of text."""
        return self.sum_logprob / (len(self.tokens) + 1)


class Phase(Enum):
    DETECT = "detect"  # one pass of <|startoftranscript|> to read the language
    PREFILL = "prefill"  # the prompt, all but its last token, into the cache
    DECODE = "decode"  # rounds of the pending token and drafts


@dataclass(eq=False)
class Row:
    window: Window
    owner: object  # whoever joined it; handed back with its result
    phase: Phase
    language: str | None
    tokens: list[int] = field(default_factory=list)
    prompt_length: int = 0
    filters: list[LogitFilter] = field(default_factory=list)
    lane: Lane | None = None  # the draft it drafts with, once it has drafted
    draft_slot: int | None = None  # its row in that draft's session
    sot_index: int = 0  # where <|startoftranscript|> is in the prompt
    sum_logprob: float = 0.0
    no_speech_prob: float | None = None
    copied: bool = False  # this step's drafts were copied (specwhisper_backend.copying), not drafted
    copy_index: CopyIndex | None = None  # where its text's pairs occurred, from its first drafting step

    def begin(self, language: str, sot: int) -> None:
        self.language = language
        self.tokens = list(self.window.prompt(language))
        self.prompt_length = len(self.tokens)
        self.sot_index = self.tokens.index(sot)
        self.filters = self.window.filters(self.prompt_length)
        self.phase = Phase.PREFILL if self.prompt_length > 1 else Phase.DECODE
        if self.window.drafting is not None:
            self.window.drafting.begin(language)


@dataclass(eq=False)
class Lane:
    """One draft's session and the rows it holds, in the session's order."""

    session: DecoderSession
    rows: list[Row] = field(default_factory=list)


class BatchDecoder:
    """The rows being decoded on one main decoder session (and a session per draft), step by step."""

    def __init__(
        self,
        facts: ModelFacts,
        main: DecoderSession,
        draft: DecoderSession | None,
        policy: DraftPolicy,
        costs: StepCosts | None = None,
        probes: Probes | None = None,
        routes: Sequence[DecoderSession] = (),
    ) -> None:
        """``costs``: the measured step costs the drafts are capped by (``policy.cost_aware``);
        ``probes``: when a batch the cap keeps plain drafts anyway (shared by the decoders that take
        turns on one instance's sessions, so that short requests, each on a decoder of its own, still
        probe; None: this decoder's own); ``routes``: the sessions of ``facts.routes``' drafts."""
        if policy.cost_aware and draft is not None and costs is None:
            raise ValueError("a cost-aware drafting policy needs the measured step costs")
        if len(routes) != len(facts.routes) or (routes and draft is None):
            raise ValueError(f"the model routes {len(facts.routes)} drafts besides its assistant, got {len(routes)}")
        self.facts, self.main, self.policy, self.costs = facts, main, policy, costs
        # The assistant's lane first, then the routes' in facts.routes' order (see _lane).
        self.lanes = [Lane(session) for session in ((draft, *routes) if draft is not None else ())]
        for session in (main, *(lane.session for lane in self.lanes)):
            session.keep_rows([])  # the sessions are this decoder's from now on, empty
        self.rows: list[Row] = []
        self.last_cap: int | None = None  # the cap the last step's drafts had (None: nobody could draft)
        self._probes = probes if probes is not None else Probes()
        self._joining_seconds = 0.0  # this step's rows joining the draft took

    def join(self, window: Window, owner: object) -> None:
        """A new row for ``window``; it takes part from the next step on."""
        phase = Phase.DETECT if window.language is None else Phase.PREFILL
        row = Row(window, owner, phase, window.language)
        if window.language is not None:
            row.begin(window.language, self.facts.tokens.sot)
        if window.drafting is not None and not self.lanes:
            raise ValueError("this model has no draft decoder: decode plainly")
        self.main.add_rows(window.states)
        self.rows.append(row)

    def _lane(self, row: Row) -> Lane:
        """The draft of ``row``'s language."""
        route = self.facts.route(row.language)
        return self.lanes[0 if route is None else route + 1]

    def _join_draft(self, row: Row) -> None:
        """``row`` takes a row of its draft's session, the first time it drafts: its cross K/V cost
        about a draft step per layer, which a row the policy keeps plain (a busy batch) never pays."""
        started, states = time.perf_counter(), row.window.draft_states
        frames = attended_frames(row.window.audio_frames, self.policy.frames_after_audio, states.shape[1])
        lane = self._lane(row)
        lane.session.add_rows(states, frames)
        seconds = time.perf_counter() - started
        self._joining_seconds += seconds
        if self.costs is not None:
            self.costs.observe_join(seconds)
        row.lane, row.draft_slot = lane, len(lane.rows)
        lane.rows.append(row)

    @property
    def draft_rows(self) -> int:
        """The rows the drafts' sessions hold, all drafts together."""
        return sum(len(lane.rows) for lane in self.lanes)

    def leave(self, rows: Sequence[Row]) -> None:
        """Drop ``rows`` (finished or withdrawn); the last rows move into their slots."""
        self.rows = _remove(self.main, self.rows, rows)
        for lane in self.lanes:
            if any(row.lane is lane for row in rows):
                lane.rows = _remove(lane.session, lane.rows, rows)
                for slot, row in enumerate(lane.rows):
                    row.draft_slot = slot

    def owners(self) -> list[object]:
        return [row.owner for row in self.rows]

    def withdraw(self, owner: object) -> None:
        """Drop ``owner``'s rows before their text ends (a cancelled request)."""
        self.leave([row for row in self.rows if row.owner is owner])

    def drain(self) -> list[tuple[object, WindowResult]]:
        """Step until every row has left; their results, in the order they finished."""
        results = []
        while self.rows:
            results += self.step()
        return results

    def step(self) -> list[tuple[object, WindowResult]]:
        """One batched step for every row; the rows whose text ended leave, their results returned."""
        started, rows = time.perf_counter(), len(self.rows)
        self._joining_seconds = 0.0
        feeds = self._fed_before_drafts()
        drafts, timing, catch_up = self._propose(feeds)
        feeds = [feed + drafted for feed, drafted in zip(feeds, drafts, strict=True)]
        width = max(len(feed) for feed in feeds)
        batch = np.zeros((len(self.rows), width), dtype=np.int64)
        for index, feed in enumerate(feeds):
            batch[index, : len(feed)] = feed
        counts = np.asarray([len(feed) for feed in feeds])
        verify_started = time.perf_counter()
        logits = self.main.forward(batch, counts)
        verify_seconds = time.perf_counter() - verify_started
        predicted = 0.0
        if self.costs is not None:
            draft_rows = self.draft_rows
            draft_passes = timing.step_passes + 1 if catch_up else 0
            predicted = self.costs.step(rows, width, draft_rows, catch_up, draft_passes)
            self.costs.observe(rows, width, verify_seconds, draft_rows, timing.step_passes, timing.step_seconds)

        share = (time.perf_counter() - started - timing.seconds) / len(self.rows)
        finished: list[Row] = []
        for row, feed, drafted, scores in zip(self.rows, feeds, drafts, logits, strict=True):
            stats = row.window.stats
            stats.add_verify(share)
            stats.rows_in_steps += len(self.rows)
            if row.phase is Phase.DETECT:
                self._detect(row, scores[0])
                continue
            fed = int(self.main.lengths[self.rows.index(row)]) - len(feed)  # where this step's tokens began
            if fed <= row.sot_index < fed + len(feed):
                row.no_speech_prob = self._no_speech(scores[row.sot_index - fed])
            if row.phase is Phase.PREFILL:
                if fed + len(feed) >= row.prompt_length - 1:
                    row.phase = Phase.DECODE
            elif self._decode(row, scores[: len(feed)], drafted):
                finished.append(row)
        results = [(row.owner, self._result(row)) for row in finished]
        if finished:
            self.leave(finished)
        if self.costs is not None:  # all the step took, against what the grid predicted for it and
            # the rows' joining the draft took (once a window, and priced where probes are)
            wall = time.perf_counter() - started
            self.costs.overruns.observe(rows, catch_up > 0, predicted + self._joining_seconds, wall)
        return results

    def _fed_before_drafts(self) -> list[list[int]]:
        """What each row feeds the main pass before any drafts: its pending token, or
        ``<|startoftranscript|>`` to detect its language, or a chunk of its prompt. A prompt's chunk
        is priced by :func:`~specwhisper_backend.load_policy.prefill_chunk`; where one prompt's chunk
        widens the pass anyway, the other prompts fill in as much of that width as they have."""
        feeds: list[list[int]] = []
        prompts = []
        for slot, row in enumerate(self.rows):
            if row.phase is Phase.DETECT:
                feeds.append([self.facts.tokens.sot])
            elif row.phase is Phase.PREFILL:
                fed = int(self.main.lengths[slot])
                prompts.append((slot, fed, row.prompt_length - 1 - fed))
                feeds.append([])  # its chunk, below
            else:
                feeds.append([row.tokens[-1]])
        # the widest prompt chunk sets the pass's width; the other prompts fill it (every chunk is >= 1)
        chunks = (prefill_chunk(self.costs, len(self.rows), remaining, PREFILL_CHUNK) for _, _, remaining in prompts)
        width = max(chunks, default=1)
        for slot, fed, remaining in prompts:
            feeds[slot] = self.rows[slot].tokens[fed : fed + min(remaining, width)]
        return feeds

    def _propose(self, feeds: list[list[int]]) -> tuple[list[list[int]], ProposalTiming, int]:
        """This step's drafts for every row (none for rows that do not draft now), and what the first
        draft pass fed the row furthest behind (0: the draft did not run).

        A row whose last tokens occurred before (in an earlier attempt at its window, its prompt or
        its text) may copy what followed them instead of drafting (:mod:`specwhisper_backend.copying`),
        where the copy promises as many tokens as its draft would: a copy needs no draft pass, so a
        step in which every drafting row copies runs none, and the cap is chosen with that cost. Where
        the cap keeps every row plain because of some row's draft, the rows with a copy at hand copy
        after all if the copies alone pay."""
        none: list[list[int]] = [[] for _ in self.rows]
        for row in self.rows:
            row.copied = False
        candidates = [
            (i, row) for i, row in enumerate(self.rows) if row.phase is Phase.DECODE and row.window.drafting is not None
        ]
        self.last_cap = None
        if not candidates or not self.lanes:
            return none, NO_PROPOSAL, 0
        limit = self.facts.n_text_ctx
        lengths, copies, at_hands = [], [], []
        for _, row in candidates:
            drafting, room = row.window.drafting, limit - len(row.tokens) - 1
            length = min(drafting.length, room)
            at_hand = self._copy(row, room)
            copy = at_hand if at_hand and drafting.prefers_copy(len(at_hand), length) else []
            lengths.append(len(copy) if copy else length)
            copies.append(copy)
            at_hands.append(at_hand)
        cap = max(lengths)
        if self.policy.cost_aware:
            min_tokens = max(len(feed) for feed in feeds)
            cap = self._cap(candidates, lengths, copies, min_tokens)
            if not cap and any(at_hands) and not all(copies):
                # Kept plain where some rows would draft: every copy at hand, those passed over for
                # a draft that promised more included, needs no draft pass, and the copies alone may
                # pay where the drafts do not (a sampled attempt's drafts, at a cost the cap will not
                # pay, while its earlier attempt is there to copy; or another row's dear draft).
                cap = self._copies_cap(candidates, at_hands, min_tokens)
                if cap:
                    lengths, copies = [len(copy) for copy in at_hands], at_hands
        self.last_cap = cap
        if not cap:  # kept plain: each greedy row's estimate drifts back toward its instance's
            for _, row in candidates:
                # Not a sampled row's: drafts are accepted far less often at a temperature than the
                # instance's rounds (mostly greedy) say, and a drift up kept such a row drafting
                # where copying its window's earlier attempt would have paid.
                if not row.window.temperature:
                    row.window.drafting.rest()
        proposals, owners = [], []
        for (index, row), length, copy in zip(candidates, lengths, copies, strict=True):
            if min(length, cap) <= 0:
                continue
            window, drafting = row.window, row.window.drafting
            if copy:
                none[index], row.copied = copy[:cap], True
                continue
            if row.draft_slot is None:
                self._join_draft(row)
            # A sampled row's draft is judged against the main model's sample, not its choice:
            # what greedy rows teach of the draft's confidence does not hold for it.
            chance = drafting.chance if not window.temperature else None
            count = min(length, cap)
            proposals.append(
                Proposal(row.draft_slot, row.tokens, count, row.filters, window.temperature, window.noise, chance)
            )
            owners.append(index)
            drafting.proposed_after = len(row.tokens)
        if not proposals:
            return none, NO_PROPOSAL, 0
        behind = self._behind(self.rows[index] for index in owners)
        timings = []
        eot, confidence = self.facts.tokens.eot, self.policy.confidence
        for lane in self.lanes:  # each draft proposes for its own rows
            mine = [(i, proposal) for i, proposal in zip(owners, proposals, strict=True) if self.rows[i].lane is lane]
            if not mine:
                continue
            drafted, timing = timed_propose(lane.session, [proposal for _, proposal in mine], eot, confidence)
            timings.append(timing)
            for (index, proposal), tokens in zip(mine, drafted, strict=True):
                self.rows[index].window.drafting.probabilities = proposal.probabilities
                none[index] = tokens
                stats = self.rows[index].window.stats
                stats.assistant_passes += timing.passes
                stats.seconds_draft += timing.seconds / len(mine)
        return none, ProposalTiming.total(timings), behind

    def _copy(self, row: Row, room: int) -> list[int]:
        """What ``row`` could copy this step (empty: nothing at hand, or copies are off)."""
        if not self.policy.copies:
            return []
        if row.copy_index is None:  # each earlier attempt followed the same prompt: its start is copied too
            prompt = row.tokens[: row.prompt_length]
            row.copy_index = CopyIndex([(*prompt, *attempt) for attempt in row.window.earlier])
        return row.copy_index.continuation(row.tokens, min(self.policy.maximum, room))

    def _cap(
        self, candidates: list[tuple[int, Row]], lengths: list[int], copies: list[list[int]], min_tokens: int
    ) -> int:
        """The cap on this step's drafts, from the costs and each row's estimate (for its copy where
        it copies), or a probe's (:class:`~specwhisper_backend.load_policy.Probes`)."""
        acceptance = [
            row.window.drafting.copy_acceptance if copy else row.window.drafting.acceptance
            for (_, row), copy in zip(candidates, copies, strict=True)
        ]
        drafting_rows = [row for (_, row), copy in zip(candidates, copies, strict=True) if not copy]
        joining = sum(row.draft_slot is None for row in drafting_rows)
        draft_rows = self.draft_rows + joining if drafting_rows else 0  # copies alone run no draft pass
        rows = len(self.rows)
        step = (self.costs, rows, min_tokens, acceptance, lengths, draft_rows)
        catch_up = self._behind(drafting_rows) if drafting_rows else 0
        # The confidence stop is calibrated on greedy rounds of the draft model, not on samples or copies.
        lone = candidates[0][1]
        follows_stop = rows == 1 and self.policy.confidence > 0 and not copies[0] and not lone.window.temperature
        return self._probes.cap(
            choose_cap(*step, catch_up, follows_stop=follows_stop),
            self.costs.step(rows, min_tokens),
            price=lambda: probe_price(self.costs, rows, min_tokens, draft_rows, catch_up, joining),
            worth=lambda: choose_cap(*step, catch_up, hopeful=True) > 0,
            untried=any(row.window.drafting.untried for row in drafting_rows),
        )

    def _copies_cap(self, candidates: list[tuple[int, Row]], copies: list[list[int]], min_tokens: int) -> int:
        """The cap on a step in which the rows with a copy at hand copy and the others decode plainly:
        no draft pass, so nothing to catch up on and nothing for a probe to learn."""
        copying = [(row, copy) for (_, row), copy in zip(candidates, copies, strict=True) if copy]
        acceptance = [row.window.drafting.copy_acceptance for row, _ in copying]
        return choose_cap(self.costs, len(self.rows), min_tokens, acceptance, [len(copy) for _, copy in copying], 0)

    def _behind(self, rows: Iterable[Row]) -> int:
        """The most tokens any of ``rows`` has decoded that the draft's cache does not hold yet."""
        return max(len(row.tokens) - self._draft_length(row) for row in rows)

    def _draft_length(self, row: Row) -> int:
        """The tokens of ``row``'s text in the draft's cache (none before it first drafts)."""
        return 0 if row.lane is None else int(row.lane.session.lengths[row.draft_slot])

    def _detect(self, row: Row, scores: np.ndarray) -> None:
        """The main model's likeliest language after <|startoftranscript|>; the row then starts over."""
        codes = list(self.facts.languages)
        ids = np.asarray([self.facts.languages[code] for code in codes])
        slot = self.rows.index(row)
        lengths = self.main.lengths.copy()
        lengths[slot] = 0
        self.main.truncate(lengths)
        row.begin(codes[int(np.argmax(scores[ids]))], self.facts.tokens.sot)

    def _no_speech(self, scores: np.ndarray) -> float | None:
        """The probability of <|nospeech|> in these raw (unfiltered) scores, as openai/whisper reads it."""
        no_speech = self.facts.tokens.no_speech
        if no_speech is None:
            return None
        return float(tempered(scores, 1.0)[no_speech])

    def _decode(self, row: Row, scores: np.ndarray, drafts: list[int]) -> bool:
        """Keep a round's tokens (the main model's choices, or samples); True when the row's text ended."""
        kept, logprobs = keep_tokens(scores, row.tokens, drafts, row.filters, row.window.temperature, row.window.noise)
        accepted = len(kept) - 1
        stats = row.window.stats
        stats.add_round(drafted=len(drafts), accepted=accepted)
        stats.undrafted_rounds += row.window.drafting is not None and not drafts
        slot = self.rows.index(row)
        lengths = self.main.lengths.copy()
        lengths[slot] -= len(drafts) - accepted  # keep the pending token and the accepted drafts
        self.main.truncate(lengths)
        if row.copied:  # the draft's cache holds a prefix of the text still: nothing to roll back
            stats.add_copied(copied=len(drafts), accepted=accepted)
            row.window.drafting.update_copied(accepted, len(drafts))
        elif row.lane is not None and drafts:
            drafting, session = row.window.drafting, row.lane.session
            draft_lengths = session.lengths.copy()
            slot = row.draft_slot
            draft_lengths[slot] = min(draft_lengths[slot], drafting.kept_after(accepted, len(drafts)))
            session.truncate(draft_lengths)
            drafting.update(accepted, len(drafts))
        for token, logprob in zip(kept, logprobs, strict=True):
            stats.add_tokens(1)
            row.sum_logprob += logprob
            if token == self.facts.tokens.eot:
                return True
            row.tokens.append(token)
            if len(row.tokens) >= self.facts.n_text_ctx:
                return True
        return False

    @staticmethod
    def _result(row: Row) -> WindowResult:
        return WindowResult(
            tokens=row.tokens[row.prompt_length :],
            language=row.language,
            sum_logprob=row.sum_logprob,
            no_speech_prob=row.no_speech_prob,
            temperature=row.window.temperature,
        )


def keep_tokens(
    scores: np.ndarray,
    tokens: list[int],
    drafts: list[int],
    filters: Sequence[LogitFilter],
    temperature: float,
    noise: PositionNoise | None,
) -> tuple[list[int], list[float]]:
    """The tokens a round keeps, and the log-probability of each under the filters (not tempered).

    ``scores[i]`` are the main model's logits after ``tokens`` and the first ``i`` drafts. The main
    model's choice at each position (greedy, or sampled with the row's per-position ``noise``) is
    taken; drafts are kept while they equal it, and its choice at the first disagreement (or after
    the last draft) is kept too.
    """
    kept: list[int] = []
    logprobs: list[float] = []
    for i in range(len(drafts) + 1):
        position = filtered(scores[i], tokens + drafts[:i], filters)
        token = choose(position, temperature, noise, len(tokens) + i)
        kept.append(token)
        logprobs.append(float(position[token]) - log_normalizer(position))
        if i == len(drafts) or token != drafts[i]:
            break
    return kept, logprobs


def _remove(session: DecoderSession, rows: list[Row], leaving: Sequence[Row]) -> list[Row]:
    """Remove ``leaving`` from ``rows`` (and their session): each hole takes the last remaining row."""
    gone = {id(row) for row in leaving}
    order = list(range(len(rows)))
    kept_count = len(rows) - sum(id(row) in gone for row in rows)
    tail = [i for i in range(kept_count, len(rows)) if id(rows[i]) not in gone]
    for slot in range(kept_count):
        if id(rows[slot]) in gone:
            order[slot] = tail.pop()
    order = order[:kept_count]
    session.keep_rows(order)
    return [rows[i] for i in order]
