"""Exported graphs of real Whisper weights (base, tiny.en) against transformers, on real speech."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_backend.decoding import greedy_decode
from specwhisper_backend.logit_filters import SuppressAtBegin, SuppressTokens
from specwhisper_backend.runtime import ExportedModel
from specwhisper_export.compat import IncompatibleAssistantError
from specwhisper_export.repository import ExportRequest, export_artefacts

pytestmark = pytest.mark.slow

# ONNX Runtime and torch sum in different orders; logits are of order ±60.
LOGIT_ATOL = 2e-3


def _features(processor, audio: list[np.ndarray]) -> np.ndarray:
    return processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="np").input_features


def _prompt(exported: ExportedModel, language: str | None) -> list[int]:
    facts = exported.facts
    if not facts.is_multilingual:
        return [facts.tokens.sot, facts.tokens.no_timestamps]
    return [facts.tokens.sot, facts.languages[language], facts.tokens.transcribe, facts.tokens.no_timestamps]


def _onnx_greedy(exported: ExportedModel, features: np.ndarray, language: str | None) -> list[int]:
    facts = exported.facts
    prompt = _prompt(exported, language)
    filters = [SuppressTokens(facts.suppress_tokens), SuppressAtBegin(facts.begin_suppress_tokens, len(prompt))]
    return greedy_decode(exported.main, exported.encode(features), prompt, filters, facts.tokens.eot, facts.n_text_ctx)


def _hf_greedy(model: WhisperForConditionalGeneration, features: np.ndarray, language: str | None) -> list[int]:
    kwargs = {"language": language, "task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad():
        sequence = model.generate(torch.from_numpy(features), return_timestamps=False, **kwargs)[0].tolist()
    # generate returns the text tokens alone, at most followed by <|endoftext|>.
    eot = model.generation_config.eos_token_id
    return sequence[: sequence.index(eot)] if eot in sequence else sequence


def _teacher_forced_tokens(exported: ExportedModel, model, features: np.ndarray) -> list[int]:
    """A real prefix to score: the prompt followed by the main model's own transcript."""
    return _prompt(exported, "en") + _hf_greedy(model, features, "en")


def test_encoder_matches_torch_on_real_speech(base, base_export, english_clips):
    model, processor = base
    exported = ExportedModel(base_export)
    features = _features(processor, [audio for _, audio in english_clips[:2]])
    ours = exported.encode(features)
    with torch.no_grad():
        reference = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    print(f"encoder max abs diff {np.abs(ours - reference).max():.2e}")
    np.testing.assert_allclose(ours, reference, atol=1e-3)


def test_main_decoder_matches_torch_single_multi_and_ragged_batch(base, base_export, english_clips):
    model, processor = base
    exported = ExportedModel(base_export)
    clips = [audio for _, audio in english_clips[:2]]
    features = _features(processor, clips)
    states = exported.encode(features)
    rows = [_teacher_forced_tokens(exported, model, features[i : i + 1]) for i in range(2)]
    length = min(len(r) for r in rows)
    ids = torch.tensor([r[:length] for r in rows])
    with torch.no_grad():
        reference = model(encoder_outputs=(torch.from_numpy(states),), decoder_input_ids=ids).logits.numpy()

    decoder = exported.main
    decoder.start(states)
    worst = 0.0
    # Ragged multi-token prefill: row 0 takes 4 tokens, row 1 takes 2 (padded to 4).
    logits = decoder.forward(ids[:, :4].numpy(), counts=np.array([4, 2]))
    worst = max(worst, np.abs(logits[0] - reference[0, :4]).max(), np.abs(logits[1, :2] - reference[1, :2]).max())
    # Row 1 catches up with a 3-token step while row 0 takes a single token.
    step = np.zeros((2, 3), dtype=np.int64)
    step[0, 0], step[1] = ids[0, 4], ids[1, 2:5]
    logits = decoder.forward(step, counts=np.array([1, 3]))
    worst = max(worst, np.abs(logits[0, 0] - reference[0, 4]).max(), np.abs(logits[1] - reference[1, 2:5]).max())
    # Then single-token steps to the end, both rows together.
    for position in range(5, length):
        logits = decoder.forward(ids[:, position : position + 1].numpy())
        worst = max(worst, np.abs(logits[:, 0] - reference[:, position]).max())
    print(f"main decoder max abs logit diff {worst:.2e} (logits span ±{np.abs(reference).max():.0f})")
    assert worst < LOGIT_ATOL


def test_decoder_only_assistant_matches_torch(base, base_export, decoder_only_cut, english_clips):
    model, processor = base
    exported = ExportedModel(base_export)
    assert exported.facts.assistant_form == "decoder_only"
    assert exported.assistant_encoder is None
    assistant = WhisperForCausalLM.from_pretrained(decoder_only_cut).eval()
    features = _features(processor, [english_clips[0][1]])
    states = exported.encode(features)
    ids = torch.tensor([_teacher_forced_tokens(exported, model, features)])
    with torch.no_grad():
        reference = assistant(input_ids=ids, encoder_outputs=(torch.from_numpy(states),)).logits.numpy()
    exported.assistant.start(exported.encode_for_assistant(features, states))
    ours = exported.assistant.forward(ids.numpy())
    print(f"decoder-only assistant max abs logit diff {np.abs(ours - reference).max():.2e}")
    np.testing.assert_allclose(ours, reference, atol=LOGIT_ATOL)


def test_full_assistant_with_own_encoder_matches_torch(base, base_export_full_assistant, full_cut, english_clips):
    model, processor = base
    exported = ExportedModel(base_export_full_assistant)
    assert exported.facts.assistant_form == "full"
    assert exported.facts.assistant.layers == 2
    assistant = WhisperForConditionalGeneration.from_pretrained(full_cut).eval()
    features = _features(processor, [english_clips[1][1]])
    ids = torch.tensor([_teacher_forced_tokens(exported, model, features)])
    with torch.no_grad():
        reference = assistant(input_features=torch.from_numpy(features), decoder_input_ids=ids).logits.numpy()
    main_states = exported.encode(features)
    exported.assistant.start(exported.encode_for_assistant(features, main_states))
    ours = exported.assistant.forward(ids.numpy())
    print(f"full assistant max abs logit diff {np.abs(ours - reference).max():.2e}")
    np.testing.assert_allclose(ours, reference, atol=LOGIT_ATOL)


@pytest.mark.parametrize("name", ["base", "tiny.en"])
def test_onnx_greedy_equals_transformers_generate(name, request, english_clips):
    model, processor = request.getfixturevalue("base" if name == "base" else "tiny_en")
    exported = ExportedModel(request.getfixturevalue("base_export" if name == "base" else "tiny_en_export"))
    mismatches = []
    for prompt, audio in english_clips:
        features = _features(processor, [audio])
        ours = _onnx_greedy(exported, features, "en")
        theirs = _hf_greedy(model, features, "en")
        if ours != theirs:
            mismatches.append((prompt.name, ours, theirs))
    assert not mismatches, f"{len(mismatches)} of {len(english_clips)} clips differ: {mismatches[:2]}"


def test_assistant_with_another_vocabulary_is_refused():
    with pytest.raises(IncompatibleAssistantError, match="vocabulary size 51864 != main model's 51865"):
        export_artefacts(ExportRequest(main="base", assistant="tiny.en"))
