"""Whisper's log-mel features in NumPy, equal to transformers' ``WhisperFeatureExtractor``.

The mel filter bank is the one the feature extractor itself holds, saved by the export step, so
80- and 128-bin models need nothing here. Audio is padded with 30 s of silence before the STFT as
the feature extractor does for short-form input; long-form windows are sliced from one spectrogram
of the whole recording, as openai/whisper does.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames per 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
MEL_FILTERS_FILE = "mel_filters.npy"

_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def log_mel(audio: np.ndarray, mel_filters: np.ndarray) -> np.ndarray:
    """``[n_mels, frames]`` log-mel of 16 kHz float32 audio, padded with 30 s of silence.

    ``mel_filters`` is ``[n_fft // 2 + 1, n_mels]``. The result has ``len(audio) // 160 + 3000``
    frames: the recording's own frames followed by a full window of padding, so that any 30 s
    window can be sliced from it.
    """
    padded = np.concatenate([audio.astype(np.float32, copy=False), np.zeros(N_SAMPLES, np.float32)])
    centred = np.pad(padded, N_FFT // 2, mode="reflect")
    frames = sliding_window_view(centred, N_FFT)[::HOP_LENGTH]
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2
    mel = power.astype(np.float32) @ mel_filters.astype(np.float32)
    log_spec = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def encoder_frames(mel_frames: int, n_audio_ctx: int) -> int:
    """Encoder frames that cover ``mel_frames`` of a window (the encoder's convolutions halve the rate)."""
    return -(-mel_frames * n_audio_ctx // N_FRAMES)


def window(mel: np.ndarray, start: int) -> np.ndarray:
    """The 30 s window of ``mel`` (from :func:`log_mel`) at frame ``start``, as a ``[1, n_mels, 3000]`` batch.

    :func:`log_mel` appends a full window of padding, so every start inside the recording has 3000 frames.
    """
    chunk = mel[:, start : start + N_FRAMES]
    if chunk.shape[1] != N_FRAMES:
        raise ValueError(f"window at frame {start} runs past the padded spectrogram ({mel.shape[1]} frames)")
    return np.ascontiguousarray(chunk)[None]
