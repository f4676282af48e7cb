"""The batched draft/verify loop on scripted decoders: every row's output is its own plain output
(greedy, or sampled for its seed), whatever the draft proposes, whoever else is in the batch,
whenever rows join and leave."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specwhisper_backend.decoding import BatchDecoder, Window, keep_tokens
from specwhisper_backend.drafting import DraftPolicy, Proposal, RowDraft, SeenAcceptance, propose, timed_propose
from specwhisper_backend.facts import DecoderFacts, DraftRoute, ModelFacts, SpecialTokens
from specwhisper_backend.load_policy import (
    PROBE_DRAFTS,
    PROBE_EVERY,
    PROBE_EVERY_MAX,
    PROBE_SHARE,
    Probes,
    StepCosts,
    choose_cap,
    expected_tokens,
    prefill_chunk,
    probe_price,
)
from specwhisper_backend.logit_filters import (
    ApplyTimestampRules,
    LogitFilter,
    SuppressAtBegin,
    SuppressTokens,
    filtered,
    select,
)
from specwhisper_backend.normalizer import log_normalizer, probability
from specwhisper_backend.sampling import PositionNoise, choose, tempered
from specwhisper_backend.stats import DecodeStats

VOCAB, EOT = 64, 30  # ids 40+ play the timestamps in TestTimestampRules, as in Whisper after <|endoftext|>
SOT, LANGUAGES = 31, {"en": 32, "es": 33, "fr": 34}
TOKENS = SpecialTokens(
    sot=SOT, eot=EOT, transcribe=35, translate=36, no_timestamps=37, timestamp_begin=40, sot_prev=38, no_speech=39
)


DECODER = DecoderFacts(layers=1, heads=1, head_dim=4, cross_kv_file="", decoder_file="")


def facts(max_length: int = 448, routes: tuple[DraftRoute, ...] = ()) -> ModelFacts:
    return ModelFacts(
        n_mels=80,
        n_audio_ctx=1500,
        n_text_ctx=max_length,
        vocab_size=VOCAB,
        is_multilingual=True,
        tokens=TOKENS,
        languages=LANGUAGES,
        suppress_tokens=(),
        begin_suppress_tokens=(EOT,),
        max_initial_timestamp_index=50,
        main=DECODER,
        assistant=DECODER,
        assistant_form="decoder_only",
        routes=routes,
    )


def scripted_logits(seed: int, prefix: list[int], text_length: int, sharpness: float = 1.0) -> np.ndarray:
    """The main model: logits that are a pure function of a row's audio (``seed``) and its prefix;
    the text ends after ``text_length`` tokens. ``sharpness`` scales them without moving the argmax:
    at 1 the top token's probability is about 0.1 (64 ids), at 10 close to 1."""
    rng = np.random.default_rng([seed, *prefix])
    logits = (rng.normal(size=VOCAB) * sharpness).astype(np.float32)
    logits[[SOT, *LANGUAGES.values()]] -= 5.0  # never chosen, but language detection still reads them
    if len(prefix) >= text_length:
        logits[EOT] = 100.0
    return logits


class ScriptedSession:
    """Stands in for a DecoderSession over a batch. A row's audio is a seed its encoder states carry
    (``states[row, 0, 0]``) and its text length another (``states[row, 0, 1]``); ``mistakes`` are
    (seed, prefix length) pairs at which this decoder prefers another token than the main model, so a
    draft made from it disagrees there."""

    def __init__(self, mistakes: frozenset[tuple[int, int]] = frozenset(), sharpness: float = 1.0) -> None:
        self.mistakes, self.sharpness = mistakes, sharpness
        self.rows: list[tuple[int, int]] = []  # (seed, text length)
        self.history: list[list[int]] = []
        self.frames: list[int] = []
        self.passes = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(h) for h in self.history], dtype=np.int64)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def start(self, states: np.ndarray, frames: int | None = None) -> None:
        self.rows, self.history, self.frames = [], [], []
        self.add_rows(states, frames)

    def add_rows(self, states: np.ndarray, frames: int | None = None) -> None:
        for row in states:
            self.rows.append((int(row[0, 0]), int(row[0, 1])))
            self.history.append([])
            self.frames.append(states.shape[1] if frames is None else frames)

    def keep_rows(self, order) -> None:
        assert all(row >= slot for slot, row in enumerate(order)), "rows move only into earlier slots"
        self.rows = [self.rows[i] for i in order]
        self.history = [self.history[i] for i in order]
        self.frames = [self.frames[i] for i in order]

    def logits(self, row: int) -> np.ndarray:
        (seed, length), prefix = self.rows[row], self.history[row]
        logits = scripted_logits(seed, prefix, length, self.sharpness)
        if (seed, len(prefix)) in self.mistakes:
            logits[(int(logits.argmax()) + 1) % VOCAB] = 1000.0
        return logits

    def forward(self, tokens: np.ndarray, counts=None, last_only: bool = False) -> np.ndarray:
        assert tokens.shape[0] == self.batch_size
        counts = np.full(len(tokens), tokens.shape[1]) if counts is None else np.asarray(counts)
        self.passes += 1
        out = np.zeros((*tokens.shape, VOCAB), dtype=np.float32)
        for row, count in enumerate(counts):
            for position in range(count):
                self.history[row].append(int(tokens[row, position]))
                out[row, position] = self.logits(row)
        return out[np.arange(len(out)), np.maximum(counts - 1, 0)] if last_only else out

    def truncate(self, lengths) -> None:
        for row, length in enumerate(lengths):
            assert length <= len(self.history[row]), "truncate can only move lengths back"
            self.history[row] = self.history[row][: int(length)]


def greedy_alone(
    seed: int,
    text_length: int,
    prompt: list[int],
    filters: list[LogitFilter],
    max_length: int,
    temperature: float = 0.0,
    noise: PositionNoise | None = None,
):
    """Plain decoding of one row, a token a pass, by hand: the reference (a window decodes at least
    one token); sampled above temperature 0."""
    tokens = list(prompt)
    while True:
        scores = filtered(scripted_logits(seed, tokens, text_length), tokens, filters)
        token = choose(scores, temperature, noise, len(tokens))
        if token == EOT:
            break
        tokens.append(token)
        if len(tokens) >= max_length:
            break
    return tokens[len(prompt) :]


def detect_alone(seed: int, text_length: int) -> str:
    scores = scripted_logits(seed, [SOT], text_length)
    return max(LANGUAGES, key=lambda code: scores[LANGUAGES[code]])


def prompt_for(language: str, extra: int) -> list[int]:
    return [SOT, LANGUAGES[language], 35, *range(50, 50 + extra)]


def rules(prompt_length: int) -> list[LogitFilter]:
    return [SuppressTokens([3, 4]), SuppressAtBegin([EOT], prompt_length)]


def window(
    seed: int,
    text_length: int,
    language: str | None,
    extra: int,
    drafting: RowDraft | None,
    temperature: float = 0.0,
) -> Window:
    states = np.zeros((1, 1500, 4), np.float32)
    states[0, 0, :2] = seed, text_length
    return Window(
        states=states,
        audio_frames=400,
        language=language,
        prompt=lambda code: prompt_for(code, extra),
        filters=rules,
        stats=DecodeStats(),
        drafting=drafting,
        draft_states=states if drafting else None,
        temperature=temperature,
        noise=_noise(seed) if temperature else None,
    )


def _noise(seed: int) -> PositionNoise:
    return PositionNoise((seed, 7), VOCAB)


def flat_costs(main_per_token: float = 0.0, draft: float = 0.1) -> StepCosts:
    """Costs to script a machine: a main pass costs 1 plus ``main_per_token`` per row and token."""
    rows, tokens = (1, 2, 4, 8, 16), (1, 2, 3, 5, 9, 17)
    main = np.asarray([[1.0 + main_per_token * r * t for t in tokens] for r in rows])
    return StepCosts(rows, tokens, main, np.full(main.shape, draft))


def run(decoder: BatchDecoder, arrivals: list[tuple[int, Window]]) -> dict[int, list[int]]:
    """Join each window at its step (an index), step until every row has left; results by arrival."""
    results: dict[int, list[int]] = {}
    pending = sorted(enumerate(arrivals), key=lambda item: item[1][0])
    step = 0
    while pending or decoder.rows:
        while pending and pending[0][1][0] <= step:
            index, (_, joining) = pending.pop(0)
            decoder.join(joining, index)
        if decoder.rows:
            for owner, result in decoder.step():
                results[owner] = result.tokens
        step += 1
    return results


