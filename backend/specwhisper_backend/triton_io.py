"""Triton request tensors <-> engine calls, without Triton: what ``model.py`` delegates to.

Every problem with a request becomes a :class:`RequestError` whose message names the input at
fault, so the client sees a clear error and the model instance goes on serving.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict

import numpy as np

from specwhisper_backend import audio
from specwhisper_backend.errors import RequestError
from specwhisper_backend.transcriber import Segment, TranscribeOptions, Transcription

INPUT_NAMES = (
    "AUDIO",
    "SAMPLE_RATE",
    "AUDIO_BYTES",
    "LANGUAGE",
    "TASK",
    "TIMESTAMPS",
    "SPECULATIVE",
    "INITIAL_PROMPT",
    "CONDITION_ON_PREVIOUS_TEXT",
    "TEMPERATURE",
    "COMPRESSION_RATIO_THRESHOLD",
    "LOGPROB_THRESHOLD",
    "NO_SPEECH_THRESHOLD",
    "SEED",
    "WORD_TIMESTAMPS",
    "VAD_FILTER",
)
# Languages given as these mean "detect it".
AUTO_LANGUAGE = ("", "auto")


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str) -> object | None:
    value = inputs.get(name)
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input {name} must hold one value, got shape {np.asarray(value).shape}")
    return flat[0]


def _text(inputs: Mapping[str, np.ndarray | None], name: str) -> str | None:
    value = _scalar(inputs, name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(f"input {name} is not UTF-8 text") from error
    return str(value)


def _flag(inputs: Mapping[str, np.ndarray | None], name: str, default: bool) -> bool:
    value = _scalar(inputs, name)
    return default if value is None else bool(value)


def _threshold(inputs: Mapping[str, np.ndarray | None], name: str, default: float | None) -> float | None:
    """A float input; NaN turns the threshold off."""
    value = _scalar(inputs, name)
    if value is None:
        return default
    number = float(value)
    if np.isinf(number):
        raise RequestError(f"input {name} must be a finite number (NaN turns it off), got {number}")
    return None if np.isnan(number) else number


def _temperatures(inputs: Mapping[str, np.ndarray | None]) -> tuple[float, ...] | None:
    value = inputs.get("TEMPERATURE")
    if value is None:
        return None
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise RequestError(f"input TEMPERATURE must hold one or more finite temperatures, got {values.tolist()}")
    return tuple(float(v) for v in values)


def parse_request(
    inputs: Mapping[str, np.ndarray | None], max_audio_seconds: float, parameters: str | None = None
) -> tuple[np.ndarray, TranscribeOptions]:
    """The 16 kHz audio and the options of one request.

    ``inputs`` maps input names to the tensors sent (``None`` for those left out); ``parameters``
    is the request's JSON parameters, which this model does not take.
    """
    if parameters and json.loads(parameters):
        unknown = ", ".join(sorted(json.loads(parameters)))
        raise RequestError(f"unknown request parameter(s): {unknown}; options are inputs: {', '.join(INPUT_NAMES[3:])}")
    has_pcm, has_bytes = inputs.get("AUDIO") is not None, inputs.get("AUDIO_BYTES") is not None
    if has_pcm == has_bytes:
        raise RequestError("send exactly one of AUDIO (float32 PCM, with SAMPLE_RATE) and AUDIO_BYTES (a file)")
    if has_pcm:
        rate = _scalar(inputs, "SAMPLE_RATE")
        if rate is None:
            raise RequestError("AUDIO needs SAMPLE_RATE (Hz)")
        samples = np.asarray(inputs["AUDIO"])
        if samples.ndim != 1:
            raise RequestError(f"AUDIO must be 1-D mono samples, got shape {samples.shape}")
        pcm = audio.from_pcm(samples, int(rate), max_audio_seconds)
    else:
        data = np.asarray(inputs["AUDIO_BYTES"])
        if data.dtype != np.uint8 or data.ndim != 1:
            raise RequestError(f"AUDIO_BYTES must be a 1-D uint8 vector of file bytes, got {data.dtype} {data.shape}")
        pcm = audio.from_bytes(data.tobytes(), max_audio_seconds)
    language = _text(inputs, "LANGUAGE")
    defaults = TranscribeOptions()
    seed = _scalar(inputs, "SEED")
    options = TranscribeOptions(
        language=None if language is None or language.strip().lower() in AUTO_LANGUAGE else language.strip().lower(),
        task=_text(inputs, "TASK") or "transcribe",
        timestamps=_flag(inputs, "TIMESTAMPS", False),
        speculative=_flag(inputs, "SPECULATIVE", True),
        initial_prompt=_text(inputs, "INITIAL_PROMPT") or None,
        condition_on_previous_text=_flag(inputs, "CONDITION_ON_PREVIOUS_TEXT", defaults.condition_on_previous_text),
        temperatures=_temperatures(inputs) or defaults.temperatures,
        compression_ratio_threshold=_threshold(
            inputs, "COMPRESSION_RATIO_THRESHOLD", defaults.compression_ratio_threshold
        ),
        logprob_threshold=_threshold(inputs, "LOGPROB_THRESHOLD", defaults.logprob_threshold),
        no_speech_threshold=_threshold(inputs, "NO_SPEECH_THRESHOLD", defaults.no_speech_threshold),
        seed=defaults.seed if seed is None else int(seed),
        word_timestamps=_flag(inputs, "WORD_TIMESTAMPS", defaults.word_timestamps),
        vad_filter=_flag(inputs, "VAD_FILTER", defaults.vad_filter),
    )
    return pcm, options


def segment_json(segments: list[Segment]) -> str:
    return json.dumps(
        [{k: v for k, v in asdict(s).items() if k != "tokens"} | {"tokens": list(s.tokens)} for s in segments]
    )


def outputs(text: str, language: str, segments: list[Segment], stats: dict) -> dict[str, np.ndarray]:
    """The output tensors of a response: a whole transcription, one streamed segment (empty stats),
    or the end of a stream (no text or segments, the request's stats)."""
    return {
        "TEXT": np.array([text.encode()], dtype=object),
        "DETECTED_LANGUAGE": np.array([language.encode()], dtype=object),
        "SEGMENTS_JSON": np.array([segment_json(segments).encode()], dtype=object),
        "STATS_JSON": np.array([json.dumps(stats).encode()], dtype=object),
    }


def transcription_outputs(result: Transcription) -> dict[str, np.ndarray]:
    return outputs(result.text, result.language, result.segments, result.stats.to_dict())
