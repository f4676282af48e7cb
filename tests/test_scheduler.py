"""The in-flight scheduler on the toy export: requests that arrive while others decode join the
running batch, and each gets exactly the tokens it gets alone; the queue is bounded; a cancelled
request leaves; a fault ends only the requests in the failing step."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from specwhisper_backend import transcriber as transcriber_module
from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.errors import RequestCancelled
from specwhisper_backend.load_policy import server_costs_file
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.scheduler import EncoderStall, Overloaded, Scheduler, SchedulerOptions, Unloading
from specwhisper_backend.transcriber import Segment, TranscribeOptions, Transcriber
from specwhisper_export.repository import link_tree
from tests.collect import Collect
from tests.toy_model import toy_speech


def tokens(segments: list[Segment]) -> list[tuple[int, ...]]:
    return [segment.tokens for segment in segments]


@pytest.fixture(scope="module")
def toy(toy_export) -> Transcriber:
    return Transcriber(ExportedModel(toy_export, intra_op_threads=1), DraftPolicy())


# The toy's random text is unlikely enough to fall back to sampling at every window; the greedy
# requests keep the temperature at 0, the others sample (seeded) at the fallback's temperatures.
GREEDY = (0.0,)
REQUESTS = [
    (4.0, TranscribeOptions(language="en", temperatures=GREEDY)),
    (70.0, TranscribeOptions(language="es", timestamps=True, temperatures=GREEDY)),
    (12.0, TranscribeOptions(timestamps=True, temperatures=GREEDY)),  # language detected
    (40.0, TranscribeOptions(language="fr", task="translate", speculative=False, temperatures=GREEDY)),
    (2.5, TranscribeOptions(language="en", initial_prompt="w5 w6 w7 w8 w9 w10 w11 w12 w13 w14", temperatures=GREEDY)),
    (65.0, TranscribeOptions(language="en", condition_on_previous_text=True, speculative=False)),  # sampled
    (8.0, TranscribeOptions(timestamps=True, speculative=False, seed=3)),  # sampled
    (33.0, TranscribeOptions(language="es", temperatures=GREEDY)),
    (20.0, TranscribeOptions(language="en")),  # sampled, speculatively
]


def test_requests_arriving_at_random_get_their_own_batch_of_one_tokens(toy):
    audios = [toy_speech(seconds, seed=index) for index, (seconds, _) in enumerate(REQUESTS)]
    alone = [toy.transcribe(audio, options) for audio, (_, options) in zip(audios, REQUESTS, strict=True)]
    for audio, (_, options), result in zip(audios, REQUESTS, alone, strict=True):
        if options.temperatures == GREEDY:
            plain = toy.transcribe(audio, replace(options, speculative=False))
            assert tokens(result.segments) == tokens(plain.segments)

    scheduler = Scheduler(toy, SchedulerOptions(max_rows=4))
    listeners = [Collect() for _ in REQUESTS]
    rng = random.Random(0)
    for audio, (_, options), listener in zip(audios, REQUESTS, listeners, strict=True):
        scheduler.submit(audio, options, listener)
        time.sleep(rng.uniform(0, 0.05))
    for listener in listeners:
        assert listener.done.wait(120)
    scheduler.stop()
    for index, ((_, options), listener, expected) in enumerate(zip(REQUESTS, listeners, alone, strict=True)):
        assert listener.error is None, listener.error
        assert tokens(listener.segments) == tokens(listener.result.segments)
        assert listener.result.language == expected.language
        if options.temperatures == GREEDY or not options.speculative:
            assert tokens(listener.result.segments) == tokens(expected.segments), index
        else:  # sampled drafts follow how much the batch lets a row draft: the same distribution, other draws
            assert listener.result.stats.temperatures == expected.stats.temperatures == [1.0]
    counters = scheduler.counters
    assert counters.rows / counters.steps > 1.5, "requests decoded together"
    assert max(listener.result.stats.rows_per_step for listener in listeners) > 2
    assert all(listener.result.stats.seconds_to_first_segment > 0 for listener in listeners)


def test_past_the_queue_a_request_is_refused_not_dropped(toy):
    hold = threading.Event()
    scheduler = Scheduler(toy, SchedulerOptions(max_rows=1, max_queue=1))
    first, second = Collect(hold=hold), Collect()
    scheduler.submit(toy_speech(3), TranscribeOptions(language="en"), first)
    deadline = time.time() + 30
    while scheduler.load != (1, 0) and time.time() < deadline:
        time.sleep(0.01)
    scheduler.submit(toy_speech(3, seed=1), TranscribeOptions(language="en"), second)  # waits in the queue
    with pytest.raises(Overloaded, match="max_queue 1"):
        scheduler.submit(toy_speech(3, seed=2), TranscribeOptions(language="en"), Collect())
    hold.set()
    assert first.done.wait(60) and second.done.wait(60)
    assert first.result is not None and second.result is not None
    scheduler.stop()


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(toy):
    scheduler = Scheduler(toy, SchedulerOptions(max_rows=4))
    leaving, staying = Collect(cancel_after_segments=1), Collect()
    scheduler.submit(toy_speech(95, seed=3), TranscribeOptions(language="en", temperatures=GREEDY), leaving)
    scheduler.submit(toy_speech(95, seed=4), TranscribeOptions(language="en", temperatures=GREEDY), staying)
    assert leaving.done.wait(60) and staying.done.wait(60)
    scheduler.stop()
    assert isinstance(leaving.error, RequestCancelled) and leaving.result is None
    assert len(leaving.segments) < 4
    expected = toy.transcribe(toy_speech(95, seed=4), TranscribeOptions(language="en", temperatures=GREEDY))
    assert tokens(staying.result.segments) == tokens(expected.segments)


def test_a_fault_ends_the_requests_in_the_failing_step_and_the_next_ones_are_served(toy, monkeypatch):
    scheduler = Scheduler(toy, SchedulerOptions(max_rows=4))
    decoder = scheduler._decoder
    original = decoder.step
    calls = {"n": 0}

    def fails_once():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a session went away")
        return original()

    monkeypatch.setattr(decoder, "step", fails_once)
    first, second = Collect(), Collect()
    scheduler.submit(toy_speech(5), TranscribeOptions(language="en"), first)
    scheduler.submit(toy_speech(5, seed=1), TranscribeOptions(language="en"), second)
    assert first.done.wait(60) and second.done.wait(60)
    failed = [c for c in (first, second) if c.error is not None]
    assert failed and all("a session went away" in str(c.error) for c in failed)
    after = Collect()
    scheduler.submit(toy_speech(5, seed=2), TranscribeOptions(language="en"), after)
    assert after.done.wait(60) and after.error is None
    scheduler.stop()
    assert tokens(after.result.segments) == tokens(
        toy.transcribe(toy_speech(5, seed=2), TranscribeOptions(language="en")).segments
    )


def test_the_encoder_stall_bound_weighs_the_rows_a_pass_would_stall_against_a_windows_decoding():
    stall = EncoderStall(3.0)
    assert stall.allows(16, held=0.0), "nothing is held back before both are measured"
    stall.observe_pass(0.4)
    stall.observe_window(0.2)
    assert stall.allows(1, held=0.0)  # 0.4 s of one row's time against 3 x 0.2 s
    assert not stall.allows(2, held=0.0)  # 0.8 s
    assert not stall.allows(2, held=0.5) and stall.allows(2, held=0.61), "held at most as long as it would stall"
    assert stall.allows(2, held=0.0, running=0.3), "a window in the batch has decoded longer than the mean"
    stall.observe_pass(1.4)  # a running mean: 0.9 x 0.4 + 0.1 x 1.4 = 0.5
    assert stall.allows(1, held=0.0) and not stall.allows(2, held=0.0)
    assert stall.encoder_pass == pytest.approx(0.5)
    for _ in range(20):  # long-form windows, then traffic turns to short clips
        stall.observe_window(10.0)
    for _ in range(EncoderStall.WINDOWS // 2 + 1):
        stall.observe_window(0.5)
    assert stall.window_decoding == pytest.approx(0.5), "the bound follows the traffic within a few windows"
    unbounded = EncoderStall(0.0)
    unbounded.observe_pass(10.0)
    unbounded.observe_window(0.01)
    assert unbounded.allows(16, held=0.0)
    with pytest.raises(ValueError, match="encoder_stall >= 0"):
        SchedulerOptions(encoder_stall=-1.0)


class Timed(Collect):
    """Also notes when the request finished."""

    ended: float = 0.0

    def finished(self, transcription) -> None:
        self.ended = time.perf_counter()
        super().finished(transcription)


def _encoded_while(toy, monkeypatch, stall: float, window_decoding: float, first_seconds: float):
    """Request A (``first_seconds`` of speech) decodes alone; B (3 s) arrives while A's first window
    decodes. The bound's estimates are fixed (an encoder pass 100 s, a window's decoding as given).
    Returns A's and B's listeners, and for each encoder pass whether A had finished by then."""
    for observe in ("observe_pass", "observe_window"):  # the estimates stay as set
        monkeypatch.setattr(EncoderStall, observe, lambda self, seconds: None)
    scheduler = Scheduler(toy, SchedulerOptions(max_rows=4, encoder_stall=stall))
    scheduler.stall.encoder_pass, scheduler.stall.window_decoding = 100.0, window_decoding
    first, second = Timed(), Timed()
    passes: list[tuple[str, bool]] = []
    encode = toy.encode

    def logged(requests):
        passes.extend(("B" if request.stats is second_stats[0] else "A", first.done.is_set()) for request in requests)
        return encode(requests)

    second_stats: list = [None]
    monkeypatch.setattr(toy, "encode", logged)
    scheduler.submit(toy_speech(first_seconds, seed=5), TranscribeOptions(language="en", temperatures=GREEDY), first)
    deadline = time.time() + 30
    while scheduler.counters.steps < 2 and time.time() < deadline:  # A's first window is decoding
        time.sleep(0.001)
    original_start = toy.start

    def start(audio, options, stats):
        second_stats[0] = stats
        return original_start(audio, options, stats)

    monkeypatch.setattr(toy, "start", start)
    scheduler.submit(toy_speech(3, seed=6), TranscribeOptions(language="en", temperatures=GREEDY), second)
    assert first.done.wait(60) and second.done.wait(60)
    scheduler.stop()
    monkeypatch.undo()
    assert first.error is None and second.error is None
    expected = toy.transcribe(toy_speech(3, seed=6), TranscribeOptions(language="en", temperatures=GREEDY))
    assert tokens(second.result.segments) == tokens(expected.segments)
    return first, second, passes


def test_where_encoder_passes_dominate_a_newer_request_waits_for_the_running_window(toy, monkeypatch):
    """A pass would stall A for 100 s against 3 x 1 s of a window's decoding: B waits until A's
    windows have ended (A's next window, an older request's, goes first); with the bound off, B is
    encoded while A decodes."""
    _, _, passes = _encoded_while(toy, monkeypatch, stall=3.0, window_decoding=1.0, first_seconds=25)
    assert passes[-1] == ("B", True) and all(who == "A" for who, _ in passes[:-1])
    _, _, passes = _encoded_while(toy, monkeypatch, stall=0.0, window_decoding=1.0, first_seconds=25)
    assert ("B", False) in passes


def test_a_held_request_does_not_wait_for_a_long_one_to_finish(toy, monkeypatch):
    """The bound binds (100 s against 3 x 0.02 s, or 3 x what A's running window has decoded so far),
    but B is held at most that long in steps: it is encoded and finishes while A, four windows long,
    still decodes."""
    first, second, passes = _encoded_while(toy, monkeypatch, stall=3.0, window_decoding=0.02, first_seconds=95)
    assert [who for who, _ in passes].count("A") == 4 and ("B", False) in passes
    assert second.ended < first.ended


def test_stopping_answers_every_request_still_there(toy):
    hold = threading.Event()
    scheduler = Scheduler(toy, SchedulerOptions(max_rows=1, max_queue=4))
    running, waiting = Collect(hold=hold), Collect()
    scheduler.submit(toy_speech(40), TranscribeOptions(language="en"), running)
    scheduler.submit(toy_speech(3), TranscribeOptions(language="en"), waiting)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    hold.set()
    stopper.join(60)
    assert running.done.is_set() and waiting.done.is_set()
    assert isinstance(waiting.error, Unloading)
    with pytest.raises(Unloading):
        scheduler.submit(toy_speech(3), TranscribeOptions(language="en"), Collect())
    assert toy.transcribe(toy_speech(3), TranscribeOptions(language="en")).text  # the sessions are free again


def test_bad_options_are_refused_at_submission(toy):
    scheduler = Scheduler(toy)
    with pytest.raises(ValueError, match="unknown language"):
        scheduler.submit(toy_speech(3), TranscribeOptions(language="xx"), Collect())
    with pytest.raises(ValueError, match="feature frame"):
        scheduler.submit(np.ones(10, np.float32), TranscribeOptions(), Collect())
    scheduler.stop()


def test_instances_of_one_server_share_the_step_costs_the_first_measured(toy_export, tmp_path, monkeypatch):
    """The first instance measures; the next ones with the same file read its grid; another grid is
    measured and kept beside it; a file that cannot be read is measured over."""
    measured = []
    measure = transcriber_module.measure_step_costs
    monkeypatch.setattr(transcriber_module, "measure_step_costs", lambda *a: measured.append(a[4]) or measure(*a))
    shared = tmp_path / "costs.json"

    def instance() -> Transcriber:
        return Transcriber(ExportedModel(toy_export, intra_op_threads=1), DraftPolicy(), shared)

    first, second = instance(), instance()
    assert second.step_costs(2).to_dict() == first.step_costs(2).to_dict()
    assert measured == [[1, 2]]
    second.step_costs(4)
    assert measured == [[1, 2], [1, 2, 4]] and len(json.loads(shared.read_text())) == 2
    assert instance().step_costs(4).to_dict() == second.step_costs(4).to_dict() and len(measured) == 2
    shared.write_text("{")
    instance().step_costs(2)
    assert len(measured) == 3


def test_a_servers_costs_file_is_named_by_its_graphs_files_and_settings(toy_export, tmp_path):
    """The plain and streaming models hard-link one export: they share; a copy of the graphs, or
    other threads or devices, measure their own."""
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    link_tree(toy_export, linked)
    shutil.copytree(toy_export, copied)
    name = server_costs_file(toy_export, 1, ["CPUExecutionProvider"])
    assert server_costs_file(linked, 1, ["CPUExecutionProvider"]) == name
    assert server_costs_file(copied, 1, ["CPUExecutionProvider"]) != name
    assert server_costs_file(toy_export, 2, ["CPUExecutionProvider"]) != name