def _peaked(*tops: int) -> np.ndarray:
    """Logits for each position, ``tops[i]`` the likeliest at position ``i``."""
    scores = np.zeros((len(tops), VOCAB), dtype=np.float32)
    for i, top in enumerate(tops):
        scores[i, top] = 5.0
    return scores


def test_greedy_keeps_the_agreeing_drafts_then_the_main_models_choice():
    scores = _peaked(5, 6, 7, 8)
    assert keep_tokens(scores, [1], [5, 6, 7], [], 0.0, None)[0] == [5, 6, 7, 8]
    assert keep_tokens(scores, [1], [5, 9, 7], [], 0.0, None)[0] == [5, 6]
    assert keep_tokens(scores, [1], [4], [], 0.0, None)[0] == [5]
    kept, logprobs = keep_tokens(scores[:1], [1], [], [SuppressTokens([5])], 0.0, None)
    assert kept != [5], "filters apply before the choice"
    assert logprobs[0] == pytest.approx(-np.log(VOCAB - 1)), "log-probability under the filters"


def test_the_log_normalizer_is_logsumexp_over_filtered_scores():
    """Large logits, and ids a filter removed (-inf), as a verified position has them."""
    from scipy.special import logsumexp

    scores = (np.random.default_rng(0).standard_normal(51865) * 8 + 40).astype(np.float32)
    scores[:100] = -np.inf
    assert log_normalizer(scores) == pytest.approx(float(logsumexp(scores.astype(np.float64))), abs=1e-5)
    top = int(scores.argmax())
    expected = np.exp(scores[top] - logsumexp(scores.astype(np.float64)))
    assert probability(scores, top) == pytest.approx(expected, rel=1e-5)
    assert probability(scores, 0) == 0.0, "a filtered-out id"
    assert log_normalizer(np.full(8, -np.inf, np.float32)) == -np.inf, "every id filtered out"


def test_the_log_softmax_graph_is_the_one_onnx_builds():
    """The engine carries its LogSoftmax graph serialised (it runs without the onnx package)."""
    from onnx import TensorProto, helper

    from specwhisper_backend.normalizer import LOG_SOFTMAX_GRAPH

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", "vocab"])

    node = helper.make_node("LogSoftmax", ["scores"], ["log_probs"], axis=-1)
    graph = helper.make_graph([node], "log_softmax", [value("scores")], [value("log_probs")])
    opset = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opset, ir_version=8, producer_name="specwhisper")
    assert model.SerializeToString() == LOG_SOFTMAX_GRAPH


@pytest.mark.parametrize("drafts_per_round", [1, 3])
def test_sampled_rounds_draw_from_the_main_models_distribution(drafts_per_round):
    """Whatever the draft's distribution, the tokens kept follow the main model's: two tokens
    generated by rounds of drafts sampled with the same noise, over many seeds, against ``p x p``
    (chi-square)."""
    from scipy.stats import chisquare

    vocab, temperature = 6, 0.7
    main = np.log(np.array([0.30, 0.25, 0.2, 0.15, 0.07, 0.03]))
    draft = np.log(np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3]))  # a bad draft
    p = tempered(main, temperature)
    counts = np.zeros((vocab, vocab))
    for seed in range(12_000):
        noise = PositionNoise((seed,), vocab)
        tokens: list[int] = []
        while len(tokens) < 2:
            proposed: list[int] = []
            for _ in range(drafts_per_round):
                proposed.append(choose(draft, temperature, noise, len(tokens) + len(proposed)))
            scores = np.tile(main, (drafts_per_round + 1, 1))
            kept, _ = keep_tokens(scores, tokens, proposed, [], temperature, noise)
            tokens += kept
        counts[tokens[0], tokens[1]] += 1
    expected = np.outer(p, p).ravel() * counts.sum()
    assert chisquare(counts.ravel(), expected).pvalue > 0.001


def test_sampling_reads_the_same_noise_at_a_position_whoever_reads_it():
    noise = PositionNoise((3, 0, 1), 51865)
    assert noise.at(5) is noise.at(5)
    assert np.array_equal(noise.at(5), PositionNoise((3, 0, 1), 51865).at(5))
    assert not np.array_equal(noise.at(5), noise.at(6))
    assert not np.array_equal(noise.at(5), PositionNoise((4, 0, 1), 51865).at(5))
    with pytest.raises(ValueError, match="needs noise"):
        choose(np.zeros(4), 0.5, None, 0)


def test_select_applies_filters_before_argmax():
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[7], logits[8] = 5.0, 4.0
    assert select(logits, [1, 2], [SuppressTokens([7])]) == 8
    assert select(logits, [1, 2], [SuppressAtBegin([7], prompt_length=2)]) == 8
    assert select(logits, [1, 2, 3], [SuppressAtBegin([7], prompt_length=2)]) == 7
    assert logits[7] == 5.0, "select must not edit the caller's logits"


def test_a_draft_that_always_agrees_is_accepted_and_saves_passes():
    policy = DraftPolicy(start=4, maximum=8, cost_aware=False)
    plain = BatchDecoder(facts(), ScriptedSession(), None, policy)
    (plain_tokens,) = run(plain, [(0, w := window(7, 40, "en", 0, None))]).values()
    fast = BatchDecoder(facts(), ScriptedSession(), ScriptedSession(sharpness=10), policy)
    (fast_tokens,) = run(fast, [(0, v := window(7, 40, "en", 0, RowDraft(policy)))]).values()
    assert fast_tokens == plain_tokens == greedy_alone(7, 40, prompt_for("en", 0), rules(3), 448)
    assert v.stats.acceptance_rate == 1.0
    assert v.stats.main_passes < w.stats.main_passes / 3


row_strategy = st.tuples(
    st.integers(0, 12),  # the step it joins at
    st.integers(0, 10_000),  # its audio (seed)
    st.integers(1, 50),  # its text length
    st.sampled_from([None, "en", "es"]),  # given language, or detect it
    st.integers(0, 20),  # extra prompt tokens (previous text): spread over prefill steps
    st.booleans(),  # speculative
    st.frozensets(st.integers(0, 80), max_size=20),  # where its draft disagrees (prefix lengths)
    st.sampled_from([0.0, 0.0, 0.6]),  # temperature: greedy, or sampled (a fallback)
)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(row_strategy, min_size=1, max_size=7),
    max_length=st.integers(12, 90),
    start=st.integers(1, 8),
    confidence=st.sampled_from([0.0, 0.3, 0.9]),
    costs=st.sampled_from([None, flat_costs(0.0), flat_costs(0.5), flat_costs(0.01, draft=0.02)]),
    routed=st.booleans(),
)
def test_every_row_gets_its_own_plain_output(rows, max_length, start, confidence, costs, routed):
    """``routed``: Spanish rows draft with a draft of their own, which errs elsewhere."""
    policy = DraftPolicy(start=start, maximum=8, confidence=confidence, cost_aware=costs is not None)
    mistakes = frozenset((seed, at) for _, seed, _, _, _, _, wrong, _ in rows for at in wrong)
    routes = (DraftRoute(("es",), DECODER),) if routed else ()
    spanish = [ScriptedSession(frozenset((seed, at + 1) for seed, at in mistakes), sharpness=3)] if routed else []
    draft = ScriptedSession(mistakes, sharpness=3)
    decoder = BatchDecoder(facts(max_length, routes), ScriptedSession(), draft, policy, costs, routes=spanish)
    arrivals = [
        (step, window(seed, length, language, extra, RowDraft(policy) if speculative else None, temperature))
        for step, seed, length, language, extra, speculative, _, temperature in rows
    ]
    results = run(decoder, arrivals)
    for index, (_, seed, length, language, extra, _, _, temperature) in enumerate(rows):
        prompt = prompt_for(language or detect_alone(seed, length), extra)
        noise = _noise(seed) if temperature else None
        alone = greedy_alone(seed, length, prompt, rules(len(prompt)), max_length, temperature, noise)
        assert results[index] == alone, index
    assert not decoder.rows and not decoder.draft_rows and decoder.main.batch_size == 0
    assert all(session.batch_size == 0 for session in (draft, *spanish))


