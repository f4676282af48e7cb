"""Refuse an assistant that cannot propose tokens the main model would read the same way."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from specwhisper_export.model_facts import special_tokens


class IncompatibleAssistantError(ValueError):
    """The assistant's vocabulary or special tokens differ from the main model's."""


def check_assistant(
    main_tokenizer: PreTrainedTokenizerBase,
    main_vocab_size: int,
    assistant_tokenizer: PreTrainedTokenizerBase,
    assistant_vocab_size: int,
    assistant_name: str,
) -> None:
    """Speculative decoding compares token ids, so both models must mean the same thing by every id."""
    problems: list[str] = []
    if main_vocab_size != assistant_vocab_size:
        problems.append(f"vocabulary size {assistant_vocab_size} != main model's {main_vocab_size}")
    main_special, assistant_special = special_tokens(main_tokenizer), special_tokens(assistant_tokenizer)
    if main_special != assistant_special:
        problems.append(f"special tokens {assistant_special} != main model's {main_special}")
    if not problems:
        main_vocab, assistant_vocab = main_tokenizer.get_vocab(), assistant_tokenizer.get_vocab()
        differing = sum(1 for token, i in main_vocab.items() if assistant_vocab.get(token) != i)
        if differing:
            problems.append(f"{differing} tokens map to other ids than in the main model's vocabulary")
    if problems:
        raise IncompatibleAssistantError(
            f"assistant {assistant_name!r} cannot draft for this main model: "
            + "; ".join(problems)
            + ". Use an assistant trained on the main model's tokenizer (e.g. a multilingual model for a"
            " multilingual main model)."
        )
