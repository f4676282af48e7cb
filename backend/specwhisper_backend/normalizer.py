"""The log-normalizer of a vocabulary row, ``log(sum(exp(scores)))``, on ONNX Runtime's kernel.

Every kept token's log-probability needs one (the fallback reads their average), and so does every
draft token's probability (the confidence stop reads it): once per verified position of every row,
and once per drafted token. NumPy's float32 ``exp`` runs element by element on this project's CPUs,
which made these normalizers a noticeable share of a draft token and of a busy batch's host work;
ONNX Runtime's ``LogSoftmax`` computes the same in vectorised code (MLAS) in less than half the time
(docs/experiments.md, 2026-12-04). The value agrees with a float64 reference to float32 precision.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from specwhisper_backend.runtime import session_options

# ``LogSoftmax`` over the last axis of a float32 ``scores [rows, vocab]`` (output ``log_probs``),
# opset 17, serialised: the engine runs where the ``onnx`` package is not installed (Triton's Python
# backend needs only onnxruntime). tests/test_decoding.py rebuilds it with ``onnx.helper`` and
# checks these bytes are that graph.
LOG_SOFTMAX_GRAPH = (
    b'\x08\x08\x12\x0bspecwhisper:\x8d\x01\n5\n\x06scores\x12\tlog_probs"\nLogSoftmax*\x14\n\x04axis'
    b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\xa0\x01\x02\x12\x0blog_softmaxZ!\n\x06scores\x12\x17"
    b"\n\x15\x08\x01\x12\x11\n\x06\x12\x04rows\n\x07\x12\x05vocabb$\n\tlog_probs\x12\x17\n\x15\x08\x01"
    b"\x12\x11\n\x06\x12\x04rows\n\x07\x12\x05vocabB\x04\n\x00\x10\x11"
)

_lock = threading.Lock()
_session: ort.InferenceSession | None = None


def _log_softmax() -> ort.InferenceSession:
    """One in-memory ``LogSoftmax`` graph a process, on one thread: a row is too small to share."""
    global _session
    if _session is not None:
        return _session
    with _lock:
        if _session is None:
            options = session_options(intra_op_threads=1)
            _session = ort.InferenceSession(LOG_SOFTMAX_GRAPH, options, providers=["CPUExecutionProvider"])
    return _session


def log_normalizer(scores: np.ndarray) -> float:
    """``log(sum(exp(scores)))`` over one row of logits (float32; -inf where filtered out): the row's
    largest score less its log-softmax, which there is close to 0 and so loses no precision."""
    top = int(scores.argmax())
    if not np.isfinite(scores[top]):  # every id filtered out: nothing to normalize
        return float(scores[top])
    row = np.ascontiguousarray(scores, dtype=np.float32).reshape(1, -1)
    log_probs = _log_softmax().run(None, {"scores": row})[0]
    return float(row[0, top]) - float(log_probs[0, top])


def probability(scores: np.ndarray, token: int) -> float:
    """The probability of ``token`` under ``scores`` (logits, -inf where filtered out)."""
    return float(np.exp(float(scores[token]) - log_normalizer(scores)))
