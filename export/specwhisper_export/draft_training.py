"""``specwhisper-train-draft``: train a decoder-only draft aligned with a main Whisper model, on CPU.

The draft (distil-whisper style) reads the main encoder's output: a few of the main decoder's
layers with their own cross-attention, the main model's token embeddings (a frozen copy) and an
output head over a TRIMMED vocabulary. The head dominates a small decoder's cost (``512 x 51865``
for multilingual Whisper), so it only scores the ids the main model actually says (those it emits
or ranks among its likeliest on the training audio, optionally the most frequent BPE merges, and
every special and timestamp token). Those rows are the main model's own output projection, kept
frozen: the draft learns to reach the main model's final hidden state, which generalises to unheard
audio far better than a head trained on a few hundred windows. The export records which ids the
head's columns are, and the engine places their scores by id. Its cross-attention reads only the
encoder frames of a window's audio and a short margin after them, in training as when served
(``DraftPolicy.frames_after_audio``): over a window's silent padding it was a fifth of a step.

It learns from the main model itself (:mod:`specwhisper_export.draft_data`): cross-entropy on the
main model's greedy tokens, plus two targets taken from the main model's final hidden state at every
position: its distribution over the head's ids, and the hidden state itself (the draft's head is the
main model's, so reaching that state is what agreeing means; 512 numbers a position teach more than
one token). The checkpoint is a standard one
that ``specwhisper-export --assistant`` takes: ``WhisperForCausalLM`` + the main processor +
``draft_vocab.json``. :func:`evaluate_draft` reports what matters for speculative decoding on
held-out recordings.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import WhisperForCausalLM, WhisperProcessor

from specwhisper_backend.cache import cached_dir, checkpoint_identity, input_key
from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.drafting import DraftPolicy, attended_frames
from specwhisper_backend.features import HOP_LENGTH, SAMPLE_RATE, encoder_frames
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_export import draft_data
from specwhisper_export.cut import cut_decoder_only
from specwhisper_export.draft_data import CorpusOptions, DraftData, Target
from specwhisper_export.graphs import CrossKVGraph, DecoderGraph
from specwhisper_export.heap import freed_memory_kept
from specwhisper_export.presets import load_whisper, resolve_checkpoint
from specwhisper_export.repository import DRAFT_VOCAB_FILE, ExportRequest, export_artefacts

log = logging.getLogger(__name__)

TRAINING_FILE = "draft_training.json"


@dataclass(frozen=True)
class DraftTrainingOptions:
    """How a draft is built and trained; the defaults are the ``base`` preset's (< 20 min on 2 cores)."""

    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    # Main decoder layers the draft starts from (2 is the useful floor). A third (0, 3, 5) lifts held-out
    # agreement by 3 points but costs 30 % more per draft step: served, it was no faster (README).
    layers: tuple[int, ...] = (0, 5)
    # Ids below this (GPT-2 style merge ranks: the most frequent merges) are always kept; 0: none.
    vocab_rank_floor: int = 0
    # Also keep the main model's k likeliest alternatives at every training position: a better lexicon
    # than merge rank. Base, default corpus (20 held-out windows a language), held-out coverage en / es
    # / fr: k=14 gives 21.4k ids and 98.4 / 99.6 / 99.5 %, k=16 22.7k ids and 98.6 / 99.8 / 99.6 %.
    vocab_teacher_top_k: int = 16
    # And every id that Debian's fortune-cookie prose (the corpus languages that have it) uses at least
    # this often (0: none): common words the training audio lacks ("compatible", "debugging",
    # "provider" were missed). With k=16, 5 gives 23.8k ids and 99.2 / 100 / 99.6 %.
    vocab_prose_min_count: int = 5
    # The head stays the main model's output projection (its rows for the kept ids): the draft learns
    # to reach the main model's final hidden state. A trained head (20k x 512 weights, most of the
    # draft's) memorised the training set: base, 250 steps, held-out agreement 67.7 % against 74.4 %.
    train_head: bool = False
    # The draft reads each window's audio and this many encoder frames after it, as it is served
    # (DraftPolicy.frames_after_audio).
    frames_after_audio: int = DraftPolicy().frames_after_audio
    steps: int = 600
    batch_windows: int = 4  # windows per step, each with all its targets (prompt forms)
    learning_rate: float = 5e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    ce_weight: float = 1.0  # cross-entropy on the main model's greedy token
    kd_weight: float = 1.0  # cross-entropy against the main model's distribution over the head's ids
    # Squared distance to the main model's final hidden state, relative to its mean square. With it,
    # held-out agreement rose from 75.4 % to 77.6 % (base, 600 steps; README); weighted 1 / 3 / 6 / 12
    # (same data and held-out windows), en 84.6 / 85.1 / 85.6 / 86.6 %, es 77.4 / 77.7 / 78.5 /
    # 79.1 %, fr 74.1 / 75.0 / 75.1 / 77.2 %. 24 gained no more than two trainings at 12 differ.
    hidden_weight: float = 12.0
    # The draft kept is an exponential moving average of the weights after warm-up (0: the last weights).
    # Held-out agreement with it (base, same data and held-out windows), en / es / fr: 85.6 / 73.2 /
    # 75.9 % against 86.0 / 71.5 / 75.2 % (another held-out set: 81.5 / 76.4 / 75.9 against 81.0 /
    # 75.0 / 75.7); 0.995 gained less (80.1 / 75.2 / 76.9 there).
    ema_decay: float = 0.99
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers or any(i < 0 for i in self.layers):
            raise ValueError(f"layers must name main decoder layers, got {self.layers}")
        if min(self.vocab_rank_floor, self.vocab_teacher_top_k, self.vocab_prose_min_count) < 0:
            raise ValueError("vocab_rank_floor, vocab_teacher_top_k and vocab_prose_min_count must be >= 0")
        if self.frames_after_audio < 0:
            raise ValueError("frames_after_audio must be >= 0")
        if self.steps < 1 or self.batch_windows < 1 or self.threads < 1:
            raise ValueError("steps, batch_windows and threads must be >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be within 0..steps")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        weights = (self.ce_weight, self.kd_weight, self.hidden_weight)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError("ce_weight, kd_weight and hidden_weight must be >= 0, not all 0")


