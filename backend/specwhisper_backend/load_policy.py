"""How many tokens the rows of a batch draft in a step: as many as pay, given what a step costs.

A step is a few draft passes over the drafting rows, then one main pass over every row, padded to
the longest row's tokens. How long that main pass takes depends on the rows and the tokens per row:
on a CPU it is nearly flat in the tokens at one row and close to proportional to rows x tokens at
sixteen (compute-bound); on a GPU it stays launch-bound far longer. So the right draft length falls
as the batch grows, to none at all when verifying drafts costs more than they save.

The policy decides from measurements, not assumptions. :class:`StepCosts` holds the measured time of
a main pass for a grid of rows and tokens per row, and of a draft pass for a grid of rows, taken when
an instance loads (:func:`measure_step_costs`), then scaled by how the steps actually served compare
with it, so that a machine under other load is seen as such. The served steps correct the grid's
shape too, not only its level: a point timed at load is as noisy as the machine, and at one row
drafting is a close call that a few percent on the ratio of a wide pass to a one-token pass decides,
so two instances of one server, timed a minute apart, would draft differently for good. The level
follows the one-token passes (plain decoding's), and each wider pass corrects its width's point
against that level (:meth:`StepCosts.observe`). A pass that took many times its
estimate was interrupted rather than slowed, and moves the scale by a few percent only (``OUTLIER``):
the draft's scale is corrected only by drafting, so one inflated by a pause would keep a row from
the drafts that would correct it. Each row brings its own draft length
(:class:`~specwhisper_backend.drafting.RowDraft`) and its acceptance estimate ``a``: drafting ``k``
tokens then yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average (the accepted drafts and the main
model's own token). For every cap ``c`` on the drafts (0 is plain decoding), :func:`choose_cap`
predicts the tokens a step yields over its cost, and takes the cap with the highest rate. The cost
counts the step's first draft pass as what it is: a pass that feeds every drafting row what it
decoded since the draft last ran (one or two tokens while the rows draft every step, all of them
after a stretch of plain steps, and the whole text for a row that has not drafted in its window).
That catch-up is paid once for the stretch of drafting it starts, so a step is charged its share
of a stretch of ``PROBE_EVERY`` steps. Charged whole to the one step that resumes drafting, it grew
with every plain step, and a lone row whose estimate dipped in a hard passage stayed plain long
after the passage, until a probe (docs/experiments.md, 2026-12-06, "The catch-up").
Plain decoding is always a candidate, and a cap must promise more tokens per second than it, by
``MARGIN`` at least: a close call goes to plain decoding.

A lone greedy row that drafts at all with its draft model drafts its whole length, and the
confidence stop ends each round where the draft is unsure. The cap prices a round as if every draft
were kept with the row's mean chance, one after another, but the draft is right in runs (the rest of
a word, a phrase it is sure of) and the stop reads each token's own probability: priced so, a lone
row was held to short rounds through the runs the stop would have let go on (docs/experiments.md,
2026-12-07, "A lone row drafts until the stop"). With more rows the longest row's drafts set every
row's passes and width, and the cap stays priced. So it does for a sampled row (the stop reads the
draft's raw probability there, and a sample is accepted far less often) and for a copy (no stop
ends it), where whole lengths lost.

A row filling in its prompt makes the main pass wider than one token a row whatever the cap; the
drafts of the others then ride in width that is paid anyway, but the tokens they add are worth what
an ordinary step (one token a row) would take for them, not what that wide step takes: set against
the wide step's poor rate, draft passes dearer than the tokens they add looked like a gain (on a
CPU with many rows, at every window's start).

The passes are not all a step costs. Each drafted token is also filtered and chosen on the host,
twice (as a draft, then when it is verified), and a catch-up runs in chunks; none of this is in the
grid, and all of it grows with the rows that draft. (A row new to the draft also computes its cross
K/V, once a window: that is timed as rows join, :attr:`StepCosts.join_seconds`, and left out here.)
So every step's wall time is set against what the grid predicted for what it ran
(:class:`Overruns`), apart for steps that drafted and steps that did not, by batch size (1, 2-3, 4-7,
8-15 rows, ...): how much further drafting steps overrun their prediction than plain steps is the
part of their cost the grid leaves out, and it is the margin a cap must beat at that batch size,
where it is above ``MARGIN``. It is measured, so it holds on any machine, and it only weighs
against drafting where drafting steps have been seen to cost more than they were expected to. The
probes below are drafting steps too, with their catch-up: where they keep costing more than
drafting could gain, the margin stops them as well (until ``OVERRUN_FORGET`` plain steps have
passed, and the margin is measured again).

Estimates only move when rows draft (a row kept plain drifts back toward its instance's estimate,
but the instance's, and the draft's measured cost, stand still), so after ``PROBE_EVERY`` steps in a
row without drafts the next step drafts ``PROBE_DRAFTS`` tokens a row (:class:`Probes`; sooner where
a row's request has not drafted yet, whose estimate is only its instance's): a probe that keeps the acceptance
estimates and the draft's measured cost current (its second pass is one token a row, which is what
teaches the draft's cost). A probe is not cheap: its first draft pass feeds every drafting row all
it decoded since the draft last ran, and its main pass pads every row to the probe's width. So a
probe is only made where it could change the answer: where drafting would pay if the rows accepted
drafts as often as a draft does at best (``HOPEFUL_ACCEPTANCE``), at the measured costs and margin,
with the catch-up paid once for a stretch of ``PROBE_EVERY`` drafting steps. On a CPU
with many rows, verifying even one draft a row costs nearly a second step, and no acceptance makes
drafting pay: there the batch decodes as plain decoding does, with no probes. A probe after
which the policy still keeps the batch plain doubles the wait before the next (up to
``PROBE_EVERY_MAX`` steps), so rows whose drafts are seldom right stop paying for probes. And a
probe waits until the plain steps since the last have saved up its price (a share of their
predicted seconds; :func:`probe_price`: its passes, its catch-up, and the cross K/V of the rows that
join the draft with it, which in a busy batch after a plain stretch is most of them): whatever
probes turn out to show, they cost at most that share of the plain decoding they interrupt. The
share is ``PROBE_SHARE`` at the start's pace and falls in proportion as the wait grows, to a
quarter of it: where drafts never pay, as in a language the draft cannot speak, the probes are all
that speculative decoding costs over plain decoding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specwhisper_backend.decoder_session import DecoderSession

# How fast measured steps move the scale: a step is a sample of the machine's current load.
SCALE_MEMORY = 0.95
# A pass or step that took more than this many times what was expected of it was interrupted (the
# process preempted, a page fault, a collector's pause), not slowed by the machine's load: it counts
# as this many times. Unclipped, one pause in a short draft pass multiplied the draft's cost
# estimate, and since only drafting corrects that estimate, a lone request then decoded plainly
# for long after (docs/experiments.md, 2026-12-05).
OUTLIER = 3.0
# Overruns: each step's weight fades by this for every later step of its kind and batch size, and a
# batch size's overrun counts once it has seen this many steps of each kind.
OVERRUN_MEMORY = 0.98
OVERRUN_SAMPLES = 8
# Plain steps of one batch size after which what its drafting steps overran is forgotten, and
# probes there (which it had stopped) measure it again: the machine's load may have changed.
OVERRUN_FORGET = 512
PROBE_EVERY = 16
PROBE_EVERY_MAX = 64
PROBE_DRAFTS = 2
# The most a probe may cost, as a share of the plain steps since the last (their predicted seconds),
# at the start's pace; PROBE_EVERY / wait of it after probes that showed nothing (Probes.share).
PROBE_SHARE = 0.05
MARGIN = 1.1
# A width's correction of the grid's shape is measured against the level of the one-token passes, so
# it is learned only while one-token passes at that batch size have come within this many steps;
# otherwise (a batch that drafts every step) the level follows every pass, as the shape stands.
ANCHOR_STEPS = 64
# About the best a trained draft's acceptance gets on clean speech (docs/experiments.md): a probe is
# made only where drafting would pay at this acceptance.
HOPEFUL_ACCEPTANCE = 0.9
# A row's joining the draft is priced at the median of this many recent joins (StepCosts.observe_join).
JOIN_SAMPLES = 5


@dataclass
class StepCosts:
    """Seconds of a main pass and of a draft pass by (rows, tokens per row), measured on a grid and
    interpolated between its points (in proportion beyond its last; the grid is not changed once
    made, and the points read are kept); scaled online by the steps actually run. A draft pass of
    many tokens a row is a draft catching up on what its rows decoded while it did not run."""

    rows: tuple[int, ...]  # increasing, from 1
    tokens: tuple[int, ...]  # increasing, from 1
    main_seconds: np.ndarray  # [len(rows), len(tokens)]
    draft_seconds: np.ndarray  # [len(rows), len(tokens)]
    main_scale: float = 1.0
    draft_scale: float = 1.0
    # A row's first draft: its cross K/V, the last joins timed (join_seconds).
    _joins: deque[float] = field(default_factory=lambda: deque(maxlen=JOIN_SAMPLES), repr=False, compare=False)
    overruns: Overruns = field(default_factory=lambda: Overruns())
    _points: dict[tuple[str, int, int], float] = field(default_factory=dict, repr=False, compare=False)
    # The served passes' correction of each main-grid point (the one-token column stays 1: it is the
    # level's), and the steps at each grid row since its last one-token pass.
    _shape: list[list[float]] = field(default_factory=list, repr=False, compare=False)
    _since_level: list[int] = field(default_factory=list, repr=False, compare=False)
    _columns: dict[int, tuple[tuple[int, float], ...]] = field(default_factory=dict, repr=False, compare=False)
    _row_indices: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._shape = [[1.0] * len(self.tokens) for _ in self.rows]
        self._since_level = [ANCHOR_STEPS] * len(self.rows)

    def main(self, rows: int, tokens: int) -> float:
        """A main pass over ``rows`` rows of ``tokens`` tokens each (padding included)."""
        return self._interpolated("main_seconds", rows, tokens) * self.shape(rows, tokens) * self.main_scale

    def shape(self, rows: int, tokens: int) -> float:
        """How far the served passes have moved this point of the main grid from its measured shape."""
        shape = self._shape[self._row_index(rows)]
        return sum(weight * shape[column] for column, weight in self._token_columns(tokens))

    def _row_index(self, rows: int) -> int:
        """The grid row whose shape a pass over ``rows`` rows shares: the last one at or below it."""
        if rows not in self._row_indices:
            self._row_indices[rows] = max(0, int(np.searchsorted(self.rows, rows, side="right")) - 1)
        return self._row_indices[rows]

    def _token_columns(self, tokens: int) -> tuple[tuple[int, float], ...]:
        """The grid's token columns on either side of ``tokens``, with their interpolation weights."""
        if tokens not in self._columns:
            upper = min(int(np.searchsorted(self.tokens, tokens)), len(self.tokens) - 1)
            lower = max(upper - 1, 0)
            if upper == lower or tokens >= self.tokens[upper]:
                self._columns[tokens] = ((upper, 1.0),)
            else:
                weight = (tokens - self.tokens[lower]) / (self.tokens[upper] - self.tokens[lower])
                self._columns[tokens] = ((lower, 1.0 - weight), (upper, weight))
        return self._columns[tokens]

    def draft(self, rows: int, tokens: int = 1) -> float:
        """A draft pass over ``rows`` rows of ``tokens`` tokens each (padding included)."""
        return self._interpolated("draft_seconds", rows, tokens) * self.draft_scale

    def _interpolated(self, grid: str, rows: int, tokens: int) -> float:
        key = (grid, rows, tokens)  # the policy asks for the same few points every step
        if key not in self._points:
            by_rows = [np.interp(tokens, self.tokens, line) for line in getattr(self, grid)]
            seconds = float(np.interp(rows, self.rows, by_rows))
            self._points[key] = seconds * _beyond(rows, self.rows) * _beyond(tokens, self.tokens)
        return self._points[key]

    def to_dict(self) -> dict:
        """The measured grid (not the online scales, which are each instance's own)."""
        return {
            "rows": list(self.rows),
            "tokens": list(self.tokens),
            "main_seconds": self.main_seconds.tolist(),
            "draft_seconds": self.draft_seconds.tolist(),
        }

    @classmethod
    def from_dict(cls, grid: dict) -> StepCosts:
        """The grid of :meth:`to_dict`; ValueError if it is not one (another version's)."""
        costs = cls(
            tuple(grid["rows"]),
            tuple(grid["tokens"]),
            np.asarray(grid["main_seconds"], dtype=np.float64),
            np.asarray(grid["draft_seconds"], dtype=np.float64),
        )
        shape = (len(costs.rows), len(costs.tokens))
        if costs.main_seconds.shape != shape or costs.draft_seconds.shape != shape:
            raise ValueError(f"step costs of another shape than {shape}")
        return costs

    def describe(self) -> str:
        """The measured grid, in milliseconds, for the log."""
        main = "; ".join(
            f"{rows} rows: " + " ".join(f"{ms:.1f}" for ms in line * 1e3)
            for rows, line in zip(self.rows, self.main_seconds, strict=True)
        )
        draft = "; ".join(
            f"{rows} rows: " + " ".join(f"{ms:.1f}" for ms in line * 1e3)
            for rows, line in zip(self.rows, self.draft_seconds, strict=True)
        )
        return f"ms by tokens per row {list(self.tokens)}: main pass {main}; draft pass {draft}"

    def observe(
        self, rows: int, tokens: int, main_seconds: float, draft_rows: int, draft_passes: int, draft_seconds: float
    ) -> None:
        """Fold a served step into the scales: its main pass, and its draft passes of one token a row
        over ``draft_rows`` rows, if any (not a round's first pass, which also catches up on the
        accepted tokens: counted as a draft pass, it would make drafting look dearer each time it
        resumes after plain steps, and it would seldom resume).

        A one-token pass moves the level (``main_scale``). A wider one, where one-token passes at its
        batch size came lately (``ANCHOR_STEPS``), corrects its width's point of the grid against
        that level instead: the level is then what plain decoding is priced at, not a mixture of the
        widths served. Where none came lately, the level follows this pass, as the shape stands."""
        index = self._row_index(rows)
        grid = self._interpolated("main_seconds", rows, tokens)
        self._since_level[index] = 0 if tokens == 1 else self._since_level[index] + 1
        if tokens == 1 or self._since_level[index] >= ANCHOR_STEPS:
            self.main_scale = _follow(self.main_scale, main_seconds / (grid * self.shape(rows, tokens)))
        else:
            ratio, shape = main_seconds / (grid * self.main_scale), self._shape[index]
            for column, weight in self._token_columns(tokens):
                if column:  # the one-token column is the level's
                    shape[column] = _follow(shape[column], ratio, weight)
        if draft_passes:
            expected = draft_passes * self.draft(draft_rows) / self.draft_scale
            self.draft_scale = _follow(self.draft_scale, draft_seconds / expected)

    def observe_join(self, seconds: float) -> None:
        """Fold in what a row's joining the draft took."""
        self._joins.append(seconds)

    @property
    def join_seconds(self) -> float:
        """What a row's joining the draft takes (0 until one has joined): the median of the last
        ``JOIN_SAMPLES``. Rows join once a window, too seldom for a running mean to forget its first
        sample, and the first is cold (the graph's first run at one row after the grid's at many):
        followed from it, it overpriced each window's first probe (when a row joins) for many
        windows."""
        return float(np.median(self._joins)) if self._joins else 0.0

    def step(self, rows: int, tokens: int, draft_rows: int = 0, catch_up: int = 1, draft_passes: int = 0) -> float:
        """A step: a main pass over ``rows`` x ``tokens``, after ``draft_passes`` draft passes over
        ``draft_rows`` rows, the first of which feeds ``catch_up`` tokens a row."""
        seconds = self.main(rows, tokens)
        if draft_passes and draft_rows:  # a step whose drafts were all copied runs no draft pass
            seconds += self.draft(draft_rows, catch_up) + (draft_passes - 1) * self.draft(draft_rows)
        return seconds


