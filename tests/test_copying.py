"""Copy drafts: the tokens after the text's last tokens where they occurred before."""

from hypothesis import given, settings
from hypothesis import strategies as st

from specwhisper_backend.copying import MATCH_LONGEST, MATCH_SHORTEST, CopyIndex


def copied_continuation(sources: list[list[int]], text: list[int], count: int) -> list[int]:
    """What a fresh index of ``sources`` copies after ``text``."""
    return CopyIndex(sources).continuation(text, count)


def test_what_followed_the_last_tokens_in_an_earlier_attempt_is_copied():
    earlier = [1, 2, 3, 4, 5, 6]
    assert copied_continuation([earlier], [9, 3, 4], 2) == [5, 6]
    assert copied_continuation([earlier], [9, 3, 4], 10) == [5, 6]  # no further than the attempt goes


def test_the_longest_match_wins_then_the_latest():
    # "3 4" occurs in both attempts; "2 3 4" only in the first, which says more about where the text is
    assert copied_continuation([[1, 2, 3, 4, 5], [7, 3, 4, 8]], [0, 2, 3, 4], 1) == [5]
    # equally long matches: the latest one (the nearest attempt)
    assert copied_continuation([[3, 4, 5], [3, 4, 8]], [0, 3, 4], 1) == [8]


def test_text_that_repeats_itself_is_copied_from_its_own_start():
    assert copied_continuation([], [5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]


def test_a_copy_never_runs_from_one_attempt_into_the_next():
    assert copied_continuation([[1, 2, 3], [4, 5]], [0, 2, 3], 3) == []


def test_nothing_is_copied_on_a_match_shorter_than_the_shortest():
    assert MATCH_SHORTEST == 2
    assert copied_continuation([[1, 2, 3]], [0, 2], 3) == []  # "0 2" occurs nowhere
    assert copied_continuation([[1, 2, 3]], [2], 3) == []  # one token is too short a match
    assert copied_continuation([[1, 2, 3]], [1, 2], 0) == []


def test_the_text_does_not_match_itself_at_its_end():
    assert copied_continuation([], [1, 2], 4) == []
    assert copied_continuation([], [2, 2, 2], 4) == [2]  # "2 2" occurred once before the end


def _searched(sources: list[list[int]], text: list[int], count: int) -> list[int]:
    """The rule by brute force: the longest match of the text's last tokens (to ``MATCH_LONGEST``),
    then the latest, ending before the text's last token, never across two sources."""
    pieces = [source for source in sources] + [text]
    best, best_length = None, 0
    flat = [(p, i) for p, piece in enumerate(pieces) for i in range(len(piece))]
    for p, i in flat:
        piece = pieces[p]
        if p == len(pieces) - 1 and i >= len(text) - 1:
            continue
        length = 0
        while length < min(MATCH_LONGEST, len(text)) and i - length >= 0:
            if piece[i - length] != text[len(text) - 1 - length]:
                break
            length += 1
        if length >= MATCH_SHORTEST and length >= best_length:
            best, best_length = (p, i), length
    if best is None:
        return []
    p, i = best
    return pieces[p][i + 1 : i + 1 + count]


@settings(max_examples=200, deadline=None)
@given(
    sources=st.lists(st.lists(st.integers(0, 12), max_size=30), max_size=3),
    text=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    count=st.integers(1, 6),
)
def test_an_index_kept_as_the_text_grows_finds_what_a_search_finds(sources, text, count):
    index = CopyIndex(sources)
    for end in range(1, len(text) + 1):  # the text as it grows, a token at a time
        if len(text[:end]) >= MATCH_SHORTEST:
            assert index.continuation(text[:end], count) == _searched(sources, text[:end], count), end
