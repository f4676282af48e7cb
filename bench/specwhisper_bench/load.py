"""``specwhisper-load``: throughput and latency under concurrent clients, through the real tritonserver.

Two servers run side by side on the same export, each one instance: the batched server (in-flight
batching, ``--max-batch-rows`` rows) and the serial server (one request at a time, as before
batching). Only one is loaded at a time; each point of the sweep (an audio set, a number of
clients, plain or speculative) runs on both back to back, in alternating order, so that the
machine's drifting load hits both alike. With ``--repeats``, each load runs that many times, plain
and speculative alternating which goes first, and the report sets speculative over plain side by
side for every run, with the spread: one run's ratio is within the machine's noise. Every client
streams its requests (``specwhisper_stream``) back to back: latency is the whole request, time to
first segment is when its first segment arrives. A soak then holds the batched server at the
largest load and samples its resident memory. Writes ``load.md``, ``load.json`` and ``load.png``.

Throughput is given twice. Over the whole run, it includes the start, where every request's first
window waits for the encoder, and the drain: once a client has sent its last request, fewer
requests than the load are open, and at the end one long request may decode alone, so the figure
mixes loads below the one named. Between the first request's end and the first client's last one
(:func:`steady_rate`), all clients have a request open: that is the throughput *at* the load, what
a server held at N concurrent requests delivers, as Triton's perf_analyzer measures it. Each
request of a point has audio of its own where the pool allows, so that no two rows decode the same
text in lockstep and leave the batch together.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_client import SpeechClient, StreamEnd
from specwhisper_export.cli import add_assistant_arguments, resolve_assistant
from specwhisper_export.repository import ExportRequest, write_repository
from specwhisper_export.triton_config import ServingOptions
from specwhisper_serve.tritonserver import TritonServer, free_ports
from specwhisper_training import asterisk


@dataclass(frozen=True)
class LoadOptions:
    out: Path
    assistant: str
    main: str = "base"
    loads: tuple[int, ...] = (1, 2, 4, 8, 16)
    long_seconds: float = 60.0  # each long-form request (speech-dense, timestamps on)
    long_per_client: int = 3  # requests each client sends, back to back
    long_variants: int = 4  # different long-form recordings per language
    short_clips: int = 12  # short real recordings, 2-10 s, four a language
    short_per_client: int = 4
    max_batch_rows: int = 16
    encoder_stall: float = ServingOptions().encoder_stall  # the batched server's (0: no bound)
    threads: int = 2
    soak_seconds: float = 180.0  # the batched server at the largest load (0: no soak)
    repeats: int = 1  # runs of each load, plain and speculative alternating which goes first
    audio: tuple[str, ...] = ("long", "short")  # which audio sets: long-form, short clips

    def smoke(self) -> LoadOptions:
        return replace(
            self,
            loads=(1, 2),
            long_seconds=20.0,
            long_per_client=1,
            long_variants=1,
            short_clips=3,
            short_per_client=1,
            soak_seconds=6.0,
        )


@dataclass(frozen=True)
class Outcome:
    client: int
    latency: float
    first_segment: float
    audio_seconds: float
    stats: dict
    finished: float  # seconds from the point's start
    decoded: tuple[tuple[float, float], ...]  # (seconds from the point's start, audio seconds decoded by then)


@dataclass(frozen=True)
class LoadPoint:
    server: str
    audio: str
    speculative: bool
    clients: int
    requests: int
    failures: int
    seconds: float
    audio_seconds_per_second: float
    requests_per_second: float
    p50_s: float
    p95_s: float
    steady_audio_seconds_per_second: float  # while every client had a request open (steady_rate)
    steady_from_s: float  # that span, from the point's start
    steady_to_s: float
    first_segment_p50_s: float
    rows_per_step: float  # the mean batch size of the steps its requests took part in
    acceptance: float | None
    tokens_per_main_pass: float
    drafted_per_pass: float  # draft tokens per main pass: how much the policy let rows draft
    repeat: int = 1  # which run of this load (--repeats)


@dataclass
class Soak:
    clients: int
    seconds: float
    requests: int = 0
    failures: int = 0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, resident MB)


# Long-form recordings start this many prompts apart (the first at the 60th), each about 60 s.
LONG_VARIANT_STRIDE = 40


def audio_sets(options: LoadOptions) -> dict[str, list[np.ndarray]]:
    """Speech-dense long-form audio (``long_variants`` per language) and short real recordings, those
    of ``options.audio``."""
    sets = {}
    if "long" in options.audio:
        sets[f"long-form {options.long_seconds:.0f} s"] = [
            asterisk.long_form(language, options.long_seconds, skip=60 + LONG_VARIANT_STRIDE * variant)
            for variant in range(options.long_variants)
            for language in asterisk.LANGUAGES
        ]
    if "short" in options.audio:
        per_language = max(1, options.short_clips // len(asterisk.LANGUAGES))
        sets["short clips"] = [
            asterisk.load_audio(prompt.path)
            for language in asterisk.LANGUAGES
            for prompt in asterisk.select(language, per_language, min_seconds=2.0, max_seconds=10.0)
        ]
    return sets


def _one(
    client: SpeechClient, audio: np.ndarray, speculative: bool, long: bool, index: int = 0, origin: float | None = None
) -> Outcome:
    """One streamed request by client ``index``; times in the outcome count from ``origin``."""
    started = time.perf_counter()
    origin = started if origin is None else origin
    seconds = len(audio) / SAMPLE_RATE
    first = None
    stats: dict = {}
    decoded, done = [], 0.0
    for item in client.stream(audio, sample_rate=SAMPLE_RATE, timestamps=long, speculative=speculative):
        now = time.perf_counter()
        if first is None:
            first = now - started
        if isinstance(item, StreamEnd):
            stats, done = item.stats, seconds  # the rest was silence, or no speech
        else:
            done = min(seconds, max(done, item.end))
        decoded.append((now - origin, done))
    ended = time.perf_counter()
    latency = ended - started
    first = first if first is not None else latency
    return Outcome(index, latency, first, seconds, stats, ended - origin, tuple(decoded))


def steady_rate(outcomes: Sequence[Outcome], clients: int) -> tuple[float, float, float]:
    """(audio seconds decoded per second, from, to): the throughput between the first request's end
    and the first client's last request's end, while all ``clients`` had a request open.

    Decoded audio is read from each request's streamed segments (a request counts what its segments
    had covered at each end). A window still decoding at either end is not counted there: in a
    steady state as much is in flight at the start as at the end, so the two cancel, where counting
    from the point's start would leave out only what the end cut (all of a busy batch's rows).
    """
    finished: dict[int, float] = {}
    for outcome in outcomes:
        finished[outcome.client] = max(finished.get(outcome.client, 0.0), outcome.finished)
    nan = float("nan")
    if len(finished) < clients:  # a client had no request answered: no span with all of them busy
        return nan, nan, nan
    begin, end = min(o.finished for o in outcomes), min(finished.values())
    if end <= begin:  # one request per client: the first to end was its client's last
        return nan, begin, end

    def decoded(outcome: Outcome, at: float) -> float:
        return max((done for when, done in outcome.decoded if when <= at), default=0.0)

    return sum(decoded(o, end) - decoded(o, begin) for o in outcomes) / (end - begin), begin, end


def run_point(
    url: str, audios: Sequence[np.ndarray], clients: int, per_client: int, speculative: bool, long: bool
) -> tuple[list[Outcome], int, float]:
    """``clients`` threads, each sending ``per_client`` requests back to back: outcomes, failures, seconds."""
    outcomes: list[Outcome] = []
    failures = [0]

    started = time.perf_counter()

    def worker(index: int) -> None:
        with SpeechClient(url, timeout=1800) as client:
            for turn in range(per_client):
                audio = audios[(index + turn * clients) % len(audios)]  # the pool's next unsent recording
                try:
                    outcomes.append(_one(client, audio, speculative, long, index, started))
                except Exception:  # counted; the sweep goes on
                    failures[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, failures[0], time.perf_counter() - started


def summarise(server: str, audio: str, speculative: bool, clients: int, run: tuple[list[Outcome], int, float]):
    outcomes, failures, seconds = run
    latencies = sorted(o.latency for o in outcomes) or [float("nan")]
    total = {key: sum(o.stats.get(key, 0) for o in outcomes) for key in ("tokens_out", "main_passes")}
    total |= {key: sum(o.stats.get(key, 0) for o in outcomes) for key in ("tokens_drafted", "tokens_accepted")}
    rows = sum(o.stats.get("rows_per_step", 0) * o.stats.get("main_passes", 0) for o in outcomes)
    passes = max(total["main_passes"], 1)
    steady, begin, end = steady_rate(outcomes, clients)
    return LoadPoint(
        server=server,
        audio=audio,
        speculative=speculative,
        clients=clients,
        requests=len(outcomes),
        failures=failures,
        seconds=round(seconds, 2),
        audio_seconds_per_second=round(sum(o.audio_seconds for o in outcomes) / seconds, 3),
        requests_per_second=round(len(outcomes) / seconds, 3),
        p50_s=round(float(np.percentile(latencies, 50)), 3),
        p95_s=round(float(np.percentile(latencies, 95)), 3),
        steady_audio_seconds_per_second=round(steady, 3),
        steady_from_s=round(begin, 2),
        steady_to_s=round(end, 2),
        first_segment_p50_s=round(statistics.median(o.first_segment for o in outcomes), 3) if outcomes else 0.0,
        rows_per_step=round(rows / passes, 2),
        acceptance=round(total["tokens_accepted"] / total["tokens_drafted"], 3) if total["tokens_drafted"] else None,
        tokens_per_main_pass=round(total["tokens_out"] / passes, 2),
        drafted_per_pass=round(total["tokens_drafted"] / passes, 2),
    )


@contextmanager
def servers(options: LoadOptions, repository_root: Path) -> Iterator[dict[str, TritonServer]]:
    """The batched and the serial server on one export, both running (one instance each)."""
    request = ExportRequest(main=options.main, assistant=options.assistant, assistant_int8=True)
    configs = {
        f"batched ({options.max_batch_rows} rows)": options.max_batch_rows,
        "serial (1 request at a time)": 1,
    }
    with ExitStack() as stack:
        running = {}
        for index, (name, rows) in enumerate(configs.items()):
            repository = repository_root / f"repository-{index}"
            serving = ServingOptions(
                instances=1,
                intra_op_threads=options.threads,
                max_batch_rows=rows,
                max_queue=256,
                encoder_stall=options.encoder_stall,
            )
            write_repository(request, repository, serving=serving)
            grpc, http, metrics = free_ports(3)
            log = options.out / f"tritonserver-{index}.log"
            running[name] = stack.enter_context(TritonServer(repository, grpc, http, metrics, log_file=log))
        yield running


def server_rss_mb(server: TritonServer) -> float:
    """Resident memory of tritonserver and its Python-backend stubs, in MB."""
    pids = [server.process.pid]
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{server.process.pid}\n" in status.read_text():
                pids.append(int(status.parent.name))
        except OSError:
            continue
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


@contextmanager
def sampled_rss(server: TritonServer, every: float) -> Iterator[list[tuple[float, float]]]:
    """``server``'s resident memory (elapsed s, MB) while the block runs: read on entry, every ``every``
    seconds from a thread (the block may be busy waiting for requests), and once more on exit."""
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    done = threading.Event()

    def read() -> None:
        samples.append((time.monotonic() - started, server_rss_mb(server)))

    def keep_reading() -> None:
        while not done.wait(every):
            read()

    read()
    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    try:
        yield samples
    finally:
        done.set()
        reader.join()
        read()


def soak(server: TritonServer, audios: dict[str, list[np.ndarray]], clients: int, seconds: float) -> Soak:
    """``clients`` clients sending long and short requests, speculative, for ``seconds``; memory sampled."""
    result = Soak(clients, seconds)
    mixed = [(audio, kind.startswith("long")) for kind, items in audios.items() for audio in items]
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(index: int) -> None:
        with SpeechClient(server.grpc_url, timeout=1800) as client:
            turn = index
            while time.monotonic() < deadline:
                audio, long = mixed[turn % len(mixed)]
                try:
                    _one(client, audio, True, long)
                    with lock:
                        result.requests += 1
                except Exception:
                    with lock:
                        result.failures += 1
                turn += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    with sampled_rss(server, every=max(1.0, seconds / 12)) as samples:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result.rss_mb = [(round(elapsed, 1), round(mb, 1)) for elapsed, mb in samples]
    return result


def markdown(points: Sequence[LoadPoint], soaked: Soak | None, options: LoadOptions) -> str:
    lines = [
        f"# specwhisper-load: main {options.main}, draft {Path(options.assistant).name} (int8), "
        f"{options.threads} ONNX Runtime threads, one instance per server, encoder_stall {options.encoder_stall:g}",
        "",
    ]
    columns = (
        "server | mode | clients | audio s/s, all clients busy (s) | audio s/s, whole run | requests/s | p50 s | "
        "p95 s | first segment p50 s | rows/step | acceptance | tokens/main pass | drafts/main pass | failures"
    )
    for audio in dict.fromkeys(p.audio for p in points):
        lines += [f"## {audio}", "", f"| {columns} |", "|" + "---|" * (columns.count("|") + 1)]
        for p in (p for p in points if p.audio == audio):
            acceptance = "n/a" if p.acceptance is None else f"{p.acceptance:.0%}"
            steady = (
                "n/a"
                if math.isnan(p.steady_audio_seconds_per_second)
                else (f"{p.steady_audio_seconds_per_second:.2f} ({p.steady_from_s:.0f}-{p.steady_to_s:.0f} s)")
            )
            mode = ("speculative" if p.speculative else "plain") + (f", run {p.repeat}" if options.repeats > 1 else "")
            lines.append(
                f"| {p.server} | {mode} | {p.clients} | "
                f"{steady} | "
                f"{p.audio_seconds_per_second:.2f} | {p.requests_per_second:.3f} | {p.p50_s:.2f} | {p.p95_s:.2f} | "
                f"{p.first_segment_p50_s:.2f} | {p.rows_per_step:.2f} | {acceptance} | {p.tokens_per_main_pass:.2f} | "
                f"{p.drafted_per_pass:.2f} | {p.failures} |"
            )
        lines.append("")
    lines += speculative_over_plain(points)
    if soaked is not None:
        memory = [mb for _, mb in soaked.rss_mb]
        lines += [
            f"## Soak: batched server, {soaked.clients} clients, {soaked.seconds:.0f} s, speculative, long and short",
            "",
            f"{soaked.requests} requests, {soaked.failures} failures; resident memory (MB) from "
            f"{memory[0]:.0f} to {memory[-1]:.0f}, at most {max(memory):.0f}: "
            + ", ".join(f"{t:.0f} s {mb:.0f}" for t, mb in soaked.rss_mb),
            "",
        ]
    return "\n".join(lines)


def speculative_over_plain(points: Sequence[LoadPoint]) -> list[str]:
    """Speculative throughput over plain, each run's pair side by side (they ran back to back on the
    same server), at the load and over the whole run, with the median of the runs."""
    plain = {(p.audio, p.server, p.clients, p.repeat): p for p in points if not p.speculative}
    pairs: dict[tuple[str, str, int], list[tuple[LoadPoint, LoadPoint]]] = {}
    for p in points:
        run = (p.audio, p.server, p.clients, p.repeat)
        if p.speculative and run in plain:
            pairs.setdefault(run[:3], []).append((plain[run], p))
    if not pairs:
        return []
    lines = [
        "## Speculative over plain, each run (median)",
        "",
        "| audio | server | clients | audio s/s, all clients busy | audio s/s, whole run |",
        "|---|---|---|---|---|",
    ]

    def ratios(runs: list[tuple[LoadPoint, LoadPoint]], field: str) -> str:
        # A point whose requests all failed has no throughput to divide by: it shows as n/a.
        each = [getattr(spec, field) / getattr(plain, field) for plain, spec in runs if getattr(plain, field)]
        shown = [value for value in each if not math.isnan(value)]
        if not shown:
            return "n/a"
        return ", ".join(f"{value:.2f}x" for value in shown) + f" ({statistics.median(shown):.2f}x)"

    for (audio, server, clients), runs in pairs.items():
        steady = ratios(runs, "steady_audio_seconds_per_second")
        lines.append(f"| {audio} | {server} | {clients} | {steady} | {ratios(runs, 'audio_seconds_per_second')} |")
    return [*lines, ""]


def plot(points: Sequence[LoadPoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audios = list(dict.fromkeys(p.audio for p in points))
    fig, axes = plt.subplots(2, len(audios), figsize=(7 * len(audios), 9), squeeze=False)
    for column, audio in enumerate(audios):
        for server in dict.fromkeys(p.server for p in points):
            for speculative in (False, True):
                mine = [p for p in points if (p.audio, p.server, p.speculative) == (audio, server, speculative)]
                loads = sorted({p.clients for p in mine})

                def median(field: str, mine: list[LoadPoint] = mine, loads: list[int] = loads) -> list[float]:
                    return [statistics.median(getattr(p, field) for p in mine if p.clients == n) for n in loads]

                label = f"{server.split(' (')[0]}, {'speculative' if speculative else 'plain'}"
                style = "o-" if speculative else "s--"
                axes[0][column].plot(loads, median("steady_audio_seconds_per_second"), style, label=label)
                axes[1][column].plot(loads, median("p95_s"), style, label=label)
        for row, ylabel in ((0, "audio seconds per second, all clients busy"), (1, "p95 latency (s)")):
            axis = axes[row][column]
            axis.set_title(audio)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(ylabel)
            axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(options: LoadOptions) -> tuple[list[LoadPoint], Soak | None]:
    options.out.mkdir(parents=True, exist_ok=True)
    audios = audio_sets(options)
    points: list[LoadPoint] = []
    with tempfile.TemporaryDirectory(prefix="specwhisper-load-") as root, servers(options, Path(root)) as running:
        warm_up = (audios.get("short clips") or next(iter(audios.values())))[:1]  # short where there are some
        for server in running.values():  # warm each server and mode
            for speculative in (False, True):
                run_point(server.grpc_url, warm_up, 1, 1, speculative, long=False)
        order = list(running.items())
        for audio, items in audios.items():
            long = audio.startswith("long")
            per_client = options.long_per_client if long else options.short_per_client
            for clients in options.loads:
                for repeat in range(1, options.repeats + 1):
                    for speculative in (False, True) if repeat % 2 else (True, False):
                        order.reverse()  # alternate which server goes first
                        for name, server in order:
                            outcome = run_point(server.grpc_url, items, clients, per_client, speculative, long)
                            points.append(replace(summarise(name, audio, speculative, clients, outcome), repeat=repeat))
                            print(json.dumps(asdict(points[-1])), flush=True)
        soaked = None
        if options.soak_seconds > 0:
            batched = next(iter(running.values()))
            soaked = soak(batched, audios, max(options.loads), options.soak_seconds)
    points.sort(key=lambda p: (p.audio, p.clients, p.speculative, p.server, p.repeat))
    (options.out / "load.json").write_text(
        json.dumps(
            {
                "options": asdict(options),
                "points": [asdict(p) for p in points],
                "soak": asdict(soaked) if soaked else None,
            },
            indent=1,
            default=str,
        )
    )
    (options.out / "load.md").write_text(markdown(points, soaked, options))
    plot(points, options.out / "load.png")
    return points, soaked


def main(argv: list[str] | None = None) -> int:
    defaults = LoadOptions(out=Path("load"), assistant="")
    parser = argparse.ArgumentParser(prog="specwhisper-load", description=__doc__)
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--main", default=defaults.main)
    add_assistant_arguments(parser, optional=False)
    parser.add_argument("--loads", type=int, nargs="+", default=list(defaults.loads), help="concurrent clients")
    parser.add_argument("--long-seconds", type=float, default=defaults.long_seconds)
    parser.add_argument("--long-per-client", type=int, default=defaults.long_per_client)
    parser.add_argument(
        "--long-variants", type=int, default=defaults.long_variants, help="long-form recordings per language"
    )
    parser.add_argument("--short-per-client", type=int, default=defaults.short_per_client)
    parser.add_argument("--max-batch-rows", type=int, default=defaults.max_batch_rows)
    parser.add_argument(
        "--encoder-stall", type=float, default=defaults.encoder_stall, help="the batched server's (0: no bound)"
    )
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--soak-seconds", type=float, default=defaults.soak_seconds)
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="runs of each load, plain and speculative alternating"
    )
    parser.add_argument(
        "--audio", nargs="+", choices=("long", "short"), default=list(defaults.audio), help="which audio sets"
    )
    parser.add_argument("--smoke", action="store_true", help="loads 1 2, 20 s long-form, a short soak")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    assistant, _ = resolve_assistant(args)
    if assistant is None:
        parser.error(f"no draft ships for {args.main!r}: give --assistant")
    options = LoadOptions(
        out=args.out,
        assistant=assistant,
        main=args.main,
        loads=tuple(args.loads),
        long_seconds=args.long_seconds,
        long_per_client=args.long_per_client,
        long_variants=args.long_variants,
        short_per_client=args.short_per_client,
        max_batch_rows=args.max_batch_rows,
        encoder_stall=args.encoder_stall,
        threads=args.threads,
        soak_seconds=args.soak_seconds,
        repeats=args.repeats,
        audio=tuple(args.audio),
    )
    points, soaked = run(options.smoke() if args.smoke else options)
    print(markdown(points, soaked, options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
