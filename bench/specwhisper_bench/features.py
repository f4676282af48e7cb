"""``specwhisper-features``: Whisper's everyday features measured, side by side with faster-whisper.

On real speech from Debian's Asterisk prompts, through the engine (plain and speculative, the same
loop as served), each beside faster-whisper on the same audio:

- word timestamps: faster-whisper's ``word_timestamps=True`` (greedy, as here); the difference of
  word starts and ends where both transcripts are the same words;
- silence, noise and tones between speech: the text either system writes over them, with both
  systems' defaults (faster-whisper: beam search of 5, no VAD; this project: greedy with fallback);
- the VAD filter on speech with long pauses: the real-time factor and the transcript, with and
  without it;
- what each option costs: word timestamps' extra pass per window, and how often the temperature
  fallback decodes a window again on long recordings.
Writes ``features.md`` and ``features.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber, Transcription
from specwhisper_export.cli import add_assistant_arguments, resolve_assistant
from specwhisper_export.presets import ct2_dir
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_training import asterisk


def normalised(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


@dataclass
class WordComparison:
    clips: int = 0
    same_words: int = 0  # clips whose transcripts are the same words in both systems
    words: int = 0
    start_diffs: list[float] = field(default_factory=list)
    end_diffs: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "clips": self.clips,
            "clips_with_the_same_words": self.same_words,
            "words_compared": self.words,
            "median_start_diff_s": round(statistics.median(self.start_diffs), 3) if self.start_diffs else None,
            "median_end_diff_s": round(statistics.median(self.end_diffs), 3) if self.end_diffs else None,
            "p90_start_diff_s": round(float(np.percentile(self.start_diffs, 90)), 3) if self.start_diffs else None,
        }


def compare_words(ours: Transcription, theirs: list) -> tuple[bool, list[float], list[float]]:
    """Whether both are the same words, and each word's start and end difference when they are."""
    mine = [w for s in ours.segments for w in s.words]
    other = [w for s in theirs for w in (s.words or ())]
    if [normalised(w.word) for w in mine] != [normalised(w.word) for w in other]:
        return False, [], []
    return (
        True,
        [abs(a.start - b.start) for a, b in zip(mine, other, strict=True)],
        [abs(a.end - b.end) for a, b in zip(mine, other, strict=True)],
    )


def word_timestamps(engine: Transcriber, faster, clips_per_language: int) -> dict:
    comparison = WordComparison()
    for language in asterisk.LANGUAGES:
        for prompt in asterisk.select(language, clips_per_language, min_seconds=3.0, max_seconds=12.0):
            audio = asterisk.load_audio(prompt.path)
            ours = engine.transcribe(audio, TranscribeOptions(language=language, word_timestamps=True, timestamps=True))
            theirs, _ = faster.transcribe(audio, language=language, beam_size=1, word_timestamps=True)
            same, starts, ends = compare_words(ours, list(theirs))
            comparison.clips += 1
            comparison.same_words += same
            comparison.words += len(starts)
            comparison.start_diffs += starts
            comparison.end_diffs += ends
    return comparison.summary()


