"""The trimmed draft as trained and evaluated in PyTorch: the model, its batches and its loss."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperForCausalLM, WhisperProcessor

from specwhisper_backend.drafting import attended_frames
from specwhisper_backend.features import HOP_LENGTH, SAMPLE_RATE, encoder_frames
from specwhisper_export.cut import cut_decoder_only
from specwhisper_export.graphs import CrossKVGraph, DecoderGraph
from specwhisper_export.repository import DRAFT_VOCAB_FILE
from specwhisper_training.data import DraftData, Target
from specwhisper_training.options import DraftTrainingOptions


def final_hidden(
    decoder: nn.Module, input_ids: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """A Whisper decoder's final hidden state at ``positions`` (a ``[B, T]`` mask): ``[M, d]``.

    ``states [W, n_audio_ctx, d]`` holds each window once and ``rows [B]`` says which window a row
    reads: the cross-attention keys and values over the window's frames, most of the cost, are
    projected once per window rather than once per prompt form (``index_select``: the backward of
    plain indexing was a large share of a training step on the CPU). The decoder runs as
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

    def __init__(self, decoder_only: WhisperForCausalLM, token_ids: np.ndarray, head: torch.Tensor) -> None:
        super().__init__()
        self.model = decoder_only
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.int64))
        # The main model's output projection rows for the kept ids, frozen: the draft learns to reach
        # the main model's final hidden state, which generalises where a trained head memorised
        # (docs/experiments.md). The same rows give the main model's distribution over the kept ids.
        self.register_buffer("head", head.detach().clone())
        # The embeddings stay the main model's: the export and the engine share its vocabulary.
        self.model.model.decoder.embed_tokens.weight.requires_grad_(False)

    @classmethod
    def from_main(cls, main, layers: Sequence[int], token_ids: np.ndarray) -> TrimmedDraft:
        """The untrained start: ``layers`` of the main decoder, head rows from the main output projection."""
        draft = cut_decoder_only(main, layers)
        return cls(draft, token_ids, main.proj_out.weight[torch.as_tensor(token_ids)])

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
    # The main model's choice at each position: its greedy token, or where the text was forced on it
    # (spoken targets), what it would have said there.
    next_ids = np.concatenate([t.topk_ids[:, 0] for t in targets]).astype(np.int64)
    windows = [t.window for t in targets]
    unique, inverse = np.unique(windows, return_inverse=True)
    states = torch.from_numpy(attended_states(data, unique, frames_after_audio))
    labels = to_trimmed[next_ids]
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        states=states,
        rows=torch.from_numpy(inverse),
        positions=torch.from_numpy(positions),
        labels=torch.from_numpy(np.where(labels < 0, -100, labels)),
        next_ids=torch.from_numpy(next_ids),
    )


def attended_states(data: DraftData, windows: np.ndarray, frames_after_audio: int) -> np.ndarray:
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
    teacher = F.softmax(main_hidden @ draft.head.t(), dim=-1)
    kd = -(teacher * log_q).sum(-1).mean()
    distance = F.mse_loss(hidden, main_hidden) / main_hidden.pow(2).mean()
    return options.ce_weight * ce + options.kd_weight * kd + options.hidden_weight * distance


def by_window(targets: Sequence[Target]) -> dict[int, list[Target]]:
    grouped: dict[int, list[Target]] = {}
    for target in targets:
        grouped.setdefault(target.window, []).append(target)
    return grouped
