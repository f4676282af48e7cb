"""A Whisper decoder graph in ONNX Runtime together with the KV cache it reads.

The cache is owned here, as one buffer per layer of shape ``[B, H, capacity, Dh]``, and passed to
the graph whole (no copy); the graph returns only the new tokens' K/V, which are written into each
row's next free slots. Each row has its own length, so rows may advance by different numbers of
tokens, and rejecting draft tokens is :meth:`DecoderSession.truncate`: a length moves back and the
rejected slots are overwritten later. Nothing kept is ever recomputed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from specwhisper_backend.facts import DecoderFacts

# The cache grows in steps of this many slots: attention reads every slot of the buffer (masked),
# so a buffer much larger than the text would waste work, and regrowing at every token would copy.
CAPACITY_STEP = 64


def _names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]


class DecoderSession:
    """Runs one decoder (main or assistant) step by step for a batch of rows."""

    def __init__(
        self,
        facts: DecoderFacts,
        directory: Path,
        max_length: int,
        options: ort.SessionOptions | None = None,
        providers: list[str] | None = None,
    ) -> None:
        providers = providers or ["CPUExecutionProvider"]
        self.cross_kv = ort.InferenceSession(str(Path(directory) / facts.cross_kv_file), options, providers=providers)
        self.decoder = ort.InferenceSession(str(Path(directory) / facts.decoder_file), options, providers=providers)
        self.facts = facts
        self.max_length = max_length
        self.dtype = np.dtype(facts.dtype)
        self._past_names = _names(facts.layers, "past")
        self._cross_names = _names(facts.layers, "cross")
        self._cross: list[np.ndarray] = []
        self._cache: list[np.ndarray] = []
        self.lengths = np.zeros(0, dtype=np.int64)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def start(self, encoder_hidden_states: np.ndarray) -> None:
        """Begin new rows for these audio windows: cross K/V once, empty self-attention caches."""
        self._cross = self.cross_kv.run(None, {"encoder_hidden_states": encoder_hidden_states})
        self.lengths = np.zeros(encoder_hidden_states.shape[0], dtype=np.int64)
        self._cache = self._empty_cache(CAPACITY_STEP)

    def _empty_cache(self, capacity: int) -> list[np.ndarray]:
        shape = (self.batch_size, self.facts.heads, capacity, self.facts.head_dim)
        return [np.zeros(shape, dtype=self.dtype) for _ in self._past_names]

    def _reserve(self, needed: int) -> None:
        capacity = self._cache[0].shape[2]
        if needed <= capacity:
            return
        steps = -(-needed // CAPACITY_STEP)
        grown = self._empty_cache(steps * CAPACITY_STEP)
        for old, new in zip(self._cache, grown, strict=True):
            new[:, :, :capacity] = old
        self._cache = grown

    def forward(self, tokens: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Feed ``tokens [B, S]`` after each row's current length and return their logits ``[B, S, V]``.

        ``counts[b]`` says how many of row ``b``'s ``S`` tokens are real (the rest is padding, whose
        logits are meaningless and whose K/V are not kept); by default all of them.
        """
        batch, new_len = tokens.shape
        if batch != self.batch_size:
            raise ValueError(f"{batch} rows of tokens for a decoder started with {self.batch_size}")
        counts = np.full(batch, new_len, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
        ends = self.lengths + counts
        if ends.max(initial=0) > self.max_length:
            raise ValueError(f"decoder context of {self.max_length} tokens exceeded")
        self._reserve(int(ends.max(initial=0)))
        capacity = self._cache[0].shape[2]

        slots = np.arange(capacity)
        fresh = np.arange(new_len)
        mask = np.concatenate(
            [slots[None, :] < self.lengths[:, None], fresh[None, :] < counts[:, None]], axis=1
        ).astype(np.int64)
        positions = np.minimum(self.lengths[:, None] + fresh[None, :], self.max_length - 1)

        feed = {"input_ids": tokens.astype(np.int64, copy=False), "position_ids": positions, "attention_mask": mask}
        feed.update(zip(self._past_names, self._cache, strict=True))
        feed.update(zip(self._cross_names, self._cross, strict=True))
        logits, *new_kv = self.decoder.run(None, feed)

        self._store(new_kv, counts)
        self.lengths = ends
        return logits

    def _store(self, new_kv: list[np.ndarray], counts: np.ndarray) -> None:
        if np.all(counts == counts[0]) and np.all(self.lengths == self.lengths[0]):
            start, stop = int(self.lengths[0]), int(self.lengths[0] + counts[0])
            for buffer, new in zip(self._cache, new_kv, strict=True):
                buffer[:, :, start:stop] = new[:, :, : stop - start]
            return
        for row, (start, count) in enumerate(zip(self.lengths, counts, strict=True)):
            for buffer, new in zip(self._cache, new_kv, strict=True):
                buffer[row, :, start : start + count] = new[row, :, :count]

    def truncate(self, lengths: np.ndarray) -> None:
        """Forget every row's tokens past ``lengths[b]`` (rejected drafts); kept K/V stay in place."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if np.any(lengths > self.lengths) or np.any(lengths < 0):
            raise ValueError("truncate can only move lengths back")
        self.lengths = lengths
