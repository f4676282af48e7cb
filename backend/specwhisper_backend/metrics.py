"""The product's own Prometheus metrics, published by the Python backend on Triton's metrics port.

Counters only, named and labelled by Prometheus conventions; rates and ratios (acceptance rate =
accepted / drafted) are the dashboard's job, e.g. ``rate(specwhisper_draft_tokens_accepted_total[5m])
/ rate(specwhisper_draft_tokens_proposed_total[5m])``. Request counters carry the request's
language (given or detected): a draft's acceptance differs most between languages, and the
languages a deployment serves with little acceptance are those to train a draft for and route to it
(docs/draft-training.md).
"""

from __future__ import annotations

from typing import Any

from specwhisper_backend.stats import DecodeStats

# (name, description, DecodeStats field or None for a value passed in)
COUNTERS = (
    ("specwhisper_draft_tokens_proposed_total", "Tokens proposed by the assistant", "tokens_drafted"),
    ("specwhisper_draft_tokens_accepted_total", "Proposed tokens the main model accepted", "tokens_accepted"),
    ("specwhisper_output_tokens_total", "Tokens decoded", "tokens_out"),
    ("specwhisper_main_decoder_passes_total", "Main decoder passes", "main_passes"),
    ("specwhisper_assistant_decoder_passes_total", "Assistant decoder passes", "assistant_passes"),
    ("specwhisper_audio_seconds_total", "Seconds of audio transcribed", None),
    ("specwhisper_requests_total", "Requests served", None),
    ("specwhisper_queue_seconds_total", "Seconds requests waited before their first window decoded", "seconds_queued"),
    (
        "specwhisper_first_segment_seconds_total",
        "Seconds from arrival to each request's first segment",
        "seconds_to_first_segment",
    ),
)
# Per instance, not per request: the batch's steps and the rows they decoded (mean rows per step is
# rate(rows) / rate(steps)).
STEP_COUNTERS = (
    ("specwhisper_batch_steps_total", "Decode steps run"),
    ("specwhisper_batch_rows_total", "Rows decoded, summed over the decode steps"),
)


class ServingMetrics:
    """Counters per decoding mode (``speculative="true"|"false"``) and language, plus failed requests
    by reason."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        kind = pb_utils.MetricFamily.COUNTER
        self._families = [pb_utils.MetricFamily(name=name, description=text, kind=kind) for name, text, _ in COUNTERS]
        self._metrics: dict[tuple[str, str], dict[str, Any]] = {}  # by (mode, language), made as they come
        self._failures_family = pb_utils.MetricFamily(
            name="specwhisper_request_failures_total", description="Requests refused or failed", kind=kind
        )
        self._failures: dict[str, Any] = {}
        self._model = model
        self._step_families = [pb_utils.MetricFamily(name=n, description=d, kind=kind) for n, d in STEP_COUNTERS]
        self._steps, self._rows = (family.Metric(labels={"model": model}) for family in self._step_families)

    def record(self, stats: DecodeStats, audio_seconds: float, speculative: bool, language: str) -> None:
        """A finished request's counts; ``language`` is "" where no speech was found to detect one."""
        key = ("true" if speculative else "false", language or "none")
        if key not in self._metrics:
            labels = {"model": self._model, "speculative": key[0], "language": key[1]}
            families = zip(COUNTERS, self._families, strict=True)
            self._metrics[key] = {name: family.Metric(labels=labels) for (name, _, _), family in families}
        metrics = self._metrics[key]
        for name, _, field in COUNTERS:
            if field is not None:
                metrics[name].increment(getattr(stats, field))
        metrics["specwhisper_audio_seconds_total"].increment(audio_seconds)
        metrics["specwhisper_requests_total"].increment(1)

    def record_step(self, rows: int) -> None:
        self._steps.increment(1)
        self._rows.increment(rows)

    def record_failure(self, reason: str) -> None:
        if reason not in self._failures:
            self._failures[reason] = self._failures_family.Metric(labels={"model": self._model, "reason": reason})
        self._failures[reason].increment(1)

    def close(self) -> None:
        """Drop every metric object before the stub exits (left alive, they crash it at shutdown)."""
        self._metrics.clear()
        self._failures.clear()
        self._families.clear()
        del self._failures_family, self._steps, self._rows
        self._step_families.clear()
