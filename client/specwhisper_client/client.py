"""Transcribe over gRPC with a running Triton server: one file, a stream of segments, or many files.

Built on ``tritonclient.grpc``. Transient failures (server unavailable or overloaded) are retried
with backoff; errors about the request itself are raised at once with the server's message.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

Source = str | Path | bytes | np.ndarray
# gRPC status codes worth another try: the server is starting, restarting or overloaded.
TRANSIENT = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")


class TranscriptionError(RuntimeError):
    """The server refused or failed a request; the message says why."""


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    words: tuple[Word, ...] = ()  # with word_timestamps
    temperature: float = 0.0  # its window's decoding: the temperature kept, and what the fallback judged
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class TranscriptionResult:
    text: str
    language: str
    segments: list[Segment]
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a stream: the request's language and statistics."""

    language: str
    stats: dict


def _segments(raw: bytes) -> list[Segment]:
    judged = ("temperature", "avg_logprob", "compression_ratio", "no_speech_prob")
    return [
        Segment(
            s["start"],
            s["end"],
            s["text"],
            tuple(s.get("tokens", ())),
            tuple(Word(**w) for w in s.get("words", ())),
            **{key: s[key] for key in judged if key in s},
        )
        for s in json.loads(raw)
    ]


def _text_input(name: str, value: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
    return tensor


def _flag_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _number_input(name: str, values: Sequence[float] | float, dtype: str = "FP32") -> grpcclient.InferInput:
    array = np.asarray(values, dtype=np.int64 if dtype == "INT64" else np.float32).reshape(-1)
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def audio_inputs(source: Source, sample_rate: int | None = None) -> list[grpcclient.InferInput]:
    """A file (path or its bytes) goes as AUDIO_BYTES, decoded by the server; an array as AUDIO PCM."""
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise ValueError("an audio array needs its sample_rate")
        samples = np.ascontiguousarray(source, dtype=np.float32)
        pcm = grpcclient.InferInput("AUDIO", list(samples.shape), "FP32")
        pcm.set_data_from_numpy(samples)
        rate = grpcclient.InferInput("SAMPLE_RATE", [1], "INT32")
        rate.set_data_from_numpy(np.array([sample_rate], dtype=np.int32))
        return [pcm, rate]
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    encoded = np.frombuffer(data, dtype=np.uint8)
    tensor = grpcclient.InferInput("AUDIO_BYTES", [encoded.size], "UINT8")
    tensor.set_data_from_numpy(encoded)
    return [tensor]


@dataclass(frozen=True)
class Options:
    """A request's options; those left at None are the server's defaults (openai/whisper's)."""

    language: str | None = None
    task: str = "transcribe"
    timestamps: bool = False
    speculative: bool = True
    initial_prompt: str | None = None
    condition_on_previous_text: bool | None = None
    temperature: Sequence[float] | float | None = None  # the fallback's schedule, e.g. (0.0, 0.2, ..., 1.0)
    compression_ratio_threshold: float | None = None  # NaN turns it off
    logprob_threshold: float | None = None  # NaN turns it off
    no_speech_threshold: float | None = None  # NaN turns it off
    seed: int | None = None
    word_timestamps: bool = False
    vad_filter: bool = False

    def inputs(self) -> list[grpcclient.InferInput]:
        tensors = [
            _text_input("TASK", self.task),
            _flag_input("TIMESTAMPS", self.timestamps),
            _flag_input("SPECULATIVE", self.speculative),
            _flag_input("WORD_TIMESTAMPS", self.word_timestamps),
            _flag_input("VAD_FILTER", self.vad_filter),
        ]
        if self.language:
            tensors.append(_text_input("LANGUAGE", self.language))
        if self.initial_prompt:
            tensors.append(_text_input("INITIAL_PROMPT", self.initial_prompt))
        if self.condition_on_previous_text is not None:
            tensors.append(_flag_input("CONDITION_ON_PREVIOUS_TEXT", self.condition_on_previous_text))
        if self.temperature is not None:
            tensors.append(_number_input("TEMPERATURE", self.temperature))
        for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
            if getattr(self, name) is not None:
                tensors.append(_number_input(name.upper(), getattr(self, name)))
        if self.seed is not None:
            tensors.append(_number_input("SEED", self.seed, "INT64"))
        return tensors


class SpeechClient:
    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model: str = "specwhisper",
        timeout: float | None = 600.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.url, self.model, self.timeout, self.retries, self.backoff = url, model, timeout, retries, backoff
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SpeechClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transcribe(self, source: Source, sample_rate: int | None = None, **options) -> TranscriptionResult:
        """Transcribe a file path, file bytes or a float32 array (with ``sample_rate``)."""
        inputs = audio_inputs(source, sample_rate) + Options(**options).inputs()
        for attempt in range(self.retries + 1):
            try:
                response = self._client.infer(self.model, inputs, client_timeout=self.timeout)
                break
            except InferenceServerException as error:
                if str(error.status()) not in TRANSIENT or attempt == self.retries:
                    raise TranscriptionError(error.message()) from error
                time.sleep(self.backoff * 2**attempt)
        return TranscriptionResult(
            text=response.as_numpy("TEXT")[0].decode(),
            language=response.as_numpy("DETECTED_LANGUAGE")[0].decode(),
            segments=_segments(response.as_numpy("SEGMENTS_JSON")[0]),
            stats=json.loads(response.as_numpy("STATS_JSON")[0]),
        )

    def stream(self, source: Source, sample_rate: int | None = None, **options) -> Iterator[Segment | StreamEnd]:
        """Segments as the server decodes them (``<model>_stream``), then a :class:`StreamEnd`."""
        inputs = audio_inputs(source, sample_rate) + Options(**options).inputs()
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer(self.model + "_stream", inputs, enable_empty_final_response=False)
            while True:
                result, error = results.get(timeout=self.timeout)
                if error is not None:
                    raise TranscriptionError(error.message())
                stats = json.loads(result.as_numpy("STATS_JSON")[0])
                if stats:  # the final response carries the stats and no segment
                    yield StreamEnd(result.as_numpy("DETECTED_LANGUAGE")[0].decode(), stats)
                    return
                yield from _segments(result.as_numpy("SEGMENTS_JSON")[0])
        finally:
            client.stop_stream()
            client.close()

    def transcribe_many(
        self, sources: Iterable[Source], concurrency: int = 4, **options
    ) -> Iterator[tuple[Source, TranscriptionResult | Exception]]:
        """Transcribe many files at once; yields each source with its result or error, as they finish."""
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = {pool.submit(self.transcribe, source, **options): source for source in sources}
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result()
                except (TranscriptionError, OSError) as error:
                    yield futures[future], error
