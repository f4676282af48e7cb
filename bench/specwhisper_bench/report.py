"""``specwhisper-report``: this project against the usual ways of running Whisper, on the same audio, in one run.

Rows, per language, on short clips and on speech-dense long-form audio (separate tables):
transformers greedy and assisted generation (with the same draft), faster-whisper greedy in float32 and
int8 (CTranslate2, the same base weights), and this project plain and speculative *through a running
tritonserver* (exported into a temporary repository, one instance, two ONNX Runtime threads). Columns:
seconds, speed-up against transformers greedy, real-time factor, WER against the prompts' transcripts,
the share of outputs whose text tokens equal transformers greedy's, and the draft's acceptance rate.
Then a concurrency sweep against the same server: throughput and p95 latency, speculative on and off.

Everything goes into ``--out``: ``report.md`` (tables), ``report.json`` (the same numbers) and
``report.png`` (real-time factors and the sweep), plus the server's log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import jiwer
import numpy as np
import torch
import transformers
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_bench.benchmark import run_transformers
from specwhisper_client import SpeechClient
from specwhisper_export.cli import add_assistant_arguments, resolve_assistant
from specwhisper_export.presets import ct2_dir, load_whisper, resolve_checkpoint
from specwhisper_export.repository import ExportRequest, write_repository
from specwhisper_export.triton_config import ServingOptions
from specwhisper_serve.tritonserver import TritonServer, free_ports
from specwhisper_training import asterisk

REFERENCE = "transformers greedy"
# Where the long-form audio starts in each language's prompt list (as ``specwhisper-bench``).
LONG_FORM_SKIP = 100


@dataclass(frozen=True)
class ReportOptions:
    """What to measure; ``smoke()`` is the tiny subset the test runs."""

    out: Path
    assistant: str  # the draft: a checkpoint directory or preset (the CLI's default: the one shipped for main)
    main: str = "base"
    assistant_int8: bool = True  # this project's draft decoder with int8 weights (the main model stays fp32)
    languages: tuple[str, ...] = ("en",)
    clips: int = 10
    long_seconds: float = 120.0  # 0: no long-form table
    sweep: tuple[int, ...] = (1, 2, 4, 8)
    sweep_seconds: float = 20.0  # per client count and mode
    threads: int = 2

    def smoke(self) -> ReportOptions:
        return replace(self, clips=1, long_seconds=10.0, sweep=(1, 2), sweep_seconds=1.5)


@dataclass(frozen=True)
class Hypothesis:
    """One system's output for one audio; ``tokens`` are text tokens, None where the system exposes none."""

    text: str
    tokens: tuple[int, ...] | None
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Measured:
    """One system over a set of audio: total wall time and each output."""

    seconds: float
    outputs: tuple[Hypothesis, ...]


# A system: (audio at 16 kHz, long-form?) -> its output. Timing is done around it, the same for all.
Decode = Callable[[np.ndarray, bool], Hypothesis]


@dataclass(frozen=True)
class Row:
    system: str
    seconds: float
    speedup_vs_transformers_greedy: float | None
    real_time_factor: float
    wer: float
    identical_to_greedy: float | None  # share of outputs; None: no reference or no tokens
    acceptance_rate: float | None  # speculative rows that report it


@dataclass(frozen=True)
class Table:
    title: str
    language: str
    audio_seconds: float
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepPoint:
    clients: int
    speculative: bool
    requests: int
    failures: int
    throughput_rps: float
    audio_seconds_per_second: float
    p50_s: float
    p95_s: float


@dataclass(frozen=True)
class Report:
    options: dict
    environment: dict
    tables: tuple[Table, ...]
    sweep: tuple[SweepPoint, ...]
    notes: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------- the systems


def _text_tokens(ids: Sequence[int], eot: int) -> tuple[int, ...]:
    """Ids below <|endoftext|>: the text, whatever prompt, timestamp or end tokens a system adds around it."""
    return tuple(int(t) for t in ids if t < eot)


def long_form_features(processor: WhisperProcessor, audio: np.ndarray) -> dict[str, torch.Tensor]:
    """Un-truncated log-mel features (and their mask) for transformers' sequential long-form generate;
    30 s or less stays one padded window, which is what generate expects for short-form."""
    if len(audio) <= 30 * SAMPLE_RATE:
        extra = {}
    else:
        extra = {"truncation": False, "padding": "longest", "return_attention_mask": True}
    features = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", **extra)
    return {k: v for k, v in features.items() if k in ("input_features", "attention_mask")}


