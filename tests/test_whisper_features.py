"""Whisper's everyday features without real weights: the temperature fallback, silence, word timing
and voice activity detection, on the toy export, hand-made inputs and Debian's real speech."""

from __future__ import annotations

import numpy as np
import pytest

from specwhisper_backend.decoding import WindowResult
from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber, compression_ratio
from specwhisper_backend.vad import VAD_FILE, SileroVad, SpeechMap, VadOptions, speech_runs
from specwhisper_backend.word_timing import dtw, median_filter
from specwhisper_training import asterisk
from tests.toy_model import toy_speech

NO_FALLBACK = {"temperatures": (0.0,)}


@pytest.fixture(scope="module")
def toy(toy_export) -> Transcriber:
    return Transcriber(ExportedModel(toy_export, intra_op_threads=1), DraftPolicy(cost_aware=False))


def _tokens(result) -> list[tuple[int, ...]]:
    return [segment.tokens for segment in result.segments]


def test_the_toy_falls_back_to_sampling_reproducibly(toy):
    """The toy's random text is unlikely (average log-probability below -1), so every window is
    decoded again at each temperature of the schedule; sampling is seeded per request."""
    audio = toy_speech(8)
    fallback = toy.transcribe(audio, TranscribeOptions(language="en", speculative=False))
    assert fallback.stats.temperatures == [1.0] and fallback.stats.fallback_decodes == 5
    again = toy.transcribe(audio, TranscribeOptions(language="en", speculative=False))
    assert _tokens(again) == _tokens(fallback), "the same seed samples the same tokens"
    other = toy.transcribe(audio, TranscribeOptions(language="en", speculative=False, seed=7))
    assert _tokens(other) != _tokens(fallback)
    greedy = toy.transcribe(audio, TranscribeOptions(language="en", speculative=False, **NO_FALLBACK))
    assert greedy.stats.temperatures == [0.0] and greedy.stats.fallback_decodes == 0
    off = toy.transcribe(
        audio, TranscribeOptions(language="en", logprob_threshold=None, compression_ratio_threshold=None)
    )
    assert off.stats.temperatures == [0.0] and _tokens(off) == _tokens(greedy)
    drafted = toy.transcribe(audio, TranscribeOptions(language="en"))
    assert drafted.stats.temperatures == [1.0] and drafted.stats.tokens_drafted > 0, "sampled drafts are verified too"


def test_at_temperature_zero_speculative_and_plain_agree(toy):
    for seconds, options in ((8, {}), (65, {"timestamps": True})):
        plain = toy.transcribe(toy_speech(seconds), TranscribeOptions(speculative=False, **NO_FALLBACK, **options))
        fast = toy.transcribe(toy_speech(seconds), TranscribeOptions(**NO_FALLBACK, **options))
        assert _tokens(fast) == _tokens(plain) and fast.stats.tokens_accepted > 0


def _finish(toy, tokens, no_speech_prob, sum_logprob, **options):
    stats = DecodeStats()
    request = toy.start(toy_speech(40), TranscribeOptions(language="en", **options), stats)
    toy.encode([request])  # the window is encoded, so that it could be decoded again
    result = WindowResult(tokens, "en", sum_logprob=sum_logprob, no_speech_prob=no_speech_prob)
    return request, request.finish(result), stats


def test_a_silent_window_is_skipped_as_openai_whisper_skips_it(toy):
    words = [5, 6, 7, 8]  # four text tokens: average log-probability = sum / 5
    request, segments, stats = _finish(toy, words, no_speech_prob=0.9, sum_logprob=-10.0)
    assert segments == [] and stats.windows_skipped == 1 and request.seek == 3000
    _, segments, stats = _finish(toy, words, no_speech_prob=0.9, sum_logprob=-1.0)
    assert segments and stats.windows_skipped == 0, "likely text is kept despite <|nospeech|>"
    _, segments, stats = _finish(toy, words, no_speech_prob=0.3, sum_logprob=-10.0, **NO_FALLBACK)
    assert segments and stats.windows_skipped == 0
    _, segments, _ = _finish(toy, words, 0.9, -10.0, no_speech_threshold=None, **NO_FALLBACK)
    assert segments, "no threshold: nothing is skipped"


def test_fallback_rules_follow_openai_whisper(toy):
    loop = [5, 6] * 40  # highly compressible: a repetition loop
    request, segments, stats = _finish(toy, loop, no_speech_prob=0.0, sum_logprob=0.0)
    assert compression_ratio(toy.text.decode(loop)) > 2.4
    assert request.retrying and segments == [] and stats.fallback_decodes == 1
    request, _, stats = _finish(toy, [5, 6, 7], no_speech_prob=0.9, sum_logprob=-20.0)
    assert not request.retrying, "silence does not fall back: it is skipped"
    request, _, _ = _finish(toy, [5, 6, 7], no_speech_prob=0.0, sum_logprob=-20.0)
    assert request.retrying


