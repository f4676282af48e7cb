"""The speculative engine on real weights and real speech: same tokens as plain greedy, always.

Assistants here are cut from base's own layers (the trained draft has its own tests): an untrained
2-layer cut that rarely agrees, a full model with its own encoder, and base's own decoder graphs,
which always agree. Correctness must hold whatever the draft proposes.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from specwhisper_backend import audio as audio_input
from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.errors import OptionError
from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.scheduler import Scheduler, SchedulerOptions
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber, Transcription
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_training.asterisk import long_form
from tests.collect import Collect
from tests.exports import decoder_only_cut
from tests.support import clips

pytestmark = pytest.mark.slow

# The cost-aware cap follows measured step times, which vary with machine load, and rightly keeps
# the test drafts (untrained cuts with a full-vocabulary head, as dear as the main model) from
# drafting at all; tests of what drafts do keep it out of the way.
NEVER_FALL_BACK = DraftPolicy(cost_aware=False)


@pytest.fixture(scope="module")
def decoder_only(base_export) -> Transcriber:
    return Transcriber(ExportedModel(base_export, intra_op_threads=2), NEVER_FALL_BACK)


@pytest.fixture(scope="module")
def device_cache(base_export) -> Transcriber:
    """The GPU path's KV caches (device buffers through IO binding), on ONNX Runtime's CPU device."""
    return Transcriber(ExportedModel(base_export, intra_op_threads=2, cache_device="cpu-bound"), NEVER_FALL_BACK)


@pytest.fixture(scope="module")
def full_assistant(base_export_full_assistant) -> Transcriber:
    return Transcriber(ExportedModel(base_export_full_assistant, intra_op_threads=2), NEVER_FALL_BACK)


@pytest.fixture(scope="module")
def trained(trained_draft) -> Transcriber:
    exported = ExportedModel(export_artefacts(ExportRequest("base", trained_draft)), intra_op_threads=2)
    return Transcriber(exported, draft_policy=NEVER_FALL_BACK)


@pytest.fixture(scope="module")
def agreeing(agreeing_export) -> Transcriber:
    # This draft costs as much as the main model, so the engine would rightly stop drafting; it
    # reads all encoder frames, as the main decoder does, so that it is the main decoder exactly.
    policy = DraftPolicy(cost_aware=False, frames_after_audio=1500)
    return Transcriber(ExportedModel(agreeing_export, intra_op_threads=2), draft_policy=policy)


def _tokens(result: Transcription) -> list[tuple[int, ...]]:
    return [segment.tokens for segment in result.segments]


# Plain decodes by (main graph files, KV cache placement, audio, options): see _plain.
_PLAIN: dict[tuple, Transcription] = {}


def _plain(engine: Transcriber, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
    """Plain decoding runs the main graphs alone, and the engines here share base's: each export links
    the files of one (test_export_base). So one plain decode of an audio with given options serves
    every engine whose main graphs are those very files, read the same way."""
    model, main = engine.model, engine.model.facts.main
    graphs = [(model.directory / name).stat() for name in (main.encoder_file, main.decoder_file)]
    key = (
        tuple((stat.st_dev, stat.st_ino) for stat in graphs),
        model.cache_device,
        hashlib.sha256(audio.tobytes()).hexdigest(),
        repr(options),
    )
    if key not in _PLAIN:
        _PLAIN[key] = engine.transcribe(audio, options)
    return _PLAIN[key]


def _both(engine: Transcriber, audio: np.ndarray, **options) -> tuple[Transcription, Transcription]:
    """Plain and speculative decoding at temperature 0, every other option at its default (the
    silence check included): the same tokens. Above 0 each samples, from the same distribution but
    not the same draws (test_a_window_that_falls_back_passes_its_thresholds_both_ways)."""
    options = {"temperatures": (0.0,), **options}
    plain = _plain(engine, audio, TranscribeOptions(speculative=False, **options))
    fast = engine.transcribe(audio, TranscribeOptions(speculative=True, **options))
    assert _tokens(fast) == _tokens(plain), f"speculative output differs from plain greedy ({options})"
    assert fast.text == plain.text and fast.language == plain.language
    return plain, fast


@pytest.mark.parametrize("language", ["en", "es", "fr"])
@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("engine_name", ["decoder_only", "full_assistant"])
def test_short_form_identity(engine_name, language, timestamps, request):
    engine = request.getfixturevalue(engine_name)
    for _, audio in clips(language, 2):
        plain, fast = _both(engine, audio, language=language, timestamps=timestamps)
        assert plain.text
        assert fast.stats.tokens_drafted > 0


def test_short_form_equals_transformers_generate(decoder_only, english_clips, hf_greedy_base):
    """With transformers' own features and decoding as the reference, on 10 real recordings."""
    mismatches = []
    for prompt, audio in english_clips:
        result = decoder_only.transcribe(audio, TranscribeOptions(language="en", speculative=True))
        ours = [token for segment in result.segments for token in segment.tokens]
        if ours != hf_greedy_base[prompt.name]:
            mismatches.append(prompt.name)
    assert not mismatches, f"differ from transformers generate: {mismatches}"


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize("timestamps", [False, True])
def test_long_form_identity(decoder_only, language, timestamps):
    audio = long_form(language, 65)
    plain, _ = _both(decoder_only, audio, language=language, timestamps=timestamps)
    assert plain.stats.windows >= 3
    if timestamps:
        starts = [segment.start for segment in plain.segments]
        assert starts == sorted(starts) and plain.segments[-1].end <= len(audio) / SAMPLE_RATE + 1
        assert len(plain.segments) > plain.stats.windows, "timestamps should split windows into segments"