def test_each_row_drafts_with_the_draft_of_its_language():
    """A default draft that is always wrong, a Spanish draft that is right: Spanish rows (given, or
    detected) accept its drafts, the English row none, and each gets its plain output."""
    policy = DraftPolicy(start=4, maximum=8, cost_aware=False)
    detected_spanish = next(seed for seed in range(100, 1000) if detect_alone(seed, 40) == "es")
    seeds = (1, 2, detected_spanish)
    default = ScriptedSession(frozenset((seed, at) for seed in seeds for at in range(200)), sharpness=10)
    spanish = ScriptedSession(sharpness=10)
    routed = facts(routes=(DraftRoute(("es", "fr"), DECODER),))
    decoder = BatchDecoder(routed, ScriptedSession(), default, policy, routes=[spanish])
    languages = ("en", "es", None)
    english, given, detected = (
        window(seed, 40, language, 0, RowDraft(policy)) for seed, language in zip(seeds, languages, strict=True)
    )
    results = run(decoder, [(0, english), (0, given), (2, detected)])
    for index, (seed, language) in enumerate(zip(seeds, ("en", "es", "es"), strict=True)):
        prompt = prompt_for(language, 0)
        assert results[index] == greedy_alone(seed, 40, prompt, rules(len(prompt)), 448), index
    assert english.stats.acceptance_rate == 0.0
    # (Not quite 1: at a near tie, the draft's sharper scores can round to another argmax.)
    assert given.stats.acceptance_rate > 0.9 and detected.stats.acceptance_rate > 0.9
    assert default.batch_size == spanish.batch_size == 0


def test_routes_are_checked_where_the_facts_are_made():
    assert facts(routes=(DraftRoute(("es",), DECODER),)).route("es") == 0
    assert facts(routes=(DraftRoute(("es",), DECODER),)).route("en") is None
    with pytest.raises(ValueError, match="routed to two drafts"):
        facts(routes=(DraftRoute(("es",), DECODER), DraftRoute(("es", "fr"), DECODER)))
    with pytest.raises(ValueError, match="does not know"):
        facts(routes=(DraftRoute(("xx",), DECODER),))
    with pytest.raises(ValueError, match="decoder-only default assistant"):
        dataclasses.replace(facts(), assistant=None, routes=(DraftRoute(("es",), DECODER),))
    routed = facts(routes=(DraftRoute(("es", "fr"), DECODER),))
    assert ModelFacts.from_json(routed.to_json()) == routed
    with pytest.raises(ValueError, match="routes 1 drafts"):
        BatchDecoder(routed, ScriptedSession(), ScriptedSession(), DraftPolicy(cost_aware=False))


def test_rows_in_a_batch_share_passes():
    policy = DraftPolicy(cost_aware=False)
    decoder = BatchDecoder(facts(), ScriptedSession(), None, policy)
    windows = [window(seed, 30, "en", 0, None) for seed in range(4)]
    run(decoder, [(0, w) for w in windows])
    # A prompt of 3 and a text that ends after 30 tokens in all: one prefill pass, 27 tokens, the end.
    assert decoder.main.passes == max(w.stats.main_passes for w in windows) == 29
    assert all(w.stats.rows_per_step == 4 for w in windows)


def test_a_window_decoded_again_copies_its_earlier_attempt():
    """A fallback's earlier attempt, where it says what the main model says again, is copied as the
    drafts and accepted. This draft never agrees with the main model: once the row has seen that (its
    first round), it copies, with no draft pass."""
    policy = DraftPolicy(cost_aware=False)
    prompt = prompt_for("en", 0)
    plain = greedy_alone(7, 60, prompt, rules(len(prompt)), 448)
    never = frozenset((7, at) for at in range(448))
    draft = ScriptedSession(never)
    decoder = BatchDecoder(facts(), ScriptedSession(), draft, policy)
    again = dataclasses.replace(window(7, 60, "en", 0, RowDraft(policy)), earlier=(tuple(plain),))
    (tokens,) = run(decoder, [(0, again)]).values()
    assert tokens == plain
    # one pass fills in the prompt; every other keeps its copies and the main model's own token
    stats = again.stats
    assert stats.copies_accepted == stats.tokens_copied == stats.tokens_out - (stats.main_passes - 1)
    assert again.stats.main_passes <= len(plain) / 5
    assert draft.passes == again.stats.assistant_passes <= 5  # one round's


def _seen(accepted: int, drafted: int = 5, rounds: int = 30) -> SeenAcceptance:
    """An instance that saw English rounds of ``drafted`` drafts with ``accepted`` of them accepted."""
    seen = SeenAcceptance()
    teller = _begun(seen)
    for _ in range(rounds):
        teller.update(accepted, drafted)
    return seen


def _dear_draft_decoder(monkeypatch, main_per_token: float) -> tuple[BatchDecoder, TimedSession, DraftPolicy]:
    """A decoder on a scripted clock whose main pass costs 1 and ``main_per_token`` a row and token, and
    whose draft pass costs 5: drafting costs more than it could save, copies need no draft pass."""
    import time

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    policy = DraftPolicy()
    draft = TimedSession(clock, 5.0)
    costs = flat_costs(main_per_token, draft=5.0)
    return BatchDecoder(facts(), TimedSession(clock, 1.0), draft, policy, costs), draft, policy


def test_a_row_kept_plain_copies_what_it_passed_over_for_its_draft(monkeypatch):
    """A row whose draft promises more than its copy (the instance saw this draft accepted), but whose
    draft passes cost more than drafting could save: the cap keeps its drafts out. The copy at hand
    needs no draft pass and pays, so the row copies rather than decode plainly."""
    decoder, draft, policy = _dear_draft_decoder(monkeypatch, 0.1)
    prompt = prompt_for("en", 0)
    plain = greedy_alone(7, 60, prompt, rules(len(prompt)), 448)
    seen = _seen(5)
    start = _begun(seen)  # where the row starts: its draft promises more than sixteen copies
    assert start.acceptance > 0.9 and not start.prefers_copy(16, policy.start)
    again = dataclasses.replace(window(7, 60, "en", 0, RowDraft(policy, seen)), earlier=(tuple(plain),))
    (tokens,) = run(decoder, [(0, again)]).values()
    assert tokens == plain
    assert again.stats.copies_accepted > len(plain) / 2
    assert again.stats.main_passes < len(plain) / 3
    assert draft.passes == 0


def test_a_batch_kept_plain_by_one_rows_draft_lets_another_copy(monkeypatch):
    """Two rows: one prefers its copy (its instance saw its drafts seldom accepted), the other, with
    nothing to copy, has a draft whose passes cost more than drafting could save. The cap keeps the
    batch plain because of that draft; the copy needs no draft pass and pays, so its row copies, and
    the other decodes plainly."""
    decoder, draft, policy = _dear_draft_decoder(monkeypatch, 0.02)
    prompt = prompt_for("en", 0)
    copier_plain = greedy_alone(7, 60, prompt, rules(len(prompt)), 448)
    drafter_plain = greedy_alone(8, 60, prompt, rules(len(prompt)), 448)
    seldom, often = _seen(0), _seen(5)
    assert _begun(seldom).prefers_copy(16, policy.start) and _begun(often).acceptance > 0.9
    copier = dataclasses.replace(window(7, 60, "en", 0, RowDraft(policy, seldom)), earlier=(tuple(copier_plain),))
    drafter = window(8, 60, "en", 0, RowDraft(policy, often))
    results = run(decoder, [(0, copier), (0, drafter)])
    assert [results[0], results[1]] == [copier_plain, drafter_plain]
    # The copier copies while the drafter is in the batch (a step a token), not only after it left.
    assert copier.stats.main_passes < drafter.stats.main_passes / 2 < len(copier_plain)
    assert drafter.stats.tokens_drafted == 0 and draft.passes == 0


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 6),  # the step it joins at
            st.integers(0, 10_000),  # its audio (seed)
            st.integers(1, 50),  # its text length
            st.sampled_from([0.0, 0.6]),  # temperature
            st.lists(st.tuples(st.integers(0, 60), st.integers(0, VOCAB - 1)), max_size=8),  # changed tokens
            st.integers(0, 2),  # earlier attempts
        ),
        min_size=1,
        max_size=5,
    ),
    costs=st.sampled_from([None, flat_costs(0.0), flat_costs(0.5)]),
)
def test_copied_drafts_never_change_a_rows_output(rows, costs):
    """Rows that copy from earlier attempts (the greedy text with some tokens changed, as a fallback's
    attempt before it would be), beside rows that draft, each get their own plain output."""
    policy = DraftPolicy(maximum=8, cost_aware=costs is not None)
    mistakes = frozenset((seed, at) for _, seed, *_ in rows for at in range(0, 448, 4))
    decoder = BatchDecoder(facts(), ScriptedSession(), ScriptedSession(mistakes, sharpness=3), policy, costs)
    arrivals, expected = [], []
    for step, seed, length, temperature, changes, attempts in rows:
        prompt = prompt_for("en", 0)
        greedy = greedy_alone(seed, length, prompt, rules(len(prompt)), 448)
        attempt = list(greedy)
        for at, token in changes:
            if at < len(attempt):
                attempt[at] = token
        joining = window(seed, length, "en", 0, RowDraft(policy), temperature)
        arrivals.append((step, dataclasses.replace(joining, earlier=(tuple(attempt),) * attempts)))
        expected.append(greedy_alone(seed, length, prompt, rules(len(prompt)), 448, temperature, joining.noise))
    results = run(decoder, arrivals)
    assert [results[index] for index in range(len(rows))] == expected
    assert not decoder.rows and not decoder.draft_rows


