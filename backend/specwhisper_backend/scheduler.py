"""In-flight batching for one model instance: many requests' windows decoded as the rows of one batch.

A request waits in a bounded queue until it is admitted (at most ``max_rows`` are active: each has
at most one window in the batch at a time, so its windows stay in order). An active request's next
window is encoded between two decode steps and joins the batch at the next step; it leaves when its
text ends, and the request's next window goes back to the encoder. Encoder passes and decode steps
alternate, one pass (``encoder_batch`` windows at once where batching the encoder pays, as on a GPU)
then one step, so a new request starts decoding within about one encoder pass, however long the
requests already running are. The encoder takes the oldest request's window first, so requests
finish in about the order they came. (An encoder on a thread of its own, running while the batch
steps, was slower here: on two cores the two competed for them, see docs/experiments.md.)

An encoder pass stalls every row in the batch for as long as it runs. Where a window decodes in
little time next to an encoder pass (short clips on a CPU), encoding every newcomer at once
stretches each running request by one pass per request that arrives while it decodes: the median
request ends sooner than on a serial server, but the slowest end later, and the throughput gained
is only the decoder passes' share. So (:class:`EncoderStall`) a window of a request newer than every
running row is encoded only while the rows decoding, times one encoder pass, stay within
``encoder_stall`` times one window's decoding, both measured as the instance runs; otherwise the batch
steps on until rows leave, and the newcomer waits its turn, oldest first. Held back, a window waits
at most as long as it would have stalled the rows (``encoder_stall`` windows' decoding), so that no
request waits for a long one to finish. The oldest request's window is never held back, and where
decoding dominates (long-form windows, GPUs) the bound does not bind.

Every request is answered through its :class:`Listener`: its segments as they are decoded, then its
transcription, or the error that ended it. A request the caller cancels leaves the batch at the
next step. A fault in a step ends the requests whose rows were in it, and the batch starts afresh;
the others go on. Past the queue's bound a request is refused with :class:`Overloaded`, never
dropped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from specwhisper_backend.errors import RequestCancelled
from specwhisper_backend.features import FRAMES_PER_SECOND
from specwhisper_backend.load_policy import StepCosts
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.transcriber import RequestDecode, Segment, TranscribeOptions, Transcriber, Transcription

log = logging.getLogger(__name__)

# How often a request is asked whether its caller cancelled it (each ask may cross a process).
CANCEL_CHECK_SECONDS = 0.05


class Overloaded(Exception):
    """The instance's queue is full: the caller should retry later (the request was not accepted)."""


class Unloading(Exception):
    """The instance is shutting down: requests still waiting or running are ended with this."""


class Listener(Protocol):
    """Where a request's results go (the Triton glue's response sender, a test's list)."""

    def segment(self, segment: Segment, language: str) -> None: ...

    def finished(self, transcription: Transcription) -> None: ...

    def failed(self, error: BaseException) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class SchedulerOptions:
    max_rows: int = 8  # windows decoded together; each row holds its cross-attention K/V (docs/architecture.md)
    max_queue: int = 64  # requests waiting beyond the active ones; more are refused (Overloaded)
    encoder_batch: int = 1  # windows encoded in one pass: 1 on a CPU, where batching the encoder does not pay
    # A newer request's encoder pass may stall the rows decoding for this many windows' decoding (see
    # the module docstring); 0: no bound, every waiting window is encoded at the next pass.
    encoder_stall: float = 3.0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_queue < 0 or self.encoder_batch < 1 or not self.encoder_stall >= 0:
            raise ValueError(
                f"need max_rows >= 1, max_queue >= 0, encoder_batch >= 1 and encoder_stall >= 0, got {self}"
            )


class EncoderStall:
    """Whether an encoder pass for a newer request may stall the batch now (the module docstring says
    why): the rows decoding times one pass, against ``limit`` times one window's decoding, which is
    also the longest a window is held back. Both are what this instance measured: an encoder pass a
    running mean, a window's decoding the median of the last ``WINDOWS`` windows; until it has
    measured both, nothing is held back.

    A window's decoding is not a running mean: it is heavy-tailed across traffic (a long-form
    window decodes for many times a short clip's whole request), and a mean held the long-form
    windows' for dozens of short ones after traffic turned from long-form to short clips, so that
    every newcomer was encoded at once, as with no bound. The median follows within half of
    ``WINDOWS``; a long window in the batch is weighed as it runs (``running`` in :meth:`allows`)."""

    MEMORY = 0.9  # each encoder pass's weight fades by this for every later one
    WINDOWS = 9

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.encoder_pass: float | None = None  # seconds an encoder pass takes
        self.window_decoding: float | None = None  # seconds of steps a window takes, from joining to leaving
        self._windows: deque[float] = deque(maxlen=self.WINDOWS)

    def observe_pass(self, seconds: float) -> None:
        self.encoder_pass = _mean(self.encoder_pass, seconds, self.MEMORY)

    def observe_window(self, seconds: float) -> None:
        self._windows.append(seconds)
        self.window_decoding = float(np.median(self._windows))

    def allows(self, rows: int, held: float, running: float = 0.0) -> bool:
        """``rows`` decoding; ``held``: seconds the window has been held back already; ``running``: the
        longest any window in the batch has decoded so far. A window takes at least that, so where
        the traffic turns from short windows to long ones the bound follows before any long one ends."""
        if not self.limit or self.encoder_pass is None or self.window_decoding is None:
            return True
        stall = self.limit * max(self.window_decoding, running)
        return rows * self.encoder_pass <= stall or held >= stall


