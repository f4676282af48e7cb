"""A stand-in for Triton's ``triton_python_backend_utils``, enough to run ``model.py`` without a server.

It records what the model sends: responses (with their flags) per request, log lines, metrics.
Only the calls ``model.py`` makes exist, so a call the real module lacks fails here too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

MODEL_PY = Path(__file__).resolve().parents[1] / "model_repository" / "specwhisper" / "1" / "model.py"
FINAL = 1


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 0) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


@dataclass
class Tensor:
    name: str
    value: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.value


@dataclass
class InferenceResponse:
    output_tensors: list[Tensor] = field(default_factory=list)
    error: TritonError | None = None

    def outputs(self) -> dict[str, np.ndarray]:
        return {tensor.name: tensor.value for tensor in self.output_tensors}

    def json(self, name: str):
        return json.loads(self.outputs()[name][0])


class ResponseSender:
    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[InferenceResponse, int]] = []
        self.fail_after = fail_after  # the client goes away after this many responses
        self._final = threading.Event()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise RuntimeError("the stream's client is gone")
        if self._final.is_set():
            raise AssertionError("a response after the final one")
        self.sent.append((response, flags))
        if flags == FINAL:
            self._final.set()

    @property
    def finished(self) -> bool:
        return bool(self.sent) and self.sent[-1][1] == FINAL

    def wait(self, timeout: float = 120.0) -> list[tuple[InferenceResponse, int]]:
        """The responses, once the final one is sent."""
        assert self._final.wait(timeout), "no final response"
        return self.sent


class Request:
    def __init__(self, inputs: dict[str, np.ndarray], parameters: dict | None = None, cancel_after: int | None = None):
        self.inputs = inputs
        self._parameters = json.dumps(parameters or {})
        self.sender = ResponseSender()
        self.cancel_after = cancel_after  # is_cancelled() answers yes from this call on
        self.cancel_checks = 0

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after is not None and self.cancel_checks > self.cancel_after


class Logger:
    lines: ClassVar[list[tuple[str, str]]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.lines.append(("error", message))


class Metric:
    def __init__(self, labels: dict) -> None:
        self.labels, self.value = labels, 0.0

    def increment(self, value: float) -> None:
        self.value += value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = range(3)
    families: ClassVar[dict[str, list[MetricFamily]]] = {}  # by name: every model's

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name, self.metrics = name, []
        MetricFamily.families.setdefault(name, []).append(self)

    def Metric(self, labels: dict) -> Metric:
        metric = Metric(labels)
        self.metrics.append(metric)
        return metric


def metric_values(name: str, **labels: str) -> dict[str, float]:
    """The values of every metric of family ``name`` whose labels include ``labels``, by their labels' values."""
    found = {}
    for family in MetricFamily.families.get(name, []):
        for metric in family.metrics:
            if labels.items() <= metric.labels.items():
                found[",".join(metric.labels.values())] = metric.value
    return found


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    value = request.inputs.get(name)
    return None if value is None else Tensor(name, value)


def using_decoupled_model_transaction_policy(config: dict) -> bool:
    return bool(config.get("model_transaction_policy", {}).get("decoupled"))


def install() -> types.ModuleType:
    """Put this module where ``model.py`` imports Triton's from, and return ``model.py`` loaded."""
    sys.modules["triton_python_backend_utils"] = sys.modules[__name__]
    spec = importlib.util.spec_from_file_location("specwhisper_triton_model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL


def model_args(directory: Path, name: str, decoupled: bool, parameters: dict[str, str] | None = None) -> dict:
    """What Triton passes ``initialize`` for a model whose version directory is ``directory``."""
    config = {
        "name": name,
        "model_transaction_policy": {"decoupled": decoupled},
        "parameters": {key: {"string_value": value} for key, value in (parameters or {}).items()},
    }
    return {
        "model_config": json.dumps(config),
        "model_repository": str(directory.parent),
        "model_version": directory.name,
        "model_name": name,
        "model_instance_device_id": "0",
    }
