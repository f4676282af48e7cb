"""``specwhisper-demo``: the whole path on this machine, end to end.

Imports the default weights, exports them with the default draft into ``model_repository/``,
starts the real tritonserver, transcribes a real recording over gRPC with speculative decoding
on and off, and prints the text and the measured speed-up.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import soundfile as sf

from specwhisper_backend.tritonserver import TritonServer
from specwhisper_client import SpeechClient
from specwhisper_export import asterisk
from specwhisper_export.repository import ExportRequest, write_repository
from specwhisper_export.triton_config import ServingOptions


def default_assistant(main: str) -> str:
    """The trained draft for ``main`` (built and cached on first use)."""
    from specwhisper_export.draft_training import draft_checkpoint

    return str(draft_checkpoint(main))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specwhisper-demo", description=__doc__)
    parser.add_argument("--main", default="base")
    parser.add_argument("--assistant", help="default: the trained draft for --main")
    parser.add_argument(
        "--assistant-int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the draft decoder with int8 weights (a cheaper draft; the transcript is the main model's either way)",
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--audio", type=Path, help="default: 60 s of real English speech (Asterisk prompts)")
    args = parser.parse_args(argv)

    assistant = args.assistant or default_assistant(args.main)
    print(f"exporting {args.main} with assistant {assistant} into {args.repository} ...", flush=True)
    request = ExportRequest(main=args.main, assistant=assistant, assistant_int8=args.assistant_int8)
    write_repository(request, args.repository, serving=ServingOptions())
    if args.audio:
        data, label = args.audio.read_bytes(), str(args.audio)
    else:
        buffer = io.BytesIO()
        sf.write(buffer, asterisk.long_form("en", 60), asterisk.SAMPLE_RATE, format="WAV")
        data, label = buffer.getvalue(), "60 s of English Asterisk prompts"
    print("starting tritonserver ...", flush=True)
    with TritonServer(args.repository.resolve()) as server, SpeechClient(server.grpc_url) as client:
        client.transcribe(data, language="en", timestamps=True)  # first request warms caches
        timings = {}
        for speculative in (False, True):
            started = time.perf_counter()
            result = client.transcribe(data, language="en", timestamps=True, speculative=speculative)
            timings[speculative] = time.perf_counter() - started
        print(f"\n{label}:\n{result.text}\n")
        print(
            f"plain {timings[False]:.2f} s, speculative {timings[True]:.2f} s: "
            f"{timings[False] / timings[True]:.2f}x end to end; {result.stats['tokens_per_main_pass']:.2f} tokens "
            f"per main decoder pass, acceptance {result.stats['acceptance_rate']:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
