"""Triton Python-backend model: Whisper with speculative decoding.

Thin by design: the engine (``specwhisper_backend``) does the work; this file reads the model
config, turns request tensors into engine calls and results into response tensors, and reports
every bad request as a per-request ``TritonError`` so the instance keeps serving. The same file
serves the decoupled (streaming) variant, which sends each segment as soon as it is decoded.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from specwhisper_backend.drafting import DraftPolicy
from specwhisper_backend.errors import RequestError
from specwhisper_backend.metrics import ServingMetrics
from specwhisper_backend.runtime import ExportedModel, execution_providers
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber
from specwhisper_backend.triton_io import INPUT_NAMES, outputs, parse_request, transcription_outputs


def _tensors(arrays):
    return [pb_utils.Tensor(name, value) for name, value in arrays.items()]


def _refusal(error):
    """A per-request error with gRPC's INVALID_ARGUMENT status: the request, not the server, is at fault."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))


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
        except (ValueError, RuntimeError) as error:
            raise pb_utils.TritonModelException(f"bad model parameter: {error}") from error
        directory = Path(args["model_repository"]) / args["model_version"]
        self.transcriber = Transcriber(ExportedModel(directory, intra_op_threads=threads, providers=providers), policy)
        pb_utils.Logger.log_info(f"{args['model_name']}: {policy}")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.metrics = ServingMetrics(pb_utils, args["model_name"])
        self._warm_up()

    def _warm_up(self):
        """Run each decoding path once, so the first user request does not pay for it."""
        tone = (0.1 * np.sin(np.linspace(0, 2000 * np.pi, 16_000))).astype(np.float32)
        for speculative in (False, self.transcriber.model.assistant is not None):
            self.transcriber.transcribe(tone, TranscribeOptions(language=None, speculative=speculative))

    def _inputs(self, request):
        tensors = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            tensors[name] = None if tensor is None else tensor.as_numpy()
        return tensors

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:
            try:
                audio, options = parse_request(self._inputs(request), self.max_audio_seconds, request.parameters())
                result = self.transcriber.transcribe(audio, options)
            except RequestError as error:
                self.metrics.record_failure(type(error).__name__)
                responses.append(_refusal(error))
                continue
            self.metrics.record(result.stats, len(audio) / 16_000, options.speculative)
            responses.append(pb_utils.InferenceResponse(output_tensors=_tensors(transcription_outputs(result))))
        return responses

    def _stream(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            audio, options = parse_request(self._inputs(request), self.max_audio_seconds, request.parameters())
            stats, language = DecodeStats(), []
            for segment in self.transcriber.segments(audio, options, stats, language):
                partial = outputs(segment.text, language[0], [segment], {})
                sender.send(pb_utils.InferenceResponse(output_tensors=_tensors(partial)))
        except RequestError as error:
            self.metrics.record_failure(type(error).__name__)
            sender.send(_refusal(error), flags=final)
            return
        self.metrics.record(stats, len(audio) / 16_000, options.speculative)
        done = outputs("", language[0] if language else "", [], stats.to_dict())
        sender.send(pb_utils.InferenceResponse(output_tensors=_tensors(done)), flags=final)

    def finalize(self):
        self.metrics.close()
