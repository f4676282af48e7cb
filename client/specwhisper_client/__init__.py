"""gRPC client library and CLI for the specwhisper Triton model."""

from specwhisper_client.client import Segment, SpeechClient, StreamEnd, TranscriptionError, TranscriptionResult

__all__ = ["Segment", "SpeechClient", "StreamEnd", "TranscriptionError", "TranscriptionResult"]