def test_dtw_finds_the_cheapest_monotonic_path():
    rng = np.random.default_rng(0)
    for rows, cols in ((1, 1), (3, 8), (6, 5), (12, 40)):
        cost = rng.random((rows, cols))
        path_rows, path_cols = dtw(cost)
        assert path_rows[0] == 0 and path_cols[0] == 0 and path_rows[-1] == rows - 1 and path_cols[-1] == cols - 1
        steps = np.stack([np.diff(path_rows), np.diff(path_cols)], axis=1)
        assert all(tuple(step) in ((1, 1), (1, 0), (0, 1)) for step in steps)
        best = np.full((rows + 1, cols + 1), np.inf)
        best[0, 0] = 0
        for i in range(1, rows + 1):
            for j in range(1, cols + 1):
                best[i, j] = cost[i - 1, j - 1] + min(best[i - 1, j - 1], best[i - 1, j], best[i, j - 1])
        assert cost[path_rows, path_cols].sum() == pytest.approx(best[rows, cols])


def test_median_filter_matches_scipy():
    from scipy.ndimage import median_filter as reference

    x = np.random.default_rng(1).random((2, 5, 30))
    np.testing.assert_allclose(median_filter(x, 7), reference(x, size=(1, 1, 7), mode="mirror"))


def test_words_cover_the_text_in_order_within_their_segments(toy):
    result = toy.transcribe(
        toy_speech(45), TranscribeOptions(language="en", timestamps=True, word_timestamps=True, **NO_FALLBACK)
    )
    assert result.segments
    for segment in result.segments:
        assert segment.words, "every segment with text has words"
        assert "".join(w.word for w in segment.words) == segment.text
        starts = [w.start for w in segment.words]
        assert starts == sorted(starts) and all(w.start <= w.end for w in segment.words)
        assert all(0 <= w.probability <= 1 for w in segment.words)
        assert segment.start == segment.words[0].start and segment.end == segment.words[-1].end
    plain = toy.transcribe(
        toy_speech(45),
        TranscribeOptions(language="en", timestamps=True, speculative=False, word_timestamps=True, **NO_FALLBACK),
    )
    assert result.segments == plain.segments, "word timings come from the text, whatever decoded it"


def test_speech_runs_and_their_times():
    probs = np.zeros(200)
    probs[20:50] = 0.9  # 0.64 s .. 1.6 s of speech
    probs[60:70] = 0.9  # after a pause shorter than the minimum silence: the same run
    probs[150:160] = 0.9  # after a long one: another run
    runs = speech_runs(probs, 200 * 512, VadOptions(min_silence_duration_ms=1000, speech_pad_ms=100))
    assert len(runs) == 2
    (a, b), (c, d) = runs
    assert a == 20 * 512 - 1600 and b == 70 * 512 + 1600 and c == 150 * 512 - 1600 and d == 160 * 512 + 1600
    speech = SpeechMap(runs)
    assert speech.original(0.0) == round(a / SAMPLE_RATE, 2)
    after_first = (b - a) / SAMPLE_RATE + 0.5  # half a second into the second run
    assert speech.original(after_first) == pytest.approx(c / SAMPLE_RATE + 0.5, abs=0.01)


def test_silero_finds_the_speech_between_long_silences(toy_export):
    vad = SileroVad(toy_export / VAD_FILE)
    prompt = asterisk.select("en", 1, min_seconds=2.0)[0]
    speech = asterisk.load_audio(prompt.path)
    silence = np.zeros(5 * SAMPLE_RATE, np.float32)
    audio = np.concatenate([silence, speech, silence, speech, silence])
    runs = vad.speech(audio)
    assert len(runs) == 2
    for (start, end), offset in zip(runs, (5, 10 + prompt.seconds), strict=True):
        assert abs(start / SAMPLE_RATE - offset) < 0.6 and abs(end / SAMPLE_RATE - (offset + prompt.seconds)) < 0.6
    assert vad.speech(silence) == []


def test_with_no_speech_the_transcription_is_empty(toy):
    result = toy.transcribe(
        np.full(3 * SAMPLE_RATE, 1e-3, np.float32), TranscribeOptions(language="en", vad_filter=True)
    )
    assert result.segments == [] and result.text == "" and result.stats.windows == 0