def with_non_speech(language: str) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Real speech with a minute of silence, a minute of noise and half a minute of a tone between;
    the (start, end) seconds of the speech."""
    rng = np.random.default_rng(0)
    clips = [asterisk.load_audio(p.path) for p in asterisk.select(language, 4, min_seconds=2.0, max_seconds=8.0)]
    tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(30 * SAMPLE_RATE) / SAMPLE_RATE)
    gaps = [np.zeros(60 * SAMPLE_RATE), 0.03 * rng.standard_normal(60 * SAMPLE_RATE), tone]
    pieces, speech, at = [], [], 0.0
    for index, clip in enumerate(clips):
        pieces.append(clip)
        speech.append((at, at + len(clip) / SAMPLE_RATE))
        at += len(clip) / SAMPLE_RATE
        if index < len(gaps):
            pieces.append(gaps[index])
            at += len(gaps[index]) / SAMPLE_RATE
    return np.concatenate(pieces).astype(np.float32), speech


def outside_speech(segments, speech: list[tuple[float, float]]) -> list[str]:
    """The text of segments that overlap no speech: hallucinated over silence, noise or a tone."""
    return [s.text for s in segments if not any(s.start < end and s.end > start for start, end in speech)]


def silence(engine: Transcriber, faster) -> dict:
    rows = {}
    for language in ("en", "es"):
        audio, speech = with_non_speech(language)
        systems = {
            "specwhisper (defaults, timestamps)": TranscribeOptions(language=language, timestamps=True),
            "specwhisper, VAD filter": TranscribeOptions(language=language, timestamps=True, vad_filter=True),
        }
        for name, options in systems.items():
            result = engine.transcribe(audio, options)
            rows[f"{language}: {name}"] = {
                "hallucinated": outside_speech(result.segments, speech),
                "windows": result.stats.windows,
                "skipped_as_silent": result.stats.windows_skipped,
                "fallback_decodes": result.stats.fallback_decodes,
            }
        segments, _ = faster.transcribe(audio, language=language)
        rows[f"{language}: faster-whisper (defaults)"] = {"hallucinated": outside_speech(list(segments), speech)}
    return rows


def vad(engine: Transcriber, repeats: int) -> dict:
    """Speech with long pauses: decoded whole, and with the VAD filter, interleaved; each
    transcript's word error rate against the prompts' own transcripts."""
    import jiwer

    prompts = asterisk.select("en", 8, min_seconds=2.0, max_seconds=8.0)
    clips = [asterisk.load_audio(p.path) for p in prompts]
    pause = np.zeros(12 * SAMPLE_RATE, np.float32)
    audio = np.concatenate([piece for clip in clips for piece in (clip, pause)])
    reference = " ".join(normalised(w) for p in prompts for w in p.text.split())
    seconds = len(audio) / SAMPLE_RATE
    times: dict[bool, list[float]] = {False: [], True: []}
    texts = {}
    for _ in range(repeats):
        for use_vad in (False, True):
            started = time.perf_counter()
            result = engine.transcribe(audio, TranscribeOptions(language="en", vad_filter=use_vad))
            times[use_vad].append(time.perf_counter() - started)
            texts[use_vad] = " ".join(filter(None, (normalised(w) for w in result.text.split())))
    return {
        "audio_seconds": round(seconds, 1),
        "speech_seconds": round(sum(len(c) for c in clips) / SAMPLE_RATE, 1),
        "rtf_without_vad": [round(t / seconds, 4) for t in times[False]],
        "rtf_with_vad": [round(t / seconds, 4) for t in times[True]],
        "wer_without_vad": round(jiwer.wer(reference, texts[False]), 4),
        "wer_with_vad": round(jiwer.wer(reference, texts[True]), 4),
        "words_differing": round(jiwer.wer(texts[False], texts[True]) * len(texts[False].split())),
        "transcript_without_vad": texts[False],
        "transcript_with_vad": texts[True],
    }


def costs(engine: Transcriber, seconds: float) -> dict:
    out = {}
    for language in asterisk.LANGUAGES:
        audio = asterisk.long_form(language, seconds, skip=40)
        base = TranscribeOptions(language=language, timestamps=True, temperatures=(0.0,))
        started = time.perf_counter()
        plain = engine.transcribe(audio, base)
        without = time.perf_counter() - started
        started = time.perf_counter()
        engine.transcribe(
            audio, TranscribeOptions(language=language, timestamps=True, temperatures=(0.0,), word_timestamps=True)
        )
        extra = time.perf_counter() - started - without
        fallback = engine.transcribe(audio, TranscribeOptions(language=language, timestamps=True)).stats
        out[language] = {
            "windows": plain.stats.windows,
            "word_timestamps_extra_s_per_window": round(extra / plain.stats.windows, 3),
            "fallback_decodes": fallback.fallback_decodes,
            "fallback_windows_share": round(sum(t > 0 for t in fallback.temperatures) / len(fallback.temperatures), 3),
            "temperatures": fallback.temperatures,
        }
    return out


def markdown(report: dict) -> str:
    lines = [
        "# specwhisper-features",
        "",
        "## Word timestamps against faster-whisper (word_timestamps=True, greedy)",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in report["word_timestamps"].items()]
    lines += ["", "## Silence, noise and a tone between real speech: text written over them", ""]
    lines += ["| system | hallucinated segments | text |", "|---|---|---|"]
    for name, row in report["silence"].items():
        lines.append(f"| {name} | {len(row['hallucinated'])} | {' / '.join(row['hallucinated'])[:200]} |")
    vad_row = report["vad"]
    lines += ["", "## VAD filter on speech with long pauses", ""]
    lines += [f"- {key}: {value}" for key, value in vad_row.items() if not key.startswith("transcript")]
    lines += ["", "## What each option costs (long-form, timestamps, speculative)", ""]
    lines += ["| language | windows | word timestamps: extra s per window | fallback decodes | windows kept above 0 |"]
    lines += ["|---|---|---|---|---|"]
    for language, row in report["costs"].items():
        lines.append(
            f"| {language} | {row['windows']} | {row['word_timestamps_extra_s_per_window']} | "
            f"{row['fallback_decodes']} | {row['fallback_windows_share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specwhisper-features", description=__doc__)
    parser.add_argument("--main", default="base")
    add_assistant_arguments(parser, optional=False)
    parser.add_argument("--out", type=Path, default=Path("features"))
    parser.add_argument("--clips", type=int, default=6, help="clips per language for word timestamps")
    parser.add_argument("--long-seconds", type=float, default=120.0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of the VAD comparison")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    assistant, int8 = resolve_assistant(args)
    from faster_whisper import WhisperModel

    export = export_artefacts(ExportRequest(args.main, assistant, assistant_int8=int8))
    engine = Transcriber(ExportedModel(export, intra_op_threads=args.threads))
    faster = WhisperModel(str(ct2_dir(args.main)), device="cpu", compute_type="float32", cpu_threads=args.threads)
    report = {
        "word_timestamps": word_timestamps(engine, faster, args.clips),
        "silence": silence(engine, faster),
        "vad": vad(engine, args.repeats),
        "costs": costs(engine, args.long_seconds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "features.json").write_text(json.dumps(report, indent=1))
    (args.out / "features.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
