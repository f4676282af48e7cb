"""The held-out report of a draft: what matters for speculative decoding, on recordings never trained on."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_training import data as draft_data
from specwhisper_training.data import REPETITIVE, CorpusOptions, DraftData, Target, repetitive
from specwhisper_training.model import TrimmedDraft, attended_states, by_window, make_batch
from specwhisper_training.vocabulary import coverage, text_coverage


def agreement(
    draft: TrimmedDraft,
    data: DraftData,
    targets: Sequence[Target],
    frames_after_audio: int = DraftPolicy().frames_after_audio,
) -> list[np.ndarray]:
    """Per target: whether the draft's top-1 (teacher-forced on the main model's tokens) is the
    main model's next token, at each generated position. One window at a time, so that each reads
    the encoder frames it is served with."""
    to_trimmed = draft.trimmed_index()
    matches: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for chosen in by_window(targets).values():
            batch = make_batch(data, chosen, to_trimmed, frames_after_audio)
            predicted = draft.token_ids[
                draft.logits(batch.input_ids, batch.states, batch.rows, batch.positions).argmax(-1)
            ]
            hits = (predicted == batch.next_ids).numpy()
            ends = np.cumsum([len(t.text_tokens) for t in chosen])
            for target, end in zip(chosen, ends, strict=True):
                matches[id(target)] = hits[end - len(target.text_tokens) : end]
    return [matches[id(t)] for t in targets]


def tokens_per_pass(hits: np.ndarray, k: int) -> tuple[int, int]:
    """Speculative decoding of one text with ``k`` drafts a round, from teacher-forced hits: (tokens, passes).

    A round's drafts follow the text so far, which is the main model's; while they agree they stay
    the main model's, so the first miss after a round's start ends it, exactly as in decoding.
    Each round (one main pass) yields its accepted drafts plus the main model's own next token.
    """
    position = passes = 0
    while position < len(hits):
        window = hits[position : position + k]
        accepted = len(window) if window.all() else int(np.argmin(window))
        position += accepted + 1
        passes += 1
    return len(hits), passes


@dataclass(frozen=True)
class LanguageFigures:
    language: str
    texts: int
    tokens: int
    agreement: float  # share of the draft's teacher-forced top-1 equal to the main model's token
    coverage: float  # share of the main model's tokens inside the trimmed vocabulary
    tokens_per_pass: float  # at the report's K
    tokens_per_pass_by_k: tuple[float, ...] = ()  # at K = 1, 2, ...: what a longer draft would give
    # Share of the ids of all the language's held-out prose (tokenised as Whisper writes text) inside
    # the head: coverage of what is said, over far more text than the windows spoken; None where the
    # language is held out on recordings.
    prose_coverage: float | None = None
    # Held-out texts left out of every figure above: the main model's greedy text is more repetitive
    # than Whisper keeps (compression ratio over REPETITIVE), as it often is on synthetic speech.
    repetitive: int = 0
    # Through the engine (ONNX Runtime) with the served draft-length policy, None if not run.
    engine_acceptance: float | None = None
    engine_tokens_per_pass: float | None = None
    engine_speedup: float | None = None  # decode-phase seconds, plain over speculative


@dataclass(frozen=True)
class DraftReading:
    """What the draft's measured step read: the encoder frames of the window its costs were taken on."""

    frames: int  # encoder frames the draft attends to there (its audio and the served margin)
    window_seconds: float
    int8_full_window_ms: float  # an int8 draft step over all the encoder's frames (a full 30 s window)