def test_the_draft_reads_the_audio_and_a_margin_and_the_batch_its_longest_row():
    policy = DraftPolicy(frames_after_audio=50, cost_aware=False)
    draft = ScriptedSession()
    decoder = BatchDecoder(facts(), ScriptedSession(), draft, policy)
    first, second = window(1, 5, "en", 0, RowDraft(policy)), window(2, 5, "en", 0, RowDraft(policy))
    second.audio_frames = 1490
    decoder.join(first, 0)
    decoder.join(second, 1)
    assert draft.frames == [], "a row takes a draft row when it first drafts"
    decoder.step()  # the prompts
    decoder.step()
    assert draft.frames == [450, 1500]
    with pytest.raises(ValueError, match="frames_after_audio"):
        DraftPolicy(frames_after_audio=-1)


def test_draft_length_adapts():
    drafting = RowDraft(DraftPolicy(start=4, minimum=2, maximum=9))
    drafting.update(4, 4)
    assert drafting.length == 6
    drafting.update(1, 6)
    assert drafting.length == 5
    for _ in range(5):
        drafting.update(0, 5)
    assert drafting.length == 2
    high = drafting.acceptance
    drafting.update(2, 2)
    assert drafting.acceptance > high
    drafting.proposed_after = 7
    assert drafting.kept_after(accepted=1, drafted=6) == 8, "the cache keeps the text and the accepted draft"
    assert drafting.kept_after(accepted=6, drafted=6) == 12, "the last draft was never fed"


def _begun(seen: SeenAcceptance | None, language: str = "en", task: str = "transcribe") -> RowDraft:
    """A row's drafting state, its window begun in ``language``."""
    drafting = RowDraft(DraftPolicy(), seen, task)
    drafting.begin(language)
    return drafting


def test_a_new_rows_acceptance_starts_from_what_its_instance_saw_of_its_kind():
    seen = SeenAcceptance()
    assert _begun(seen).acceptance == pytest.approx(2 / 3), "nothing seen: the default prior"
    teller = _begun(seen)
    for _ in range(30):
        teller.update(5, 5)  # English drafts accepted whole
    english = _begun(seen)
    assert english.acceptance > 0.9
    for task, language in (("transcribe", "de"), ("translate", "en")):
        assert _begun(seen, language, task).acceptance == pytest.approx(2 / 3), f"{task} {language} is another kind"
    english.update(0, 5)
    english.update(0, 5)
    own = english.acceptance
    english.begin("en")  # its request's next window: the row's own evidence stands
    assert english.acceptance == own
    assert _begun(None).acceptance == pytest.approx(2 / 3)  # no instance to learn from


def test_a_new_rows_acceptance_starts_from_its_drafts_measured_acceptance_where_the_draft_has_one():
    """A draft measured held out at 0.85 in Italian: a fresh instance's Italian rows start there,
    where the generic 2 in 3 is a close call at one row on a CPU, and a measurement weighs more than
    that guess: one rejected first round (a window's first token is heard with no text before it)
    leaves the row near its measurement, where it left the guess at a half."""
    seen = SeenAcceptance({"it": 0.85})
    assert _begun(seen, "it").acceptance == pytest.approx(0.85)
    assert _begun(seen, "it").copy_acceptance == pytest.approx(1 / 2), "copies are not the draft's"
    assert _begun(seen, "it", "translate").acceptance == pytest.approx(2 / 3), "measured transcribing"
    assert _begun(seen, "ru").acceptance == pytest.approx(2 / 3), "not measured"
    italian, guessed = _begun(seen, "it"), _begun(SeenAcceptance(), "it")
    italian.update(0, 1)
    guessed.update(0, 1)
    assert italian.acceptance > 0.7 and guessed.acceptance < 0.5
    w = SeenAcceptance.MEASURED_WEIGHT
    assert _begun(seen, "it").acceptance == pytest.approx(0.85 * w / (w + 1)), "the instance heard of it"


def test_a_new_rows_estimate_for_copies_starts_from_what_its_instance_saw_of_copies():
    """Copies are a kind of their own: what they showed moves the next request's copy estimate, not
    its draft's, and the draft's rounds do not move the copies'."""
    seen = SeenAcceptance()
    fresh = _begun(seen)
    assert fresh.copy_acceptance == pytest.approx(1 / 2), "nothing seen: the copies' prior"
    teller = _begun(seen)
    for _ in range(30):
        teller.update_copied(0, 8)  # copies that were never right
        teller.update(5, 5)  # drafts that always were
    later = _begun(seen)
    assert later.copy_acceptance < 0.1 and later.acceptance > 0.9
    assert not later.prefers_copy(16, 5)
    assert fresh.prefers_copy(16, 1)  # sixteen tokens at even odds promise more than one draft


def test_the_confidence_stop_reads_how_often_drafts_that_sure_were_accepted():
    seen, italian = SeenAcceptance(), ("transcribe", "it")
    assert seen.chance(italian, 0.45) == 0.45, "nothing seen: the draft's own probability"
    for _ in range(200):  # an unsure draft that is right: its tokens of about 0.4 are accepted
        seen.observe_drafts(italian, [0.45, 0.95, 0.35], accepted=3)
    assert seen.chance(italian, 0.4) > 0.9
    assert seen.chance(("transcribe", "ru"), 0.4) == 0.4, "another kind"
    assert seen.chance(italian, 0.75) == 0.75, "another probability"
    for _ in range(300):  # the same draft rejected where it was sure
        seen.observe_drafts(italian, [0.95, 0.05, 0.05], accepted=0)
    assert seen.chance(italian, 0.95) < 0.15
    assert seen.chance(italian, 0.05) == 0.05, "drafts after a rejected one were never judged"


@pytest.mark.parametrize("draft_sure", [False, True])
def test_the_confidence_stop_learns_how_far_to_trust_the_draft(draft_sure):
    """Unsure and right (``draft_sure`` False: about 0.1 on every token, never wrong), a draft's
    rounds stop after one token at the policy's confidence as it stands; once the instance has seen
    such drafts accepted, they go on. Sure and mostly wrong (True: two positions in three), its
    rounds stop after one token once such drafts were seen rejected, and keep what they kept.
    Output is plain greedy output either way."""
    policy = DraftPolicy(start=6, minimum=6, maximum=6, cost_aware=False)
    wrong = [(seed, at) for seed in range(12) for at in range(448) if at % 3]
    mistakes = frozenset(wrong) if draft_sure else frozenset()
    totals = {}
    for calibrated in (False, True):
        seen, later = SeenAcceptance(), DecodeStats()
        for seed in range(12):  # requests one after another; the last 8 are counted
            draft = ScriptedSession(mistakes, sharpness=10 if draft_sure else 1)
            decoder = BatchDecoder(facts(), ScriptedSession(), draft, policy)
            drafting = RowDraft(policy, seen if calibrated else None)
            (tokens,) = run(decoder, [(0, w := window(seed, 40, "en", 0, drafting))]).values()
            assert tokens == greedy_alone(seed, 40, prompt_for("en", 0), rules(3), 448)
            if seed >= 4:
                later.add(w.stats)
        totals[calibrated] = later
    raw, calibrated = totals[False], totals[True]
    if draft_sure:
        assert calibrated.tokens_drafted < 0.4 * raw.tokens_drafted, "fewer drafts made in vain"
        assert calibrated.tokens_accepted == pytest.approx(raw.tokens_accepted, rel=0.1)
        assert calibrated.main_passes == pytest.approx(raw.main_passes, rel=0.1)
    else:
        assert raw.tokens_per_main_pass < 2.05, "a draft token a round"
        assert calibrated.tokens_per_main_pass > 3.0, "whole rounds"


def _proposals(sharpness: float, confidence: float, filters=()) -> list[int]:
    session = ScriptedSession(sharpness=sharpness)
    session.start(window(1, 40, "en", 0, None).states)
    (drafts,) = propose(session, [Proposal(0, [1, 2], 6, list(filters))], EOT, confidence)
    return drafts


