"""The ``config.pbtxt`` of the Triton Python-backend model that serves the exported graphs."""

from __future__ import annotations

from dataclasses import dataclass

from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.scheduler import SchedulerOptions

# (name, Triton data type, dims). All inputs are optional to Triton: the model itself checks that a
# request carries exactly one of AUDIO (with SAMPLE_RATE) and AUDIO_BYTES, and says which is wrong.
INPUTS = (
    ("AUDIO", "TYPE_FP32", "[ -1 ]"),
    ("SAMPLE_RATE", "TYPE_INT32", "[ 1 ]"),
    # An encoded file as raw bytes: a UINT8 vector travels as one flat buffer, with no string framing.
    ("AUDIO_BYTES", "TYPE_UINT8", "[ -1 ]"),
    ("LANGUAGE", "TYPE_STRING", "[ 1 ]"),
    ("TASK", "TYPE_STRING", "[ 1 ]"),
    ("TIMESTAMPS", "TYPE_BOOL", "[ 1 ]"),
    ("SPECULATIVE", "TYPE_BOOL", "[ 1 ]"),
    ("INITIAL_PROMPT", "TYPE_STRING", "[ 1 ]"),
    ("CONDITION_ON_PREVIOUS_TEXT", "TYPE_BOOL", "[ 1 ]"),
    # The temperature fallback's schedule, and its thresholds (NaN turns one off).
    ("TEMPERATURE", "TYPE_FP32", "[ -1 ]"),
    ("COMPRESSION_RATIO_THRESHOLD", "TYPE_FP32", "[ 1 ]"),
    ("LOGPROB_THRESHOLD", "TYPE_FP32", "[ 1 ]"),
    ("NO_SPEECH_THRESHOLD", "TYPE_FP32", "[ 1 ]"),
    ("SEED", "TYPE_INT64", "[ 1 ]"),
    ("WORD_TIMESTAMPS", "TYPE_BOOL", "[ 1 ]"),
    ("VAD_FILTER", "TYPE_BOOL", "[ 1 ]"),
)
OUTPUTS = (
    ("TEXT", "TYPE_STRING", "[ 1 ]"),
    ("DETECTED_LANGUAGE", "TYPE_STRING", "[ 1 ]"),
    ("SEGMENTS_JSON", "TYPE_STRING", "[ 1 ]"),
    ("STATS_JSON", "TYPE_STRING", "[ 1 ]"),
)


@dataclass(frozen=True)
class ServingOptions:
    instances: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    device: str = "cpu"  # "cpu" or "gpu": the instance kind and ONNX Runtime's execution provider
    streaming: bool = True  # also write a decoupled model ("<name>_stream") that sends segments as decoded
    max_audio_seconds: float = 3600.0
    # The drafting policy's confidence stop (see DraftPolicy): worth tuning per assistant and device.
    draft_confidence: float = DraftPolicy().confidence
    # In-flight batching (SchedulerOptions): rows decoded together per instance, requests that may wait
    # beyond them, windows per encoder pass, how long a newer request's encoder pass may stall the batch.
    max_batch_rows: int = SchedulerOptions().max_rows
    max_queue: int = SchedulerOptions().max_queue
    encoder_batch: int = SchedulerOptions().encoder_batch
    encoder_stall: float = SchedulerOptions().encoder_stall

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be at least 1, got {self.instances}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be 0 (default) or more, got {self.intra_op_threads}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.max_audio_seconds <= 0:
            raise ValueError(f"max_audio_seconds must be positive, got {self.max_audio_seconds}")
        DraftPolicy(confidence=self.draft_confidence)  # refuses a value out of range
        SchedulerOptions(self.max_batch_rows, self.max_queue, self.encoder_batch, self.encoder_stall)  # likewise


def _tensors(entries: tuple[tuple[str, str, str], ...], optional: bool) -> str:
    extra = " optional: true" if optional else ""
    return ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}' for name, dtype, dims in entries)


def render_config(model_name: str, options: ServingOptions, decoupled: bool = False) -> str:
    kind = "KIND_GPU" if options.device == "gpu" else "KIND_CPU"
    parameters = {
        "intra_op_threads": str(options.intra_op_threads),
        "device": options.device,
        "max_audio_seconds": str(options.max_audio_seconds),
        "draft_confidence": str(options.draft_confidence),
        "max_batch_rows": str(options.max_batch_rows),
        "max_queue": str(options.max_queue),
        "encoder_batch": str(options.encoder_batch),
        "encoder_stall": str(options.encoder_stall),
    }
    params = "\n".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in parameters.items()
    )
    return f"""name: "{model_name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: {str(decoupled).lower()} }}
input [
{_tensors(INPUTS, optional=True)}
]
output [
{_tensors(OUTPUTS, optional=False)}
]
instance_group [ {{ count: {options.instances} kind: {kind} }} ]
{params}
"""
