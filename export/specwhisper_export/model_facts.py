"""Build the ``model_facts.json`` the backend reads, from a transformers model and its processor."""

from __future__ import annotations

from transformers import GenerationConfig, PreTrainedTokenizerBase, WhisperForConditionalGeneration

from specwhisper_backend.facts import DecoderFacts, ModelFacts, SpecialTokens


def _token_id(tokenizer: PreTrainedTokenizerBase, *candidates: str) -> int | None:
    """The id of the first of ``candidates`` the vocabulary has (names changed across Whisper versions)."""
    vocab = tokenizer.get_vocab()
    for token in candidates:
        if token in vocab:
            return vocab[token]
    return None


def _required(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = _token_id(tokenizer, token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token} token: is this a Whisper tokenizer?")
    return found


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    no_timestamps = _required(tokenizer, "<|notimestamps|>")
    # Timestamp tokens follow <|notimestamps|> in every Whisper vocabulary; newer tokenizers name them.
    timestamp_begin = _token_id(tokenizer, "<|0.00|>") or no_timestamps + 1
    return SpecialTokens(
        sot=_required(tokenizer, "<|startoftranscript|>"),
        eot=_required(tokenizer, "<|endoftext|>"),
        transcribe=_required(tokenizer, "<|transcribe|>"),
        translate=_required(tokenizer, "<|translate|>"),
        no_timestamps=no_timestamps,
        timestamp_begin=timestamp_begin,
        sot_prev=_required(tokenizer, "<|startofprev|>"),
        no_speech=_token_id(tokenizer, "<|nospeech|>", "<|nocaptions|>"),
    )


def languages(generation: GenerationConfig) -> dict[str, int]:
    """``{"en": 50259, ...}`` from the generation config's ``lang_to_id`` (empty for English-only models)."""
    lang_to_id = getattr(generation, "lang_to_id", None) or {}
    if not getattr(generation, "is_multilingual", False):
        return {}
    return {token.strip("<|>"): int(i) for token, i in lang_to_id.items()}


def build_facts(
    model: WhisperForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    main: DecoderFacts,
    assistant: DecoderFacts | None,
    assistant_form: str | None,
) -> ModelFacts:
    cfg, generation = model.config, model.generation_config
    return ModelFacts(
        n_mels=cfg.num_mel_bins,
        n_audio_ctx=cfg.max_source_positions,
        n_text_ctx=cfg.max_target_positions,
        vocab_size=cfg.vocab_size,
        is_multilingual=bool(getattr(generation, "is_multilingual", False)),
        tokens=special_tokens(tokenizer),
        languages=languages(generation),
        suppress_tokens=tuple(int(i) for i in generation.suppress_tokens or ()),
        begin_suppress_tokens=tuple(int(i) for i in generation.begin_suppress_tokens or ()),
        max_initial_timestamp_index=int(getattr(generation, "max_initial_timestamp_index", None) or 50),
        main=main,
        assistant=assistant,
        assistant_form=assistant_form,
        alignment_heads=tuple(
            tuple(int(x) for x in pair) for pair in getattr(generation, "alignment_heads", None) or ()
        ),
    )
