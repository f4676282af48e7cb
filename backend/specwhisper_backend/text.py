"""Token ids <-> text with the tokenizer exported beside the graphs (HF ``tokenizers``, no transformers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from specwhisper_backend.facts import ModelFacts


class WhisperText:
    def __init__(self, tokenizer_file: Path, facts: ModelFacts) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.facts = facts

    def encode(self, text: str) -> list[int]:
        """Ids of plain text (no special tokens), e.g. for an initial prompt."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids that are text: special and timestamp tokens are dropped."""
        return self.tokenizer.decode([i for i in ids if i < self.facts.tokens.eot], skip_special_tokens=True)