# Named main models whose draft builds on first use (see draft_checkpoint).
DRAFT_PRESETS: dict[str, DraftTrainingOptions] = {"base": DraftTrainingOptions()}


def draft_vocabulary(
    targets: Sequence[Target],
    vocab_size: int,
    first_special: int,
    rank_floor: int,
    teacher_top_k: int = 0,
    lexicon: Sequence[int] = (),
) -> np.ndarray:
    """Sorted ids the head covers: those the main model said (and its ``teacher_top_k`` likeliest
    alternatives at each position), the ``rank_floor`` most frequent merges, ``lexicon``, and every
    special and timestamp id (``first_special`` onwards, end of text included)."""
    said = [t.text_tokens for t in targets] + [t.topk_ids[:, :teacher_top_k].ravel() for t in targets]
    kept = np.union1d(np.arange(min(rank_floor, first_special)), np.arange(first_special, vocab_size))
    return np.unique(np.concatenate([kept, np.asarray(lexicon, dtype=np.int64), *said])).astype(np.int64)


def prose_lexicon(tokenizer, languages: Sequence[str], min_count: int) -> np.ndarray:
    """Ids that Debian's fortune prose in ``languages`` uses at least ``min_count`` times, tokenised
    as Whisper writes text (after a space); none for ``min_count`` 0."""
    counts: Counter[int] = Counter()
    for language in languages if min_count else ():
        if texts := draft_data.fortune_texts(language):
            for ids in tokenizer([" " + text for text in texts], add_special_tokens=False)["input_ids"]:
                counts.update(ids)
    return np.asarray(sorted(i for i, count in counts.items() if count >= min_count), dtype=np.int64)


def coverage(targets: Sequence[Target], token_ids: np.ndarray) -> float:
    """Share of the main model's output tokens (text, timestamps, end of text) inside ``token_ids``."""
    said = np.concatenate([t.text_tokens for t in targets])
    return float(np.isin(said, token_ids).mean())


