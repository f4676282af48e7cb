"""The exported graphs of a model repository, opened in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from specwhisper_backend.decoder_session import DecoderSession
from specwhisper_backend.facts import DecoderFacts, ModelFacts


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # One request runs one graph at a time: inter-op threads would only compete for the same cores.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Draft and main decoder alternate step by step, each with its own thread pool: a pool that
    # spin-waits after its run keeps the cores from the other, and both slow down several times.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Memory patterns are planned and kept per set of input shapes, and decoder shapes change with
    # the batch's rows, tokens and cache length: off, a batching instance held less memory and ran
    # as fast (docs/experiments.md, 2026-12-01).
    options.enable_mem_pattern = False
    return options


def execution_providers(device: str = "cpu", device_id: int = 0) -> list:
    """ONNX Runtime's providers for ``"cpu"``, or ``"gpu"``: CUDA on GPU ``device_id``, with the CPU
    for any node CUDA lacks.

    ``"gpu"`` is refused where this ONNX Runtime has no CUDA provider (the CPU-only wheel): ONNX
    Runtime itself would fall back to the CPU with a warning, and serve at a fraction of the speed
    asked for.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"device 'gpu' needs onnxruntime-gpu's CUDA execution provider; this ONNX Runtime has only {available}"
        )
    # No TF32: an fp32 export computes in fp32, as the CPU does (TF32 moved logits enough to flip
    # near-ties against the CPU's greedy choice, docs/gpu.md); fp16 exports are for speed.
    return [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}), "CPUExecutionProvider"]


class ExportedModel:
    """Encoders and decoder sessions of a main model and (when exported with one) its assistant."""

    def __init__(
        self,
        directory: Path,
        intra_op_threads: int = 0,
        providers: list | None = None,
        cache_device: str | None = None,
    ) -> None:
        """``providers``: see :func:`execution_providers`; ``cache_device``: where the decoders keep
        their KV caches (see :class:`DecoderSession`)."""
        self.directory = Path(directory)
        self.facts = ModelFacts.load(self.directory)
        self._options = session_options(intra_op_threads)
        self._providers = providers or ["CPUExecutionProvider"]
        self.cache_device = cache_device

        def open_session(relative: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(self.directory / relative), self._options, providers=self._providers)

        self._open_session = open_session
        self._alignment: ort.InferenceSession | None = None
        main = self.facts.main
        self.encoder = open_session(main.encoder_file)
        self.main = self.open_decoder(main)
        assistant = self.facts.assistant
        self.assistant = self.open_decoder(assistant) if assistant else None
        self.assistant_encoder = open_session(assistant.encoder_file) if assistant and assistant.encoder_file else None
        # The drafts routed by language (facts.routes, in order), each with caches of its own.
        self.routes = [self.open_decoder(route.decoder) for route in self.facts.routes]

    def open_decoder(self, facts: DecoderFacts) -> DecoderSession:
        """A new session of one of this export's decoders, with caches of its own (``main`` and
        ``assistant`` are two; the draft report opens a third to time two cuts side by side)."""
        return DecoderSession(
            facts,
            self.directory,
            self.facts.n_text_ctx,
            self._options,
            self._providers,
            self.cache_device,
            self.facts.vocab_size,
        )

    @property
    def alignment(self) -> ort.InferenceSession | None:
        """The main model's alignment graph (word timestamps), opened on first use; None if the
        export has none."""
        if self._alignment is None and self.facts.main.alignment_file:
            self._alignment = self._open_session(self.facts.main.alignment_file)
        return self._alignment

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Main encoder: log-mel ``[B, n_mels, 3000]`` -> hidden states ``[B, 1500, d]``."""
        return self.encoder.run(None, {"input_features": features.astype(np.float32, copy=False)})[0]

    def encode_for_assistant(self, features: np.ndarray, main_states: np.ndarray) -> np.ndarray:
        """What the assistant's cross-attention reads: its own encoder's output, or the main one's."""
        if self.assistant_encoder is None:
            return main_states
        return self.assistant_encoder.run(None, {"input_features": features.astype(np.float32, copy=False)})[0]