class Overruns:
    """How much longer than predicted (:meth:`StepCosts.step`) steps take, those that drafted and
    those that did not, by batch size: sums of wall and predicted seconds in which each step fades as
    later steps of its kind come (``OVERRUN_MEMORY``). A batch size's drafting steps are forgotten
    after ``OVERRUN_FORGET`` plain steps in a row."""

    def __init__(self) -> None:
        # bucket -> [wall, predicted, steps] for plain steps, the same for drafting steps, and the
        # plain steps since the last drafting step
        self._sums: dict[int, np.ndarray] = {}

    def observe(self, rows: int, drafted: bool, predicted: float, wall: float) -> None:
        sums = self._sums.setdefault(_bucket(rows), np.zeros(7))
        kind = slice(3, 6) if drafted else slice(0, 3)
        # A step that overran OUTLIER times further than its kind has was interrupted: so much counts.
        seen = sums[kind][0] / sums[kind][1] if sums[kind][1] else 1.0
        wall = min(wall, OUTLIER * max(seen, 1.0) * predicted)
        sums[kind] = sums[kind] * (OVERRUN_MEMORY, OVERRUN_MEMORY, 1) + (wall, predicted, 1)
        sums[6] = 0 if drafted else sums[6] + 1
        if sums[6] >= OVERRUN_FORGET:
            sums[3:7] = 0

    def factor(self, rows: int) -> float:
        """How many times further than plain steps the drafting steps of this batch size overran their
        prediction: 1 until ``OVERRUN_SAMPLES`` drafting steps have been seen; until as many plain
        steps have, their overrun counts as none (a batch that drafts every step has no plain steps to
        compare with, and the host work of a plain step is small beside a drafting step's)."""
        sums = self._sums.get(_bucket(rows))
        if sums is None or sums[5] < OVERRUN_SAMPLES:
            return 1.0
        plain = sums[0] / sums[1] if sums[2] >= OVERRUN_SAMPLES else 1.0
        return float((sums[3] / sums[4]) / plain)


