"""Triton Python-backend model: Whisper with speculative decoding, requests batched in flight.

Thin by design: the engine (``specwhisper_backend``) does the work. ``execute`` checks each request
and hands it to the instance's scheduler, which decodes the windows of every request in flight as
the rows of one batch on a thread of its own, and answers each request through its response sender:
one response for ``specwhisper``, one per segment then a final one for the decoupled
``specwhisper_stream``. ``execute`` returns at once, so requests that arrive while others decode
join the running batch (Triton 24.06+ lets a non-decoupled model answer through the sender too).

Every request is answered: a bad one with ``INVALID_ARGUMENT`` saying what is wrong, one the queue
cannot take with ``UNAVAILABLE`` (clients retry it), a cancelled one with ``CANCELLED``, and any other
failure with ``INTERNAL`` naming it (the traceback goes to the server log). The last response always
carries the FINAL flag, and the instance goes on serving.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.errors import RequestCancelled, RequestError
from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_backend.load_policy import measuring_alone, server_costs_file
from specwhisper_backend.metrics import ServingMetrics
from specwhisper_backend.runtime import ExportedModel, execution_providers
from specwhisper_backend.scheduler import Overloaded, Scheduler, SchedulerOptions, Unloading
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_backend.triton_io import INPUT_NAMES, outputs, parse_request, transcription_outputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(arrays):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in arrays.items()])


class _Reply:
    """A request's listener: its response, once the transcription is done, through its sender."""

    def __init__(self, model, request, audio_seconds, speculative):
        self.model, self.request, self.sender = model, request, request.get_response_sender()
        self.audio_seconds, self.speculative = audio_seconds, speculative

    def segment(self, segment, language):
        pass

    def finished(self, transcription):
        self.model.metrics.record(transcription.stats, self.audio_seconds, self.speculative, transcription.language)
        self.sender.send(_response(transcription_outputs(transcription)), flags=FINAL)

    def failed(self, error):
        self.sender.send(self.model.failure(error), flags=FINAL)

    def cancelled(self):
        return self.request.is_cancelled()


class _Stream(_Reply):
    """A stream's listener: a response per segment as it is decoded, then the statistics with FINAL."""

    def segment(self, segment, language):
        self.sender.send(_response(outputs(segment.text, language, [segment], {})))

    def finished(self, transcription):
        self.model.metrics.record(transcription.stats, self.audio_seconds, self.speculative, transcription.language)
        done = outputs("", transcription.language, [], transcription.stats.to_dict())
        self.sender.send(_response(done), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        try:
            self.max_audio_seconds = float(params.get("max_audio_seconds", "3600"))
            threads = int(params.get("intra_op_threads", "0"))
            # A GPU instance runs on the GPU Triton placed it on (instance_group's gpus).
            providers = execution_providers(params.get("device", "cpu"), int(args.get("model_instance_device_id") or 0))
            policy = DraftPolicy(confidence=float(params.get("draft_confidence", DraftPolicy().confidence)))
            batching = SchedulerOptions(
                max_rows=int(params.get("max_batch_rows", SchedulerOptions.max_rows)),
                max_queue=int(params.get("max_queue", SchedulerOptions.max_queue)),
                encoder_batch=int(params.get("encoder_batch", SchedulerOptions.encoder_batch)),
                encoder_stall=float(params.get("encoder_stall", SchedulerOptions.encoder_stall)),
            )
        except (ValueError, RuntimeError) as error:
            raise pb_utils.TritonModelException(f"bad model parameter: {error}") from error
        directory = Path(args["model_repository"]) / args["model_version"]
        model = ExportedModel(directory, intra_op_threads=threads, providers=providers)
        shared_costs = server_costs_file(directory, threads, providers)  # measured by this server's first instance
        transcriber = Transcriber(model, policy, shared_costs)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.metrics = ServingMetrics(pb_utils, args["model_name"])
        with measuring_alone():  # the instances of this machine warm up and time their steps in turn
            self._warm_up(transcriber)
            self.scheduler = Scheduler(transcriber, batching, on_step=lambda rows, cap: self.metrics.record_step(rows))
        pb_utils.Logger.log_info(f"{args['model_name']}: {policy}, {batching}")
        if self.scheduler.costs is not None:
            pb_utils.Logger.log_info(f"{args['model_name']}: measured step costs: {self.scheduler.costs.describe()}")

    def _warm_up(self, transcriber):
        """Run each decoding path once, so the first user request does not pay for it."""
        tone = (0.1 * np.sin(np.linspace(0, 2000 * np.pi, SAMPLE_RATE))).astype(np.float32)
        for speculative in (False, transcriber.model.assistant is not None):
            transcriber.transcribe(tone, TranscribeOptions(language=None, speculative=speculative))
        transcriber.forget_traffic()

    def _inputs(self, request):
        tensors = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            tensors[name] = None if tensor is None else tensor.as_numpy()
        return tensors

    def execute(self, requests):
        kind = _Stream if self.decoupled else _Reply
        for request in requests:
            try:
                audio, options = parse_request(self._inputs(request), self.max_audio_seconds, request.parameters())
                listener = kind(self, request, len(audio) / SAMPLE_RATE, options.speculative)
                self.scheduler.submit(audio, options, listener)
            except Exception as error:  # refused before it was accepted: answered here, at once
                try:
                    request.get_response_sender().send(self.failure(error), flags=FINAL)
                except Exception:
                    pb_utils.Logger.log_warn(f"could not answer a refused request: {traceback.format_exc()}")
        return None

    def failure(self, error):
        """The error response for ``error``, counted by kind; internal faults are logged with their traceback."""
        if isinstance(error, RequestError):
            code, message = pb_utils.TritonError.INVALID_ARG, str(error)
        elif isinstance(error, Overloaded | Unloading):
            code, message = pb_utils.TritonError.UNAVAILABLE, str(error)
        elif isinstance(error, RequestCancelled):
            code, message = pb_utils.TritonError.CANCELLED, str(error)
        else:
            code, message = pb_utils.TritonError.INTERNAL, f"internal error: {type(error).__name__}: {error}"
            pb_utils.Logger.log_error(f"request failed: {''.join(traceback.format_exception(error))}")
        self.metrics.record_failure(type(error).__name__)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self):
        self.scheduler.stop()
        self.metrics.close()
