"""``specwhisper-bench``: speculative against plain decoding, measured side by side in one run.

For one main model and its draft, on real speech (short clips and speech-dense long-form audio per
language), it times this engine plain and speculative, and transformers greedy and assisted
generation (``generate(assistant_model=...)``, the method this project builds on) on the same
clips, and prints ratios: main-decoder passes saved, tokens per main pass, acceptance rate,
decode-phase and end-to-end speed-up, and whether the tokens are identical. ``--versus`` runs a
second draft (and ``--versus-confidence`` or ``--versus-copies`` a second drafting policy) on the
same audio in the same run, against the same plain decoding: two drafts compared on one machine's
load, not on two runs' noise. ``--route`` gives ``--assistant``'s run drafts routed by language, as ``specwhisper-export
--route`` does; with the shipped draft, the drafts that ship routed beside it are its routes unless
``--no-shipped-routes``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.runtime import ExportedModel, execution_providers
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_export.cli import add_assistant_arguments, add_route_arguments, resolve_assistant, resolve_routes
from specwhisper_export.presets import load_whisper, resolve_checkpoint
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_training import asterisk


@dataclass
class Run:
    seconds: float = 0.0
    decode_seconds: float = 0.0
    stats: DecodeStats | None = None
    tokens: list[list[int]] | None = None


def _merge(total: DecodeStats, part: DecodeStats) -> None:
    for name, value in vars(part).items():
        setattr(total, name, getattr(total, name) + value)


def run_engine(
    engine: Transcriber, audios: list[np.ndarray], language: str, speculative: bool, timestamps: bool
) -> Run:
    run = Run(stats=DecodeStats(), tokens=[])
    for audio in audios:
        started = time.perf_counter()
        result = engine.transcribe(
            audio, TranscribeOptions(language=language, speculative=speculative, timestamps=timestamps)
        )
        run.seconds += time.perf_counter() - started
        _merge(run.stats, result.stats)
        run.tokens.append([t for s in result.segments for t in s.tokens])
    run.decode_seconds = run.stats.seconds_draft + run.stats.seconds_verify
    return run


def run_transformers(
    model: WhisperForConditionalGeneration,
    processor,
    assistant: torch.nn.Module | None,
    audios: list[np.ndarray],
    language: str,
) -> Run:
    """transformers greedy (or assisted with ``assistant``), short-form, no timestamps."""
    run = Run(tokens=[])
    for audio in audios:
        started = time.perf_counter()
        features = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        kwargs = {"assistant_model": assistant} if assistant is not None else {}
        with torch.no_grad():
            sequence = model.generate(features, language=language, task="transcribe", **kwargs)[0].tolist()
        run.seconds += time.perf_counter() - started
        eot = model.generation_config.eos_token_id
        run.tokens.append(sequence[: sequence.index(eot)] if eot in sequence else sequence)
    return run


def engine_rows(
    engine: Transcriber, versus: Transcriber | None, audios: list[np.ndarray], language: str, timestamps: bool
) -> dict:
    """Plain against speculative decoding of ``audios``, and against ``versus``'s draft (``"versus"``)."""
    plain = run_engine(engine, audios, language, False, timestamps)
    row = compare(plain, run_engine(engine, audios, language, True, timestamps))
    if versus is not None:
        row["versus"] = compare(plain, run_engine(versus, audios, language, True, timestamps))
    return row


