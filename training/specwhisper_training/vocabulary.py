"""Which vocabulary ids a trimmed draft head covers, and how much of the main model's output they cover."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

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


def prose_lexicon(tokenizer, texts: Sequence[str], min_count: int) -> np.ndarray:
    """Ids that ``texts`` (the corpus's training prose, :func:`specwhisper_training.data.training_prose`)
    use at least ``min_count`` times, tokenised as Whisper writes text (after a space); none for
    ``min_count`` 0. Program messages count as well as fortunes: in the languages that have few
    fortunes (zh, ja, ko) they are most of the prose, and without them the head missed a tenth of
    their held-out text."""
    counts: Counter[int] = Counter()
    if min_count and texts:
        for ids in tokenizer([" " + text for text in texts], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return np.asarray(sorted(i for i, count in counts.items() if count >= min_count), dtype=np.int64)


def text_coverage(tokenizer, texts: Sequence[str], token_ids: np.ndarray) -> float:
    """Share of the ids of ``texts``, tokenised as Whisper writes text, inside ``token_ids``: the head's
    coverage of what was said, apart from how the main model hears synthetic speech of it."""
    ids = [i for row in tokenizer([" " + text for text in texts], add_special_tokens=False)["input_ids"] for i in row]
    return float(np.isin(ids, token_ids).mean()) if ids else float("nan")


def coverage(targets: Sequence[Target], token_ids: np.ndarray) -> float:
    """Share of the main model's output tokens (text, timestamps, end of text) inside ``token_ids``."""
    said = np.concatenate([t.text_tokens for t in targets])
    return float(np.isin(said, token_ids).mean())
