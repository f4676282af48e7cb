"""``specwhisper-load``'s throughput while all clients are busy, read from streamed segments."""

import math
from pathlib import Path

from specwhisper_bench.load import LoadOptions, LoadPoint, Outcome, markdown, steady_rate


def _outcome(client: int, finished: float, decoded: list[tuple[float, float]], seconds: float = 60.0) -> Outcome:
    return Outcome(client, finished, decoded[0][0], seconds, {}, finished, tuple(decoded))


def test_steady_rate_counts_between_the_first_end_and_the_first_client_done():
    outcomes = [
        _outcome(0, 4.0, [(2.0, 30.0), (4.0, 40.0)], seconds=40.0),  # the first request to end: from 4 s
        _outcome(0, 10.0, [(7.0, 30.0), (10.0, 60.0)]),  # client 0's last: to 10 s
        _outcome(1, 15.0, [(3.0, 20.0), (9.5, 40.0), (12.0, 50.0), (15.0, 60.0)]),  # 20 s by 4 s, 40 s by 10 s
        _outcome(2, 25.0, [(11.0, 30.0), (25.0, 60.0)]),  # nothing decoded by 10 s
    ]
    rate, begin, end = steady_rate(outcomes, clients=3)
    assert (begin, end) == (4.0, 10.0)
    assert math.isclose(rate, ((40.0 - 40.0) + (60.0 - 0.0) + (40.0 - 20.0) + 0.0) / 6.0)


def test_steady_rate_needs_a_span_with_every_client_busy():
    rate, _, _ = steady_rate([_outcome(0, 5.0, [(5.0, 60.0)])], clients=2)  # client 1 never answered
    assert math.isnan(rate)
    one_each = [_outcome(0, 5.0, [(5.0, 60.0)]), _outcome(1, 8.0, [(8.0, 60.0)])]
    rate, begin, end = steady_rate(one_each, clients=2)  # the first request to end was its client's last
    assert math.isnan(rate) and (begin, end) == (5.0, 5.0)


def test_markdown_gives_both_throughputs():
    def point(steady: float, begin: float, end: float, clients: int) -> LoadPoint:
        return LoadPoint(
            "batched (16 rows)", "long-form 60 s", False, clients, 3 * clients, 0, 100.0, 18.2, 0.3, 15.0, 41.6,
            steady, begin, end, 6.8, 5.9, None, 0.99, 0.0,
        )  # fmt: skip

    text = markdown([point(20.57, 15.2, 49.0, 8), point(float("nan"), 8.0, 8.0, 2)], None, LoadOptions(Path("x"), "d"))
    assert "| 8 | 20.57 (15-49 s) | 18.20 |" in text
    assert "| 2 | n/a | 18.20 |" in text


def test_markdown_sets_speculative_over_plain_side_by_side_for_every_run():
    def point(speculative: bool, repeat: int, steady: float, whole: float) -> LoadPoint:
        return LoadPoint(
            "batched (16 rows)", "long-form 60 s", speculative, 8, 24, 0, 100.0, whole, 0.3, 15.0, 41.6,
            steady, 15.0, 49.0, 6.8, 5.9, None, 0.99, 0.0, repeat,
        )  # fmt: skip

    points = [point(False, 1, 20.0, 16.0), point(True, 1, 19.0, 16.8), point(False, 2, 18.0, 15.0)]
    points.append(point(True, 2, 19.8, 15.0))
    text = markdown(points, None, LoadOptions(Path("x"), "d", repeats=2))
    assert "| long-form 60 s | batched (16 rows) | 8 | 0.95x, 1.10x (1.02x) | 1.05x, 1.00x (1.02x) |" in text
    assert "| batched (16 rows) | speculative, run 2 | 8 |" in text
    failed = [point(False, 1, float("nan"), 0.0), point(True, 1, float("nan"), 0.0)]  # no request answered
    text = markdown(failed, None, LoadOptions(Path("x"), "d"))
    assert "| long-form 60 s | batched (16 rows) | 8 | n/a | n/a |" in text
