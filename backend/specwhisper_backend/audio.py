"""Audio in: PCM arrays at any rate or encoded files, checked and brought to 16 kHz mono float32."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from specwhisper_backend.errors import AudioError
from specwhisper_backend.features import SAMPLE_RATE

# Below this peak amplitude a recording holds nothing Whisper could transcribe (16-bit quantisation
# noise is ~3e-5): decoding it would only produce hallucinated text.
SILENCE_PEAK = 1e-4


def from_pcm(samples: np.ndarray, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Check float PCM (mono, or ``[frames, channels]``) and resample it to 16 kHz mono float32."""
    samples = np.asarray(samples)
    if samples.dtype not in (np.float32, np.float64):
        raise AudioError(f"audio samples must be float32 PCM in [-1, 1], got dtype {samples.dtype}")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f"audio must be 1-D (mono) or [frames, channels], got shape {samples.shape}")
    if not isinstance(sample_rate, int | np.integer) or not 1_000 <= sample_rate <= 384_000:
        raise AudioError(f"sample rate must be an integer between 1000 and 384000 Hz, got {sample_rate}")
    if samples.size == 0:
        raise AudioError("audio is empty")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"audio has {int(np.sum(~np.isfinite(samples)))} NaN or infinite samples")
    seconds = samples.size / sample_rate
    if seconds > max_seconds:
        raise AudioError(f"audio is {seconds:.1f} s long, over the maximum of {max_seconds:g} s")
    if np.abs(samples).max() < SILENCE_PEAK:
        raise AudioError("audio is silent (peak amplitude below 1e-4): nothing to transcribe")
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")
    return samples.astype(np.float32, copy=False)


def from_bytes(data: bytes, max_seconds: float) -> np.ndarray:
    """Decode an encoded file (WAV, FLAC, OGG, MP3: whatever libsndfile reads), then as :func:`from_pcm`."""
    if not data:
        raise AudioError("audio file is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as sound:
            seconds = sound.frames / sound.samplerate
            if seconds > max_seconds:
                raise AudioError(f"audio is {seconds:.1f} s long, over the maximum of {max_seconds:g} s")
            samples = sound.read(dtype="float32", always_2d=True)
            rate = sound.samplerate
    except sf.LibsndfileError as error:
        raise AudioError(f"cannot decode the audio file ({len(data)} bytes): {error}") from error
    return from_pcm(samples, int(rate), max_seconds)
