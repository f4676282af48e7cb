"""``model.py`` without a server: a fake ``triton_python_backend_utils`` and the toy export.

Every request is answered through its sender, whatever happens: a bad request with
INVALID_ARGUMENT, a request the queue cannot take with UNAVAILABLE, a cancelled one with
CANCELLED, an internal fault with INTERNAL naming it; the last response always carries FINAL; and
the next request is served as if nothing had happened.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.transcriber import TranscribeOptions
from tests import fake_triton
from tests.fake_triton import FINAL, Request, TritonError
from tests.toy_model import toy_speech


def _pcm(audio: np.ndarray, **options) -> dict[str, np.ndarray]:
    inputs = {"AUDIO": audio, "SAMPLE_RATE": np.array([SAMPLE_RATE], np.int32)}
    for name, value in options.items():
        dtype = bool if isinstance(value, bool) else object
        inputs[name.upper()] = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
    return inputs


@pytest.fixture(scope="module")
def module():
    return fake_triton.install()


def _model(module, directory, name, decoupled, **parameters):
    model = module.TritonPythonModel()
    model.initialize(fake_triton.model_args(directory, name, decoupled, {k: str(v) for k, v in parameters.items()}))
    return model


@pytest.fixture(scope="module")
def unary(module, toy_export):
    model = _model(module, toy_export, "specwhisper", False)
    yield model
    model.finalize()


@pytest.fixture(scope="module")
def streaming(module, toy_export):
    model = _model(module, toy_export, "specwhisper_stream", True)
    yield model
    model.finalize()


def _answer(model, request: Request):
    """Send one request; its single (final) response."""
    assert model.execute([request]) is None
    ((response, flags),) = request.sender.wait()
    assert flags == FINAL
    return response


def _error(response) -> TritonError:
    assert response.error is not None, response
    return response.error


def test_the_warm_up_teaches_the_instance_nothing_about_drafting(unary):
    """The warm-up's tone ran both paths; the acceptance the instance has seen is still none (the
    tone's rejected drafts would have lowered where every request of its language starts)."""
    transcriber = unary.scheduler.transcriber
    assert transcriber.model.assistant is not None
    fresh = type(transcriber.seen_acceptance)(transcriber.measured_acceptance())
    assert transcriber.seen_acceptance.prior(("transcribe", "en")) == fresh.prior(("transcribe", "en"))
    assert not transcriber.seen_acceptance._sums


def test_a_batch_answers_each_request_on_its_own(unary):
    good = Request(_pcm(toy_speech(3), language="en"))
    bad = Request(_pcm(np.full(SAMPLE_RATE, np.nan, np.float32)))
    other = Request(_pcm(toy_speech(3, seed=1), language="es"))
    assert unary.execute([good, bad, other]) is None
    responses = [request.sender.wait()[0][0] for request in (good, bad, other)]
    assert _error(responses[1]).code() == TritonError.INVALID_ARG and "NaN" in responses[1].error.message()
    for response in (responses[0], responses[2]):
        assert response.error is None and response.json("STATS_JSON")["windows"] == 1
    assert responses[2].outputs()["DETECTED_LANGUAGE"][0] == b"es"
    requests = fake_triton.metric_values("specwhisper_requests_total", model="specwhisper", language="es")
    assert sum(requests.values()) >= 1, "request counters carry the language"


def test_an_internal_fault_is_answered_with_its_name_and_the_next_request_is_served(unary, monkeypatch):
    def broken(requests):
        raise IndexError("list index out of range")

    with monkeypatch.context() as patch:
        patch.setattr(unary.scheduler.transcriber, "encode", broken)
        response = _answer(unary, Request(_pcm(toy_speech(2))))
    error = _error(response)
    assert error.code() == TritonError.INTERNAL and "IndexError: list index out of range" in error.message()
    assert any(level == "error" and "Traceback" in line for level, line in fake_triton.Logger.lines)
    after = _answer(unary, Request(_pcm(toy_speech(2))))
    assert after.error is None and after.outputs()["TEXT"][0]


@pytest.mark.parametrize(
    ("samples", "message"), [(0, "empty"), (1, "at least one feature frame"), (159, "at least one feature frame")]
)
def test_audio_too_short_for_one_feature_frame_is_refused_clearly(unary, samples, message):
    response = _answer(unary, Request(_pcm(np.full(samples, 0.1, np.float32))))
    assert _error(response).code() == TritonError.INVALID_ARG and message in response.error.message()


def test_audio_of_one_feature_frame_is_transcribed(unary):
    response = _answer(unary, Request(_pcm(np.full(160, 0.1, np.float32), language="en")))
    assert response.error is None and response.json("STATS_JSON")["windows"] == 1


def test_a_cancelled_request_stops_early(unary):
    request = Request(_pcm(toy_speech(600)), cancel_after=1)  # twenty windows; cancelled at the second ask
    response = _answer(unary, request)
    assert _error(response).code() == TritonError.CANCELLED and "cancelled after" in response.error.message()
    assert float(response.error.message().split("after ")[1].split(" s")[0]) < 600


