"""``specwhisper-export``: write a Triton model repository for a main Whisper model and its assistant."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specwhisper_export.compat import IncompatibleAssistantError
from specwhisper_export.presets import PRESETS
from specwhisper_export.repository import ExportRequest, write_repository
from specwhisper_export.triton_config import ServingOptions


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(sorted(PRESETS))
    parser = argparse.ArgumentParser(
        prog="specwhisper-export",
        description="Export Whisper (and an assistant for speculative decoding) to ONNX in a Triton model repository.",
    )
    parser.add_argument("--main", required=True, help=f"preset ({presets}), checkpoint directory or Hugging Face id")
    parser.add_argument("--assistant", help="assistant model: preset, checkpoint directory or Hugging Face id")
    parser.add_argument(
        "--assistant-form",
        choices=["auto", "decoder_only", "full"],
        default="auto",
        help="decoder_only reuses the main encoder's output (distil-whisper style); full runs the assistant's own "
        "encoder; auto picks decoder_only when the assistant can read the main encoder's output",
    )
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="fp16 is for GPU deployments")
    parser.add_argument(
        "--assistant-int8",
        action="store_true",
        help="int8 weights for the assistant decoder only (a cheaper draft; the output is unchanged)",
    )
    parser.add_argument("--out", type=Path, required=True, help="Triton model repository to write into")
    parser.add_argument("--model-name", default="specwhisper")
    parser.add_argument("--instances", type=int, default=1, help="Triton model instances")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per session (0: default)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--draft-confidence",
        type=float,
        default=ServingOptions().draft_confidence,
        help="a round stops drafting after a token the draft gives less probability (0: never)",
    )
    parser.add_argument(
        "--no-stream", action="store_true", help="skip the decoupled <name>_stream model that streams segments"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        serving = ServingOptions(
            instances=args.instances,
            intra_op_threads=args.threads,
            device=args.device,
            streaming=not args.no_stream,
            draft_confidence=args.draft_confidence,
        )
        request = ExportRequest(
            main=args.main,
            assistant=args.assistant,
            assistant_form=args.assistant_form,
            precision=args.precision,
            assistant_int8=args.assistant_int8,
        )
        model_dirs = write_repository(request, args.out, args.model_name, serving)
    except (IncompatibleAssistantError, ValueError) as error:
        print(f"specwhisper-export: error: {error}", file=sys.stderr)
        return 2
    written = ", ".join(str(d) for d in model_dirs)
    print(f"wrote {written} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