def final_hidden(
    decoder: nn.Module, input_ids: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """A Whisper decoder's final hidden state at ``positions`` (a ``[B, T]`` mask): ``[M, d]``.

    ``states [W, n_audio_ctx, d]`` holds each window once and ``rows [B]`` says which window a row
    reads: the cross-attention keys and values over the window's frames, most of the cost, are
    projected once per window rather than once per prompt form (``index_select``: the backward of
    plain indexing took 25 ms per tensor on CPU, an eighth of a training step). The decoder runs as
    the export's own graph (an empty cache), so what is trained is what is served.
    """
    cross = [kv.index_select(0, rows) for kv in CrossKVGraph(decoder)(states)]
    batch, length = input_ids.shape
    shape = (batch, cross[0].shape[1], 0, cross[0].shape[-1])
    empty = [input_ids.new_zeros(shape, dtype=states.dtype) for _ in range(len(cross))]
    hidden, *_ = DecoderGraph(decoder, nn.Identity())(
        input_ids,
        torch.arange(length).expand(batch, length),
        torch.ones(batch, length, dtype=torch.int64),
        *empty,
        *cross,
    )
    return hidden[positions]


class TrimmedDraft(nn.Module):
    """A decoder-only Whisper with a head over ``token_ids`` only (training and evaluation view)."""

    def __init__(
        self, decoder_only: WhisperForCausalLM, token_ids: np.ndarray, head: torch.Tensor, train_head: bool = False
    ) -> None:
        super().__init__()
        self.model = decoder_only
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.int64))
        self.head = nn.Parameter(head.detach().clone(), requires_grad=train_head)
        # The main model's rows, for its distribution over the kept ids (``head`` moves if it trains).
        self.register_buffer("main_head", head.detach().clone(), persistent=False)
        # The embeddings stay the main model's: the export and the engine share its vocabulary.
        self.model.model.decoder.embed_tokens.weight.requires_grad_(False)

    @classmethod
    def from_main(cls, main, layers: Sequence[int], token_ids: np.ndarray, train_head: bool = False) -> TrimmedDraft:
        """The untrained start: ``layers`` of the main decoder, head rows from the main output projection."""
        draft = cut_decoder_only(main, layers)
        return cls(draft, token_ids, main.proj_out.weight[torch.as_tensor(token_ids)], train_head)

    @classmethod
    def load(cls, checkpoint: Path) -> TrimmedDraft:
        """A checkpoint saved by :meth:`save` (or any decoder-only one, then over its full vocabulary)."""
        draft = WhisperForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        vocab_file = Path(checkpoint) / DRAFT_VOCAB_FILE
        if vocab_file.is_file():
            ids = np.asarray(json.loads(vocab_file.read_text())["token_ids"], dtype=np.int64)
        else:
            ids = np.arange(draft.config.vocab_size)
        return cls(draft, ids, draft.proj_out.weight[torch.as_tensor(ids)])

    def trimmed_index(self) -> np.ndarray:
        """Full-vocabulary id -> its column in the head, -1 for the ids the head leaves out."""
        index = np.full(self.model.config.vocab_size, -1, dtype=np.int64)
        index[self.token_ids.numpy()] = np.arange(len(self.token_ids))
        return index

    def hidden(self, input_ids: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
        """The final hidden state (after the last layer norm) at ``positions`` (a ``[B, T]`` mask): ``[M, d]``."""
        return final_hidden(self.model.model.decoder, input_ids, states, rows, positions)

    def logits(self, input_ids: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
        """Scores over the trimmed vocabulary at ``positions``: ``[M, len(token_ids)]``."""
        return self.hidden(input_ids, states, rows, positions) @ self.head.t()

    def save(self, directory: Path, processor: WhisperProcessor) -> None:
        """A standard checkpoint: untied full-size ``proj_out`` (kept rows trained, the others the
        embedding's), the main processor and ``draft_vocab.json``."""
        model = copy.deepcopy(self.model)
        model.config.tie_word_embeddings = False
        weight = model.model.decoder.embed_tokens.weight.detach().clone()
        weight[self.token_ids] = self.head.detach()
        model.proj_out = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        model.proj_out.weight = nn.Parameter(weight)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        (Path(directory) / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": self.token_ids.tolist()}))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    states: torch.Tensor  # [W, n_audio_ctx, d]: each window once
    rows: torch.Tensor  # [B] the window each row reads
    positions: torch.Tensor  # bool [B, T]: where the main model's next token is a target
    labels: torch.Tensor  # [M] trimmed-vocabulary index, -100 outside it
    next_ids: torch.Tensor  # [M] full-vocabulary ids (for agreement)


def make_batch(data: DraftData, targets: Sequence[Target], to_trimmed: np.ndarray, frames_after_audio: int) -> Batch:
    """Targets padded to one length (padding is never a target, and a causal decoder ignores what follows),
    their windows' encoder output cut after the longest one's audio and ``frames_after_audio``."""
    width = max(len(t.tokens) for t in targets) - 1
    input_ids = np.zeros((len(targets), width), dtype=np.int64)
    positions = np.zeros((len(targets), width), dtype=bool)
    for row, target in enumerate(targets):
        input_ids[row, : len(target.tokens) - 1] = target.tokens[:-1]
        positions[row, target.prompt_length - 1 : len(target.tokens) - 1] = True
    next_ids = np.concatenate([t.text_tokens for t in targets]).astype(np.int64)
    windows = [t.window for t in targets]
    unique, inverse = np.unique(windows, return_inverse=True)
    states = torch.from_numpy(_attended_states(data, unique, frames_after_audio))
    labels = to_trimmed[next_ids]
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        states=states,
        rows=torch.from_numpy(inverse),
        positions=torch.from_numpy(positions),
        labels=torch.from_numpy(np.where(labels < 0, -100, labels)),
        next_ids=torch.from_numpy(next_ids),
    )


def _attended_states(data: DraftData, windows: np.ndarray, frames_after_audio: int) -> np.ndarray:
    """The windows' encoder output up to the longest one's audio and ``frames_after_audio``, as the
    engine cuts it for the draft (float32)."""
    n_audio_ctx = data.states.shape[1]
    mel_frames = max(round(data.windows[w].seconds * SAMPLE_RATE) // HOP_LENGTH for w in windows)
    frames = attended_frames(encoder_frames(mel_frames, n_audio_ctx), frames_after_audio, n_audio_ctx)
    return np.asarray(data.states[windows, :frames], dtype=np.float32)


def loss(draft: TrimmedDraft, batch: Batch, main_hidden: torch.Tensor, options: DraftTrainingOptions) -> torch.Tensor:
    """``ce_weight`` x CE(greedy token) + ``kd_weight`` x CE(the main model's distribution over the
    head's ids) + ``hidden_weight`` x the squared distance to the main model's final hidden state
    ``main_hidden [M, d]``, relative to its mean square."""
    hidden = draft.hidden(batch.input_ids, batch.states, batch.rows, batch.positions)
    log_q = F.log_softmax(hidden @ draft.head.t(), dim=-1)
    ce = F.nll_loss(log_q, batch.labels, ignore_index=-100)
    teacher = F.softmax(main_hidden @ draft.main_head.t(), dim=-1)
    kd = -(teacher * log_q).sum(-1).mean()
    distance = F.mse_loss(hidden, main_hidden) / main_hidden.pow(2).mean()
    return options.ce_weight * ce + options.kd_weight * kd + options.hidden_weight * distance


def main_hidden_states(main: nn.Module, data: DraftData, targets: Sequence[Target]) -> dict[int, np.ndarray]:
    """Per window, the main model's final hidden state at each position its targets score (in
    :func:`_by_window` order), reading all the encoder frames as the main model does when served.
    Computed once before training (float16): 43 s for base's 380 training windows; recomputed at
    every step instead, it doubled the training time."""
    every_id = np.arange(main.config.vocab_size)
    hidden = {}
    with torch.no_grad():
        for window, chosen in tqdm(_by_window(targets).items(), desc="main model hidden states", unit="window"):
            batch = make_batch(data, chosen, every_id, data.states.shape[1])
            found = final_hidden(main.model.decoder, batch.input_ids, batch.states, batch.rows, batch.positions)
            hidden[window] = found.numpy().astype(np.float16)
    return hidden


def _by_window(targets: Sequence[Target]) -> dict[int, list[Target]]:
    grouped: dict[int, list[Target]] = {}
    for target in targets:
        grouped.setdefault(target.window, []).append(target)
    return grouped


def _schedule(step: int, options: DraftTrainingOptions) -> float:
    """Linear warm-up, then cosine decay to a tenth of the learning rate."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(options.steps - options.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    draft: TrimmedDraft, data: DraftData, main_hidden: dict[int, np.ndarray], options: DraftTrainingOptions
) -> list[float]:
    """Optimise ``draft`` in place on the training split (``main_hidden``: :func:`main_hidden_states`
    of it); returns the loss per step."""
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    to_trimmed = draft.trimmed_index()
    grouped = _by_window(data.split("train"))
    windows = sorted(grouped)
    parameters = [p for p in draft.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _schedule(step, options))
    average: list[torch.Tensor] = []  # the moving average, from warm-up's end on
    draft.train()
    order: list[int] = []
    losses = []
    every_frame = data.states.shape[1]
    for step in (bar := tqdm(range(options.steps), desc="training draft", unit="step")):
        if len(order) < options.batch_windows:
            order += rng.sample(windows, len(windows))  # a new epoch, reshuffled
        chosen, order = order[: options.batch_windows], order[options.batch_windows :]
        # Every other step reads all frames: a long recording's full windows are read whole, and a
        # draft that never saw the frames after its training windows' audio was worse there.
        frames_after_audio = options.frames_after_audio if step % 2 == 0 else every_frame
        batch = make_batch(data, [t for w in chosen for t in grouped[w]], to_trimmed, frames_after_audio)
        teacher = torch.from_numpy(np.concatenate([main_hidden[w] for w in chosen]).astype(np.float32))
        value = loss(draft, batch, teacher, options)
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        if average:
            torch._foreach_lerp_(average, [p.detach() for p in parameters], 1 - options.ema_decay)
        elif step >= options.warmup_steps:
            average = [p.detach().clone() for p in parameters]
        losses.append(value.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
    if average:
        with torch.no_grad():
            torch._foreach_copy_(parameters, average)
    draft.eval()
    return losses


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
        for chosen in _by_window(targets).values():
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

    def format(self) -> str:
        served, r = ("int8" if self.int8 else "fp32"), self.reading
        lines = [
            f"K={self.k}  main step {self.main_step_ms:.2f} ms, verify {self.k + 1} tokens {self.verify_ms:.2f} ms, "
            f"draft token fp32 {self.draft_ms:.2f} ms, int8 {self.draft_int8_ms:.2f} ms; served {served}: "
            f"{self.draft_cost:.3f} main steps",
            f"costs on the held-out window of median length ({r.window_seconds:.1f} s): the draft reads "
            f"{r.frames} encoder frames; over all frames (a full 30 s window) int8 {r.int8_full_window_ms:.2f} ms, "
            f"{r.int8_full_window_ms / self.main_step_ms:.3f} main steps",
            f"{'lang':<5}{'texts':>6}{'tokens':>7}{'agree':>8}{'cover':>8}{'tok/pass':>9}{'speedup':>8}"
            f"{'engine, as served: accept':>35}{'tok/pass':>9}{'speedup':>8}",
        ]
        for f in self.languages:
            engine = ""
            if f.engine_acceptance is not None:
                engine = f"{f.engine_acceptance:>35.1%}{f.engine_tokens_per_pass:>9.2f}{f.engine_speedup:>8.2f}"
            lines.append(
                f"{f.language:<5}{f.texts:>6}{f.tokens:>7}{f.agreement:>8.1%}{f.coverage:>8.1%}"
                f"{f.tokens_per_pass:>9.2f}{self.speedup(f):>8.2f}{engine}"
            )
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
    served (adaptive length, confidence stop). The report turns the wall-clock fallback judge off
    (``judge_after_rounds``): on a shared machine it would measure load, not the draft."""
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


def evaluate_draft(
    main: str, checkpoint: Path, corpus: CorpusOptions, max_k: int = 8, engine_windows: int = 10, int8: bool = True
) -> DraftReport:
    """The held-out report for a draft checkpoint. Teacher-forced figures are given at every K up to
    ``max_k``, and in full at the K that maximises the mean implied speed-up over the languages (with
    the costs measured on the exported graphs); ``engine_windows`` held-out windows per language are
    then decoded through the engine, whose draft length adapts as served. ``int8``: the draft is
    served with int8 weights (its cost, and the engine figures, are those of that export)."""
    policy = replace(DraftPolicy(), judge_after_rounds=10**9)  # see _engine_figures
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
    cut = _attended_states(data, np.asarray([target.window]), policy.frames_after_audio)
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

    def figures(k: int) -> list[LanguageFigures]:
        rows = []
        for language in languages:
            mine = [(t, h) for t, h in zip(heldout, hits, strict=True) if data.windows[t.window].language == language]
            counted = [tokens_per_pass(h, k) for _, h in mine]
            rows.append(
                LanguageFigures(
                    language=language,
                    texts=len(mine),
                    tokens=sum(len(h) for _, h in mine),
                    agreement=float(np.concatenate([h for _, h in mine]).mean()),
                    coverage=coverage([t for t, _ in mine], draft.token_ids.numpy()),
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


# Part of a cached draft's key besides its options and the data module: bump it when a change here
# changes what training produces (not for changes to the report, which needs no retraining).
TRAINING_VERSION = 2


def train_draft(main: str, options: DraftTrainingOptions, out: Path) -> dict:
    """Train a draft for ``main`` and save it in ``out``; returns what was recorded in draft_training.json."""
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    with freed_memory_kept():
        data = draft_data.draft_data(options.corpus, main)
        data_seconds = time.perf_counter() - started
        model, processor = load_whisper(main)
        train_targets = data.split("train")
        eot = model.config.eos_token_id
        lexicon = prose_lexicon(processor.tokenizer, options.corpus.languages, options.vocab_prose_min_count)
        token_ids = draft_vocabulary(
            train_targets, model.config.vocab_size, eot, options.vocab_rank_floor, options.vocab_teacher_top_k, lexicon
        )
        draft = TrimmedDraft.from_main(model, options.layers, token_ids, options.train_head)
        main_hidden = main_hidden_states(model, data, train_targets)
        del model
        losses = train(draft, data, main_hidden, options)
    draft.save(out, processor)
    record = {
        "main": main,
        "options": asdict(options),
        "vocabulary": len(token_ids),
        "train_windows": len({t.window for t in train_targets}),
        "train_texts": len(train_targets),
        "heldout_coverage": coverage(data.split("heldout"), token_ids),
        "final_loss": statistics.fmean(losses[-20:]),
        "seconds_data": round(data_seconds, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    (Path(out) / TRAINING_FILE).write_text(json.dumps(record, indent=1))
    return record


def draft_checkpoint(main: str, options: DraftTrainingOptions | None = None) -> Path:
    """The trained draft of ``main`` (a preset in DRAFT_PRESETS, or any main with ``options``),
    trained on first use and cached in ``cache_root()/drafts``."""
    if options is None:
        if main not in DRAFT_PRESETS:
            raise KeyError(f"no draft preset for {main!r}; known: {sorted(DRAFT_PRESETS)}; pass options")
        options = DRAFT_PRESETS[main]
    identity = checkpoint_identity(resolve_checkpoint(main))
    key = input_key("draft", identity, asdict(options), draft_data.code_version(), TRAINING_VERSION)
    return cached_dir("drafts", key, lambda tmp: train_draft(main, options, tmp))


def build_parser() -> argparse.ArgumentParser:
    defaults, corpus = DraftTrainingOptions(), CorpusOptions()
    parser = argparse.ArgumentParser(
        prog="specwhisper-train-draft",
        description="Train a decoder-only draft (trimmed vocabulary) aligned with a main Whisper model, on CPU.",
    )
    parser.add_argument("--main", default="base", help="preset, checkpoint directory or Hugging Face id")
    parser.add_argument("--audio", nargs="*", default=[], help="extra audio files or folders (no transcripts needed)")
    parser.add_argument("--languages", nargs="*", default=list(corpus.languages), help="built-in speech languages")
    parser.add_argument("--out", type=Path, help="checkpoint directory to write (default: the cached draft)")
    parser.add_argument("--layers", type=int, nargs="+", default=list(defaults.layers))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--train-windows", type=int, default=corpus.train_windows, help="per language")
    parser.add_argument(
        "--voice-windows", type=int, default=corpus.voice_windows, help="per language with a second Asterisk voice"
    )
    parser.add_argument("--espeak-windows", type=int, default=corpus.espeak_windows, help="per language")
    parser.add_argument(
        "--fortune-windows", type=int, default=corpus.fortune_windows, help="per language with fortunes installed"
    )
    parser.add_argument("--heldout-windows", type=int, default=corpus.heldout_windows, help="per language")
    parser.add_argument(
        "--training-forms",
        type=int,
        default=corpus.training_forms,
        help="prompt forms (task, timestamps) each training window is decoded in, 1-4",
    )
    parser.add_argument("--max-files", type=int, default=corpus.max_files, help="per language and split; 0: all")
    parser.add_argument("--vocab-rank-floor", type=int, default=defaults.vocab_rank_floor)
    parser.add_argument(
        "--vocab-teacher-top-k",
        type=int,
        default=defaults.vocab_teacher_top_k,
        help="also cover the main model's k likeliest ids at every training position",
    )
    parser.add_argument(
        "--vocab-prose-min-count",
        type=int,
        default=defaults.vocab_prose_min_count,
        help="also cover every id Debian's fortune prose uses this often (0: none)",
    )
    parser.add_argument(
        "--train-head",
        action="store_true",
        help="train the trimmed head too (default: keep the main model's output projection; it generalises better)",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=defaults.ema_decay,
        help="keep a moving average of the weights after warm-up (0: the last weights)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--engine-windows",
        type=int,
        default=10,
        help="held-out windows per language decoded through the engine for the report (0: teacher-forced figures only)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the held-out report (and the ONNX export)")
    return parser


def options_from(args: argparse.Namespace) -> DraftTrainingOptions:
    corpus = CorpusOptions(
        languages=tuple(args.languages),
        audio=tuple(str(Path(a).resolve()) for a in args.audio),
        train_windows=args.train_windows,
        voice_windows=args.voice_windows,
        espeak_windows=args.espeak_windows,
        fortune_windows=args.fortune_windows,
        heldout_windows=args.heldout_windows,
        training_forms=args.training_forms,
        max_files=args.max_files,
        seed=args.seed,
    )
    return DraftTrainingOptions(
        corpus=corpus,
        layers=tuple(args.layers),
        steps=args.steps,
        warmup_steps=min(DraftTrainingOptions.warmup_steps, args.steps),
        vocab_rank_floor=args.vocab_rank_floor,
        vocab_teacher_top_k=args.vocab_teacher_top_k,
        vocab_prose_min_count=args.vocab_prose_min_count,
        train_head=args.train_head,
        ema_decay=args.ema_decay,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        options = options_from(args)
    except ValueError as error:
        print(f"specwhisper-train-draft: error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.out is None:
        checkpoint = draft_checkpoint(args.main, options)
    else:
        checkpoint = args.out
        if checkpoint.exists() and any(checkpoint.iterdir()):
            print(f"specwhisper-train-draft: error: {checkpoint} is not empty", file=sys.stderr)
            return 2
        checkpoint.mkdir(parents=True, exist_ok=True)
        train_draft(args.main, options, checkpoint)
    record = json.loads((checkpoint / TRAINING_FILE).read_text())
    print(f"draft checkpoint: {checkpoint}")
    print(
        f"{len(options.layers)} layers {list(options.layers)}, vocabulary {record['vocabulary']} ids, "
        f"trained in {record['seconds_total']:.0f} s (data {record['seconds_data']:.0f} s), "
        f"final loss {record['final_loss']:.3f}"
    )
    if not args.no_report:
        report = evaluate_draft(args.main, checkpoint, options.corpus, engine_windows=args.engine_windows)
        print(report.format())
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
