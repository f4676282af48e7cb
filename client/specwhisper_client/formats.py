"""Transcripts as txt, srt, vtt or json files."""

from __future__ import annotations

import json
from dataclasses import asdict

from specwhisper_client.client import TranscriptionResult

FORMATS = ("txt", "srt", "vtt", "json")


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(result: TranscriptionResult, words: bool) -> list[tuple[float, float, str]]:
    """(start, end, text) of each subtitle: a segment, or each word of each segment."""
    if words:
        return [(w.start, w.end, w.word.strip()) for s in result.segments for w in s.words]
    return [(s.start, s.end, s.text.strip()) for s in result.segments]


def render(result: TranscriptionResult, fmt: str, words: bool = False) -> str:
    """The result as ``fmt``; ``words``: srt and vtt cues are words (the result has word timestamps)."""
    if fmt == "txt":
        return result.text + "\n"
    if fmt == "json":
        return json.dumps(asdict(result), ensure_ascii=False, indent=2) + "\n"
    if words and not any(s.words for s in result.segments) and result.segments:
        raise ValueError("word-level subtitles need word timestamps: request word_timestamps")
    if fmt == "srt":
        blocks = [
            f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
            for i, (start, end, text) in enumerate(_cues(result, words), 1)
        ]
        return "\n".join(blocks)
    if fmt == "vtt":
        cues = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text}\n" for start, end, text in _cues(result, words)]
        return "WEBVTT\n\n" + "\n".join(cues)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