def test_an_unsure_draft_ends_its_round():
    """A draft token below the policy's confidence is proposed, and drafting stops after it: the
    drafts after an unsure one would be drafted and verified mostly in vain."""
    sure, unsure = _proposals(sharpness=10, confidence=0.6), _proposals(sharpness=1, confidence=0.6)
    assert len(sure) == 6, "a draft sure of its tokens drafts the whole round"
    assert unsure == sure[:1], "an unsure draft proposes its first token and stops"
    assert _proposals(sharpness=1, confidence=0) == sure, "confidence 0 never stops a round"


def test_draft_confidence_is_taken_under_the_logit_filters():
    """Suppressing every id but the draft's two likeliest leaves it choosing between two: sure enough."""
    logits = scripted_logits(1, [1, 2], 40)
    two = np.argsort(logits)[-2:]
    others = SuppressTokens([i for i in range(VOCAB) if i not in two])
    assert len(_proposals(sharpness=1, confidence=0.45, filters=[others])) >= 2


def test_only_one_token_draft_passes_teach_the_draft_cost():
    """A round's first draft pass also feeds what the row accepted since it last drafted; timed as a
    draft pass, it would make drafting look dearer after every stretch of plain steps."""
    session = ScriptedSession(sharpness=10)
    session.start(window(1, 40, "en", 0, None).states)
    (drafts,), timing = timed_propose(session, [Proposal(0, [1, 2, 3, 4], 3, [])], EOT, 0.0)
    assert len(drafts) == 3 and (timing.passes, timing.step_passes) == (3, 2)
    assert timing.step_seconds <= timing.seconds
    session.start(window(1, 40, "en", 0, None).states)
    (drafts,), timing = timed_propose(session, [Proposal(0, [1, 2, 3, 4, 5, 6], 1, [])], EOT, 0.0)
    assert (timing.passes, timing.step_passes, timing.step_seconds) == (1, 0, 0.0), "a probe: no draft cost"
    costs = flat_costs(0.1, draft=0.02)
    costs.observe(4, 1, costs.main(4, 1), 8, 2, 2 * costs.draft(8))
    assert costs.draft_scale == pytest.approx(1.0), "draft passes are costed over the draft session's rows"


def test_a_long_catch_up_is_fed_in_chunks_and_drafts_the_same():
    """A draft far behind (here 100 tokens) catches up in passes of at most CATCH_UP_CHUNK tokens a
    row, so no pass holds scores for hundreds of positions; what it drafts does not change."""
    from specwhisper_backend.drafting import CATCH_UP_CHUNK

    text = [SOT, LANGUAGES["en"], 35, *range(60, 157)]
    widths: list[int] = []

    class Recording(ScriptedSession):
        def forward(self, tokens, counts=None, last_only=False):
            widths.append(tokens.shape[1])
            return super().forward(tokens, counts, last_only)

    behind, caught_up = Recording(), ScriptedSession()
    for session in (behind, caught_up):
        session.start(window(3, 300, "en", 0, None).states)
    caught_up.forward(np.asarray([text[:-1]]))
    chunks: list[float] = []
    (far,) = propose(behind, [Proposal(0, text, 4, [])], EOT, 0.0, catch_up_seconds=chunks)
    (near,) = propose(caught_up, [Proposal(0, text, 4, [])], EOT, 0.0)
    assert far == near and len(far) == 4
    assert max(widths) <= CATCH_UP_CHUNK and len(chunks) == len(text) // CATCH_UP_CHUNK
    assert behind.history == caught_up.history


def test_expected_tokens_of_a_round():
    assert expected_tokens(np.array([0.0]), np.array([4]))[0] == pytest.approx(1.0)
    assert expected_tokens(np.array([0.5]), np.array([2]))[0] == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(np.array([1.0]), np.array([3]))[0] == pytest.approx(4.0)


def test_the_cap_follows_the_cost_of_verification():
    """Launch-bound passes (a GPU's, or one row on a CPU) take long drafts; passes that cost in
    proportion to their tokens (a CPU with many rows) take none; a draft nobody trusts, none. A lone
    row whose rounds the confidence stop ends drafts its whole length if it drafts at all: the stop
    ends its rounds, and its passes with them, where the draft is unsure, which a cap priced on the
    row's mean acceptance cannot see. Without the stop (a sampled row, a copy), or with two rows,
    whose longest drafts widen every row's pass, the cap is priced."""
    trusted = [0.8] * 8
    assert choose_cap(flat_costs(0.0, draft=0.02), 8, 1, trusted, [8] * 8, 8) == 8
    assert choose_cap(flat_costs(0.5), 8, 1, trusted, [8] * 8, 8) == 0
    assert 1 <= choose_cap(flat_costs(0.05), 1, 1, [0.8], [8], 1) < 8
    assert 1 <= choose_cap(flat_costs(0.05), 2, 1, [0.8] * 2, [8] * 2, 2, follows_stop=True) < 8
    assert choose_cap(flat_costs(0.05), 1, 1, [0.8], [8], 1, follows_stop=True) == 8
    assert choose_cap(flat_costs(0.0, draft=0.5), 1, 1, [0.1], [8], 1, follows_stop=True) == 0
    assert choose_cap(flat_costs(0.0), 4, 1, [], [], 0) == 0


def test_a_draft_far_behind_counts_its_catching_up():
    """The first draft pass feeds what the rows decoded since the draft last ran: cheap one step after
    the last drafts, dear after a long stretch of plain steps (or for a row new to the draft). It is
    paid once for the stretch of drafting it starts: a draft 40 tokens behind may resume, one as dear
    as a stretch of drafting could save may not, even for a probe. Charged whole to the step that
    resumes, a catch-up grew with every plain step and kept a row plain once its estimate had dipped."""
    grid = flat_costs(0.05)
    costs = StepCosts(
        grid.rows, grid.tokens, grid.main_seconds, np.asarray([[0.1 * t for t in grid.tokens] for _ in grid.rows])
    )
    assert choose_cap(costs, 4, 1, [0.8] * 4, [6] * 4, 4, catch_up=1) > 0
    assert choose_cap(costs, 4, 1, [0.8] * 4, [6] * 4, 4, catch_up=40) > 0
    assert choose_cap(costs, 4, 1, [0.8] * 4, [6] * 4, 4, catch_up=1000) == 0
    assert choose_cap(costs, 4, 1, [0.8] * 4, [6] * 4, 4, catch_up=1000, hopeful=True) == 0
    grid = costs.to_dict()
    assert StepCosts.from_dict(grid).draft(4, 40) == pytest.approx(costs.draft(4, 40))
    with pytest.raises(ValueError, match="shape"):  # a grid saved by another version: measured anew
        StepCosts.from_dict(grid | {"draft_seconds": grid["draft_seconds"][0]})


def test_a_prefilling_row_makes_drafting_cheap():
    """When a row brings its prompt to the pass anyway, the other rows' drafts ride along for free."""
    costs = flat_costs(0.3)
    assert choose_cap(costs, 4, 1, [0.7] * 3, [6] * 3, 3) == 0
    assert choose_cap(costs, 4, 7, [0.7] * 3, [6] * 3, 3) >= 4


def test_a_prompt_goes_at_once_where_a_wider_pass_is_cheap_and_a_token_a_step_where_it_widens_every_row():
    assert prefill_chunk(flat_costs(0.0), 16, 8, 16) == 8  # launch-bound: a step is a step
    assert prefill_chunk(flat_costs(0.01), 1, 8, 16) == 8  # one row: the next step costs a whole pass
    assert prefill_chunk(flat_costs(0.5), 16, 8, 16) == 1  # compute-bound: a token more a row, for all 16
    assert prefill_chunk(None, 16, 30, 16) == 16  # no measured costs: the most a step
    assert prefill_chunk(flat_costs(0.5), 16, 1, 16) == 1


def test_a_row_joining_a_compute_bound_batch_feeds_its_prompt_without_widening_the_others():
    """Eight rows decoding, a ninth joins with a prompt of 7: on a machine whose passes cost their
    rows x tokens its prompt goes in a token a step, so no pass pads the others; where a wider pass
    costs little it goes at once. Every row's tokens are its plain output either way."""

    class Widths(ScriptedSession):
        def forward(self, tokens, counts=None, last_only=False):
            self.widths.append(tokens.shape[1])
            return super().forward(tokens, counts, last_only)

    for costs, widest in ((flat_costs(0.5), 1), (flat_costs(0.0), 6)):
        main = Widths()
        main.widths = []
        decoder = BatchDecoder(facts(), main, None, DraftPolicy(cost_aware=False), costs)
        arrivals = [(0, window(seed, 40, "en", 0, None)) for seed in range(8)] + [(5, window(9, 30, "en", 4, None))]
        results = run(decoder, arrivals)
        assert max(main.widths[1:]) == widest  # after the first pass, the eight rows' prompts
        for index, (_, joined) in enumerate(arrivals):
            seed, length = (int(v) for v in joined.states[0, 0, :2])
            prompt = prompt_for("en", 4 if index == 8 else 0)
            assert results[index] == greedy_alone(seed, length, prompt, rules(len(prompt)), 448), index


