"""The speculative engine on real weights and real speech: same tokens as plain greedy, always.

Assistants here are cut from base's own layers (the trained draft has its own tests): an untrained
2-layer cut that rarely agrees, a full model with its own encoder, and base's whole decoder, which
always agrees. Correctness must hold whatever the draft proposes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from specwhisper_backend import audio as audio_input
from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.errors import AudioError, OptionError
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber, Transcription
from specwhisper_export.asterisk import long_form
from specwhisper_export.repository import ExportRequest, export_artefacts
from tests.support import clips

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def decoder_only(base_export) -> Transcriber:
    return Transcriber(ExportedModel(base_export, intra_op_threads=2))


@pytest.fixture(scope="module")
def device_cache(base_export) -> Transcriber:
    """The GPU path's KV caches (device buffers through IO binding), on ONNX Runtime's CPU device."""
    return Transcriber(ExportedModel(base_export, intra_op_threads=2, cache_device="cpu-bound"))


@pytest.fixture(scope="module")
def full_assistant(base_export_full_assistant) -> Transcriber:
    return Transcriber(ExportedModel(base_export_full_assistant, intra_op_threads=2))


# The fallback judge stops drafting in a window by measured wall time, which varies with machine
# load; tests that assert acceptance keep it out of the way so that what they measure is the draft.
NEVER_FALL_BACK = DraftPolicy(judge_after_rounds=10**9)


@pytest.fixture(scope="module")
def trained(trained_draft) -> Transcriber:
    exported = ExportedModel(export_artefacts(ExportRequest("base", trained_draft)), intra_op_threads=2)
    return Transcriber(exported, draft_policy=NEVER_FALL_BACK)


@pytest.fixture(scope="module")
def agreeing(agreeing_export) -> Transcriber:
    # This draft costs as much as the main model, so the engine would rightly stop drafting; it
    # reads all encoder frames, as the main decoder does, so that it is the main decoder exactly.
    policy = DraftPolicy(judge_after_rounds=10**9, frames_after_audio=1500)
    return Transcriber(ExportedModel(agreeing_export, intra_op_threads=2), draft_policy=policy)


def _tokens(result: Transcription) -> list[tuple[int, ...]]:
    return [segment.tokens for segment in result.segments]


def _both(engine: Transcriber, audio: np.ndarray, **options) -> tuple[Transcription, Transcription]:
    plain = engine.transcribe(audio, TranscribeOptions(speculative=False, **options))
    fast = engine.transcribe(audio, TranscribeOptions(speculative=True, **options))
    assert _tokens(fast) == _tokens(plain), f"speculative output differs from plain greedy ({options})"
    assert fast.text == plain.text and fast.language == plain.language
    return plain, fast


@pytest.mark.parametrize("language", ["en", "es", "fr"])
@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("engine_name", ["decoder_only", "full_assistant"])
def test_short_form_identity(engine_name, language, timestamps, request):
    engine = request.getfixturevalue(engine_name)
    for _, audio in clips(language, 3):
        plain, fast = _both(engine, audio, language=language, timestamps=timestamps)
        assert plain.text
        assert fast.stats.tokens_drafted > 0


def test_short_form_equals_transformers_generate(decoder_only, english_clips, hf_greedy_base):
    """With transformers' own features and decoding as the reference, on 20 real recordings."""
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
    audio = long_form(language, 100)
    plain, _ = _both(decoder_only, audio, language=language, timestamps=timestamps)
    assert plain.stats.windows >= 4
    if timestamps:
        starts = [segment.start for segment in plain.segments]
        assert starts == sorted(starts) and plain.segments[-1].end <= len(audio) / 16_000 + 1
        assert len(plain.segments) > plain.stats.windows, "timestamps should split windows into segments"


@pytest.mark.parametrize("language", ["en", "es"])
def test_device_resident_caches_give_the_same_tokens(decoder_only, device_cache, language):
    """Caches kept in device buffers and updated by the kv_writer graph decode exactly like NumPy
    caches, with drafts rejected and windows restarted (long-form, timestamps)."""
    audio = long_form(language, 65)
    for speculative in (False, True):
        options = TranscribeOptions(language=language, timestamps=True, speculative=speculative)
        on_device = device_cache.transcribe(audio, options)
        assert _tokens(on_device) == _tokens(decoder_only.transcribe(audio, options))
        assert on_device.stats.tokens_drafted > 0 or not speculative


@pytest.mark.parametrize("language", ["en", "es", "fr"])
def test_trained_draft_identity_and_acceptance(trained, language):
    """The product's default assistant: identical tokens, and a real share of drafts accepted."""
    for _, audio in clips(language, 3):
        _both(trained, audio, language=language)
    _, fast = _both(trained, long_form(language, 65, skip=60), language=language, timestamps=True)
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
    _both(full_assistant, long_form(language, 65, skip=40), language=language, task="translate", timestamps=True)


def test_language_detection(decoder_only):
    for language in ("en", "es", "fr"):
        _, audio = clips(language, 1, min_seconds=3.0)[0]
        plain, _ = _both(decoder_only, audio)
        assert plain.language == language


def test_prompts_and_previous_text(decoder_only):
    audio = long_form("en", 70, skip=100)
    _both(decoder_only, audio, language="en", initial_prompt="Asterisk voicemail menu.")
    plain, _ = _both(decoder_only, audio, language="en", condition_on_previous_text=True, timestamps=True)
    assert plain.stats.windows >= 3


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


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: audio_input.from_pcm(np.zeros(0, np.float32), 16_000, 60), "empty"),
        (lambda: audio_input.from_pcm(np.zeros(16_000, np.float32), 16_000, 60), "silent"),
        (lambda: audio_input.from_pcm(np.full(16_000, np.nan, np.float32), 16_000, 60), "NaN"),
        (lambda: audio_input.from_pcm(np.ones(16_000, np.int16), 16_000, 60), "dtype int16"),
        (lambda: audio_input.from_pcm(np.ones((2, 2, 2), np.float32), 16_000, 60), "shape"),
        (lambda: audio_input.from_pcm(np.ones(16_000, np.float32), 7, 60), "sample rate"),
        (lambda: audio_input.from_pcm(np.ones(16_000 * 61, np.float32) * 0.1, 16_000, 60), "maximum of 60 s"),
        (lambda: audio_input.from_bytes(b"", 60), "empty"),
        (lambda: audio_input.from_bytes(b"RIFF\x00\x00garbage" * 10, 60), "cannot decode"),
    ],
)
def test_bad_audio_is_refused_clearly(make, message):
    with pytest.raises(AudioError, match=message):
        make()


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