@dataclass(frozen=True)
class DraftReport:
    k: int
    main_step_ms: float  # one token through the main decoder
    verify_ms: float  # K + 1 tokens in one main pass
    draft_ms: float  # one token through the draft decoder (mean of a round's K steps)
    draft_int8_ms: float  # the same with int8 weights (export --assistant-int8)
    languages: tuple[LanguageFigures, ...]
    reading: DraftReading
    int8: bool = False  # the draft is served with int8 weights: its cost is draft_int8_ms
    unscored: tuple[str, ...] = ()  # languages whose held-out texts were all repetitive

    @property
    def served_draft_ms(self) -> float:
        return self.draft_int8_ms if self.int8 else self.draft_ms

    @property
    def draft_cost(self) -> float:
        """A draft token's cost in main steps, at the precision served."""
        return self.served_draft_ms / self.main_step_ms

    def speedup(self, figures: LanguageFigures) -> float:
        """Decode-phase speed-up implied: tokens per round over a round's cost in main steps."""
        return figures.tokens_per_pass / ((self.verify_ms + self.k * self.served_draft_ms) / self.main_step_ms)

    def engine_acceptance(self) -> dict[str, float]:
        """Per language decoded through the engine: the share of drafted tokens the main model kept."""
        return {f.language: f.engine_acceptance for f in self.languages if f.engine_acceptance is not None}

    def format(self) -> str:
        served, r = ("int8" if self.int8 else "fp32"), self.reading
        lines = [
            f"K={self.k}  main step {self.main_step_ms:.2f} ms, verify {self.k + 1} tokens {self.verify_ms:.2f} ms, "
            f"draft token fp32 {self.draft_ms:.2f} ms, int8 {self.draft_int8_ms:.2f} ms; served {served}: "
            f"{self.draft_cost:.3f} main steps",
            f"costs on the held-out window of median length ({r.window_seconds:.1f} s): the draft reads "
            f"{r.frames} encoder frames; over all frames (a full 30 s window) int8 {r.int8_full_window_ms:.2f} ms, "
            f"{r.int8_full_window_ms / self.main_step_ms:.3f} main steps",
            f"{'lang':<5}{'texts':>6}{'loops':>6}{'tokens':>7}{'agree':>8}{'cover':>8}{'prose':>8}{'tok/pass':>9}{'speedup':>8}"
            f"{'engine, as served: accept':>35}{'tok/pass':>9}{'speedup':>8}",
        ]
        for f in self.languages:
            engine = ""
            if f.engine_acceptance is not None:
                engine = f"{f.engine_acceptance:>35.1%}{f.engine_tokens_per_pass:>9.2f}{f.engine_speedup:>8.2f}"
            prose = "-" if f.prose_coverage is None else f"{f.prose_coverage:.1%}"
            lines.append(
                f"{f.language:<5}{f.texts:>6}{f.repetitive:>6}{f.tokens:>7}{f.agreement:>8.1%}{f.coverage:>8.1%}{prose:>8}"
                f"{f.tokens_per_pass:>9.2f}{self.speedup(f):>8.2f}{engine}"
            )
        if self.unscored:
            lines.append(f"no held-out text to score (every one repetitive): {' '.join(self.unscored)}")
        for f in self.languages:
            by_k = " ".join(f"{value:.2f}" for value in f.tokens_per_pass_by_k)
            lines.append(f"{f.language}: tokens per pass at K = 1..{len(f.tokens_per_pass_by_k)}: {by_k}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Costs:
    """Medians, in milliseconds, of decoding rounds as the engine runs them."""

    main_ms: float  # one token through the main decoder
    verify_ms: dict[int, float]  # K -> one main pass over K + 1 tokens
    draft_ms: list[dict[int, float]]  # per draft: K -> its mean step in a round of K steps


def measure_costs(
    main: DecoderSession,
    states: np.ndarray,
    drafts: Sequence[tuple[DecoderSession, np.ndarray]],
    prefix: Sequence[int],
    max_k: int,
    repeats: int = 15,
) -> Costs:
    """Decoding rounds after ``prefix``, timed in ONNX Runtime: a main pass over K + 1 tokens, then
    K draft steps in a row, as in decoding (a round's first draft step finds the memory caches as the
    main pass left them, the next ones as the draft did), for every K up to ``max_k`` and every draft
    in turn, so that load from elsewhere hits all alike. The main decoder reads ``states``; each draft
    the encoder states it is given (as served: cut after the audio). Every session is distinct:
    each keeps one set of states and caches."""
    if len({id(session) for session, _ in drafts} | {id(main)}) != len(drafts) + 1:
        raise ValueError("measure_costs needs a distinct session per measured decoder")
    token = np.asarray([[prefix[-1]]])
    kept = {}
    for session, read in ((main, states), *drafts):
        session.start(read)
        session.forward(np.asarray([prefix]))
        kept[id(session)] = session.lengths.copy()

    def timed(session: DecoderSession, tokens: np.ndarray) -> float:
        started = time.perf_counter()
        session.forward(tokens)
        return (time.perf_counter() - started) * 1e3

    single: list[float] = []
    verify: dict[int, list[float]] = {k: [] for k in range(1, max_k + 1)}
    steps: list[dict[int, list[float]]] = [{k: [] for k in verify} for _ in drafts]
    for _ in range(repeats):
        single.append(timed(main, token))
        main.truncate(kept[id(main)])
        for k in verify:
            for (draft, _), mine in zip(drafts, steps, strict=True):
                verify[k].append(timed(main, np.repeat(token, k + 1, axis=1)))
                main.truncate(kept[id(main)])
                mine[k].append(statistics.fmean(timed(draft, token) for _ in range(k)))
                draft.truncate(kept[id(draft)])
    return Costs(
        main_ms=statistics.median(single),
        verify_ms={k: statistics.median(times) for k, times in verify.items()},
        draft_ms=[{k: statistics.median(times) for k, times in mine.items()} for mine in steps],
    )


def _engine_figures(exported: ExportedModel, audio: Sequence[np.ndarray], language: str, policy: DraftPolicy):
    """Acceptance, tokens per main pass and decode speed-up through the Transcriber, drafting as
    served (adaptive length, confidence stop), with no cap from the measured step costs
    (``cost_aware``): on a shared machine they measure load, not the draft; and with no copied
    drafts (``copies``), which are not the draft's."""
    transcriber = Transcriber(exported, policy)
    drafted = accepted = tokens = passes = 0
    plain_seconds = speculative_seconds = 0.0
    for clip in audio:
        fast = transcriber.transcribe(clip, TranscribeOptions(language=language, speculative=True)).stats
        slow = transcriber.transcribe(clip, TranscribeOptions(language=language, speculative=False)).stats
        drafted, accepted = drafted + fast.tokens_drafted, accepted + fast.tokens_accepted
        tokens, passes = tokens + fast.tokens_out, passes + fast.main_passes
        plain_seconds += slow.seconds_verify
        speculative_seconds += fast.seconds_verify + fast.seconds_draft
    return accepted / max(drafted, 1), tokens / max(passes, 1), plain_seconds / max(speculative_seconds, 1e-9)


def _prose_coverage(
    tokenizer, corpus: CorpusOptions, languages: Sequence[str], token_ids: np.ndarray
) -> dict[str, float]:
    """Per language held out on texts, the head's coverage of all its held-out prose."""
    held = {language: draft_data.heldout_prose(corpus, language) for language in languages}
    return {language: text_coverage(tokenizer, texts, token_ids) for language, texts in held.items() if texts}


def evaluate_draft(
    main: str, checkpoint: Path, corpus: CorpusOptions, max_k: int = 8, engine_windows: int = 10, int8: bool = True
) -> DraftReport:
    """The held-out report for a draft checkpoint. Teacher-forced figures are given at every K up to
    ``max_k``, and in full at the K that maximises the mean implied speed-up over the languages (with
    the costs measured on the exported graphs); ``engine_windows`` held-out windows per language are
    then decoded through the engine, whose draft length adapts as served. ``int8``: the draft is
    served with int8 weights (its cost, and the engine figures, are those of that export)."""
    policy = replace(DraftPolicy(), cost_aware=False, copies=False)  # the draft's figures: see _engine_figures
    data = draft_data.draft_data(corpus, main)
    heldout = data.split("heldout")
    draft = TrimmedDraft.load(checkpoint)
    hits = agreement(draft, data, heldout, policy.frames_after_audio)
    exported = ExportedModel(export_artefacts(ExportRequest(main=main, assistant=str(checkpoint))), intra_op_threads=2)
    int8_directory = export_artefacts(ExportRequest(main=main, assistant=str(checkpoint), assistant_int8=True))
    int8_export = ExportedModel(int8_directory, intra_op_threads=2)
    int8_full_window = int8_export.open_decoder(int8_export.facts.assistant)  # its own caches and states
    # Costs on the held-out window of median length: the draft's step grows with the audio it reads.
    target = sorted(heldout, key=lambda t: data.windows[t.window].seconds)[len(heldout) // 2]
    states = np.asarray(data.states[target.window : target.window + 1], dtype=np.float32)
    cut = attended_states(data, np.asarray([target.window]), policy.frames_after_audio)
    prefix = target.tokens[: target.prompt_length + 20].tolist()
    costs = measure_costs(
        exported.main,
        states,
        [(exported.assistant, cut), (int8_export.assistant, cut), (int8_full_window, states)],
        prefix,
        max_k,
    )
    draft_ms, int8_ms, int8_full_ms = costs.draft_ms

    languages = sorted({data.windows[t.window].language for t in heldout})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prose_coverage = _prose_coverage(tokenizer, corpus, languages, draft.token_ids.numpy())
    eot = draft.model.config.eos_token_id
    looped = [repetitive(tokenizer, t, eot) for t in heldout]
    scored = {language: [] for language in languages}
    for target, target_hits, loop in zip(heldout, hits, looped, strict=True):
        if not loop:
            scored[data.windows[target.window].language].append((target, target_hits))
    loops = Counter(data.windows[t.window].language for t, loop in zip(heldout, looped, strict=True) if loop)
    unscored = tuple(language for language in languages if not scored[language])
    if len(unscored) == len(languages):
        raise ValueError(f"every held-out text is repetitive (compression ratio over {REPETITIVE}): nothing to score")

    def figures(k: int) -> list[LanguageFigures]:
        rows = []
        for language in languages:
            mine = scored[language]
            if not mine:
                continue
            counted = [tokens_per_pass(h, k) for _, h in mine]
            rows.append(
                LanguageFigures(
                    language=language,
                    texts=len(mine),
                    repetitive=loops[language],
                    tokens=sum(len(h) for _, h in mine),
                    agreement=float(np.concatenate([h for _, h in mine]).mean()),
                    coverage=coverage([t for t, _ in mine], draft.token_ids.numpy()),
                    prose_coverage=prose_coverage.get(language),
                    tokens_per_pass=sum(c[0] for c in counted) / sum(c[1] for c in counted),
                )
            )
        return rows

    def report(k: int, rows: Sequence[LanguageFigures]) -> DraftReport:
        return DraftReport(
            k,
            costs.main_ms,
            costs.verify_ms[k],
            draft_ms[k],
            int8_ms[k],
            tuple(rows),
            DraftReading(cut.shape[1], data.windows[target.window].seconds, int8_full_ms[k]),
            int8,
            unscored,
        )

    candidates = [report(k, figures(k)) for k in range(1, max_k + 1)]
    best = max(candidates, key=lambda r: statistics.fmean(r.speedup(f) for f in r.languages))
    curves = zip(*(r.languages for r in candidates), strict=True)
    best = replace(
        best,
        languages=tuple(
            replace(f, tokens_per_pass_by_k=tuple(c.tokens_per_pass for c in curve))
            for f, curve in zip(best.languages, curves, strict=True)
        ),
    )
    if not engine_windows:
        return best
    audio = draft_data.heldout_audio(data)
    rows = []
    for f in best.languages:
        clips = [a for w, a in audio if data.windows[w].language == f.language][:engine_windows]
        acceptance, per_pass, speedup = _engine_figures(int8_export if int8 else exported, clips, f.language, policy)
        rows.append(replace(f, engine_acceptance=acceptance, engine_tokens_per_pass=per_pass, engine_speedup=speedup))
    return replace(best, languages=tuple(rows))
