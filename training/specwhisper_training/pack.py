"""Ship a trained draft with the project: pack its weights, then measure it as it ships.

The record written beside the weights says what the shipped draft achieved on held-out Asterisk
recordings (files the draft never trained on, by the corpus's own split rule), decoded through the
engine as served with its int8 weights. A test decodes the same recordings again and expects the
same figures, so a shipped file that no longer loads, or loads into another model, is caught. The
record names the toolchain it was measured with, since other versions move the figures a little.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_export.shipped import pack_draft, shipped_draft, shipped_files
from specwhisper_training import asterisk
from specwhisper_training.data import CorpusOptions

HELDOUT_CLIPS = 8  # held-out recordings per language, at least MIN_SECONDS long
MIN_SECONDS = 2.0
TOOLCHAIN = ("onnxruntime", "onnx", "onnxscript", "torch", "transformers")


def heldout_recordings(language: str, count: int = HELDOUT_CLIPS, every: int = CorpusOptions.heldout_every) -> list:
    """``count`` of ``language``'s held-out Asterisk prompts (every ``every``-th by sorted name, as the
    corpus holds them out), of at least ``MIN_SECONDS``, spread over the list."""
    heldout = [p for p in asterisk.prompts(language)[every - 1 :: every] if p.seconds >= MIN_SECONDS]
    step = len(heldout) / count
    return [heldout[int(i * step)] for i in range(count)]


def served_figures(main: str, assistant: str, languages: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per language: acceptance and tokens per main pass of the int8 draft on the held-out recordings,
    through the engine with the served draft lengths and confidence stop, but no cap from the
    measured step costs (they measure the machine's load, not the draft), and no copied drafts (the
    draft's figures, not what the text's repeating gives)."""
    export = export_artefacts(ExportRequest(main=main, assistant=assistant, assistant_int8=True))
    engine = Transcriber(ExportedModel(export, intra_op_threads=2), DraftPolicy(cost_aware=False, copies=False))
    figures = {}
    for language in languages:
        total = DecodeStats()
        for prompt in heldout_recordings(language):
            stats = engine.transcribe(asterisk.load_audio(prompt.path), TranscribeOptions(language=language)).stats
            for name, value in asdict(stats).items():
                setattr(total, name, getattr(total, name) + value)
        figures[language] = {
            "acceptance": round(total.acceptance_rate, 4),
            "tokens_per_main_pass": round(total.tokens_per_main_pass, 4),
            "tokens": total.tokens_out,
        }
    return figures


def pack(main: str, checkpoint: Path, training: dict, name: str | None = None) -> tuple[Path, Path]:
    """Pack ``checkpoint`` as ``main``'s shipped draft (or, with a ``name``, as a draft the export routes
    the languages it trained on to), then record its held-out figures as shipped."""
    record = {"training": training}
    if name is not None:
        record["route"] = list(training["options"]["corpus"]["languages"])
    files = pack_draft(checkpoint, main, record, name)
    record_heldout(main, name)
    return files


def heldout_languages(record: dict) -> tuple[str, ...]:
    """The languages a shipped draft is measured in: those it trained on that have recordings, whether
    or not the export routes them to it (a draft packed for fewer languages may serve some). Recordings
    in a language the draft trained on synthetic speech alone were never trained on."""
    languages = record["training"]["options"]["corpus"]["languages"]
    return tuple(language for language in languages if language in asterisk.RECORDED)


def toolchain() -> dict[str, str]:
    """The versions that export, quantise and run the draft's graph: the figures move a little with
    them (a draft token near the confidence stop's threshold goes either way)."""
    return {package: metadata.version(package) for package in TOOLCHAIN}


def record_heldout(main: str, name: str | None = None) -> dict:
    """Measure a shipped draft of ``main`` on its held-out recordings and write the figures into its
    record (again after a change to how the engine drafts); returns them."""
    record_file = shipped_files(main, name)[1]
    record = json.loads(record_file.read_text())
    languages = heldout_languages(record)
    if not languages:
        raise ValueError(f"{record_file}: none of its languages has recordings to measure it on ({asterisk.RECORDED})")
    figures = served_figures(main, str(shipped_draft(main, name)), languages)
    record["heldout"] = {
        "recordings_per_language": HELDOUT_CLIPS,
        "int8": True,
        "toolchain": toolchain(),
        "languages": figures,
    }
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record["heldout"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specwhisper_training.pack", description="Re-measure a shipped draft's held-out figures."
    )
    parser.add_argument("--main", default="base")
    parser.add_argument("--name", help="a draft that ships routed beside the default one (default: the default one)")
    args = parser.parse_args(argv)
    print(json.dumps(record_heldout(args.main, args.name), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
