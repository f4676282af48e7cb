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

MATCH_LONGEST = 4
MATCH_SHORTEST = 2
# Occurrences of a pair looked at, the latest first: a copy is looked for at every step of every
# speculative row, so its cost must not grow with the text.
CANDIDATES = 16
_APART = -1  # between sources: no token id, so no match spans two of them and no copy runs on


class CopyIndex:
    """Where each pair of tokens occurred, in a row's earlier attempts and in its text as it grows
    (the text only ever grows: a row keeps what it accepted). Built once a window, so that finding a
    copy at each step costs a dictionary lookup and a few comparisons."""

    def __init__(self, sources: Sequence[Sequence[int]] = ()) -> None:
        self._tokens: list[int] = []
        self._pairs: dict[tuple[int, int], list[int]] = {}  # pair -> where its second token is
        for source in sources:
            self._extend(source)
            self._extend([_APART])
        self._text_start = len(self._tokens)

    def _extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._tokens.append(int(token))
            at = len(self._tokens) - 1
            if at and self._tokens[at - 1] != _APART and token != _APART:
                self._pairs.setdefault((self._tokens[at - 1], int(token)), []).append(at)

    def continuation(self, text: Sequence[int], count: int) -> list[int]:
        """Up to ``count`` tokens that followed ``text``'s last tokens where they occurred before: in
        one of the sources, or earlier in ``text`` (which must extend the text seen before). Empty
        where its last ``MATCH_SHORTEST`` tokens occurred nowhere before."""
        self._extend(text[len(self._tokens) - self._text_start :])
        tokens = self._tokens
        end = len(tokens) - 1
        if count < 1 or len(text) < MATCH_SHORTEST:
            return []
        best, best_length = None, 0
        for at in reversed(self._pairs.get((tokens[end - 1], tokens[end]), [])[-CANDIDATES - 1 :]):
            if at >= end:
                continue  # the text's own last pair
            length = MATCH_SHORTEST
            while length < MATCH_LONGEST and at - length >= 0 and tokens[at - length] == tokens[end - length] != _APART:
                length += 1
            if length > best_length:
                best, best_length = at, length
        if best is None:
            return []
        copied = tokens[best + 1 : best + 1 + count]
        return copied[: copied.index(_APART)] if _APART in copied else copied
