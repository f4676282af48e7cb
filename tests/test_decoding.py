"""The draft/verify loop on scripted decoders: identity with plain greedy whatever the draft does."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specwhisper_backend.decoding import accept, decode_window
from specwhisper_backend.drafting import Drafter, DraftPolicy
from specwhisper_backend.logit_filters import ApplyTimestampRules, SuppressAtBegin, SuppressTokens, select
from specwhisper_backend.stats import DecodeStats

VOCAB, EOT = 64, 30  # ids 40+ play the timestamps in TestTimestampRules, as in Whisper after <|endoftext|>


class ScriptedDecoder:
    """Stands in for a DecoderSession: logits are a pure function of the prefix it has consumed.

    ``mistakes`` marks prefix lengths at which this decoder prefers another token than the true
    model, so a draft built from it disagrees there. ``seconds_per_call`` makes each forward take
    that long, for tests of the wall-clock fallback judge (otherwise timing is all noise).
    ``sharpness`` scales the logits without moving their argmax: at 1 the top token's probability
    is about 0.1 (64 ids), at 10 close to 1, so it sets how sure a draft is of its tokens.
    """

    def __init__(
        self,
        text_length: int,
        seed: int = 0,
        mistakes: frozenset[int] = frozenset(),
        seconds_per_call: float = 0.0,
        sharpness: float = 1.0,
    ) -> None:
        self.text_length, self.seed, self.mistakes = text_length, seed, mistakes
        self.seconds_per_call, self.sharpness = seconds_per_call, sharpness
        self.history: list[int] = []
        self.calls = 0
        self.started_on: tuple[int, ...] | None = None  # the shape of the states last started on

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(self.history)])

    def start(self, states: np.ndarray | None = None) -> None:
        self.history = []
        self.started_on = None if states is None else states.shape

    def _logits(self, prefix: list[int]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *prefix])
        logits = (rng.normal(size=VOCAB) * self.sharpness).astype(np.float32)
        if len(prefix) >= self.text_length:
            logits[EOT] = 100.0
        if len(prefix) in self.mistakes:
            logits[(int(logits.argmax()) + 1) % VOCAB] = 1000.0
        return logits

    def forward(self, tokens: np.ndarray, counts=None) -> np.ndarray:
        self.calls += 1
        time.sleep(self.seconds_per_call)
        out = []
        for token in tokens[0].tolist():
            self.history.append(token)
            out.append(self._logits(self.history))
        return np.stack(out)[None]

    def truncate(self, lengths: np.ndarray) -> None:
        assert lengths[0] <= len(self.history)
        self.history = self.history[: int(lengths[0])]


def _run(main: ScriptedDecoder, prompt, filters, drafter=None, max_length=448) -> tuple[list[int], DecodeStats]:
    stats = DecodeStats()
    main.start()
    if drafter:
        drafter.start_window(np.zeros((1, 1500, 1)), 1500)
    result = decode_window(main, prompt, filters, EOT, max_length, stats, drafter)
    return result.tokens, stats


def test_accept_counts_common_prefix():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accept([5, 6, 7], [5, 9]) == 1
    assert accept([5], [4]) == 0
    assert accept([], [3]) == 0


def test_select_applies_filters_before_argmax():
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[7], logits[8] = 5.0, 4.0
    assert select(logits, [1, 2], [SuppressTokens([7])]) == 8
    assert select(logits, [1, 2], [SuppressAtBegin([7], prompt_length=2)]) == 8
    assert select(logits, [1, 2, 3], [SuppressAtBegin([7], prompt_length=2)]) == 7
    assert logits[7] == 5.0, "select must not edit the caller's logits"


def test_perfect_draft_is_accepted_and_saves_passes():
    prompt = [60, 61, 62]
    plain, plain_stats = _run(ScriptedDecoder(40), prompt, [])
    drafter = Drafter(ScriptedDecoder(40, sharpness=10), EOT, DraftPolicy(start=4, maximum=8))
    fast, stats = _run(ScriptedDecoder(40), prompt, [], drafter)
    assert fast == plain
    assert stats.acceptance_rate == 1.0
    assert stats.main_passes < plain_stats.main_passes / 3


@settings(max_examples=60, deadline=None)
@given(
    text_length=st.integers(1, 60),
    seed=st.integers(0, 1000),
    mistakes=st.frozensets(st.integers(0, 70), max_size=25),
    start=st.integers(1, 8),
    max_length=st.integers(5, 80),
    sharpness=st.sampled_from([1.0, 10.0]),
    confidence=st.sampled_from([0.0, 0.3, 0.9]),
)
def test_any_draft_gives_plain_greedy_output(text_length, seed, mistakes, start, max_length, sharpness, confidence):
    prompt = [60, 61, 62]
    filters = [SuppressTokens([3, 4]), SuppressAtBegin([EOT], len(prompt))]
    plain, _ = _run(ScriptedDecoder(text_length, seed), prompt, filters, max_length=max_length)
    policy = DraftPolicy(start=start, maximum=8, confidence=confidence)
    drafter = Drafter(ScriptedDecoder(text_length, seed, mistakes, sharpness=sharpness), EOT, policy)
    fast, stats = _run(ScriptedDecoder(text_length, seed), prompt, filters, drafter, max_length=max_length)
    assert fast == plain
    assert len(prompt) + len(plain) <= max_length
    assert stats.tokens_out >= len(plain)


def test_unrelated_draft_falls_back_to_plain_decoding():
    """A draft that never agrees, costing half a main step: each round yields one token for over
    1.5 main steps, so the judge stops drafting after its first rounds."""
    prompt = [60]
    draft = ScriptedDecoder(200, seed=99, seconds_per_call=0.003)
    drafter = Drafter(draft, EOT, DraftPolicy(start=3, judge_after_rounds=4))
    tokens, stats = _run(ScriptedDecoder(200, seed=1, seconds_per_call=0.006), prompt, [], drafter)
    assert stats.fallback_windows == 1
    assert not drafter.active
    assert stats.tokens_drafted < 20, "drafting should stop once it does not pay"
    assert tokens == _run(ScriptedDecoder(200, seed=1), prompt, [])[0]


def test_draft_reads_the_windows_audio_and_a_margin_of_encoder_frames():
    drafter = Drafter(ScriptedDecoder(10), EOT, DraftPolicy(frames_after_audio=50))
    drafter.start_window(np.zeros((1, 1500, 4), np.float32), audio_frames=200)
    assert drafter.session.started_on == (1, 250, 4)
    drafter.start_window(np.zeros((1, 1500, 4), np.float32), audio_frames=1490)
    assert drafter.session.started_on == (1, 1500, 4)
    with pytest.raises(ValueError, match="frames_after_audio"):
        DraftPolicy(frames_after_audio=-1)


def test_draft_length_adapts():
    drafter = Drafter(ScriptedDecoder(10), EOT, DraftPolicy(start=4, minimum=2, maximum=9, confidence=0))
    drafter.session.start()
    stats = DecodeStats()
    assert drafter.propose([1, 2], 4, [], stats) == [], "a window's first round is a plain, measuring step"
    drafter.update(0, 0, 0.01, stats)
    assert len(drafter.propose([1, 2], 4, [], stats)) == 4
    drafter.update(4, 4, 0.01, stats)
    assert drafter.draft_length == 6
    drafter.propose([1, 2, 3, 4, 5, 6, 7], 6, [], stats)
    drafter.update(1, 6, 0.01, stats)
    assert drafter.draft_length == 5
    assert drafter.session.lengths[0] == 7 + 1, "cache keeps the text plus the accepted draft"


def test_unsure_draft_ends_its_round():
    """A draft token below the policy's confidence is proposed, and drafting stops after it: the
    drafts after an unsure one would be drafted and verified mostly in vain."""
    stats = DecodeStats()

    def proposals(sharpness: float, confidence: float) -> list[int]:
        drafter = Drafter(ScriptedDecoder(40, sharpness=sharpness), EOT, DraftPolicy(start=6, confidence=confidence))
        drafter.session.start()
        drafter.propose([1, 2], 6, [], stats)  # a window's first round is a plain, measuring step
        drafter.update(0, 0, 0.01, stats)
        return drafter.propose([1, 2], 6, [], stats)

    sure, unsure = proposals(sharpness=10, confidence=0.6), proposals(sharpness=1, confidence=0.6)
    assert len(sure) == 6, "a draft sure of its tokens drafts the whole round"
    assert unsure == sure[:1], "an unsure draft proposes its first token and stops"
    assert proposals(sharpness=1, confidence=0) == sure, "confidence 0 never stops a round"


def test_draft_confidence_is_taken_under_the_logit_filters():
    """Suppressing every id but the draft's two likeliest leaves it choosing between two: sure enough."""
    logits = ScriptedDecoder(40)._logits([1, 2])
    two = np.argsort(logits)[-2:]
    others = SuppressTokens([i for i in range(VOCAB) if i not in two])
    drafter = Drafter(ScriptedDecoder(40), EOT, DraftPolicy(confidence=0.45))
    stats = DecodeStats()
    drafter.session.start()
    drafter.propose([1, 2], 3, [others], stats)
    drafter.update(0, 0, 0.01, stats)
    assert len(drafter.propose([1, 2], 3, [others], stats)) == 3