def test_device_resident_caches_give_the_same_tokens(decoder_only, device_cache):
    """Caches kept in device buffers and updated by the kv_writer graph decode exactly like NumPy
    caches, with drafts rejected and windows restarted (long-form, timestamps, speculative: drafts
    verified, rolled back and single tokens). The graphs' tests check the same on the toy export,
    row by row and in single-token steps; this is the whole engine on real weights."""
    audio = long_form("es", 32)
    # At temperature 0 alone: the fallback's decodes would repeat the same steps several times over.
    options = TranscribeOptions(language="es", timestamps=True, temperatures=(0.0,))
    on_device = device_cache.transcribe(audio, options)
    assert _tokens(on_device) == _tokens(decoder_only.transcribe(audio, options))
    assert on_device.stats.windows >= 2
    assert on_device.stats.tokens_drafted > on_device.stats.tokens_accepted > 0


@pytest.mark.parametrize("language", ["en", "es", "fr"])
def test_trained_draft_identity_and_acceptance(trained, language):
    """The product's default assistant: identical tokens, and a real share of drafts accepted."""
    for _, audio in clips(language, 3):
        _both(trained, audio, language=language)
    _, fast = _both(trained, long_form(language, 45, skip=60), language=language, timestamps=True)
    print(f"trained draft, {language} long-form: {fast.stats.to_dict()}")
    assert fast.stats.acceptance_rate > 0.3
    assert fast.stats.tokens_per_main_pass > 1.5