def transformers_decoder(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    assistant: torch.nn.Module | None,
    language: str,
) -> Decode:
    """Short clips through ``specwhisper-bench``'s ``run_transformers``; long-form through sequential
    long-form ``generate(return_timestamps=True)`` on the whole audio."""
    eot = model.generation_config.eos_token_id

    def decode(audio: np.ndarray, long_form: bool) -> Hypothesis:
        if long_form:
            kwargs = {"assistant_model": assistant} if assistant is not None else {}
            with torch.no_grad():
                ids = model.generate(
                    **long_form_features(processor, audio),
                    language=language,
                    task="transcribe",
                    return_timestamps=True,
                    **kwargs,
                )[0].tolist()
        else:
            ids = run_transformers(model, processor, assistant, [audio], language).tokens[0]
        tokens = _text_tokens(ids, eot)
        return Hypothesis(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens)

    return decode


def faster_whisper_decoder(model, language: str, eot: int) -> Decode:
    """Greedy, no fallback, no conditioning; without timestamps on short clips, with them on long-form
    (its sequential timestamped mode, like the other long-form rows). Tokens from its segments."""

    def decode(audio: np.ndarray, long_form: bool) -> Hypothesis:
        segments, _ = model.transcribe(
            audio,
            language=language,
            beam_size=1,
            temperature=0.0,
            without_timestamps=not long_form,
            condition_on_previous_text=False,
        )
        segments = list(segments)  # a generator: decoding happens here
        tokens = _text_tokens([t for s in segments for t in s.tokens], eot)
        return Hypothesis("".join(s.text for s in segments).strip(), tokens)

    return decode


def triton_decoder(client: SpeechClient, language: str, speculative: bool, eot: int) -> Decode:
    """This project over gRPC, PCM in; timestamps on long-form only (as ``specwhisper-bench``)."""

    def decode(audio: np.ndarray, long_form: bool) -> Hypothesis:
        result = client.transcribe(
            audio, sample_rate=SAMPLE_RATE, language=language, speculative=speculative, timestamps=long_form
        )
        tokens = _text_tokens([t for s in result.segments for t in s.tokens], eot)
        stats = result.stats
        return Hypothesis(result.text.strip(), tokens, stats.get("tokens_drafted", 0), stats.get("tokens_accepted", 0))

    return decode


@dataclass(frozen=True)
class Models:
    """Everything loaded once per run and shared by the languages."""

    main: WhisperForConditionalGeneration
    processor: WhisperProcessor
    assistant: WhisperForCausalLM
    fw_float32: object
    fw_int8: object

    @classmethod
    def load(cls, options: ReportOptions, assistant_checkpoint: str) -> Models:
        from faster_whisper import WhisperModel

        model, processor = load_whisper(options.main)
        assistant = WhisperForCausalLM.from_pretrained(assistant_checkpoint, dtype=torch.float32).eval()
        ct2 = str(ct2_dir(options.main))
        fw = {
            kind: WhisperModel(ct2, device="cpu", compute_type=kind, cpu_threads=options.threads)
            for kind in ("float32", "int8")
        }
        return cls(model, processor, assistant, fw["float32"], fw["int8"])

    def systems(self, client: SpeechClient, language: str) -> dict[str, Decode]:
        eot = self.main.generation_config.eos_token_id
        return {
            REFERENCE: transformers_decoder(self.main, self.processor, None, language),
            "transformers assisted": transformers_decoder(self.main, self.processor, self.assistant, language),
            "faster-whisper float32": faster_whisper_decoder(self.fw_float32, language, eot),
            "faster-whisper int8": faster_whisper_decoder(self.fw_int8, language, eot),
            "specwhisper plain (Triton)": triton_decoder(client, language, False, eot),
            "specwhisper speculative (Triton)": triton_decoder(client, language, True, eot),
        }


# ---------------------------------------------------------------- measuring and scoring


def measure(decode: Decode, audios: Sequence[np.ndarray], long_form: bool) -> Measured:
    """Wall time of ``decode`` over ``audios``, one after another (callers warm each system up first)."""
    outputs, seconds = [], 0.0
    for audio in audios:
        started = time.perf_counter()
        outputs.append(decode(audio, long_form))
        seconds += time.perf_counter() - started
    return Measured(seconds, tuple(outputs))


