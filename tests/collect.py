"""A scheduler listener for tests: it keeps what it hears, and can stall or cancel on cue."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from specwhisper_backend.transcriber import Segment, Transcription


@dataclass
class Collect:
    """A listener that keeps what it hears."""

    cancel_after_segments: int | None = None
    hold: threading.Event | None = None  # segment() waits for it: the scheduler's loop stalls there
    segments: list[Segment] = field(default_factory=list)
    result: Transcription | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def segment(self, segment: Segment, language: str) -> None:
        if self.hold is not None:
            self.hold.wait(30)
        self.segments.append(segment)

    def finished(self, transcription: Transcription) -> None:
        self.result = transcription
        self.done.set()

    def failed(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def cancelled(self) -> bool:
        return self.cancel_after_segments is not None and len(self.segments) >= self.cancel_after_segments