def test_draft_reads_only_the_windows_audio(trained):
    """Its cross-attention reads the clip's encoder frames (2 mel frames of 10 ms each) and the
    policy's margin, not all 1500 as the main decoder does."""
    (_, audio), *_ = clips("en", 1)
    trained.transcribe(audio, TranscribeOptions(language="en"))
    audio_frames = -(-(len(audio) // 160) // 2)
    assert trained.model.assistant.encoder_frames == audio_frames + trained.draft_policy.frames_after_audio
    assert trained.model.main.encoder_frames == 1500


def test_int8_draft_is_cheaper_and_changes_nothing_but_acceptance(trained_draft, trained):
    """``--assistant-int8``: the draft decoder's weights shrink about 4x; the output stays the main model's."""
    request = ExportRequest("base", trained_draft, assistant_int8=True)
    int8_dir, fp32_dir = export_artefacts(request), export_artefacts(ExportRequest("base", trained_draft))
    decoder = trained.model.facts.assistant.decoder_file

    def size(directory):
        return sum(p.stat().st_size for p in (directory / decoder).parent.glob("decoder.onnx*"))

    assert size(int8_dir) < size(fp32_dir) / 3
    assert (int8_dir / trained.model.facts.main.decoder_file).samefile(fp32_dir / trained.model.facts.main.decoder_file)
    int8 = Transcriber(ExportedModel(int8_dir, intra_op_threads=2), draft_policy=NEVER_FALL_BACK)
    for language in ("en", "es"):
        accepted = {}
        for name, engine in (("fp32", trained), ("int8", int8)):
            results = [_both(engine, audio, language=language)[1] for _, audio in clips(language, 3)]
            accepted[name] = sum(r.stats.tokens_accepted for r in results) / sum(
                r.stats.tokens_drafted for r in results
            )
            accepted[name + " tokens"] = [_tokens(r) for r in results]
        assert accepted["int8 tokens"] == accepted["fp32 tokens"]
        print(f"{language}: acceptance fp32 {accepted['fp32']:.1%}, int8 {accepted['int8']:.1%}")
        assert accepted["int8"] > accepted["fp32"] - 0.1


def test_always_agreeing_draft_is_accepted(agreeing):
    """A draft that is the main decoder itself: nearly every draft kept, many tokens per main pass."""
    _, agreed = _both(agreeing, long_form("es", 65), language="es", timestamps=True)
    print(f"always-agreeing draft: {agreed.stats.to_dict()}")
    assert agreed.stats.acceptance_rate > 0.95
    assert agreed.stats.tokens_per_main_pass > 3


@pytest.mark.parametrize("language", ["es", "fr"])
def test_translate_identity(full_assistant, language):
    for _, audio in clips(language, 3, min_seconds=3.0):
        plain, _ = _both(full_assistant, audio, language=language, task="translate")
        assert plain.text.isascii(), f"translation should be English: {plain.text!r}"
    _both(full_assistant, long_form(language, 40, skip=40), language=language, task="translate", timestamps=True)


def test_language_detection(decoder_only):
    for language in ("en", "es", "fr"):
        _, audio = clips(language, 1, min_seconds=3.0)[0]
        plain, _ = _both(decoder_only, audio)
        assert plain.language == language


def test_prompts_and_previous_text(decoder_only):
    audio = long_form("en", 50, skip=100)
    _both(decoder_only, audio, language="en", initial_prompt="Asterisk voicemail menu.")
    plain, _ = _both(decoder_only, audio, language="en", condition_on_previous_text=True, timestamps=True)
    assert plain.stats.windows >= 2


def test_encoded_files_decode_like_pcm(decoder_only):
    prompt, _ = clips("en", 1, min_seconds=3.0)[0]
    raw, rate = sf.read(str(prompt.path), dtype="float32")
    reference = decoder_only.transcribe(audio_input.from_pcm(raw, rate, 600), TranscribeOptions(language="en"))
    for fmt in ("WAV", "FLAC", "OGG"):
        buffer = io.BytesIO()
        sf.write(buffer, raw, rate, format=fmt)
        decoded = audio_input.from_bytes(buffer.getvalue(), 600)
        result = decoder_only.transcribe(decoded, TranscribeOptions(language="en"))
        if fmt == "OGG":  # lossy: the words survive, the tokens need not
            assert result.text.lower()[:20] == reference.text.lower()[:20]
        else:
            assert _tokens(result) == _tokens(reference)


def test_bad_options_are_refused_and_engine_stays_usable(decoder_only, tiny_en_export):
    _, audio = clips("en", 1)[0]
    with pytest.raises(OptionError, match="unknown language 'xx'"):
        decoder_only.transcribe(audio, TranscribeOptions(language="xx"))
    with pytest.raises(OptionError, match="unknown task"):
        decoder_only.transcribe(audio, TranscribeOptions(task="summarise"))
    english_only = Transcriber(ExportedModel(tiny_en_export))
    with pytest.raises(OptionError, match="English-only"):
        english_only.transcribe(audio, TranscribeOptions(task="translate", speculative=False))
    with pytest.raises(OptionError, match="needs an assistant"):
        english_only.transcribe(audio, TranscribeOptions(speculative=True))
    assert english_only.transcribe(audio, TranscribeOptions(speculative=False)).text
    assert decoder_only.transcribe(audio, TranscribeOptions(language="en")).text


def test_requests_batched_in_flight_get_their_own_plain_greedy_tokens(trained_draft):
    """Real recordings in three languages, short and long, with and without timestamps, translated
    and with the language detected, speculative or not, arriving while others decode: each request's
    tokens are those of its own plain greedy decoding, alone."""
    exported = ExportedModel(export_artefacts(ExportRequest("base", trained_draft, assistant_int8=True)), 2)
    engine = Transcriber(exported)
    requests = []
    for language in ("en", "es", "fr"):
        fallback = {} if language == "es" else {"temperatures": (0.0,)}
        (_, short), (_, other) = clips(language, 2, min_seconds=3.0)
        requests += [
            (short, TranscribeOptions(language=language)),
            (other, TranscribeOptions(timestamps=True, speculative=language != "fr")),  # detected
            # Only the Spanish one with the fallback (its windows decoded again while others go on):
            # the others' repetitive windows would repeat their steps several times over.
            (long_form(language, 35, skip=40), TranscribeOptions(language=language, timestamps=True, **fallback)),
        ]
    requests.append((clips("es", 1, min_seconds=4.0)[0][1], TranscribeOptions(language="es", task="translate")))
    expected = [engine.transcribe(audio, replace(options, speculative=False)) for audio, options in requests]

    scheduler = Scheduler(engine, SchedulerOptions(max_rows=4))
    listeners = [Collect() for _ in requests]
    for index, ((audio, options), listener) in enumerate(zip(requests, listeners, strict=True)):
        scheduler.submit(audio, options, listener)
        if index % 3 == 2:
            time.sleep(1.0)  # later requests join a batch that is running
    assert all(listener.done.wait(600) for listener in listeners)
    scheduler.stop()
    for (_, options), listener, alone in zip(requests, listeners, expected, strict=True):
        assert listener.error is None, listener.error
        assert _tokens(listener.result) == _tokens(alone), options
        assert listener.result.language == alone.language
    assert scheduler.counters.rows / scheduler.counters.steps > 1.5
    assert sum(listener.result.stats.tokens_accepted for listener in listeners) > 0


def test_drafts_routed_by_language_draft_for_their_own_languages(trained_draft):
    """An export whose Spanish and French rows draft with the trained draft and the others with an
    untrained cut: in one batch, each row drafts with the draft of its language (given or detected),
    and every request gets the tokens of its own plain greedy decoding."""
    request = ExportRequest("base", decoder_only_cut(), routes=((("es", "fr"), trained_draft),))
    exported = ExportedModel(export_artefacts(request), intra_op_threads=2)
    assert exported.facts.routes[0].languages == ("es", "fr") and len(exported.routes) == 1
    engine = Transcriber(exported, NEVER_FALL_BACK)
    passes = {"cut": 0, "trained": 0}
    for name, session in (("cut", exported.assistant), ("trained", exported.routes[0])):
        forward = session.forward

        def counted(*args, name=name, forward=forward, **kwargs):
            passes[name] += 1
            return forward(*args, **kwargs)

        session.forward = counted
    (_, english), (_, spanish), (_, french) = (clips(code, 1, min_seconds=3.0)[0] for code in ("en", "es", "fr"))
    requests = [
        (english, TranscribeOptions(language="en", temperatures=(0.0,))),
        (spanish, TranscribeOptions(language="es", temperatures=(0.0,))),
        (french, TranscribeOptions(timestamps=True, temperatures=(0.0,))),  # detected
    ]
    expected = [engine.transcribe(audio, replace(options, speculative=False)) for audio, options in requests]
    assert passes == {"cut": 0, "trained": 0}
    engine.transcribe(english, requests[0][1])
    assert passes["cut"] > 0 and passes["trained"] == 0
    engine.transcribe(spanish, requests[1][1])
    assert passes["trained"] > 0
    scheduler = Scheduler(engine, SchedulerOptions(max_rows=3))
    listeners = [Collect() for _ in requests]
    for (audio, options), listener in zip(requests, listeners, strict=True):
        scheduler.submit(audio, options, listener)
    assert all(listener.done.wait(600) for listener in listeners)
    scheduler.stop()
    for (_, options), listener, alone in zip(requests, listeners, expected, strict=True):
        assert listener.error is None, listener.error
        assert _tokens(listener.result) == _tokens(alone), options
    assert listeners[2].result.language == "fr" and listeners[2].result.stats.tokens_accepted > 0


@pytest.mark.parametrize(("language", "timestamps"), [("es", False), ("en", True)])
def test_a_window_that_falls_back_passes_its_thresholds_both_ways(decoder_only, language, timestamps):
    """Concatenated Asterisk prompts repeat themselves: windows whose greedy text is too repetitive
    (or too unlikely) are decoded again at higher temperatures; each keeps a decode that passes the
    thresholds, or the last temperature's. Sampling is seeded per text position, so the speculative
    transcript, fallbacks included, is the plain one token for token, whether a token was drafted or
    copied from the attempt before."""
    audio = long_form(language, 40)  # the first window falls back, in both languages
    options = {"language": language, "timestamps": timestamps}
    results = [decoder_only.transcribe(audio, TranscribeOptions(speculative=s, **options)) for s in (False, True)]
    assert _tokens(results[1]) == _tokens(results[0])
    assert results[1].stats.tokens_accepted > 0
    assert results[1].stats.copies_accepted > 0  # an attempt copied from the one before it
    for result in results:
        assert result.stats.fallback_decodes > 0
        assert len(result.stats.temperatures) == result.stats.windows
        for segment in result.segments:
            if 0 < segment.temperature < 1.0:  # kept because it passed
                assert segment.avg_logprob >= -1.0 and segment.compression_ratio <= 2.4
    if not timestamps:  # windows of 30 s whatever they say: those kept at 0 are greedy's
        greedy = decoder_only.transcribe(audio, TranscribeOptions(temperatures=(0.0,), **options))
        for result in results:
            assert {s.tokens for s in result.segments if s.temperature == 0} <= {s.tokens for s in greedy.segments}