def _follow(estimate: float, sample: float, weight: float = 1.0) -> float:
    """``estimate`` moved toward ``sample`` by a step's weight (``SCALE_MEMORY``; a share ``weight``
    of it), geometrically (a cost is a factor, and a slow-down and a speed-up of the same factor
    should weigh alike), and the sample held within ``OUTLIER`` times the estimate either way: a
    pause moves it by a few percent, while a machine that stays slower is followed within a few
    dozen samples."""
    sample = min(max(sample, estimate / OUTLIER), estimate * OUTLIER)
    memory = SCALE_MEMORY**weight
    return float(estimate**memory * sample ** (1 - memory))


def _bucket(rows: int) -> int:
    """Batch sizes whose steps are told apart: 1, 2-3, 4-7, 8-15, ..."""
    return max(rows, 1).bit_length()


def _beyond(count: int, grid: Sequence[int]) -> float:
    """Past the grid's last point (rows, or tokens), cost grows in proportion."""
    return max(1.0, count / grid[-1])


def expected_tokens(acceptance: np.ndarray, drafts: np.ndarray) -> np.ndarray:
    """Tokens a round yields on average: accepted drafts plus the main model's own token, when each
    draft is accepted with chance ``acceptance`` given the previous one was."""
    acceptance = np.minimum(acceptance, 1 - 1e-9)
    return (1 - acceptance ** (drafts + 1)) / (1 - acceptance)