def test_a_stream_sends_segments_then_its_statistics_with_final(streaming):
    request = Request(_pcm(toy_speech(65), language="en", timestamps=True))
    assert streaming.execute([request]) is None
    sent = request.sender.wait()
    assert all(flags == 0 for _, flags in sent[:-1]) and len(sent) >= 3
    assert all(response.error is None for response, _ in sent)
    assert sent[-1][0].json("STATS_JSON")["windows"] >= 3
    assert all(response.json("STATS_JSON") == {} for response, _ in sent[:-1])


def test_an_internal_fault_mid_stream_ends_it_with_an_error_and_final(streaming, monkeypatch):
    transcriber = streaming.scheduler.transcriber
    original = transcriber.encode

    def fails_on_a_later_window(requests):
        if any(request.seek > 0 for request in requests):
            raise RuntimeError("decoder session lost")
        return original(requests)

    with monkeypatch.context() as patch:
        patch.setattr(transcriber, "encode", fails_on_a_later_window)
        broken = Request(_pcm(toy_speech(65), timestamps=True))
        streaming.execute([broken])
        sent = broken.sender.wait()
    (first, flags), (last, last_flags) = sent[0], sent[-1]
    assert first.error is None and flags == 0
    assert last_flags == FINAL and last.error.code() == TritonError.INTERNAL
    assert "RuntimeError: decoder session lost" in last.error.message()

    good = Request(_pcm(toy_speech(35), timestamps=True))
    streaming.execute([good])
    assert all(response.error is None for response, _ in good.sender.wait())


def test_bad_and_cancelled_streams_end_with_final(streaming):
    bad = Request(_pcm(toy_speech(2), task="summarise"))
    cancelled = Request(_pcm(toy_speech(65)), cancel_after=0)
    streaming.execute([bad, cancelled])
    ((refusal, flags),) = bad.sender.wait()
    assert flags == FINAL and refusal.error.code() == TritonError.INVALID_ARG
    assert cancelled.sender.wait()[-1][0].error.code() == TritonError.CANCELLED


def test_a_stream_whose_client_went_away_leaves_and_the_next_is_served(streaming):
    gone = Request(_pcm(toy_speech(95), timestamps=True))
    gone.sender.fail_after = 1
    assert streaming.execute([gone]) is None
    deadline = time.monotonic() + 60
    while (len(gone.sender.sent) < 1 or streaming.scheduler.load != (0, 0)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert streaming.scheduler.load == (0, 0), "the request left when its client was gone"
    assert len(gone.sender.sent) == 1 and not gone.sender.finished
    good = Request(_pcm(toy_speech(5)))
    streaming.execute([good])
    assert good.sender.wait()[-1][0].error is None


def test_past_its_queue_an_instance_answers_unavailable(module, toy_export):
    model = _model(module, toy_export, "specwhisper", False, max_batch_rows=1, max_queue=0)
    try:
        first, second = Request(_pcm(toy_speech(40))), Request(_pcm(toy_speech(3)))
        model.execute([first, second])
        refused = second.sender.wait()[0][0]
        assert _error(refused).code() == TritonError.UNAVAILABLE and "retry later" in refused.error.message()
        assert first.sender.wait()[0][0].error is None
    finally:
        model.finalize()


def test_failures_are_counted_by_kind(unary):
    name, labels = "specwhisper_request_failures_total", {"model": "specwhisper", "reason": "AudioError"}
    before = fake_triton.metric_values(name, **labels)
    _answer(unary, Request(_pcm(np.zeros(SAMPLE_RATE, np.float32))))
    after = fake_triton.metric_values(name, **labels)
    assert list(after.values()) == [sum(before.values()) + 1]
    steps = fake_triton.metric_values("specwhisper_batch_steps_total", model="specwhisper")
    rows = fake_triton.metric_values("specwhisper_batch_rows_total", model="specwhisper")
    assert sum(rows.values()) >= sum(steps.values()) > 0


def test_a_bad_model_parameter_fails_the_load_with_its_name(module, toy_export):
    model = module.TritonPythonModel()
    for key, value, message in (("draft_confidence", "1.5", "confidence"), ("max_batch_rows", "0", "max_rows")):
        with pytest.raises(fake_triton.TritonModelException, match=message):
            model.initialize(fake_triton.model_args(toy_export, "specwhisper", False, {key: value}))


def test_unloading_answers_what_is_still_running(module, toy_export):
    model = _model(module, toy_export, "specwhisper", False)
    running = Request(_pcm(toy_speech(300)))
    model.execute([running])
    model.finalize()
    response = running.sender.wait()[-1][0]
    assert response.error is None or response.error.code() == TritonError.UNAVAILABLE
    assert model.scheduler.transcriber.transcribe(toy_speech(2), TranscribeOptions(language="en")).text
