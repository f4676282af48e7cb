"""``specwhisper-train-draft``: train a draft for a main Whisper model, then report on held-out audio."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from transformers import WhisperProcessor

from specwhisper_export.repository import ACCEPTANCE_FILE, write_measured_acceptance
from specwhisper_export.shipped import DRAFTS_DIR
from specwhisper_training.evaluate import evaluate_draft
from specwhisper_training.options import DRAFT_PRESETS, DRAFT_RECIPES, PRESET_RECIPES, DraftTrainingOptions
from specwhisper_training.pack import pack
from specwhisper_training.train import TRAINING_FILE, draft_checkpoint, recipe_lexicon, train_draft, widen_head


def build_parser() -> argparse.ArgumentParser:
    defaults = DRAFT_PRESETS["base"]  # the preset's settings, for any main model
    corpus = defaults.corpus  # corpus options left out take the recipe's corpus's
    parser = argparse.ArgumentParser(
        prog="specwhisper-train-draft",
        description="Train a decoder-only draft (trimmed vocabulary) aligned with a main Whisper model, on CPU.",
    )
    parser.add_argument("--main", default="base", help="preset, checkpoint directory or Hugging Face id")
    parser.add_argument("--audio", nargs="*", default=[], help="extra audio files or folders (no transcripts needed)")
    parser.add_argument(
        "--recipe",
        choices=sorted(DRAFT_RECIPES),
        default=PRESET_RECIPES["base"],
        help=f"the corpus and start to train with (default: {PRESET_RECIPES['base']}, base's preset; 'multilingual': "
        "Whisper's twenty largest languages, from the en-es-fr draft; docs/draft-training.md)",
    )
    parser.add_argument(
        "--languages",
        nargs="*",
        help="train a draft for these languages of the recipe's built-in speech only (default: all of them)",
    )
    parser.add_argument("--out", type=Path, help="checkpoint directory to write (default: the cached draft)")
    parser.add_argument("--layers", type=int, nargs="+", default=list(defaults.layers))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument(
        "--init",
        help="start from a trained draft instead of the main decoder's layers: a recipe's, 'shipped' (--main's "
        "shipped draft), 'shipped:NAME' (its draft called NAME, routed beside it) or a checkpoint directory; "
        "'none': the main decoder's layers (default: the recipe's)",
    )
    parser.add_argument("--learning-rate", type=float, help="default: the recipe's")
    parser.add_argument("--train-windows", type=int, default=None, help="per language")
    parser.add_argument("--voice-windows", type=int, default=None, help="per language with a second Asterisk voice")
    parser.add_argument("--espeak-windows", type=int, default=None, help="per language")
    parser.add_argument("--fortune-windows", type=int, default=None, help="per language with fortunes installed")
    parser.add_argument("--heldout-windows", type=int, default=None, help="per language")
    parser.add_argument("--catalog-windows", type=int, default=None, help="per language: translated program messages")
    parser.add_argument(
        "--heldout-synthetic-windows",
        type=int,
        default=None,
        help="per language without recordings: held-out texts spoken by espeak-ng",
    )
    parser.add_argument(
        "--training-forms",
        type=int,
        default=None,
        help="prompt forms (task, timestamps) each training window is decoded in, 1-4",
    )
    parser.add_argument(
        "--spoken-targets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="synthetic windows' default-form targets: the text spoken, read by the main model teacher-forced",
    )
    parser.add_argument(
        "--festival-share",
        type=float,
        default=None,
        help="of the synthetic windows in a language Festival speaks and with no recordings, the share it reads",
    )
    parser.add_argument(
        "--narrowband-share",
        type=float,
        default=None,
        help="of the synthetic training windows, the share heard through a telephone's band (8 kHz and back)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="a training window's longest audio, up to 29 (default: the recipe's); long-form's full 30 s windows "
        "reach token places that shorter windows seldom train",
    )
    parser.add_argument(
        "--passage-words",
        type=int,
        nargs=2,
        metavar=("FEWEST", "MOST"),
        default=None,
        help="words a synthetic window's prose passage holds (default: the recipe's, 15 60); more words fill the "
        "long windows that --max-seconds allows",
    )
    parser.add_argument("--max-files", type=int, default=corpus.max_files, help="per language and split; 0: all")
    parser.add_argument("--vocab-rank-floor", type=int, default=defaults.vocab_rank_floor)
    parser.add_argument(
        "--vocab-teacher-top-k",
        type=int,
        default=defaults.vocab_teacher_top_k,
        help="also cover the main model's k likeliest ids at every training position",
    )
    parser.add_argument(
        "--vocab-prose-min-count",
        type=int,
        default=defaults.vocab_prose_min_count,
        help="also cover every id Debian's fortune prose uses this often (0: none)",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=defaults.ema_decay,
        help="keep a moving average of the weights after warm-up (0: the last weights)",
    )
    parser.add_argument(
        "--leave-out-loops",
        action="store_true",
        help="train on no target Whisper's repetition gate would discard (compression ratio over 2.4)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--engine-windows",
        type=int,
        default=10,
        help="held-out windows per language decoded through the engine for the report (0: teacher-forced figures only)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the held-out report (and the ONNX export)")
    parser.add_argument(
        "--checkpoint", type=Path, help="a draft trained before (with its draft_training.json): report or pack it"
    )
    parser.add_argument(
        "--widen-head",
        type=Path,
        metavar="OUT",
        help="with --checkpoint: write it to OUT with its head also covering this recipe's prose lexicon "
        "(the main model's rows, untrained), then report or pack that",
    )
    parser.add_argument(
        "--pack",
        nargs="?",
        const="",
        metavar="NAME",
        help=f"ship the draft with the project: write {DRAFTS_DIR}/<main>.{{safetensors,json}}; with a NAME, "
        "<main>-routed/NAME.*: a draft the export routes the languages it trained on to, beside the default one",
    )
    return parser


def options_from(args: argparse.Namespace) -> DraftTrainingOptions:
    recipe = DRAFT_RECIPES[args.recipe]
    base = recipe.corpus
    given = {
        name: getattr(args, name)
        for name in (
            "train_windows",
            "voice_windows",
            "espeak_windows",
            "fortune_windows",
            "catalog_windows",
            "heldout_windows",
            "heldout_synthetic_windows",
            "training_forms",
            "spoken_targets",
            "festival_share",
            "narrowband_share",
            "max_seconds",
        )
        if getattr(args, name) is not None
    }
    if args.passage_words is not None:
        given["passage_words"] = tuple(args.passage_words)
    corpus = replace(
        base,
        **given,
        languages=base.languages if args.languages is None else tuple(args.languages),
        audio=tuple(str(Path(a).resolve()) for a in args.audio),
        max_files=args.max_files,
        seed=args.seed,
    )
    return DraftTrainingOptions(
        corpus=corpus,
        layers=tuple(args.layers),
        init=recipe.init if args.init is None else None if args.init == "none" else args.init,
        steps=args.steps,
        learning_rate=recipe.learning_rate if args.learning_rate is None else args.learning_rate,
        warmup_steps=min(DraftTrainingOptions.warmup_steps, args.steps),
        vocab_rank_floor=args.vocab_rank_floor,
        vocab_teacher_top_k=args.vocab_teacher_top_k,
        vocab_prose_min_count=args.vocab_prose_min_count,
        ema_decay=args.ema_decay,
        leave_out_loops=args.leave_out_loops,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        options = options_from(args)
    except ValueError as error:
        print(f"specwhisper-train-draft: error: {error}", file=sys.stderr)
        return 2
    widened = args.widen_head
    if widened is not None and (args.checkpoint is None or (widened.exists() and any(widened.iterdir()))):
        print("specwhisper-train-draft: error: --widen-head needs --checkpoint and an empty OUT", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
        if not (checkpoint / TRAINING_FILE).is_file():
            print(f"specwhisper-train-draft: error: {checkpoint} has no {TRAINING_FILE}", file=sys.stderr)
            return 2
    elif args.out is None:
        checkpoint = draft_checkpoint(args.main, options)
    else:
        checkpoint = args.out
        if checkpoint.exists() and any(checkpoint.iterdir()):
            print(f"specwhisper-train-draft: error: {checkpoint} is not empty", file=sys.stderr)
            return 2
        checkpoint.mkdir(parents=True, exist_ok=True)
        train_draft(args.main, options, checkpoint)
    if args.widen_head is not None:
        args.widen_head.mkdir(parents=True, exist_ok=True)
        processor = WhisperProcessor.from_pretrained(checkpoint)
        widen_head(checkpoint, recipe_lexicon(options, processor.tokenizer), args.widen_head, processor)
        checkpoint = args.widen_head
    record = json.loads((checkpoint / TRAINING_FILE).read_text())
    print(f"draft checkpoint: {checkpoint}")
    print(
        f"{len(options.layers)} layers {list(options.layers)}, vocabulary {record['vocabulary']} ids, "
        f"trained in {record['seconds_total']:.0f} s (data {record['seconds_data']:.0f} s), "
        f"final loss {record['final_loss']:.3f}"
    )
    if not args.no_report:
        report = evaluate_draft(args.main, checkpoint, options.corpus, engine_windows=args.engine_windows)
        print(report.format())
        # A draft made by this run keeps its engine figures, so that serving it unpacked starts there
        # (packing replaces them with the pack step's figures on human recordings). A checkpoint only
        # reported on is left as it was.
        measured = report.engine_acceptance()
        if measured and (args.checkpoint is None or args.widen_head is not None):
            write_measured_acceptance(checkpoint, measured)
            print(f"measured acceptance kept in {checkpoint / ACCEPTANCE_FILE}: a served instance starts from it")
    if args.pack is not None:
        weights, record_file = pack(args.main, checkpoint, record, args.pack or None)
        print(f"shipped draft: {weights} ({weights.stat().st_size / 1e6:.1f} MB), {record_file}:")
        print(json.dumps(json.loads(record_file.read_text())["heldout"], indent=1))
    if args.pack:  # the languages the draft trained on (with --checkpoint, its record's, not these options')
        routed = ",".join(record["options"]["corpus"]["languages"])
        print(f"specwhisper-export --main {args.main} now routes {routed} to it")
    elif args.languages:  # a draft for a few languages is served beside the default one, for them alone
        codes = ",".join(options.corpus.languages)
        print(f"serve it for {codes}: specwhisper-export --main {args.main} --route {codes}={checkpoint} --out ...")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