def choose_cap(
    costs: StepCosts,
    rows: int,
    min_tokens: int,
    acceptance: Sequence[float],
    lengths: Sequence[int],
    draft_rows: int,
    catch_up: int = 1,
    hopeful: bool = False,
    follows_stop: bool = False,
) -> int:
    """The cap on this step's drafts with the most tokens per second.

    ``rows`` take part in the main pass, at least ``min_tokens`` tokens each (a row filling in its
    prompt may bring more than one; the drafts then ride in a pass that is that wide anyway, and are
    weighed against ordinary plain steps); the rows that may draft have these ``acceptance`` estimates and
    draft ``lengths``; the draft session holds ``draft_rows`` rows, each draft pass runs over all.
    The first draft pass feeds each row what it decoded since the draft last ran, ``catch_up``
    tokens for the row furthest behind (1 when the rows drafted in the last step): paid once for a
    stretch of drafting, a step's share of ``PROBE_EVERY`` steps.

    ``follows_stop``: the one row's rounds are ended by the confidence stop where its draft is unsure
    (a lone greedy row drafting with its draft model): if it drafts at all, it drafts its whole length.

    ``hopeful``: the cap there would be if every row accepted drafts at least as often as a draft
    does at best (``HOPEFUL_ACCEPTANCE``). Where that is 0, no probe can show that drafting pays
    (:class:`Probes`): a probe pays the whole catch-up, and a batch of many rows far behind its draft
    would pay it again and again for nothing.
    """
    if not len(lengths):
        return 0
    acceptance = np.asarray(acceptance, dtype=np.float64)
    lengths = np.maximum(np.asarray(lengths), 0)  # a row at the end of the text's room drafts none
    catching_up = 0.0  # a stretch's catch-up, a step's share
    if draft_rows:  # copies alone run no draft pass, so there is nothing to catch up
        catching_up = (costs.draft(draft_rows, catch_up) - costs.draft(draft_rows)) / PROBE_EVERY
    if hopeful:
        acceptance = np.maximum(acceptance, HOPEFUL_ACCEPTANCE)
    others = rows - len(lengths)  # rows that do not draft yield one token a step
    margin = max(MARGIN, costs.overruns.factor(rows))
    # A row filling in its prompt makes the pass wider than one token a row whatever the cap: that
    # width is paid anyway, and a cap is charged only what it adds to it. But the tokens it yields
    # are worth what an ordinary step (one token a row) takes for them, not what this wide step
    # would: set against the wide step's poor rate, drafting that costs more than it saves would win.
    ordinary = costs.step(rows, 1) - costs.step(rows, min_tokens)
    # Every cap's tokens in one NumPy expression: this runs every step, and at one row a loop of
    # small NumPy calls per cap was a visible part of a step that drafts nothing.
    caps = np.arange(int(lengths.max()) + 1)
    drafts = np.minimum(lengths[None, :], caps[:, None])
    longests = drafts.max(axis=1).tolist()
    tokens = (expected_tokens(acceptance[None, :], drafts).sum(axis=1) + others).tolist()
    best_cap, best_rate = 0, -1.0
    for cap, longest in enumerate(longests):
        seconds = costs.step(rows, max(min_tokens, longest + 1), draft_rows, 1, longest) + ordinary
        seconds += catching_up if longest else 0.0
        rate = tokens[cap] / seconds if cap == 0 else tokens[cap] / seconds / margin
        if rate > best_rate:
            best_cap, best_rate = cap, rate
    if best_cap and rows == 1 and follows_stop:
        return int(lengths.max())  # whether to draft is decided here; how far, the stop decides
    return best_cap


