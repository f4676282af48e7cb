"""``specwhisper transcribe FILE...``: transcripts from a running Triton server, written to files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from specwhisper_client.client import Segment, SpeechClient, StreamEnd, TranscriptionResult
from specwhisper_client.formats import FORMATS, render

# Files longer than this are streamed segment by segment, so the progress bar moves with the audio.
STREAM_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specwhisper", description="Whisper with speculative decoding, via Triton")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("transcribe", help="transcribe audio files")
    run.add_argument("files", nargs="+", type=Path)
    run.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    run.add_argument("--model", default="specwhisper")
    run.add_argument("--language", help="ISO code (en, es, ...); detected when left out")
    run.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    run.add_argument("--timestamps", action="store_true", help="segment times (implied by srt and vtt)")
    run.add_argument("--no-speculative", action="store_true", help="main model alone (the baseline)")
    run.add_argument("--initial-prompt")
    run.add_argument(
        "--condition-on-previous-text",
        action=argparse.BooleanOptionalAction,
        help="prompt each window with the text so far",
    )
    run.add_argument("--temperature", type=float, nargs="+", help="the fallback's schedule (default 0 0.2 ... 1.0)")
    for name, what in (
        ("compression-ratio-threshold", "decode again above this gzip ratio (default 2.4)"),
        ("logprob-threshold", "decode again below this average log-probability (default -1)"),
        ("no-speech-threshold", "skip a silent window above this no-speech probability (default 0.6)"),
    ):
        run.add_argument(f"--{name}", type=_threshold, help=f"{what}; 'off' turns it off")
    run.add_argument("--seed", type=int, help="for sampling above temperature 0 (default 0)")
    run.add_argument(
        "--word-timestamps", action="store_true", help="times of each word (json; srt/vtt with --word-level)"
    )
    run.add_argument("--word-level", action="store_true", help="srt/vtt: one cue per word (implies --word-timestamps)")
    run.add_argument("--vad-filter", action="store_true", help="decode only the speech Silero VAD finds")
    run.add_argument("--format", choices=FORMATS, default="txt")
    run.add_argument("--output-dir", type=Path, default=Path("."))
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    return parser


def _threshold(value: str) -> float:
    return float("nan") if value.lower() == "off" else float(value)


def _stream_with_progress(client: SpeechClient, path: Path, options: dict) -> TranscriptionResult:
    duration = sf.info(str(path)).duration
    segments: list[Segment] = []
    end = StreamEnd("", {})
    with tqdm(total=round(duration, 1), unit="s", desc=path.name, leave=False) as bar:
        for item in client.stream(path, **options):
            if isinstance(item, StreamEnd):
                end = item
                continue
            segments.append(item)
            bar.update(round(min(item.end, duration) - bar.n, 1))
    text = "".join(s.text for s in segments).strip()
    return TranscriptionResult(text=text, language=end.language, segments=segments, stats=end.stats)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        "language": args.language,
        "task": args.task,
        "timestamps": args.timestamps or args.format in ("srt", "vtt"),
        "speculative": not args.no_speculative,
        "initial_prompt": args.initial_prompt,
        "condition_on_previous_text": args.condition_on_previous_text,
        "temperature": args.temperature,
        "compression_ratio_threshold": args.compression_ratio_threshold,
        "logprob_threshold": args.logprob_threshold,
        "no_speech_threshold": args.no_speech_threshold,
        "seed": args.seed,
        "word_timestamps": args.word_timestamps or args.word_level,
        "vad_filter": args.vad_filter,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failures = 0

    def save(path: Path, result: TranscriptionResult) -> None:
        text = render(result, args.format, words=args.word_level)
        (args.output_dir / f"{path.stem}.{args.format}").write_text(text, encoding="utf-8")

    missing = [f for f in args.files if not f.is_file()]
    for path in missing:
        print(f"specwhisper: error: {path}: no such file", file=sys.stderr)
    files = [f for f in args.files if f.is_file()]
    with SpeechClient(args.url, args.model, timeout=args.timeout) as client:
        long_files = [f for f in files if _seconds(f) > STREAM_SECONDS]
        for path in long_files:
            try:
                save(path, _stream_with_progress(client, path, options))
            except Exception as error:  # reported per file; the others still run
                failures += 1
                print(f"specwhisper: error: {path}: {error}", file=sys.stderr)
        short = [f for f in files if f not in long_files]
        with tqdm(total=len(short), unit="file", disable=len(short) < 2) as bar:
            for path, outcome in client.transcribe_many(short, concurrency=args.concurrency, **options):
                bar.update(1)
                if isinstance(outcome, Exception):
                    failures += 1
                    print(f"specwhisper: error: {path}: {outcome}", file=sys.stderr)
                else:
                    save(path, outcome)
    return 1 if failures or missing else 0


def _seconds(path: Path) -> float:
    try:
        return sf.info(str(path)).duration
    except RuntimeError:
        return 0.0  # not readable here; the server will say what is wrong with it


if __name__ == "__main__":
    sys.exit(main())
