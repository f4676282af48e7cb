"""Copy drafts: what followed the text's last few tokens where they occurred before.

A window that falls back is decoded again from the same audio at a higher temperature, and the
attempt before it is most of the new attempt's text: the sampled words differ here and there, the
rest repeats. Text that repeats within a window (a recording that says the same phrase again, or the
loops that make a window fall back) repeats itself too. Where the last tokens a row decoded occurred
before, in an earlier attempt, the prompt or its own text, the tokens after that occurrence are a
draft that costs nothing to make: no draft pass, only the width it adds to the verification pass
(prompt lookup decoding, as transformers' ``prompt_lookup_num_tokens``). The main model verifies a
copy as it verifies the draft model's tokens, so the output is the same whichever proposes.

A match of one token is right too seldom to be worth a wider pass; matches of two tokens or more are
taken, the longest first (it says more about where the text is), and of equally long ones the
latest, which is the nearest attempt or the nearest repetition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MATCH_LONGEST = 4
MATCH_SHORTEST = 2
_APART = -1  # between sources: no token id, so no match spans two of them and no copy runs on


def copied_continuation(sources: Sequence[Sequence[int]], text: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` tokens that followed ``text``'s last tokens where they occurred before: in one
    of ``sources`` (earlier attempts at the window), or earlier in ``text`` itself. Empty where its
    last ``MATCH_SHORTEST`` tokens occurred nowhere before."""
    if count < 1 or len(text) < MATCH_SHORTEST:
        return []
    pieces = [piece for source in sources for piece in (np.asarray(source, dtype=np.int64), [_APART])]
    haystack = np.concatenate([*pieces, np.asarray(text, dtype=np.int64)])
    searched = len(haystack) - 1  # an occurrence must end before the text's last token
    for length in range(min(MATCH_LONGEST, len(text)), MATCH_SHORTEST - 1, -1):
        if searched < length:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(haystack[:searched], length)
        found = np.flatnonzero((windows == haystack[-length:]).all(axis=1))
        if not len(found):
            continue
        after = int(found[-1]) + length
        copied = haystack[after : after + count]
        stop = np.flatnonzero(copied == _APART)
        return copied[: stop[0] if len(stop) else len(copied)].tolist()
    return []
