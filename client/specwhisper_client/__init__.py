"""gRPC client library and CLI for the specwhisper Triton model."""

from specwhisper_client.client import (
    Options,
    Segment,
    SpeechClient,
    StreamEnd,
    TranscriptionError,
    TranscriptionResult,
    Word,
)

__all__ = ["Options", "Segment", "SpeechClient", "StreamEnd", "TranscriptionError", "TranscriptionResult", "Word"]
