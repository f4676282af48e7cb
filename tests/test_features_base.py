"""Whisper's everyday features on real weights and real speech, beside faster-whisper where it has
them: word timestamps, silence between speech, the VAD filter. (specwhisper-features measures the
same things at length: docs/benchmarks.md.)"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_bench.features import compare_words, outside_speech, with_non_speech
from specwhisper_export.presets import ct2_dir
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_training import asterisk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(trained_draft) -> Transcriber:
    export = export_artefacts(ExportRequest("base", trained_draft, assistant_int8=True))
    return Transcriber(ExportedModel(export, intra_op_threads=2))


@pytest.fixture(scope="module")
def faster():
    from faster_whisper import WhisperModel

    return WhisperModel(str(ct2_dir("base")), device="cpu", compute_type="float32", cpu_threads=2)


def test_word_timestamps_agree_with_faster_whispers(engine, faster):
    starts, ends, same = [], [], 0
    prompts = [p for language in ("en", "es") for p in asterisk.select(language, 2, min_seconds=3.0, max_seconds=12.0)]
    for prompt in prompts:
        audio = asterisk.load_audio(prompt.path)
        for speculative in (True, False):
            ours = engine.transcribe(
                audio,
                TranscribeOptions(
                    language=prompt.language, timestamps=True, word_timestamps=True, speculative=speculative
                ),
            )
            assert all(w.start <= w.end for s in ours.segments for w in s.words)
        theirs, _ = faster.transcribe(audio, language=prompt.language, beam_size=1, word_timestamps=True)
        agree, start_diffs, end_diffs = compare_words(ours, list(theirs))
        same += agree
        starts += start_diffs
        ends += end_diffs
    assert same >= len(prompts) // 2, "most transcripts are the same words"
    assert statistics.median(starts) <= 0.1 and statistics.median(ends) <= 0.1


def test_silence_noise_and_a_tone_between_speech(engine):
    """With the VAD filter nothing is written over them; without it, the windows the model judges
    silent are skipped, as openai/whisper skips them."""
    audio, speech = with_non_speech("en")
    filtered = engine.transcribe(audio, TranscribeOptions(language="en", timestamps=True, vad_filter=True))
    assert outside_speech(filtered.segments, speech) == []
    assert filtered.stats.speech_seconds < len(audio) / SAMPLE_RATE / 4
    whole = engine.transcribe(audio, TranscribeOptions(language="en", timestamps=True))
    assert whole.stats.windows_skipped >= 1
    assert len(outside_speech(whole.segments, speech)) <= 1


def test_the_vad_filter_decodes_the_speech_alone_and_maps_it_back(engine):
    prompts = asterisk.select("en", 4, min_seconds=2.0, max_seconds=6.0)
    pause = np.zeros(15 * SAMPLE_RATE, np.float32)
    pieces, spans, at = [], [], 0.0
    for prompt in prompts:
        clip = asterisk.load_audio(prompt.path)
        pieces += [pause, clip]
        at += 15
        spans.append((at, at + len(clip) / SAMPLE_RATE))
        at += len(clip) / SAMPLE_RATE
    audio = np.concatenate(pieces)
    result = engine.transcribe(audio, TranscribeOptions(language="en", timestamps=True, vad_filter=True))
    whole = engine.transcribe(audio, TranscribeOptions(language="en", timestamps=True))
    assert result.stats.windows < whole.stats.windows
    for segment in result.segments:  # every segment lands on the speech it came from
        assert any(start - 1.0 <= segment.start and segment.end <= end + 1.0 for start, end in spans), segment
    words = lambda text: [w.strip(".,?!").lower() for w in text.split()]  # noqa: E731
    assert sum(a != b for a, b in zip(words(result.text), words(whole.text), strict=False)) <= 2
