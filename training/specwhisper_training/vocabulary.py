"""Which vocabulary ids a trimmed draft head covers, and how much of the main model's output they cover."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from specwhisper_training import data as draft_data
from specwhisper_training.data import Target


def draft_vocabulary(
    targets: Sequence[Target],
    vocab_size: int,
    first_special: int,
    rank_floor: int,
    teacher_top_k: int = 0,
    lexicon: Sequence[int] = (),
) -> np.ndarray:
    """Sorted ids the head covers: those the main model said (and its ``teacher_top_k`` likeliest
    alternatives at each position), the ``rank_floor`` most frequent merges, ``lexicon``, and every
    special and timestamp id (``first_special`` onwards, end of text included)."""
    said = [t.text_tokens for t in targets] + [t.topk_ids[:, :teacher_top_k].ravel() for t in targets]
    kept = np.union1d(np.arange(min(rank_floor, first_special)), np.arange(first_special, vocab_size))
    return np.unique(np.concatenate([kept, np.asarray(lexicon, dtype=np.int64), *said])).astype(np.int64)


def prose_lexicon(tokenizer, languages: Sequence[str], min_count: int) -> np.ndarray:
    """Ids that Debian's fortune prose in ``languages`` uses at least ``min_count`` times, tokenised
    as Whisper writes text (after a space); none for ``min_count`` 0."""
    counts: Counter[int] = Counter()
    for language in languages if min_count else ():
        if texts := draft_data.fortune_texts(language):
            for ids in tokenizer([" " + text for text in texts], add_special_tokens=False)["input_ids"]:
                counts.update(ids)
    return np.asarray(sorted(i for i, count in counts.items() if count >= min_count), dtype=np.int64)


def coverage(targets: Sequence[Target], token_ids: np.ndarray) -> float:
    """Share of the main model's output tokens (text, timestamps, end of text) inside ``token_ids``."""
    said = np.concatenate([t.text_tokens for t in targets])
    return float(np.isin(said, token_ids).mean())
