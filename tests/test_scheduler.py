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
from specwhisper_backend.scheduler import Overloaded, Scheduler, SchedulerOptions, Unloading
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