class Probes:
    """When a batch that the cap keeps plain drafts anyway, to learn: after ``every`` plain steps in a
    row, where a probe could change the answer, and once the plain steps since the last probe have
    saved up its price (:attr:`share` of their predicted seconds). So whatever probes show, they
    cost at most that share of the plain decoding they interrupt. The wait doubles after each probe
    the policy does not follow with drafts of its own, and starts over whenever the policy drafts.

    The share falls as the wait grows (``PROBE_SHARE`` at the start's pace, a quarter of it at the
    longest wait): a probe the policy did not follow is evidence that drafting does not pay here, and
    where it never does (rows in a language the draft cannot speak) the probes' price is all that
    speculative decoding costs over plain decoding, so the more often probes have shown nothing, the
    less they may take."""

    def __init__(self) -> None:
        self.every = PROBE_EVERY
        self.waited = 0  # plain steps since the batch last drafted
        self.saved = 0.0  # seconds a probe may cost: `share` of the plain steps since
        self._probed = False

    @property
    def share(self) -> float:
        """The share of plain steps' predicted seconds saved up for the next probe."""
        return PROBE_SHARE * PROBE_EVERY / self.every

    def cap(
        self,
        chosen: int,
        plain_seconds: float,
        price: Callable[[], float],
        worth: Callable[[], bool],
        untried: bool = False,
    ) -> int:
        """This step's cap: ``chosen`` (the policy's), or a probe's where ``worth()``: whether drafting
        could pay here (:func:`choose_cap`, ``hopeful``), and its ``price()`` (:func:`probe_price`) is
        saved up. ``plain_seconds``: this step's predicted cost without drafts.

        ``untried``: a row here has not drafted in its request yet. Its estimate is only what the
        instance saw of its kind lately, and one request the draft did badly on can pull that below
        what drafting needs; every request after it would then start plain, and short ones end before
        the wait is over. So such a row probes as soon as the price is saved up, without the wait: the
        price still bounds what probes cost."""
        if chosen:
            self.every, self.waited, self.saved, self._probed = PROBE_EVERY, 0, 0.0, False
            return chosen
        if self._probed:  # and the policy did not follow it with drafts
            self.every, self._probed = min(2 * self.every, PROBE_EVERY_MAX), False
        self.waited += 1
        self.saved += self.share * plain_seconds
        if (self.waited > self.every or untried) and price() <= self.saved and worth():
            self.waited, self.saved, self._probed = 0, 0.0, True
            return PROBE_DRAFTS
        return 0