def test_no_probe_where_catching_up_would_cost_more_than_drafting_could_save():
    """Passes cost the same at any width (launch-bound), but a draft pass catching up on many tokens
    is dear. The drafts are always wrong, so the rows soon decode plainly; a probe would feed the
    draft all they decoded since, which no stretch of drafting could repay: none is made."""
    policy = DraftPolicy()
    grid = flat_costs(0.0, draft=0.01)
    catching_up = np.asarray([[0.01 if width <= 3 else 5.0 * width for width in grid.tokens] for _ in grid.rows])
    costs = StepCosts(grid.rows, grid.tokens, grid.main_seconds, catching_up)
    seeds = range(4)
    wrong = frozenset((seed, length) for seed in seeds for length in range(400))
    main, draft = ScriptedSession(), ScriptedSession(mistakes=wrong)
    decoder = BatchDecoder(facts(), main, draft, policy, costs)
    for seed in seeds:
        decoder.join(window(seed, 150, "en", 0, RowDraft(policy)), seed)
    results, drafted = {}, []
    while decoder.rows:
        before = draft.passes
        results.update(decoder.step())
        drafted.append(draft.passes > before)
    assert drafted[1], "the rows draft while the draft's text is short (after their prompt's step)"
    stopped = drafted.index(False, 1)
    assert not any(drafted[stopped:]), "no probe after the rows stopped drafting"
    assert costs.join_seconds > 0, "the rows' joining the draft was timed"
    for seed in seeds:
        assert results[seed].tokens == greedy_alone(seed, 150, prompt_for("en", 0), rules(3), 448)


def test_drafts_riding_along_must_beat_ordinary_plain_steps():
    """A row filling in its prompt makes a wide pass, whose rate of plain tokens is poor: set against
    it, draft passes dearer than the tokens they add would win (a CPU with many rows). The tokens
    drafts add are worth what ordinary steps would take for them, so cheap draft passes ride along
    and dear ones do not."""
    wide = 2  # a row brings two prompt tokens
    assert choose_cap(flat_costs(0.3, draft=0.1), 8, wide, [0.7] * 7, [6] * 7, 7) > 0
    assert choose_cap(flat_costs(0.3, draft=2.0), 8, wide, [0.7] * 7, [6] * 7, 7) == 0
    assert choose_cap(flat_costs(0.3, draft=2.0), 8, 1, [0.7] * 7, [6] * 7, 7) == 0


def test_where_no_acceptance_could_pay_a_speculative_batch_decodes_as_plain_with_no_probes():
    """Eight rows on a machine where a second token a row costs nearly a second pass (a CPU with many
    rows): drafting could not pay even if every draft were right, so the draft never runs at all,
    not even to probe, and every row's tokens are its plain greedy tokens."""
    policy = DraftPolicy()
    main, draft = ScriptedSession(), ScriptedSession()
    decoder = BatchDecoder(facts(), main, draft, policy, flat_costs(0.5))
    arrivals = [(0, window(seed, 120, "en", 0, RowDraft(policy))) for seed in range(8)]
    results = run(decoder, arrivals)
    for seed in range(8):
        assert results[seed] == greedy_alone(seed, 120, prompt_for("en", 0), rules(3), 448)
    assert draft.passes == 0 and main.passes > 100


def test_probes_the_policy_does_not_follow_grow_rare():
    probes = Probes()

    def cap(chosen: int, worth: bool = True) -> int:
        return probes.cap(chosen, 1.0, lambda: 0.0, lambda: worth)

    gaps, waited = [], 0
    for _ in range(2000):
        waited += 1
        if cap(0):
            gaps.append(waited)
            waited = 0
    expected = [min(PROBE_EVERY * 2**i, PROBE_EVERY_MAX) + 1 for i in range(len(gaps))]
    assert gaps == expected and gaps[-1] == PROBE_EVERY_MAX + 1
    assert cap(3) == 3, "the policy's own choice is kept"
    for _ in range(PROBE_EVERY):
        assert cap(0) == 0
    assert cap(0) > 0, "after the policy drafted, probes come at the start's pace"
    assert cap(0, worth=False) == 0 and all(cap(0, worth=False) == 0 for _ in range(1000))


def test_probes_cost_at_most_their_share_of_the_plain_steps():
    """A probe dearer than the plain steps since the last have saved up for waits until they have:
    whatever probes show, they cost the batch at most ``PROBE_SHARE`` of its plain decoding."""
    probes = Probes()
    price, steps = 10.0, 5000
    made = [step for step in range(steps) if probes.cap(0, 1.0, lambda: price, lambda: True)]
    assert len(made) >= 2 and min(np.diff(made)) >= price / PROBE_SHARE - 1
    assert len(made) * price <= PROBE_SHARE * steps