def _mean(mean: float | None, sample: float, memory: float) -> float:
    return sample if mean is None else memory * mean + (1 - memory) * sample


@dataclass(eq=False)
class Job:
    request: RequestDecode
    listener: Listener
    arrived: float
    stats: DecodeStats
    started: bool = False  # its first window has joined the batch
    decoding: float = 0.0  # seconds of steps its window in the batch has taken so far
    held: float = 0.0  # seconds of steps its next window has been held back from the encoder (EncoderStall)
    first_segment: bool = False
    next_cancel_check: float = 0.0


@dataclass
class Counters:
    """Running totals for the instance's metrics (read by the Triton glue after each step)."""

    steps: int = 0
    rows: int = 0  # summed over steps
    draft_caps: dict[int | None, int] = field(default_factory=dict)  # steps by the cap their drafts had


class Scheduler:
    """Decodes the requests submitted to it on a thread of its own, until :meth:`stop`."""

    def __init__(
        self,
        transcriber: Transcriber,
        options: SchedulerOptions | None = None,
        costs: StepCosts | None = None,
        on_step: Callable[[int, int | None], None] | None = None,
    ) -> None:
        """``costs``: the measured step costs (measured here when the drafting policy needs them);
        ``on_step(rows, cap)`` is called after every step, for metrics."""
        self.transcriber = transcriber
        self.options = options or SchedulerOptions()
        # The model's sessions are the scheduler's until it stops: Transcriber.transcribe waits till then.
        transcriber.lock.acquire()
        policy, model = transcriber.draft_policy, transcriber.model
        if costs is None and policy.cost_aware and model.assistant is not None:
            costs = transcriber.step_costs(self.options.max_rows)
        self.costs = costs
        self.on_step = on_step
        self.counters = Counters()
        self._decoder = transcriber.batch_decoder(costs)
        self._condition = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._to_encode: list[tuple[float, int, Job]] = []  # a heap: the oldest request first
        self.stall = EncoderStall(self.options.encoder_stall)
        self._held: Job | None = None  # the window held back from the encoder before this step
        self._order = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="specwhisper-scheduler", daemon=True)
        self._thread.start()

    def submit(self, audio: np.ndarray, options: TranscribeOptions, listener: Listener) -> None:
        """Queue a request. Raises a :class:`~specwhisper_backend.errors.RequestError` for bad options or
        audio, and :class:`Overloaded` when the queue is full; otherwise the listener hears the rest."""
        arrived = time.perf_counter()
        stats = DecodeStats()
        request = self.transcriber.start(audio, options, stats)  # checks, and the log-mel, on the caller's thread
        with self._condition:
            if self._stopping:
                raise Unloading("the model instance is unloading")
            if len(self._active) + len(self._waiting) >= self.options.max_rows + self.options.max_queue:
                raise Overloaded(
                    f"the model instance is at capacity: {len(self._active)} requests decoding and "
                    f"{len(self._waiting)} waiting (max_queue {self.options.max_queue}); retry later"
                )
            self._waiting.append(Job(request, listener, arrived, stats))
            self._condition.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread; requests still waiting or running are answered with :class:`Unloading`."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    @property
    def load(self) -> tuple[int, int]:
        """(active requests, waiting requests)."""
        with self._condition:
            return len(self._active), len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not (self._stopping or self._waiting or self._active):
                    self._condition.wait()
                if self._stopping:
                    break
                empty = []
                while self._waiting and len(self._active) < self.options.max_rows:
                    job = self._waiting.popleft()
                    self._active.append(job)
                    if job.request.done:  # nothing to decode (the VAD found no speech)
                        empty.append(job)
                    else:
                        self._queue_encode(job)
            for job in empty:
                self._finish(job)
            self._withdraw_cancelled()
            self._encode()
            if self._decoder.rows:
                self._step()
        with self._condition:
            ending = [*self._active, *self._waiting]
            self._active, self._waiting = [], deque()
        for job in ending:
            self._end(job, Unloading("the model instance is unloading"))
        self.transcriber.lock.release()

    def _queue_encode(self, job: Job) -> None:
        """``job``'s next window goes to the encoder: the oldest request's first."""
        heapq.heappush(self._to_encode, (job.arrived, next(self._order), job))

    def _withdraw_cancelled(self) -> None:
        now = time.perf_counter()
        for job in list(self._active):
            if now < job.next_cancel_check:
                continue
            job.next_cancel_check = now + CANCEL_CHECK_SECONDS
            try:
                gone = job.listener.cancelled()
            except Exception:  # asking failed: the caller is gone
                gone = True
            if gone:
                seconds = job.request.seek / FRAMES_PER_SECOND
                self._end(job, RequestCancelled(f"cancelled after {seconds:.1f} s of audio"))

    def _encode(self) -> None:
        if not self._to_encode:
            return
        arrived, _, first = self._to_encode[0]
        decoding = self._decoder.owners()
        oldest = arrived <= min((job.arrived for job in decoding), default=float("inf"))
        running = max((job.decoding for job in decoding), default=0.0)
        if not oldest and not self.stall.allows(len(decoding), first.held, running):
            self._held = first
            return
        count = min(self.options.encoder_batch, len(self._to_encode))
        batch = [heapq.heappop(self._to_encode)[2] for _ in range(count)]
        for job in batch:
            job.held = 0.0
        started = time.perf_counter()
        try:
            windows = self.transcriber.encode([job.request for job in batch])
        except Exception as error:
            log.error("encoder pass failed: %s", traceback.format_exc())
            for job in batch:
                self._end(job, error)
            return
        now = time.perf_counter()
        self.stall.observe_pass(now - started)
        for job, window in zip(batch, windows, strict=True):
            if not job.started:
                job.started = True
                job.stats.seconds_queued = now - job.arrived
            self._decoder.join(window, job)

    def _step(self) -> None:
        in_batch = self._decoder.owners()
        rows = len(in_batch)
        started = time.perf_counter()
        try:
            results = self._decoder.step()
        except Exception as error:  # the batch's state is unknown: its requests end, the batch starts over
            log.error("decode step failed: %s", traceback.format_exc())
            self._decoder = self.transcriber.batch_decoder(self.costs)
            for job in in_batch:
                self._end(job, error)
            return
        seconds = time.perf_counter() - started
        for job in in_batch:
            job.decoding += seconds
        if self._held is not None:
            self._held.held += seconds
            self._held = None
        self.counters.steps += 1
        self.counters.rows += rows
        cap = self._decoder.last_cap
        self.counters.draft_caps[cap] = self.counters.draft_caps.get(cap, 0) + 1
        if self.on_step is not None:
            self.on_step(rows, cap)
        for job, result in results:
            try:
                segments = job.request.finish(result)
                for segment in segments:
                    if not job.first_segment:
                        job.first_segment = True
                        job.stats.seconds_to_first_segment = time.perf_counter() - job.arrived
                    job.listener.segment(segment, job.request.language)
                if job.request.retrying:  # the same window again, at a higher temperature
                    self._decoder.join(job.request.retry(), job)
                    continue
                self.stall.observe_window(job.decoding)
                job.decoding = 0.0
                if job.request.done:
                    self._finish(job)
                else:
                    self._queue_encode(job)
            except Exception as error:
                log.error("request failed after its window: %s", traceback.format_exc())
                self._end(job, error)

    def _finish(self, job: Job) -> None:
        self._remove(job)
        if not job.first_segment:
            job.stats.seconds_to_first_segment = time.perf_counter() - job.arrived
        try:
            job.listener.finished(job.request.transcription())
        except Exception:  # the caller is gone
            log.warning("could not deliver a transcription: %s", traceback.format_exc())

    def _remove(self, job: Job) -> None:
        """Take ``job`` out of the batch (if it has a row there) and out of the active requests."""
        if job in self._decoder.owners():
            self._decoder.withdraw(job)
        if any(queued is job for _, _, queued in self._to_encode):
            self._to_encode = [entry for entry in self._to_encode if entry[2] is not job]
            heapq.heapify(self._to_encode)
        with self._condition:
            if job in self._active:
                self._active.remove(job)
            if job in self._waiting:
                self._waiting.remove(job)

    def _end(self, job: Job, error: BaseException) -> None:
        self._remove(job)
        try:
            job.listener.failed(error)
        except Exception:
            log.warning("could not tell a request how it ended: %s", traceback.format_exc())