def probe_price(costs: StepCosts, rows: int, min_tokens: int, draft_rows: int, catch_up: int, joining: int) -> float:
    """What a probe's step costs beyond the same step decoded plainly: ``PROBE_DRAFTS`` draft passes
    over ``draft_rows`` rows, the first feeding ``catch_up`` tokens a row, and the wider main pass,
    times how much further drafting steps of this batch size overran their prediction
    (:class:`Overruns`); and the cross K/V of the ``joining`` rows that have not drafted yet (after a
    long plain stretch in a busy batch, most rows are in windows that started since)."""
    plain = costs.step(rows, min_tokens)
    probe = costs.step(rows, max(min_tokens, PROBE_DRAFTS + 1), draft_rows, catch_up, PROBE_DRAFTS)
    return probe * costs.overruns.factor(rows) - plain + joining * costs.join_seconds


def prefill_chunk(costs: StepCosts | None, rows: int, remaining: int, most: int) -> int:
    """How many of its ``remaining`` prompt tokens a row filling in its prompt feeds this step (at
    most ``most``), in a batch of ``rows`` rows: the chunk whose prompt costs the rows the fewest
    seconds of waiting, all rows together.

    The main pass pads every row to the widest row's tokens, so a chunk of ``c`` tokens makes each
    row wait ``main(rows, c) - main(rows, 1)`` longer this step. A smaller chunk takes the row more
    steps instead: it waits a whole step for each, and each other row waits what one more row adds
    to a one-token pass. At one row, or where a pass is launch-bound (a GPU), a wider pass costs
    little and a step more costs a whole one, so the prompt goes at once. On a CPU with many rows a
    pass costs about its rows x tokens: there one row's two prompt tokens fed at once made the step
    take twice as long for every row, where a step more costs each of them a sixteenth of one.
    Without measured costs (a model with no draft has no grid) the prompt goes in chunks of ``most``."""
    most = max(1, min(remaining, most))
    if costs is None or most == 1:
        return most
    one = costs.main(rows, 1)
    step_more = one + (rows - 1) * (one - (costs.main(rows - 1, 1) if rows > 1 else 0.0))

    def waited(chunk: int) -> float:
        return rows * (costs.main(rows, chunk) - one) + (math.ceil(remaining / chunk) - 1) * step_more

    return min(range(1, most + 1), key=waited)