def normalizer(language: str, processor: WhisperProcessor) -> Callable[[str], str]:
    """Whisper's own normalisers: the English one for English, else the basic one. The English spelling
    map comes with the tokenizer's ``normalizer.json``; checkpoints imported from CT2 lack it (then none)."""
    if language == "en":
        return EnglishTextNormalizer(processor.tokenizer.english_spelling_normalizer or {})
    return BasicTextNormalizer()


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: Callable[[str], str]) -> float:
    """Corpus WER after normalisation, over the references that keep any words."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def identical_share(outputs: Sequence[Hypothesis], reference: Sequence[Hypothesis] | None) -> float | None:
    """Share of outputs whose text tokens equal the reference's; None without a reference or tokens."""
    if reference is None or any(o.tokens is None for o in outputs):
        return None
    return sum(o.tokens == r.tokens for o, r in zip(outputs, reference, strict=True)) / len(outputs)


def acceptance(outputs: Sequence[Hypothesis]) -> float | None:
    drafted = sum(o.drafted for o in outputs)
    return sum(o.accepted for o in outputs) / drafted if drafted else None


def make_row(
    system: str,
    result: Measured,
    audio_seconds: float,
    reference: Measured | None,
    texts: Sequence[str],
    normalize: Callable[[str], str],
) -> Row:
    return Row(
        system=system,
        seconds=round(result.seconds, 3),
        speedup_vs_transformers_greedy=round(reference.seconds / result.seconds, 2) if reference else None,
        real_time_factor=round(result.seconds / audio_seconds, 4),
        wer=round(word_error_rate(texts, [o.text for o in result.outputs], normalize), 4),
        identical_to_greedy=identical_share(result.outputs, reference.outputs if reference else None),
        acceptance_rate=None if (rate := acceptance(result.outputs)) is None else round(rate, 3),
    )