def test_probes_that_keep_showing_nothing_take_a_smaller_share():
    """Where drafts never pay (a language the draft cannot speak) the probes are all that speculative
    decoding costs over plain: after each probe the policy does not follow, the share they may take
    falls with the wait, to a quarter at the longest; once the policy drafts it is whole again."""
    probes = Probes()
    price, steps = 1.0, 20000

    def cap(chosen: int = 0) -> int:
        return probes.cap(chosen, 1.0, lambda: price, lambda: True)

    made = [step for step in range(steps) if cap()]
    floor = PROBE_SHARE * PROBE_EVERY / PROBE_EVERY_MAX
    assert probes.share == pytest.approx(floor)
    late = [step for step in made if step > steps // 2]
    assert len(late) >= 2 and min(np.diff(late)) >= price / floor - 1
    assert len(late) * price <= floor * (steps - steps // 2) + price, "a quarter of the share, not all of it"
    assert cap(3) == 3 and probes.share == PROBE_SHARE
    gap = next(wait for wait in range(1, 10 * PROBE_EVERY) if cap())
    assert gap <= price / PROBE_SHARE + 1, "after the policy drafted, probes are paid at the start's share"


def test_a_row_new_to_drafting_probes_once_its_price_is_saved_without_the_wait():
    """A new request's estimate is only its instance's, which one request the draft did badly on can
    pull below what drafting needs: its row probes as soon as the price is saved, not after the wait
    (short requests end before it); the price still bounds what it costs."""
    probes = Probes()
    caps = [probes.cap(0, 1.0, price=lambda: 0.19, worth=lambda: True, untried=True) for _ in range(6)]
    assert caps.index(PROBE_DRAFTS) == 3, "0.19 saved after four plain steps at a share of 0.05"
    probes = Probes()
    caps = [probes.cap(0, 1.0, price=lambda: 0.19, worth=lambda: True) for _ in range(PROBE_EVERY + 1)]
    assert caps.index(PROBE_DRAFTS) == PROBE_EVERY, "rows that have drafted wait as before"
    probes = Probes()
    assert not any(probes.cap(0, 1.0, price=lambda: 100.0, worth=lambda: True, untried=True) for _ in range(99))
    probes = Probes()
    assert not any(probes.cap(0, 1.0, price=lambda: 0.19, worth=lambda: False, untried=True) for _ in range(99))


def test_a_probe_is_priced_with_the_rows_joining_the_draft():
    """A row's first draft computes its cross K/V, timed as rows join; a probe pays it for each row
    that has not drafted yet."""
    costs = flat_costs(0.1)
    alone = probe_price(costs, 8, 1, 8, 1, joining=0)
    assert alone > 0 and probe_price(costs, 8, 1, 8, 1, joining=4) == alone, "nothing timed yet"
    costs.observe_join(0.5)
    assert probe_price(costs, 8, 1, 8, 1, joining=4) == pytest.approx(alone + 4 * 0.5)


def test_a_cold_first_join_does_not_price_the_joins_after_it():
    """Rows join the draft once a window. The first join after the grid was timed at many rows runs
    the graph cold, at two or three times a join's cost; a running mean started from it priced every
    window's first probe (which is when a row joins) at that for a dozen windows, and the probes of a
    lone row waited long past their turn."""
    costs = flat_costs(0.1)
    costs.observe_join(0.046)
    for _ in range(2):
        costs.observe_join(0.018)
    assert costs.join_seconds == pytest.approx(0.018)
    for _ in range(3):  # a machine that stays slower is followed
        costs.observe_join(0.030)
    assert costs.join_seconds == pytest.approx(0.030)


def test_costs_follow_the_machine():
    costs = flat_costs(0.1)
    before = costs.main(4, 5)
    for _ in range(200):
        costs.observe(4, 5, 2 * before, 0, 0, 0.0)
    assert costs.main(4, 5) == pytest.approx(2 * before, rel=0.01)
    assert costs.main(32, 1) == pytest.approx(2 * costs.main(16, 1))


def test_a_slower_machine_is_followed_however_much_slower():
    costs = flat_costs(0.1)
    before = costs.draft(1)
    for _ in range(200):  # every draft pass five times what the grid says: the machine is loaded
        costs.observe(1, 1, costs.main(1, 1), 1, 1, 5 * before)
    assert costs.draft(1) == pytest.approx(5 * before, rel=0.01)


def test_served_passes_correct_a_grid_point_timed_slow_at_load():
    """At one row drafting is a close call that the ratio of a wide pass to a one-token pass decides,
    and a grid point timed while the machine was busy misstates it: two instances of one server then
    drafted differently for as long as they ran. The served passes correct each width's point against
    the level the one-token passes set, so both come to the same decision."""
    rows, tokens = (1, 2), (1, 2, 3, 5, 9, 17)
    true = np.asarray([[0.010 * (1 + 0.05 * (t - 1)) for t in tokens]] * 2)
    slow = true * np.asarray([1.0, 1.12, 1.15, 1.15, 1.15, 1.15])  # the wide points timed in a busy moment
    accurate, misled = (StepCosts(rows, tokens, grid, np.full(grid.shape, 0.0025)) for grid in (true, slow))

    def threshold(costs: StepCosts) -> float:
        return next(a for a in np.arange(0.3, 1.0, 0.01) if choose_cap(costs, 1, 1, [a], [5], 1) > 0)

    assert threshold(misled) > threshold(accurate) + 0.05
    # The machine a little slower than at load: plain steps, then rounds of two to six tokens between them.
    widths = [1] * 100 + [1, 3, 1, 6, 1, 2, 1, 5, 1, 4] * 60
    for width in widths:
        seconds = 1.3 * float(np.interp(width, tokens, true[0]))
        for costs in (accurate, misled):
            costs.observe(1, width, seconds, 1, 0, 0.0)
    for costs in (accurate, misled):
        assert costs.main(1, 1) == pytest.approx(1.3 * true[0, 0], rel=1e-6), "the level: the one-token passes"
        for width in range(2, 7):
            assert costs.main(1, width) == pytest.approx(1.3 * np.interp(width, tokens, true[0]), rel=0.02)
    assert threshold(misled) == pytest.approx(threshold(accurate), abs=0.015)


def test_a_batch_that_always_drafts_moves_the_level():
    """With no one-token pass to set the level, the served passes move it, and the plain step's price
    follows the machine as the drafting steps' does."""
    costs = flat_costs(0.1)
    plain, wide = costs.main(4, 1), costs.main(4, 5)
    for _ in range(200):
        costs.observe(4, 5, 1.5 * wide, 4, 0, 0.0)
    assert costs.main(4, 5) == pytest.approx(1.5 * wide, rel=0.01)
    assert costs.main(4, 1) == pytest.approx(1.5 * plain, rel=0.01)


def test_an_interrupted_draft_pass_does_not_stop_a_lone_row_drafting():
    """A pause of a tenth of a second (the process preempted) in a draft pass of a few milliseconds
    is not what drafting costs. Taken at its word, three of them made drafting look several times
    dearer; the policy then kept the row plain, and only drafting could have corrected it."""
    rows, tokens = (1, 2), (1, 2, 3, 5, 9, 17)
    main = np.asarray([[0.012, 0.013, 0.013, 0.0145, 0.017, 0.021]] * 2)
    costs = StepCosts(rows, tokens, main, np.full(main.shape, 0.0025))
    decide = dict(rows=1, min_tokens=1, acceptance=[0.85], lengths=[5], draft_rows=1)
    assert choose_cap(costs, **decide) >= 3
    for _ in range(3):
        costs.observe(1, 5, costs.main(1, 5), 1, 1, 0.150)
    assert costs.draft(1) < 1.2 * 0.0025
    assert choose_cap(costs, **decide) >= 3


def test_invalid_policy_is_refused():
    with pytest.raises(ValueError, match="minimum"):
        DraftPolicy(start=0)
    with pytest.raises(ValueError, match="confidence"):
        DraftPolicy(confidence=1.0)
    with pytest.raises(ValueError, match="measured step costs"):
        BatchDecoder(facts(), ScriptedSession(), ScriptedSession(), DraftPolicy(cost_aware=True))


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


class Clock:
    """A stand-in for ``time.perf_counter`` that only scripted passes move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedSession(ScriptedSession):
    """A scripted session whose passes take ``seconds`` a row on ``clock``; its first
    ``busy_passes`` passes take ``busy`` more (other work on the machine)."""

    def __init__(self, clock: Clock, seconds: float, busy: float = 0.0, busy_passes: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock, self.seconds, self.busy, self.busy_passes = clock, seconds, busy, busy_passes

    def forward(self, tokens: np.ndarray, counts=None, last_only: bool = False) -> np.ndarray:
        self.clock.now += self.seconds * tokens.shape[0] + (self.busy if self.passes < self.busy_passes else 0.0)
        return super().forward(tokens, counts, last_only)


def test_step_costs_keep_each_points_fastest_time(monkeypatch):
    """Other work slowing some passes while an instance measures must not bend the grid: here the
    draft's passes of the first sweep run on a busy machine."""
    import time

    from specwhisper_backend.load_policy import measure_step_costs

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    main = TimedSession(clock, 1.0)
    draft = TimedSession(clock, 0.1, busy=5.0, busy_passes=4)  # each row count: a context pass, two timed
    states = np.zeros((1, 1500, 4), np.float32)
    costs = measure_step_costs(main, draft, states, states, rows=(1, 2), tokens=(1, 3), rounds=2)
    assert costs.main_seconds.tolist() == [pytest.approx([1.0, 1.0]), pytest.approx([2.0, 2.0])]
    assert costs.draft_seconds.tolist() == [pytest.approx([0.1, 0.1]), pytest.approx([0.2, 0.2])]


@pytest.mark.parametrize("probe_teaches", [True, False])
def test_a_draft_measured_too_dear_drafts_again_once_probes_time_it(monkeypatch, probe_teaches):
    """An instance that timed its draft passes while the machine was busy (here as 6 times what they
    cost) starts plain; its probes' one-token draft passes show what drafting costs, and it drafts.
    With one-token probes (nothing to teach the cost) it would stay plain for good. (A draft timed
    so dear that drafting could not pay even at the hopeful acceptance is not probed at all.)"""
    import time

    from specwhisper_backend import load_policy

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    if not probe_teaches:
        monkeypatch.setattr(load_policy, "PROBE_DRAFTS", 1)
    policy = DraftPolicy(start=5, maximum=8)
    costs = flat_costs(0.0, draft=0.6)  # a main pass costs 1; a draft pass 0.1 in truth
    mistakes = frozenset((seed, at) for seed in range(40) for at in range(0, 448, 3))  # accepts about 2 in 3
    draft = TimedSession(clock, 0.1, mistakes=mistakes, sharpness=10)
    decoder = BatchDecoder(facts(), TimedSession(clock, 1.0), draft, policy, costs)
    later = DecodeStats()
    for seed in range(40):  # requests one after another on the instance; the last 10 are counted
        (tokens,) = run(decoder, [(0, w := window(seed, 400, "en", 0, RowDraft(policy)))]).values()
        assert tokens == greedy_alone(seed, 400, prompt_for("en", 0), rules(3), 448)
        if seed >= 30:
            later.add(w.stats)
    probes_only = later.main_passes / load_policy.PROBE_EVERY * load_policy.PROBE_DRAFTS
    drafted = later.tokens_drafted - later.tokens_copied  # by the draft (copies need no draft pass)
    if probe_teaches:
        assert drafted > 3 * probes_only
    else:
        assert drafted <= probes_only + 10


@pytest.mark.parametrize("remembered", [True, False])
def test_short_requests_draft_where_their_instance_saw_drafts_accepted(monkeypatch, remembered):
    """Drafting here pays at the acceptance this draft has (about 9 in 10), not at the default prior
    (2 in 3). Short requests, each on a decoder of its own as in-process calls are: with the
    instance's acceptance remembered, they start where it was and draft from their first token; a
    request that started from the prior would decode plainly until a probe, and pass on nothing."""
    import time

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    policy = DraftPolicy(start=5, maximum=8)
    costs = flat_costs(0.0, draft=0.6)  # the truth: a main pass costs 1, a draft pass 0.6
    mistakes = frozenset((seed, at) for seed in range(30) for at in range(0, 448, 10))
    draft = TimedSession(clock, 0.6, mistakes=mistakes, sharpness=10)
    main = TimedSession(clock, 1.0)
    seen, probes = SeenAcceptance(), Probes()
    later = DecodeStats()
    for seed in range(30):  # requests one after another; the last 20 are counted
        decoder = BatchDecoder(facts(), main, draft, policy, costs, probes)
        drafting = RowDraft(policy, seen if remembered else None)
        (tokens,) = run(decoder, [(0, w := window(seed, 24, "en", 0, drafting))]).values()
        assert tokens == greedy_alone(seed, 24, prompt_for("en", 0), rules(3), 448)
        if seed >= 10:
            later.add(w.stats)
    passes_per_token = later.main_passes / later.tokens_out
    if remembered:
        assert passes_per_token < 0.6, "drafts accepted: fewer passes than tokens"
    else:
        assert passes_per_token > 0.8, "plain until a probe, in every request"


@pytest.mark.parametrize("hard", ["a stretch", "throughout"])
def test_a_row_kept_plain_drifts_back_to_its_instances_acceptance(monkeypatch, hard):
    """A draft right about 9 times in 10, wrong at every token of a stretch: the row's estimate falls
    there and the policy keeps it plain. After the stretch its own rounds cannot lift it (it has
    none) and probes are rare, so without drifting back toward its instance's estimate it stayed
    plain for much of the window. Where the draft is wrong throughout, and the instance saw as much,
    drifting back keeps it plain. Tokens are plain greedy's either way."""
    import time

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    policy = DraftPolicy(start=5, maximum=8, copies=False)  # the draft's estimate alone
    costs = flat_costs(0.0, draft=0.4)  # the truth: a main pass costs 1, a draft pass 0.4
    wrong = range(40, 90) if hard == "a stretch" else range(448)
    mistakes = frozenset((0, at) for at in range(448) if at in wrong or at % 5 == 0)
    no_end = [SuppressTokens([3, 4, EOT])]  # the text runs to the end of the context
    passes, drafted = {}, {}
    for rest in (True, False):
        if not rest:
            monkeypatch.setattr(RowDraft, "REST_MEMORY", 1.0)
        seen = SeenAcceptance()
        teller = _begun(seen)
        for _ in range(30):  # the instance saw this draft accepted (or not) on earlier requests
            teller.update(3, 4) if hard == "a stretch" else teller.update(0, 5)
        draft = TimedSession(clock, 0.4, mistakes=mistakes, sharpness=10)
        decoder = BatchDecoder(facts(400), TimedSession(clock, 1.0), draft, policy, costs)
        row = dataclasses.replace(window(0, 400, "en", 0, RowDraft(policy, seen)), filters=lambda _: no_end)
        (tokens,) = run(decoder, [(0, row)]).values()
        assert tokens == greedy_alone(0, 400, prompt_for("en", 0), no_end, 400)
        passes[rest], drafted[rest] = row.stats.main_passes, row.stats.tokens_drafted
    if hard == "a stretch":
        assert passes[True] < 0.7 * passes[False], passes
    else:
        assert drafted[True] <= drafted[False] + 10, drafted
        assert passes[True] > 0.9 * len(tokens), passes


def test_overruns_set_drafting_steps_against_plain_steps_of_their_batch_size():
    from specwhisper_backend.load_policy import (
        OUTLIER,
        OVERRUN_FORGET,
        OVERRUN_MEMORY,
        OVERRUN_SAMPLES,
        Overruns,
    )

    overruns = Overruns()
    for _ in range(OVERRUN_SAMPLES - 1):
        overruns.observe(8, True, predicted=1.0, wall=3.0)
    assert overruns.factor(8) == 1.0, "too few drafting steps to tell"
    overruns.observe(8, True, predicted=1.0, wall=3.0)
    assert overruns.factor(8) == pytest.approx(3.0), "no plain steps seen: theirs counts as no overrun"
    for _ in range(OVERRUN_SAMPLES):
        overruns.observe(9, False, predicted=2.0, wall=3.0)
    assert overruns.factor(12) == pytest.approx(2.0), "against plain steps' own overrun, 8-15 rows alike"
    assert overruns.factor(4) == overruns.factor(16) == 1.0, "other batch sizes are told apart"
    stalled = Overruns()
    for _ in range(OVERRUN_SAMPLES - 1):
        stalled.observe(2, True, predicted=1.0, wall=1.1)
    stalled.observe(2, True, predicted=1.0, wall=100.0)  # interrupted: counts as OUTLIER times their overrun
    faded = [OVERRUN_MEMORY ** (OVERRUN_SAMPLES - 1 - i) for i in range(OVERRUN_SAMPLES)]  # oldest first
    assert stalled.factor(2) == pytest.approx(1.1 * (sum(faded[:-1]) + OUTLIER) / sum(faded))
    for _ in range(400):  # the machine changed: drafting steps now cost what they were predicted to
        overruns.observe(8, True, predicted=1.0, wall=1.5)
    assert overruns.factor(8) == pytest.approx(1.0, abs=0.01)
    overruns.observe(8, True, predicted=1.0, wall=3.0)
    for _ in range(OVERRUN_FORGET - 1):
        overruns.observe(8, False, predicted=2.0, wall=3.0)
    assert overruns.factor(8) > 1.0
    overruns.observe(8, False, predicted=2.0, wall=3.0)
    assert overruns.factor(8) == 1.0, "after a long plain stretch drafting steps are measured again"


def scored_positions_cost(monkeypatch, clock: Clock, seconds: float) -> None:
    """Filtering and choosing a token on the host costs ``seconds`` of ``clock`` a position, for the
    main model's positions and the draft's alike (work no pass timing sees)."""
    from specwhisper_backend import decoding, drafting

    def slow(scores, prefix, filters):
        clock.now += seconds
        return filtered(scores, prefix, filters)

    monkeypatch.setattr(decoding, "filtered", slow)
    monkeypatch.setattr(drafting, "filtered", slow)


@pytest.mark.parametrize("host_seconds", [0.6, 0.05])
def test_speculative_rows_are_no_slower_than_plain_ones_when_drafting_costs_more_than_its_passes(
    monkeypatch, host_seconds
):
    """Eight rows on a scripted machine whose passes the grid knows exactly (a pass costs its rows,
    a draft's a tenth of a main one's, whatever their tokens), and where filtering a scored position
    costs ``host_seconds`` besides. By its passes alone drafting pays well; at 0.6 a position the host
    work makes it lose (a drafting step scores about four positions a row, a plain step one), and
    the batch must find that out and decode about as fast as plain rows do (before the steps'
    overruns were measured, it kept drafting and was 6 % slower). At 0.05 drafting still pays, and it
    still drafts. Every row's tokens are its plain greedy tokens either way."""
    import time

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    scored_positions_cost(monkeypatch, clock, host_seconds)
    policy = DraftPolicy(start=2, maximum=4)
    rows, tokens = (1, 2, 4, 8, 16), (1, 2, 3, 5, 9, 17)
    costs = StepCosts(
        rows, tokens, np.asarray([[r * 1.0] * 6 for r in rows]), np.asarray([[r * 0.1] * 6 for r in rows])
    )
    mistakes = frozenset((seed, at) for seed in range(8) for at in range(0, 448, 3))  # accepts about 2 in 3
    no_end = [SuppressTokens([3, 4, EOT])]  # every row's text runs to the end of the context
    seconds, drafted = {}, {}
    for speculative in (False, True):
        draft = TimedSession(clock, 0.1, mistakes=mistakes, sharpness=10)
        decoder = BatchDecoder(facts(200), TimedSession(clock, 1.0), draft, policy, costs)
        windows = [
            dataclasses.replace(
                window(seed, 200, "en", 0, RowDraft(policy) if speculative else None), filters=lambda _: no_end
            )
            for seed in range(8)
        ]
        started = clock.now
        results = run(decoder, [(0, w) for w in windows])
        seconds[speculative], drafted[speculative] = clock.now - started, sum(w.stats.tokens_drafted for w in windows)
        for seed in range(8):
            assert results[seed] == greedy_alone(seed, 200, prompt_for("en", 0), no_end, 200)
    if host_seconds > 0.5:
        assert seconds[True] <= 1.03 * seconds[False], seconds
    else:
        assert seconds[True] < 0.8 * seconds[False], seconds
        assert drafted[True] > 8 * 150