def measure_step_costs(
    main: DecoderSession,
    draft: DecoderSession | None,
    states: np.ndarray,
    draft_states: np.ndarray | None,
    rows: Sequence[int],
    tokens: Sequence[int],
    context: int = 48,
    rounds: int = 5,
) -> StepCosts:
    """Time main and draft passes over ``rows`` x ``tokens``, after ``context``
    tokens of text, on sessions of their own (their rows are replaced). ``states`` / ``draft_states``
    ``[1, frames, d]`` stand in for every row's encoder output.

    The grid is timed in ``rounds`` interleaved sweeps, main and draft side by side, and each point
    keeps its fastest time: the policy reads the grid's shape (what more tokens or rows cost, what a
    draft pass costs beside a main pass), while the served steps set its level. Other work on the
    machine (other instances creating their sessions while this one loads) only ever slows a pass,
    and a point timed once or twice during it would bend the shape for good: a draft pass that looked
    dear kept an instance from ever drafting."""
    main_seconds = np.full((len(rows), len(tokens)), np.inf)
    drafting = draft is not None and draft_states is not None
    draft_seconds = np.full((len(rows), len(tokens)), np.inf if drafting else 0.0)
    for _ in range(rounds):
        for i, count in enumerate(rows):
            main.start(np.repeat(states, count, axis=0))
            main.forward(np.ones((count, context), dtype=np.int64))
            kept = main.lengths.copy()
            for j, width in enumerate(tokens):
                seconds = _seconds(main, kept, np.ones((count, width), dtype=np.int64))
                main_seconds[i, j] = min(main_seconds[i, j], seconds)
            if drafting:
                draft.start(np.repeat(draft_states, count, axis=0))
                draft.forward(np.ones((count, context), dtype=np.int64))
                kept = draft.lengths.copy()
                for j, width in enumerate(tokens):  # as drafts are proposed: the last token's scores read
                    seconds = _seconds(draft, kept, np.ones((count, width), dtype=np.int64), last_only=True)
                    draft_seconds[i, j] = min(draft_seconds[i, j], seconds)
    return StepCosts(tuple(rows), tuple(tokens), main_seconds, draft_seconds)


