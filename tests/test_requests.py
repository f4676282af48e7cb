"""Requests in, responses out, without a server: every refusal ``parse_request`` makes, the output
formats, and a fuzz of the whole path from request tensors to a transcript."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.errors import RequestError
from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.transcriber import Transcriber
from specwhisper_backend.triton_io import parse_request
from specwhisper_client.client import Segment, TranscriptionResult, Word
from specwhisper_client.formats import render

MAX_SECONDS = 60.0
RATE = np.array([SAMPLE_RATE], np.int32)


def _wav(audio: np.ndarray, rate: int = SAMPLE_RATE, fmt: str = "WAV") -> np.ndarray:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


TONE = (0.1 * np.sin(np.arange(SAMPLE_RATE) / 10)).astype(np.float32)
REFUSALS = [
    ("neither audio input", {}, None, "exactly one of AUDIO"),
    ("both audio inputs", {"AUDIO": TONE, "SAMPLE_RATE": RATE, "AUDIO_BYTES": _wav(TONE)}, None, "exactly one of"),
    ("PCM without its rate", {"AUDIO": TONE}, None, "AUDIO needs SAMPLE_RATE"),
    ("PCM of two dimensions", {"AUDIO": TONE.reshape(2, -1), "SAMPLE_RATE": RATE}, None, "1-D mono"),
    ("integer PCM", {"AUDIO": (TONE * 1000).astype(np.int16), "SAMPLE_RATE": RATE}, None, "dtype int16"),
    ("a rate out of range", {"AUDIO": TONE, "SAMPLE_RATE": np.array([7], np.int32)}, None, "sample rate"),
    ("two rates", {"AUDIO": TONE, "SAMPLE_RATE": np.array([8000, 16000], np.int32)}, None, "one value"),
    ("empty PCM", {"AUDIO": np.zeros(0, np.float32), "SAMPLE_RATE": RATE}, None, "empty"),
    ("NaN", {"AUDIO": np.full(100, np.nan, np.float32), "SAMPLE_RATE": RATE}, None, "100 NaN"),
    ("silence", {"AUDIO": np.zeros(SAMPLE_RATE, np.float32), "SAMPLE_RATE": RATE}, None, "silent"),
    (
        "too long",
        {"AUDIO": np.full(int(SAMPLE_RATE * (MAX_SECONDS + 1)), 0.1, np.float32), "SAMPLE_RATE": RATE},
        None,
        "over the maximum of 60 s",
    ),
    ("a file too long", {"AUDIO_BYTES": _wav(np.full(8000 * 61, 0.1, np.float32), 8000)}, None, "over the maximum"),
    ("an empty file", {"AUDIO_BYTES": np.zeros(0, np.uint8)}, None, "0 bytes"),
    ("file bytes as int8", {"AUDIO_BYTES": _wav(TONE).astype(np.int8)}, None, "uint8 vector"),
    ("not a sound file", {"AUDIO_BYTES": np.frombuffer(b"RIFF" + bytes(400), np.uint8)}, None, "cannot decode"),
    ("unknown parameters", {"AUDIO": TONE, "SAMPLE_RATE": RATE}, {"beam_size": 5}, "unknown request parameter"),
    (
        "language not UTF-8",
        {"AUDIO": TONE, "SAMPLE_RATE": RATE, "LANGUAGE": np.array([b"\xff\xfe"], object)},
        None,
        "LANGUAGE is not UTF-8",
    ),
]


@pytest.mark.parametrize(("inputs", "parameters", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_every_refusal_names_the_problem(inputs, parameters, message):
    with pytest.raises(RequestError, match=message):
        parse_request(inputs, MAX_SECONDS, json.dumps(parameters) if parameters else None)


def test_options_are_read_from_their_inputs():
    inputs = {
        "AUDIO_BYTES": _wav(TONE, 8000, "FLAC"),
        "LANGUAGE": np.array([b" ES "], object),
        "TASK": np.array([b"translate"], object),
        "TIMESTAMPS": np.array([True]),
        "SPECULATIVE": np.array([False]),
        "INITIAL_PROMPT": np.array(["Señor".encode()], object),
    }
    audio, options = parse_request(inputs, MAX_SECONDS)
    assert audio.dtype == np.float32 and abs(len(audio) - 2 * SAMPLE_RATE) <= 2
    assert (options.language, options.task, options.timestamps, options.speculative) == ("es", "translate", True, False)
    assert options.initial_prompt == "Señor"
    _, detected = parse_request({"AUDIO": TONE, "SAMPLE_RATE": RATE, "LANGUAGE": np.array([b"auto"], object)}, 60)
    assert detected.language is None and detected.speculative and not detected.timestamps


RESULT = TranscriptionResult(
    text="Hello there. Goodbye.",
    language="en",
    segments=[Segment(0.0, 1.5, " Hello there.", (1, 2)), Segment(61.25, 3725.004, " Goodbye.", (3,))],
    stats={"tokens_out": 3},
)


def test_subtitles_number_and_time_each_segment():
    assert render(RESULT, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:01:01,250 --> 01:02:05,004\nGoodbye.\n"
    )
    assert render(RESULT, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n00:01:01.250 --> 01:02:05.004\nGoodbye.\n"
    )
    assert render(RESULT, "txt") == "Hello there. Goodbye.\n"


def test_json_keeps_everything():
    data = json.loads(render(RESULT, "json"))
    assert data["text"] == RESULT.text and data["language"] == "en" and data["stats"] == {"tokens_out": 3}
    assert data["segments"][1] == {
        "start": 61.25,
        "end": 3725.004,
        "text": " Goodbye.",
        "tokens": [3],
        "words": [],
        "temperature": 0.0,
        "avg_logprob": 0.0,
        "compression_ratio": 0.0,
        "no_speech_prob": None,
    }


def test_word_level_subtitles_have_a_cue_per_word():
    words = (Word(" Hello", 0.0, 0.5, 0.9), Word(" there.", 0.5, 1.5, 0.8))
    result = TranscriptionResult("Hello there.", "en", [Segment(0.0, 1.5, " Hello there.", (1, 2), words)])
    assert render(result, "vtt", words=True) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:00.500\nHello\n\n00:00:00.500 --> 00:00:01.500\nthere.\n"
    )
    assert render(result, "srt", words=True).count(" --> ") == 2
    with pytest.raises(ValueError, match="word timestamps"):
        render(RESULT, "srt", words=True)


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown format 'doc'"):
        render(RESULT, "doc")


@pytest.fixture(scope="module")
def toy_engine(toy_export):
    return Transcriber(ExportedModel(toy_export, intra_op_threads=1), DraftPolicy(cost_aware=False))


pcm = st.builds(
    lambda length, scale, rate, special: {
        "AUDIO": np.concatenate(
            [np.random.default_rng(length).uniform(-scale, scale, length), np.asarray(special)]
        ).astype(np.float32),
        "SAMPLE_RATE": np.array([rate], np.int32),
    },
    st.integers(0, 3000),
    st.sampled_from([0.0, 1e-5, 0.5, 1.0, 1e6]),
    st.sampled_from([1, 1000, 8000, 16000, 44100, 384000, 384001]),
    st.lists(st.sampled_from([0.0, np.nan, np.inf, -1.0]), max_size=2),
)
file_bytes = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda length, rate, cut: _wav(np.full(length, 0.2, np.float32), rate)[:cut],
        st.integers(0, 2000),
        st.sampled_from([8000, 16000, 48000]),
        st.integers(0, 5000),
    ),
).map(lambda data: {"AUDIO_BYTES": np.frombuffer(bytes(data), np.uint8)})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=st.one_of(pcm, file_bytes), speculative=st.booleans())
def test_any_audio_ends_in_a_transcript_or_a_request_error(toy_engine, inputs, speculative):
    inputs = {**inputs, "SPECULATIVE": np.array([speculative])}
    try:
        audio, options = parse_request(inputs, MAX_SECONDS)
        result = toy_engine.transcribe(audio, options)
    except RequestError:
        return
    assert result.language in ("en", "es", "fr") and result.stats.windows >= 1
