"""``specwhisper-export``: write a Triton model repository for a main Whisper model and its assistant."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specwhisper_export.compat import IncompatibleAssistantError
from specwhisper_export.presets import PRESETS
from specwhisper_export.repository import ExportRequest, write_repository
from specwhisper_export.shipped import default_assistant, default_routes
from specwhisper_export.triton_config import ServingOptions


def add_assistant_arguments(parser: argparse.ArgumentParser, optional: bool = True) -> None:
    """``--assistant`` (default: the draft that ships for ``--main``) and ``--assistant-int8`` (on by
    default), the same for every command that exports a draft; ``optional``: ``--no-assistant`` too."""
    parser.add_argument(
        "--assistant", help="preset, checkpoint directory or Hugging Face id (default: the draft shipped for --main)"
    )
    if optional:
        parser.add_argument("--no-assistant", action="store_true", help="no assistant: plain decoding only")
    parser.add_argument(
        "--assistant-int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8 weights for the assistant decoder only, a cheaper draft with the same output "
        "(default: on, for fp32 exports)",
    )


def parse_route(value: str) -> tuple[tuple[str, ...], str]:
    """``it,ru=DRAFT`` -> ``(("it", "ru"), "DRAFT")``."""
    languages, separator, draft = value.partition("=")
    codes = tuple(code.strip() for code in languages.split(",") if code.strip())
    if not separator or not draft or not codes:
        raise argparse.ArgumentTypeError(f"a route is LANGUAGES=DRAFT, such as it,ru=./my-draft; got {value!r}")
    return codes, draft


def add_route_arguments(parser: argparse.ArgumentParser) -> None:
    """``--route LANGUAGES=DRAFT``, repeatable: drafts routed by language (ExportRequest.routes)."""
    parser.add_argument(
        "--route",
        type=parse_route,
        action="append",
        default=[],
        metavar="LANGUAGES=DRAFT",
        help="a draft for some languages (comma-separated codes): their rows draft with it instead of --assistant, "
        "which keeps the others; repeatable (docs/draft-training.md). Default: with the shipped draft, the drafts "
        "that ship routed beside it",
    )
    parser.add_argument(
        "--no-shipped-routes",
        action="store_true",
        help="the shipped draft alone, for every language: not the drafts that ship routed beside it",
    )


def resolve_assistant(args: argparse.Namespace, precision: str = "fp32") -> tuple[str | None, bool]:
    """The assistant asked for (or the shipped default) and whether its decoder goes int8."""
    if getattr(args, "no_assistant", False):
        if args.assistant:
            raise ValueError("--assistant and --no-assistant contradict each other")
        return None, False
    assistant = args.assistant or default_assistant(args.main)
    int8 = args.assistant_int8
    if int8 is None:
        int8 = assistant is not None and precision == "fp32"
    return assistant, int8


def resolve_routes(args: argparse.Namespace) -> tuple[tuple[tuple[str, ...], str], ...]:
    """The drafts routed by language: those given (``--route``), else, where the shipped draft is the
    assistant, the drafts that ship routed beside it. A draft of one's own (``--assistant``) drafts for
    every language unless routes are given."""
    if args.route:
        return tuple(args.route)
    if getattr(args, "no_assistant", False) or args.assistant or args.no_shipped_routes:
        return ()
    return default_routes(args.main)


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(sorted(PRESETS))
    parser = argparse.ArgumentParser(
        prog="specwhisper-export",
        description="Export Whisper (and an assistant for speculative decoding) to ONNX in a Triton model repository.",
    )
    parser.add_argument("--main", required=True, help=f"preset ({presets}), checkpoint directory or Hugging Face id")
    parser.add_argument(
        "--assistant-form",
        choices=["auto", "decoder_only", "full"],
        default="auto",
        help="decoder_only reuses the main encoder's output (distil-whisper style); full runs the assistant's own "
        "encoder; auto picks decoder_only when the assistant can read the main encoder's output",
    )
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="fp16 is for GPU deployments")
    add_assistant_arguments(parser)
    add_route_arguments(parser)
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
    batching = ServingOptions()
    parser.add_argument(
        "--max-batch-rows", type=int, default=batching.max_batch_rows, help="windows decoded together per instance"
    )
    parser.add_argument(
        "--max-queue", type=int, default=batching.max_queue, help="requests that may wait beyond the batch's rows"
    )
    parser.add_argument(
        "--encoder-batch", type=int, default=batching.encoder_batch, help="windows per encoder pass (GPUs: more)"
    )
    parser.add_argument(
        "--encoder-stall",
        type=float,
        default=batching.encoder_stall,
        help="a newer request's encoder pass may stall the batch for this many windows' decoding (0: no bound)",
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
            max_batch_rows=args.max_batch_rows,
            max_queue=args.max_queue,
            encoder_batch=args.encoder_batch,
            encoder_stall=args.encoder_stall,
        )
        assistant, int8 = resolve_assistant(args, args.precision)
        request = ExportRequest(
            main=args.main,
            assistant=assistant,
            assistant_form=args.assistant_form,
            precision=args.precision,
            assistant_int8=int8,
            routes=resolve_routes(args),
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
