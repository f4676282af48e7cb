"""Test helpers: real speech and transformers' reference decoding."""

from __future__ import annotations

import numpy as np
import torch

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_training import asterisk


def hf_greedy(model, processor, audio: np.ndarray, language: str | None) -> list[int]:
    """transformers ``generate``, greedy, no timestamps: the reference the ONNX paths must equal."""
    features = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    kwargs = {"language": language, "task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad():
        sequence = model.generate(features, return_timestamps=False, **kwargs)[0].tolist()
    # generate returns the text tokens alone, at most followed by <|endoftext|>.
    eot = model.generation_config.eos_token_id
    return sequence[: sequence.index(eot)] if eot in sequence else sequence


def clips(language: str, count: int, min_seconds: float = 2.0) -> list[tuple[asterisk.Prompt, np.ndarray]]:
    return [(prompt, asterisk.load_audio(prompt.path)) for prompt in asterisk.select(language, count, min_seconds)]