def test_invalid_policy_is_refused():
    with pytest.raises(ValueError, match="minimum"):
        DraftPolicy(start=0)
    with pytest.raises(ValueError, match="confidence"):
        DraftPolicy(confidence=1.0)


class TestTimestampRules:
    begin, prompt = 40, [60, 61]

    def _rules(self) -> ApplyTimestampRules:
        return ApplyTimestampRules(self.begin, EOT, no_timestamps=39, prompt_length=2, max_initial_timestamp_index=3)

    def test_text_starts_with_an_early_timestamp(self):
        logits = np.zeros(VOCAB, dtype=np.float32)
        self._rules().apply(logits, self.prompt)
        allowed = np.flatnonzero(np.isfinite(logits))
        assert allowed.tolist() == [40, 41, 42, 43]

    def test_timestamps_pair_up_and_never_go_back(self):
        logits = np.zeros(VOCAB, dtype=np.float32)
        # <|t=2|> text <|t=5|>: next is the partner timestamp (>= 5) or end of text, not text.
        self._rules().apply(logits, [*self.prompt, 42, 7, 45])
        allowed = np.flatnonzero(np.isfinite(logits))
        assert EOT not in allowed.tolist() or self.begin <= EOT
        assert all(t >= 45 for t in allowed if t >= self.begin)
        assert not any(t < EOT for t in allowed)

    def test_after_a_pair_comes_text(self):
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[:40] = 10.0  # text clearly likelier than timestamps
        self._rules().apply(logits, [*self.prompt, 42, 7, 45, 45])
        allowed = np.flatnonzero(np.isfinite(logits))
        assert all(t < self.begin for t in allowed)