def compare(plain: Run, fast: Run) -> dict:
    report = {
        "plain_s": round(plain.seconds, 2),
        "speculative_s": round(fast.seconds, 2),
        "end_to_end_speedup": round(plain.seconds / fast.seconds, 2),
        "identical_tokens": plain.tokens == fast.tokens,
    }
    if plain.stats and fast.stats:
        report |= {
            "decode_speedup": round(plain.decode_seconds / max(fast.decode_seconds, 1e-9), 2),
            "main_passes_saved": round(1 - fast.stats.main_passes / plain.stats.main_passes, 3),
            "tokens_per_main_pass": round(fast.stats.tokens_per_main_pass, 2),
            "acceptance_rate": round(fast.stats.acceptance_rate, 3),
            "tokens_copied": fast.stats.tokens_copied,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specwhisper-bench", description=__doc__)
    parser.add_argument("--main", default="base")
    add_assistant_arguments(parser, optional=False)
    add_route_arguments(parser)  # for --assistant's run, not --versus's
    parser.add_argument(
        "--export", type=Path, help="time this export's graphs (specwhisper-export's artefacts) as they are"
    )
    parser.add_argument(
        "--device", choices=["cpu", "gpu"], default="cpu", help="where ONNX Runtime runs the graphs (gpu: CUDA)"
    )
    parser.add_argument("--versus", help="a second draft to run on the same audio, in the same run")
    parser.add_argument(
        "--confidence",
        type=float,
        default=DraftPolicy().confidence,
        help="drafting stops a round after a token the draft gives less probability (0: never)",
    )
    parser.add_argument(
        "--versus-confidence",
        type=float,
        help="the second run's --confidence (default: the same); without --versus, the same draft runs twice",
    )
    parser.add_argument(
        "--no-copies", action="store_true", help="never copy drafts from earlier text (specwhisper_backend.copying)"
    )
    parser.add_argument(
        "--versus-copies",
        choices=["on", "off"],
        help="whether the second run copies drafts (default: as the first); without --versus, one draft runs twice",
    )
    parser.add_argument(
        "--no-cost-cap",
        action="store_true",
        help="draft as the lengths say, never capped by the measured step costs (to time the draft, not the policy)",
    )
    parser.add_argument("--languages", nargs="+", default=["en", "es"])
    parser.add_argument("--clips", type=int, default=10, help="short clips per language")
    parser.add_argument("--long-seconds", type=float, default=120, help="long-form audio per language (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    if args.export is not None and (args.versus or args.assistant or args.route):
        parser.error("--export times an export as it is: --assistant, --route and --versus export drafts")
    assistant, int8 = (None, False) if args.export is not None else resolve_assistant(args)
    if args.export is None and assistant is None:
        parser.error(f"no draft ships for {args.main!r}: give --assistant (a draft to export) or --export")
    if not args.no_transformers and (assistant is None or args.device != "cpu"):
        parser.error("the transformers rows run on the CPU with the draft's checkpoint; else --no-transformers")
    torch.set_num_threads(args.threads)
    try:
        cost_aware = not args.no_cost_cap
        policy = DraftPolicy(confidence=args.confidence, cost_aware=cost_aware, copies=not args.no_copies)
        versus_policy = replace(
            policy,
            confidence=policy.confidence if args.versus_confidence is None else args.versus_confidence,
            copies=policy.copies if args.versus_copies is None else args.versus_copies == "on",
        )
        providers = execution_providers(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))

    assistant_ckpt = None if assistant is None else resolve_checkpoint(assistant)

    def exported(assistant_checkpoint: str | None, routes: tuple = ()) -> ExportedModel:
        if args.export is not None:
            return ExportedModel(args.export, args.threads, providers)
        request = ExportRequest(args.main, assistant_checkpoint, assistant_int8=int8, routes=routes)
        return ExportedModel(export_artefacts(request), args.threads, providers)

    try:
        main_model = exported(assistant_ckpt, () if args.export is not None else resolve_routes(args))
    except ValueError as error:
        parser.error(str(error))
    engine = Transcriber(main_model, policy)
    versus = None
    if args.versus:
        versus = Transcriber(exported(resolve_checkpoint(args.versus)), versus_policy)
    elif versus_policy != policy:
        versus = Transcriber(main_model, versus_policy)
    model = processor = assistant = None
    if not args.no_transformers:
        model, processor = load_whisper(args.main)
        assistant = WhisperForCausalLM.from_pretrained(assistant_ckpt).eval()

    results: dict[str, dict] = {}
    for language in args.languages:
        short = [asterisk.load_audio(p.path) for p in asterisk.select(language, args.clips, min_seconds=2.0)]
        engine.transcribe(short[0], TranscribeOptions(language=language))  # warm-up
        key = f"{language} short ({len(short)} clips, {sum(map(len, short)) / SAMPLE_RATE:.0f} s)"
        results[key] = engine_rows(engine, versus, short, language, timestamps=False)
        if assistant is not None:
            greedy = run_transformers(model, processor, None, short, language)
            assisted = run_transformers(model, processor, assistant, short, language)
            results[key]["transformers"] = compare(greedy, assisted)
            results[key]["engine_speculative_vs_transformers_assisted"] = round(
                assisted.seconds / max(results[key]["speculative_s"], 1e-9), 2
            )
        if args.long_seconds > 0:
            audio = [asterisk.long_form(language, args.long_seconds, skip=100)]
            key = f"{language} long-form ({len(audio[0]) / SAMPLE_RATE:.0f} s, timestamps)"
            results[key] = engine_rows(engine, versus, audio, language, timestamps=True)
        print(json.dumps({k: v for k, v in results.items() if k.startswith(language)}, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
