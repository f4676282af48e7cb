"""Exported graphs of real Whisper weights (base, tiny.en) against transformers, on real speech."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_backend.decoding import BatchDecoder, Window
from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.facts import KV_WRITER_FILE
from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.logit_filters import SuppressAtBegin, SuppressTokens
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.stats import DecodeStats
from specwhisper_export.cli import parse_route
from specwhisper_export.compat import IncompatibleAssistantError
from specwhisper_export.repository import ExportRequest, export_artefacts
from tests.support import hf_greedy

pytestmark = pytest.mark.slow

# ONNX Runtime and torch sum in different orders; logits are of order ±60.
LOGIT_ATOL = 2e-3


def _features(processor, audio: list[np.ndarray]) -> np.ndarray:
    return processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features


def _prompt(exported: ExportedModel, language: str | None) -> list[int]:
    facts = exported.facts
    if not facts.is_multilingual:
        return [facts.tokens.sot, facts.tokens.no_timestamps]
    return [facts.tokens.sot, facts.languages[language], facts.tokens.transcribe, facts.tokens.no_timestamps]


def _onnx_greedy(exported: ExportedModel, features: np.ndarray, language: str | None) -> list[int]:
    """Plain greedy decoding through the engine's loop, with only the rules transformers applies."""
    facts = exported.facts
    prompt = _prompt(exported, language)
    filters = [SuppressTokens(facts.suppress_tokens), SuppressAtBegin(facts.begin_suppress_tokens, len(prompt))]
    decoder = BatchDecoder(facts, exported.main, None, DraftPolicy(cost_aware=False))
    states = exported.encode(features)
    window = Window(states, states.shape[1], language or "en", lambda _: prompt, lambda _: filters, DecodeStats())
    decoder.join(window, owner=None)
    ((_, result),) = decoder.drain()
    return result.tokens


def _teacher_forced_tokens(exported: ExportedModel, model, processor, audio: np.ndarray) -> list[int]:
    """A real prefix to score: the prompt followed by the main model's own transcript."""
    return _prompt(exported, "en") + hf_greedy(model, processor, audio, "en")


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
    rows = [_teacher_forced_tokens(exported, model, processor, audio) for audio in clips]
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
    audio = english_clips[0][1]
    features = _features(processor, [audio])
    states = exported.encode(features)
    ids = torch.tensor([_teacher_forced_tokens(exported, model, processor, audio)])
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
    audio = english_clips[1][1]
    features = _features(processor, [audio])
    ids = torch.tensor([_teacher_forced_tokens(exported, model, processor, audio)])
    with torch.no_grad():
        reference = assistant(input_features=torch.from_numpy(features), decoder_input_ids=ids).logits.numpy()
    main_states = exported.encode(features)
    exported.assistant.start(exported.encode_for_assistant(features, main_states))
    ours = exported.assistant.forward(ids.numpy())
    print(f"full assistant max abs logit diff {np.abs(ours - reference).max():.2e}")
    np.testing.assert_allclose(ours, reference, atol=LOGIT_ATOL)


def test_onnx_greedy_equals_transformers_generate_base(base, base_export, english_clips, hf_greedy_base):
    _, processor = base
    exported = ExportedModel(base_export)
    mismatches = []
    for prompt, audio in english_clips:
        ours = _onnx_greedy(exported, _features(processor, [audio]), "en")
        if ours != hf_greedy_base[prompt.name]:
            mismatches.append((prompt.name, ours, hf_greedy_base[prompt.name]))
    assert not mismatches, f"{len(mismatches)} of {len(english_clips)} clips differ: {mismatches[:2]}"


def test_onnx_greedy_equals_transformers_generate_tiny_en(tiny_en, tiny_en_export, english_clips):
    model, processor = tiny_en
    exported = ExportedModel(tiny_en_export)
    mismatches = []
    for prompt, audio in english_clips:
        ours = _onnx_greedy(exported, _features(processor, [audio]), None)
        theirs = hf_greedy(model, processor, audio, None)
        if ours != theirs:
            mismatches.append((prompt.name, ours, theirs))
    assert not mismatches, f"{len(mismatches)} of {len(english_clips)} clips differ: {mismatches[:2]}"


def test_an_assistants_export_links_the_main_models_own_graphs(base_export):
    alone = export_artefacts(ExportRequest(main="base"))
    shared = [*sorted((alone / "main").iterdir()), alone / KV_WRITER_FILE]
    assert len(shared) == 9  # encoder, decoder, cross-attention KV and alignment graphs, weights, KV writer
    for path in shared:
        assert (base_export / path.relative_to(alone)).samefile(path)


def test_assistant_with_another_vocabulary_is_refused():
    with pytest.raises(IncompatibleAssistantError, match="vocabulary size 51864 != main model's 51865"):
        export_artefacts(ExportRequest(main="base", assistant="tiny.en"))


@pytest.mark.parametrize(
    ("request_options", "message"),
    [
        ({"assistant_int8": True}, "int8 assistant needs an assistant"),
        ({"precision": "fp8"}, "precision must be"),
        ({"routes": ((("it",), "draft"),)}, "need an assistant"),
        ({"assistant": "draft", "routes": (((), "draft"),)}, "at least one language"),
    ],
)
def test_impossible_export_requests_are_refused(request_options, message):
    with pytest.raises(ValueError, match=message):
        ExportRequest(main="base", **request_options)


def test_routes_are_read_as_languages_and_a_draft():
    assert parse_route("it, ru=./drafts/itru") == (("it", "ru"), "./drafts/itru")
    for wrong in ("it,ru", "=draft", "it="):
        with pytest.raises(argparse.ArgumentTypeError, match="LANGUAGES=DRAFT"):
            parse_route(wrong)