def run_table(
    title: str,
    language: str,
    systems: dict[str, Decode],
    audios: Sequence[np.ndarray],
    texts: Sequence[str],
    long_form: bool,
    normalize: Callable[[str], str],
) -> Table:
    """Every system on the same audio; a system that fails (e.g. transformers assisted long-form where
    unsupported) is left out and the table says why."""
    audio_seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    measured: dict[str, Measured] = {}
    notes = []
    for name, decode in systems.items():
        try:
            measured[name] = measure(decode, audios, long_form)
        except Exception as error:  # one unsupported system must not lose the others' numbers
            notes.append(f"{name} omitted: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        print(f"  {title}: {name} done", flush=True)
    reference = measured.get(REFERENCE)
    rows = tuple(make_row(n, m, audio_seconds, reference, texts, normalize) for n, m in measured.items())
    return Table(title, language, round(audio_seconds, 1), rows, tuple(notes))


def warm_up(systems: dict[str, Decode], audio: np.ndarray) -> None:
    """One untimed call each: first calls pay for allocations, thread pools and lazy initialisation."""
    for decode in systems.values():
        decode(audio, False)


def long_form_reference(language: str, seconds: float) -> tuple[np.ndarray, str]:
    """The long-form audio and its reference: the joined prompts' transcripts, in order."""
    audio = asterisk.long_form(language, seconds, skip=LONG_FORM_SKIP)
    prompts = asterisk.long_form_prompts(language, seconds, LONG_FORM_SKIP)
    return audio, " ".join(p.text for p in prompts)


# ---------------------------------------------------------------- the server and the sweep


@contextmanager
def running_server(options: ReportOptions, assistant: str) -> Iterator[TritonServer]:
    """The exported repository in a temporary directory, served by the real tritonserver (log in ``--out``)."""
    with tempfile.TemporaryDirectory(prefix="specwhisper-report-") as repository:
        serving = ServingOptions(instances=1, intra_op_threads=options.threads, streaming=False)
        request = ExportRequest(main=options.main, assistant=assistant, assistant_int8=options.assistant_int8)
        write_repository(request, Path(repository), serving=serving)
        grpc, http, metrics = free_ports(3)
        log = options.out / "tritonserver.log"
        with TritonServer(Path(repository), grpc, http, metrics, log_file=log) as server:
            yield server


def _client_loop(url: str, audios: Sequence[np.ndarray], offset: int, options: dict, deadline: float, out: list):
    """One client sending requests back to back until ``deadline`` (at least one), recording latencies."""
    with SpeechClient(url, timeout=600) as client:
        turn = offset
        while True:
            audio = audios[turn % len(audios)]
            started = time.perf_counter()
            try:
                client.transcribe(audio, sample_rate=SAMPLE_RATE, **options)
                out.append((time.perf_counter() - started, len(audio) / SAMPLE_RATE))
            except Exception:  # counted as a failure; the sweep goes on
                out.append((None, 0.0))
            turn += 1
            if time.monotonic() >= deadline:
                return


def sweep_point(url: str, audios: Sequence[np.ndarray], language: str, clients: int, speculative: bool, seconds: float):
    """``clients`` concurrent clients for ``seconds``: requests per second, audio seconds per second, latencies."""
    results: list[tuple[float | None, float]] = []
    deadline = time.monotonic() + seconds
    options = {"language": language, "speculative": speculative}
    threads = [
        threading.Thread(target=_client_loop, args=(url, audios, i, options, deadline, results)) for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = [latency for latency, _ in results if latency is not None]
    return SweepPoint(
        clients=clients,
        speculative=speculative,
        requests=len(latencies),
        failures=len(results) - len(latencies),
        throughput_rps=round(len(latencies) / elapsed, 3),
        audio_seconds_per_second=round(sum(a for _, a in results) / elapsed, 3),
        p50_s=round(float(np.percentile(latencies, 50)), 3) if latencies else float("nan"),
        p95_s=round(float(np.percentile(latencies, 95)), 3) if latencies else float("nan"),
    )


def run_sweep(url: str, audios: Sequence[np.ndarray], options: ReportOptions) -> tuple[SweepPoint, ...]:
    language = options.languages[0]
    return tuple(
        sweep_point(url, audios, language, clients, speculative, options.sweep_seconds)
        for clients in options.sweep
        for speculative in (False, True)
    )


# ---------------------------------------------------------------- writing


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(items: Sequence[object]) -> str:
    """A markdown table of frozen dataclasses, one column per field."""
    rows = [asdict(item) for item in items]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: Report) -> str:
    parts = ["# specwhisper report", "", "```", json.dumps(report.options | report.environment, indent=1), "```"]
    for table in report.tables:
        parts += ["", f"## {table.title}", "", markdown_table(table.rows) if table.rows else "(no rows)"]
        if table.notes:
            parts += ["", *(f"- {note}" for note in table.notes)]
    if report.sweep:
        language = report.options["languages"][0]
        parts += ["", f"## Concurrency sweep (Triton, {language} short clips)", "", markdown_table(report.sweep)]
    parts += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(parts) + "\n"


def plot(report: Report, path: Path) -> None:
    """Real-time factor of every row per table, and the sweep's throughput and p95 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    systems = list(dict.fromkeys(row.system for table in report.tables for row in table.rows))
    width = 0.8 / max(len(report.tables), 1)
    for i, table in enumerate(report.tables):
        rtf = {row.system: row.real_time_factor for row in table.rows}
        xs = [j + i * width for j, s in enumerate(systems) if s in rtf]
        axes[0].bar(xs, [rtf[s] for s in systems if s in rtf], width, label=table.title)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(systems))], systems, rotation=30, ha="right")
    axes[0].set_ylabel("real-time factor (lower is faster)")
    axes[0].legend(fontsize="small")
    for speculative in (False, True):
        points = [p for p in report.sweep if p.speculative == speculative]
        label = "speculative" if speculative else "plain"
        axes[1].plot([p.clients for p in points], [p.throughput_rps for p in points], "o-", label=label)
        axes[2].plot([p.clients for p in points], [p.p95_s for p in points], "o-", label=label)
    for axis, ylabel in ((axes[1], "throughput (requests/s)"), (axes[2], "p95 latency (s)")):
        axis.set_xticks(sorted({p.clients for p in report.sweep}))
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(report))
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    plot(report, out / "report.png")


# ---------------------------------------------------------------- the run


NOTES = (
    "seconds: wall time over the table's audio, one request after another, each system warmed up by one untimed "
    "call; real-time factor = seconds / audio seconds; every row starts from the same float32 16 kHz array.",
    "specwhisper rows go through the running tritonserver over gRPC (PCM input): client-side time, transfer "
    "included. Server: 1 instance, 2 ONNX Runtime intra-op threads.",
    "identical_to_greedy: share of outputs whose text tokens (ids below <|endoftext|>) equal transformers "
    "greedy's. faster-whisper is compared on its own segment token ids (Segment.tokens: the same tokenizer), "
    "not on re-encoded text. Long-form: one audio, so 0 or 1.",
    "wer: corpus WER after Whisper's EnglishTextNormalizer for English (without the British-to-American "
    "spelling map when the checkpoint has no normalizer.json, as with the CT2-imported presets), "
    "BasicTextNormalizer otherwise.",
    "acceptance_rate: drafted tokens the main model accepted, from the server's per-request stats; n/a for "
    "transformers assisted generation, which does not report it.",
    "long-form: transformers rows use sequential long-form generate(return_timestamps=True) on the full "
    "un-truncated features (audio of 30 s or less is one window); faster-whisper runs with timestamps there "
    "(without_timestamps=False) for its sequential long-form mode; specwhisper with timestamps=True. "
    "WER against the joined transcripts of the prompts that make up the audio.",
    "sweep: each client its own gRPC connection, sending the short clips (PCM) back to back for sweep_seconds "
    "per point (a client finishes the request under way, at least one); the one server instance queues the rest.",
    "faster-whisper: beam_size=1, temperature=0 (no fallback), condition_on_previous_text=False, "
    "without_timestamps=True on short clips; its other options at their defaults.",
)


def parse(argv: list[str] | None) -> ReportOptions:
    defaults = ReportOptions(out=Path("report"), assistant="")
    parser = argparse.ArgumentParser(prog="specwhisper-report", description=__doc__)
    parser.add_argument("--out", type=Path, default=defaults.out, help="directory for report.md/.json/.png")
    parser.add_argument("--main", default=defaults.main)
    add_assistant_arguments(parser, optional=False)
    parser.add_argument("--languages", nargs="+", default=list(defaults.languages))
    parser.add_argument("--clips", type=int, default=defaults.clips, help="short clips per language")
    parser.add_argument("--long-seconds", type=float, default=defaults.long_seconds, help="0: no long-form table")
    parser.add_argument("--sweep", type=int, nargs="+", default=list(defaults.sweep), help="client counts")
    parser.add_argument("--sweep-seconds", type=float, default=defaults.sweep_seconds, help="per count and mode")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads of every system")
    parser.add_argument("--smoke", action="store_true", help="1 clip, 10 s long-form, sweep 1 2 for 1.5 s")
    args = parser.parse_args(argv)
    assistant, int8 = resolve_assistant(args)
    if assistant is None:
        parser.error(f"no draft ships for {args.main!r}: give --assistant")
    options = ReportOptions(
        out=args.out,
        main=args.main,
        assistant=assistant,
        assistant_int8=int8,
        languages=tuple(args.languages),
        clips=args.clips,
        long_seconds=args.long_seconds,
        sweep=tuple(args.sweep),
        sweep_seconds=args.sweep_seconds,
        threads=args.threads,
    )
    return options.smoke() if args.smoke else options


def language_tables(models: Models, client: SpeechClient, options: ReportOptions, language: str) -> list[Table]:
    """The short-clip table and, unless ``long_seconds`` is 0, the long-form one, for one language."""
    prompts = asterisk.select(language, options.clips, min_seconds=2.0)
    clips = [asterisk.load_audio(p.path) for p in prompts]
    systems = models.systems(client, language)
    normalize = normalizer(language, models.processor)
    warm_up(systems, clips[0])
    title = f"{language} short clips ({len(clips)}, {sum(map(len, clips)) / SAMPLE_RATE:.0f} s)"
    tables = [run_table(title, language, systems, clips, [p.text for p in prompts], False, normalize)]
    if options.long_seconds > 0:
        audio, text = long_form_reference(language, options.long_seconds)
        title = f"{language} long-form ({len(audio) / SAMPLE_RATE:.0f} s)"
        tables.append(run_table(title, language, systems, [audio], [text], True, normalize))
    return tables


def environment(assistant: str) -> dict:
    return {"assistant_checkpoint": assistant, "cpu_count": os.cpu_count(), "machine": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    transformers.logging.set_verbosity_error()  # assisted generate warns about max_length on every call
    options.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(options.threads)
    assistant = resolve_checkpoint(options.assistant)
    print(f"loading {options.main}, draft {assistant}, faster-whisper ...", flush=True)
    models = Models.load(options, assistant)
    print("exporting and starting tritonserver ...", flush=True)
    with running_server(options, assistant) as server, SpeechClient(server.grpc_url, timeout=600) as client:
        tables = [t for language in options.languages for t in language_tables(models, client, options, language)]
        sweep_clips = [asterisk.load_audio(p.path) for p in asterisk.select(options.languages[0], options.clips)]
        print("concurrency sweep ...", flush=True)
        sweep = run_sweep(server.grpc_url, sweep_clips, options)
    report = Report(asdict(options) | {"out": str(options.out)}, environment(assistant), tuple(tables), sweep, NOTES)
    write(report, options.out)
    print(to_markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
