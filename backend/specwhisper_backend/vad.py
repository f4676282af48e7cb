"""Voice activity detection: decode only the speech, with Silero VAD run in ONNX Runtime.

Silero VAD's ONNX file (from the ``silero-vad`` package, copied into the model repository by the
export) scores every 32 ms of 16 kHz audio. Runs of speech are found, padded and joined with
faster-whisper's ``vad_filter`` rules and defaults (they are adapted from Silero's own
``get_speech_timestamps``), the speech is decoded as one recording, and :class:`SpeechMap` puts
every time back on the original recording's timeline.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from specwhisper_backend.features import SAMPLE_RATE

VAD_FILE = "vad/silero_vad.onnx"
CHUNK = 512  # samples Silero VAD scores at a time (32 ms)
CONTEXT = 64  # samples of the previous chunk it reads before each one


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's defaults for ``vad_filter``."""

    threshold: float = 0.5  # speech above this probability
    min_speech_duration_ms: int = 0  # shorter runs of speech are dropped
    min_silence_duration_ms: int = 2000  # a run of speech ends after this much silence
    speech_pad_ms: int = 400  # each run is padded by this much on both sides


class SileroVad:
    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """The speech probability of each 512-sample chunk of 16 kHz audio (the last one padded)."""
        padded = np.pad(audio.astype(np.float32), (0, -len(audio) % CHUNK))
        chunks = padded.reshape(-1, CHUNK)
        context = np.zeros((1, CONTEXT), dtype=np.float32)
        state = np.zeros((2, 1, 128), dtype=np.float32)
        rate = np.array(SAMPLE_RATE, dtype=np.int64)
        probs = np.empty(len(chunks), dtype=np.float32)
        for index, chunk in enumerate(chunks):
            frame = np.concatenate([context, chunk[None]], axis=1)
            output, state = self.session.run(None, {"input": frame, "state": state, "sr": rate})
            probs[index] = output[0, 0]
            context = frame[:, -CONTEXT:]
        return probs

    def speech(self, audio: np.ndarray, options: VadOptions | None = None) -> list[tuple[int, int]]:
        """(start, end) samples of each run of speech, padded, in order."""
        return speech_runs(self.probabilities(audio), len(audio), options or VadOptions())


def speech_runs(probs: np.ndarray, samples: int, options: VadOptions) -> list[tuple[int, int]]:
    """faster-whisper's ``get_speech_timestamps`` over per-chunk probabilities (no maximum length)."""
    rate = SAMPLE_RATE / 1000
    min_speech, min_silence = rate * options.min_speech_duration_ms, rate * options.min_silence_duration_ms
    pad = rate * options.speech_pad_ms
    below = max(options.threshold - 0.15, 0.01)  # below this, always silence
    runs: list[list[int]] = []
    start: int | None = None
    silence_from = 0
    for index, prob in enumerate(probs):
        at = CHUNK * index
        if prob >= options.threshold and silence_from:
            silence_from = 0
        if prob >= options.threshold and start is None:
            start = at
            continue
        if start is not None and prob < below:
            silence_from = silence_from or at
            if at - silence_from >= min_silence:
                if silence_from - start > min_speech:
                    runs.append([start, silence_from])
                start, silence_from = None, 0
    if start is not None and samples - start > min_speech:
        runs.append([start, samples])
    for index, run in enumerate(runs):
        if index == 0:
            run[0] = int(max(0, run[0] - pad))
        if index < len(runs) - 1:
            gap = runs[index + 1][0] - run[1]
            if gap < 2 * pad:
                run[1] += int(gap // 2)
                runs[index + 1][0] = int(max(0, runs[index + 1][0] - gap // 2))
            else:
                run[1] = int(min(samples, run[1] + pad))
                runs[index + 1][0] = int(max(0, runs[index + 1][0] - pad))
        else:
            run[1] = int(min(samples, run[1] + pad))
    return [(int(a), int(b)) for a, b in runs]


class SpeechMap:
    """Times on the speech-only recording -> times on the original one (faster-whisper's
    ``SpeechTimestampsMap``)."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self.chunk_ends: list[int] = []
        self.silence_before: list[float] = []
        previous_end = silent = 0
        for start, end in runs:
            silent += start - previous_end
            previous_end = end
            self.chunk_ends.append(end - silent)
            self.silence_before.append(silent / SAMPLE_RATE)

    def chunk(self, time: float, is_end: bool = False) -> int:
        sample = int(time * SAMPLE_RATE)
        if is_end and sample in self.chunk_ends:
            return self.chunk_ends.index(sample)
        return min(bisect.bisect(self.chunk_ends, sample), len(self.chunk_ends) - 1)

    def original(self, time: float, chunk: int | None = None, is_end: bool = False) -> float:
        index = self.chunk(time, is_end) if chunk is None else chunk
        return round(self.silence_before[index] + time, 2)

    def span(self, start: float, end: float) -> tuple[float, float]:
        """A segment's times on the original timeline. Whisper's segments tile the time, so their ends
        fall anywhere in the gaps between runs of speech: each end is placed in the first (last) run
        the segment covers a good part of, and kept within it."""
        bounds = [0.0] + [sample / SAMPLE_RATE for sample in self.chunk_ends]
        runs = list(itertools.pairwise(bounds))
        overlaps = [max(0.0, min(end, hi) - max(start, lo)) for lo, hi in runs]
        # A good part: a second of the run, or half of it (a run is its speech and padding).
        covered = [i for i, overlap in enumerate(overlaps) if overlap >= min(1.0, (runs[i][1] - runs[i][0]) / 2)]
        covered = covered or [int(np.argmax(overlaps))]
        first, last = covered[0], covered[-1]
        start, end = max(start, bounds[first]), min(end, bounds[last + 1])
        return self.original(start, first), self.original(end, last)
