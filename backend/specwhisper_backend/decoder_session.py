"""A Whisper decoder graph in ONNX Runtime together with the KV cache it reads.

The cache is owned here, as one buffer per layer of shape ``[B, H, capacity, Dh]``, and passed to
the graph whole (no copy); the graph returns only the new tokens' K/V, which are written into each
row's next free slots. Each row has its own length, so rows may advance by different numbers of
tokens, and rejecting draft tokens is :meth:`DecoderSession.truncate`: a length moves back and the
rejected slots are overwritten later. Nothing kept is ever recomputed.

Where the cache lives is the one thing that differs between devices. On the CPU it is NumPy
(:class:`HostCache`). On a GPU, copying every layer's cache to and from the host each step would
cost more than the step, so :class:`DeviceCache` keeps it in device memory with ONNX Runtime IO
binding, and the export's small ``kv_writer`` graph scatters each step's new K/V into it in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from specwhisper_backend.facts import KV_WRITER_FILE, DecoderFacts, cache_names

# The host cache grows in steps of this many slots: attention reads every slot of the buffer
# (masked), so a buffer much larger than the text would waste work, and regrowing at every token
# would copy.
CAPACITY_STEP = 64


def _grown(arrays: list[np.ndarray], rows: int, row_capacity: int) -> list[np.ndarray]:
    """``arrays`` with room for ``row_capacity`` rows along axis 0, the first ``rows`` kept."""
    grown = []
    for array in arrays:
        bigger = np.zeros((row_capacity, *array.shape[1:]), dtype=array.dtype)
        bigger[:rows] = array[:rows]
        grown.append(bigger)
    return grown


class HostCache:
    """NumPy caches, fed to ``session.run`` as they are; new K/V are copied in by slicing.

    Rows live in the leading slots of arrays with room for more (``[row_capacity, ...]``), and each
    graph input is the contiguous view of the rows in use, so a row joins by filling the next slot
    and leaves by another row moving into its slot: the other rows' caches never move.
    """

    def __init__(self, decoder: ort.InferenceSession, cross_kv: ort.InferenceSession, facts: DecoderFacts) -> None:
        self.decoder, self.cross_kv, self.facts = decoder, cross_kv, facts
        self.dtype = np.dtype(facts.dtype)
        self._past_names = cache_names(facts.layers, "past")
        self._cross_names = cache_names(facts.layers, "cross")
        self.rows = 0
        self.frames = 0  # encoder frames every row's cross-attention reads
        self._states: list[np.ndarray] = []  # each row's encoder states, should the frames grow
        self._cross: list[np.ndarray] = []
        self._buffers: list[np.ndarray] = []

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[2] if self._buffers else CAPACITY_STEP

    def start(self, encoder_hidden_states: np.ndarray, frames: int) -> None:
        self.rows, self.frames, self._states, self._cross, self._buffers = 0, 0, [], [], []
        self.add_rows(encoder_hidden_states, frames)

    def add_rows(self, encoder_hidden_states: np.ndarray, frames: int) -> None:
        """New rows reading ``frames`` of these states; if that is more than the rows so far read,
        every row's cross K/V is recomputed over the longer span."""
        count = encoder_hidden_states.shape[0]
        states = self._states + list(encoder_hidden_states)
        row_capacity = self._cross[0].shape[0] if self._cross else 0
        if frames > self.frames:
            self.frames = frames
            computed = self._cross_kv(np.stack([s[:frames] for s in states]))
            self._cross = _grown(computed, len(states), max(len(states), row_capacity))
        else:
            computed = self._cross_kv(encoder_hidden_states[:, : self.frames])
            if self.rows + count > row_capacity:
                self._cross = _grown(self._cross, self.rows, max(self.rows + count, 2 * row_capacity))
            for array, new in zip(self._cross, computed, strict=True):
                array[self.rows : self.rows + count] = new
        if not self._buffers:
            self._buffers = self._empty(self._cross[0].shape[0], CAPACITY_STEP)
        elif self._buffers[0].shape[0] < self._cross[0].shape[0]:
            self._buffers = _grown(self._buffers, self.rows, self._cross[0].shape[0])
        self._states = states
        self.rows += count

    def _cross_kv(self, states: np.ndarray) -> list[np.ndarray]:
        return self.cross_kv.run(None, {"encoder_hidden_states": np.ascontiguousarray(states)})

    def _empty(self, rows: int, capacity: int) -> list[np.ndarray]:
        shape = (rows, self.facts.heads, capacity, self.facts.head_dim)
        return [np.zeros(shape, dtype=self.dtype) for _ in self._past_names]

    def reserve(self, needed: int) -> None:
        capacity = self.capacity
        if needed <= capacity:
            return
        grown = self._empty(self._buffers[0].shape[0], -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
        for old, new in zip(self._buffers, grown, strict=True):
            new[: self.rows, :, :capacity] = old[: self.rows]
        self._buffers = grown

    def keep_rows(self, rows: np.ndarray) -> None:
        """In place: slot ``i`` takes row ``rows[i]`` (never an earlier slot's row, so nothing is
        overwritten before it is read). A copy into new arrays page-faulted every kept row's cross
        K/V afresh, slower than the steps it saved."""
        for arrays in (self._cross, self._buffers):
            for array in arrays:
                for slot, row in enumerate(rows):
                    if slot != row:
                        array[slot] = array[row]
        self._states = [self._states[row] for row in rows]
        self.rows = len(rows)

    def step(self, feed: dict[str, np.ndarray], lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
        rows = self.rows
        feed = {**feed, **{name: buffer[:rows] for name, buffer in zip(self._past_names, self._buffers, strict=True)}}
        feed.update((name, cross[:rows]) for name, cross in zip(self._cross_names, self._cross, strict=True))
        logits, *new_kv = self.decoder.run(None, feed)
        if np.all(counts == counts[0]) and np.all(lengths == lengths[0]):
            start, stop = int(lengths[0]), int(lengths[0] + counts[0])
            for buffer, new in zip(self._buffers, new_kv, strict=True):
                buffer[:rows, :, start:stop] = new[:, :, : stop - start]
        else:
            for row, (start, count) in enumerate(zip(lengths, counts, strict=True)):
                for buffer, new in zip(self._buffers, new_kv, strict=True):
                    buffer[row, :, start : start + count] = new[row, :, :count]
        return logits


class DeviceCache:
    """Caches in one stacked device buffer ``[2 x layers, B, H, max_length + 1, Dh]``.

    Each layer's past input and new-K/V output is bound by pointer into a stacked buffer, so the
    decoder reads the caches and writes a step's K/V without a host round trip, and one
    ``kv_writer`` run then scatters them into every row's slots, its output bound on its input. The
    buffer is allocated whole (the context is at most ``max_length`` tokens); its last slot is
    scratch that padded tokens are written to and no row ever reads. Only token ids, positions,
    masks and the logits cross to the host during steps. Rows joining and leaving go through the
    host (docs/gpu.md): they happen once per window, steps once per token.
    """

    def __init__(
        self,
        decoder: ort.InferenceSession,
        cross_kv: ort.InferenceSession,
        writer: ort.InferenceSession,
        facts: DecoderFacts,
        max_length: int,
        device: str,
        device_id: int = 0,
    ) -> None:
        self.decoder, self.cross_kv, self.writer, self.facts = decoder, cross_kv, writer, facts
        self.device, self.device_id = device, device_id
        self.dtype = np.dtype(facts.dtype)
        self.capacity = max_length + 1
        self._past_names = cache_names(facts.layers, "past")
        self._cross_names = cache_names(facts.layers, "cross")
        self._new_names = cache_names(facts.layers, "new")
        self.rows = 0
        self.frames = 0
        self._states: list[np.ndarray] = []
        self._cross: list[ort.OrtValue] = []
        self._buffer: ort.OrtValue | None = None

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _compute_cross(self, states: np.ndarray) -> list[ort.OrtValue]:
        binding = self.cross_kv.io_binding()
        binding.bind_cpu_input("encoder_hidden_states", np.ascontiguousarray(states))
        for name in self._cross_names:
            binding.bind_output(name, self.device, self.device_id)
        self.cross_kv.run_with_iobinding(binding)
        return binding.get_outputs()

    def start(self, encoder_hidden_states: np.ndarray, frames: int) -> None:
        self.rows, self.frames, self._states, self._cross, self._buffer = 0, 0, [], [], None
        self.add_rows(encoder_hidden_states, frames)

    def add_rows(self, encoder_hidden_states: np.ndarray, frames: int) -> None:
        count = encoder_hidden_states.shape[0]
        self._states += list(encoder_hidden_states)
        self.frames = max(self.frames, frames)
        # Every row's cross K/V, computed on the device: simpler than splicing rows into device buffers.
        self._cross = self._compute_cross(np.stack([s[: self.frames] for s in self._states]))
        # Zeroed, not just allocated: masked slots must hold finite values (0 x NaN is NaN).
        shape = (len(self._past_names), count, self.facts.heads, self.capacity, self.facts.head_dim)
        fresh = np.zeros(shape, self.dtype)
        kept = [self._buffer.numpy()] if self._buffer is not None else []
        self._buffer = self._on_device(np.concatenate([*kept, fresh], axis=1))
        self.rows += count

    def reserve(self, needed: int) -> None:
        """Nothing to grow: the buffer holds the whole context from the start."""

    def keep_rows(self, rows: np.ndarray) -> None:
        """Through the host: rows leave once per window, steps are once per token."""
        if not len(rows):
            self.rows, self.frames, self._states, self._cross, self._buffer = 0, 0, [], [], None
            return
        self._cross = [self._on_device(np.take(value.numpy(), rows, axis=0)) for value in self._cross]
        self._buffer = self._on_device(np.take(self._buffer.numpy(), rows, axis=1))
        self._states = [self._states[row] for row in rows]
        self.rows = len(rows)

    def _bind_layers(self, binding: ort.IOBinding, names: list[str], stacked: ort.OrtValue, output: bool) -> None:
        shape = stacked.shape()[1:]
        layer_bytes = int(np.prod(shape)) * self.dtype.itemsize
        bind = binding.bind_output if output else binding.bind_input
        for index, name in enumerate(names):
            pointer = stacked.data_ptr() + index * layer_bytes
            bind(name, self.device, self.device_id, self.dtype, shape, pointer)

    def step(self, feed: dict[str, np.ndarray], lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
        rows, new_len = feed["input_ids"].shape
        shape = (len(self._new_names), rows, self.facts.heads, new_len, self.facts.head_dim)
        new_kv = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, self.device_id)

        binding = self.decoder.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        self._bind_layers(binding, self._past_names, self._buffer, output=False)
        for name, value in zip(self._cross_names, self._cross, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        self._bind_layers(binding, self._new_names, new_kv, output=True)
        self.decoder.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()

        # Padded tokens' K/V land past their row's end (or in the scratch slot): never read.
        write = self.writer.io_binding()
        write.bind_ortvalue_input("cache", self._buffer)
        write.bind_ortvalue_input("new", new_kv)
        write.bind_cpu_input("starts", lengths)
        write.bind_ortvalue_output("cache_out", self._buffer)
        self.writer.run_with_iobinding(write)
        return logits


class DecoderSession:
    """Runs one decoder (main or assistant) step by step for a batch of rows."""

    def __init__(
        self,
        facts: DecoderFacts,
        directory: Path,
        max_length: int,
        options: ort.SessionOptions | None = None,
        providers: list | None = None,
        cache_device: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """``cache_device``: where the KV caches live, ``"cpu"`` (NumPy) or an ONNX Runtime device
        (``"cuda"``, or ``"cpu"`` through IO binding as ``"cpu-bound"``); by default ``"cuda"``
        when the CUDA execution provider is in use (on the GPU it runs on), else NumPy. ``vocab_size``: the full
        vocabulary's, needed when the graph scores a subset of it (``facts.logit_ids_file``)."""
        providers = providers or ["CPUExecutionProvider"]
        directory = Path(directory)
        self.vocab_size = vocab_size
        self._logit_ids: np.ndarray | None = None
        if facts.logit_ids_file:
            if vocab_size is None:
                raise ValueError(f"{facts.decoder_file} scores a vocabulary subset: give the full vocab_size")
            self._logit_ids = np.load(directory / facts.logit_ids_file)

        def open_session(path: Path) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), options, providers=providers)

        decoder, cross_kv = open_session(directory / facts.decoder_file), open_session(directory / facts.cross_kv_file)
        cuda = decoder.get_provider_options().get("CUDAExecutionProvider")
        if cache_device is None:
            cache_device = "cpu" if cuda is None else "cuda"
        if cache_device == "cpu":
            self.cache: HostCache | DeviceCache = HostCache(decoder, cross_kv, facts)
        else:
            device = "cpu" if cache_device == "cpu-bound" else cache_device
            device_id = int(cuda["device_id"]) if cuda and device == "cuda" else 0
            writer = open_session(directory / KV_WRITER_FILE)
            self.cache = DeviceCache(decoder, cross_kv, writer, facts, max_length, device, device_id)
        self.facts = facts
        self.max_length = max_length
        self.lengths = np.zeros(0, dtype=np.int64)
        self.passes = 0  # forward passes run, ever

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def encoder_width(self) -> int:
        """The width of the encoder output its cross-attention reads."""
        return int(self.cache.cross_kv.get_inputs()[0].shape[-1])

    @property
    def encoder_frames(self) -> int:
        """Encoder frames every row's cross-attention reads (a draft reads its audio's and a margin)."""
        return self.cache.frames

    def start(self, encoder_hidden_states: np.ndarray, frames: int | None = None) -> None:
        """Replace every row with new ones for these audio windows: cross K/V once (over the first
        ``frames`` of the states; all by default), empty self-attention caches."""
        self.cache.start(encoder_hidden_states, encoder_hidden_states.shape[1] if frames is None else frames)
        self.lengths = np.zeros(encoder_hidden_states.shape[0], dtype=np.int64)

    def add_rows(self, encoder_hidden_states: np.ndarray, frames: int | None = None) -> None:
        """Append rows for these windows after the current ones, which go on undisturbed. Every row
        of a batch reads as many encoder frames: the most any row asked for (``frames``, default all)."""
        frames = encoder_hidden_states.shape[1] if frames is None else frames
        if not 1 <= frames <= encoder_hidden_states.shape[1]:
            raise ValueError(f"frames {frames} out of range for states of {encoder_hidden_states.shape[1]} frames")
        if not self.batch_size:
            self.start(encoder_hidden_states, frames)
            return
        self.cache.add_rows(encoder_hidden_states, frames)
        self.lengths = np.concatenate([self.lengths, np.zeros(encoder_hidden_states.shape[0], dtype=np.int64)])

    def forward(self, tokens: np.ndarray, counts: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        """Feed ``tokens [B, S]`` after each row's current length and return their logits ``[B, S, V]``,
        or with ``last_only`` each row's last real token's ``[B, V]`` (a row with none: meaningless).

        ``counts[b]`` says how many of row ``b``'s ``S`` tokens are real (the rest is padding, whose
        logits are meaningless and whose K/V are not kept); by default all of them. ``last_only`` is
        for a draft catching up on many tokens: only the last one's scores are read, and a subset
        head's scores are spread over the full vocabulary for those alone.
        """
        batch, new_len = tokens.shape
        if batch != self.batch_size:
            raise ValueError(f"{batch} rows of tokens for a decoder started with {self.batch_size}")
        counts = np.full(batch, new_len, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
        ends = self.lengths + counts
        if ends.max(initial=0) > self.max_length:
            raise ValueError(f"decoder context of {self.max_length} tokens exceeded")
        self.cache.reserve(int(ends.max(initial=0)))

        slots = np.arange(self.cache.capacity)
        fresh = np.arange(new_len)
        mask = np.concatenate(
            [slots[None, :] < self.lengths[:, None], fresh[None, :] < counts[:, None]], axis=1
        ).astype(np.int64)
        positions = np.minimum(self.lengths[:, None] + fresh[None, :], self.max_length - 1)
        feed = {"input_ids": tokens.astype(np.int64, copy=False), "position_ids": positions, "attention_mask": mask}
        logits = self.cache.step(feed, self.lengths, counts)
        self.lengths = ends
        self.passes += 1
        if last_only:
            logits = logits[np.arange(batch), np.maximum(counts - 1, 0)]
        return logits if self._logit_ids is None else self._full_vocabulary(logits)

    def _full_vocabulary(self, logits: np.ndarray) -> np.ndarray:
        """Scores of a subset head placed in full-vocabulary rows; ids it does not cover get the lowest
        value, so logit filters and argmax work on token ids as with any decoder."""
        full = np.full((*logits.shape[:-1], self.vocab_size), np.finfo(np.float32).min, dtype=np.float32)
        full[..., self._logit_ids] = logits
        return full

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, with their caches, row ``rows[i]`` becoming row ``i``: a batch's finished
        rows stop costing steps. Each kept row comes from its own slot or a later one (``rows[i] >= i``:
        rows in order, or the last rows moved into the slots of rows that left), so the cache is
        rearranged in place."""
        rows = np.asarray(rows, dtype=np.int64)
        valid = len(set(rows.tolist())) == rows.size and np.all(rows >= np.arange(rows.size))
        if rows.size and (not valid or rows.max() >= self.batch_size):
            raise ValueError(
                f"rows {rows.tolist()}: need distinct rows of a batch of {self.batch_size}, each at or after its slot"
            )
        self.cache.keep_rows(rows)
        self.lengths = self.lengths[rows]

    def truncate(self, lengths: np.ndarray) -> None:
        """Forget every row's tokens past ``lengths[b]`` (rejected drafts); kept K/V stay in place."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if np.any(lengths > self.lengths) or np.any(lengths < 0):
            raise ValueError("truncate can only move lengths back")
        self.lengths = lengths