@contextlib.contextmanager
def measuring_alone(lock_file: Path | None = None) -> Iterator[None]:
    """Within, no other process on this machine that asks the same is measuring: model instances
    load together, and one instance's timings taken while the others load would be theirs too (a
    small draft's pass suffers most from cores that are busy elsewhere)."""
    path = lock_file or Path(tempfile.gettempdir()) / "specwhisper-measuring.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def server_costs_file(model_directory: Path, *settings: object) -> Path:
    """Where the instances of one server that run the same graphs with the same ``settings`` (threads,
    device) share the step costs the first of them measured (:func:`shared_step_costs`). Instances on
    one machine have the same costs, and a measurement holds up the instances that load after it.
    Graphs are the same when they are the same files: the plain and the streaming model hard-link one
    export. The server's process id and start time are part of the name, so a restarted server
    measures afresh (a Python-backend instance runs in a child process of the server)."""
    files = [(path.name, path.stat()) for path in model_directory.rglob("*.onnx")]
    graphs = sorted((name, stat.st_dev, stat.st_ino, stat.st_mtime_ns) for name, stat in files)
    server = os.getppid()
    try:
        started = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    digest = hashlib.sha256(repr((server, started, graphs, settings)).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"specwhisper-step-costs-{digest}.json"


def shared_step_costs(file: Path | None, key: str, measure: Callable[[], StepCosts]) -> StepCosts:
    """The grid saved under ``key`` in ``file`` by an earlier instance, or ``measure()``'s, saved there
    for the next (``file`` None: always measured). Callers hold :func:`measuring_alone`, which also
    orders the instances' reads and writes; a file that cannot be read is measured over."""
    saved: dict = {}
    if file is not None and file.is_file():
        try:
            saved = json.loads(file.read_text())
            return StepCosts.from_dict(saved[key])
        except (ValueError, KeyError, TypeError):
            saved = saved if isinstance(saved, dict) else {}
    costs = measure()
    if file is not None:
        partial = file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(saved | {key: costs.to_dict()}))
        partial.replace(file)
    return costs


def _seconds(session: DecoderSession, kept: np.ndarray, feed: np.ndarray, last_only: bool = False) -> float:
    """One pass over ``feed`` after ``kept``, timed; the session is rolled back to ``kept``."""
    started = time.perf_counter()
    session.forward(feed, last_only=last_only)
    seconds = time.perf_counter() - started
    session.truncate(kept)
    return seconds
