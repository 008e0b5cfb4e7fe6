"""Reading and preparing audio: any common format to mono 24 kHz float32, loudness normalisation."""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np
import pyloudnorm
import sphn

from .config import FRAME_SIZE, SAMPLE_RATE
from .errors import PersonaplexError


class AudioError(PersonaplexError):
    """An audio file is missing, unreadable, empty or unusable."""


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode wav/flac/ogg/mp3 (via sphn) into mono float32 samples at ``sample_rate``; shape [T].

    Integer PCM maps to [-1, 1) as v / 32768; several channels are averaged.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        samples, file_rate = sphn.read(str(path))
    except Exception as exc:  # sphn raises plain exceptions with the decoder's message
        raise AudioError(f"cannot decode {path} as audio ({exc}); use wav, flac, ogg or mp3") from exc
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None]
    if samples.size == 0:
        raise AudioError(f"{path} contains no audio samples")
    mono = samples[0] if samples.shape[0] == 1 else samples.mean(axis=0, dtype=np.float32)
    return resample(mono, int(file_rate), sample_rate)


def audio_file_format(path: str | Path) -> tuple[int, int]:
    """(sample rate, samples per channel) of an audio file, from the header alone when it is PCM wav."""
    import wave

    try:
        with wave.open(str(path)) as wav:
            return wav.getframerate(), wav.getnframes()
    except (wave.Error, EOFError):
        audio, rate = sphn.read(str(path))
        return int(rate), np.asarray(audio).shape[-1]


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling [T] -> [ceil(T * target / source)] float32, with no time shift.

    A zero-delay filter keeps the output aligned with the input, which time-aligned outputs (offline
    tool, evaluation) rely on; sphn's streaming resampler delays the signal by tens of milliseconds.
    """
    if source_rate == target_rate:
        return samples
    from scipy.signal import resample_poly

    common = gcd(source_rate, target_rate)
    return resample_poly(samples, target_rate // common, source_rate // common).astype(np.float32)


def normalize_loudness(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, target_lufs: float = -24.0) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness (ITU-R BS.1770-4); returns float64 like the reference.

    The gain is a plain multiplication (no limiter), as the reference applies it.
    """
    if samples.shape[-1] < int(0.4 * sample_rate):
        raise AudioError(f"audio is {samples.shape[-1] / sample_rate:.2f} s long; loudness needs at least 0.4 s")
    meter = pyloudnorm.Meter(sample_rate)
    loudness = meter.integrated_loudness(samples)
    if not np.isfinite(loudness):
        raise AudioError("audio is silent: its loudness cannot be normalised; use a recording of the voice")
    # np.float64 gain times float32 samples gives float64 under numpy 2; the reference rounds to
    # float32 only when framing, which keeps codes bit-compatible.
    gain = np.power(10.0, (target_lufs - loudness) / 20.0)
    return gain * samples


def split_frames(samples: np.ndarray, frame_size: int = FRAME_SIZE) -> np.ndarray:
    """Cut [T] samples into float32 frames [ceil(T / frame_size), frame_size], zero-padding the last."""
    count = -(-samples.shape[-1] // frame_size)
    padded = np.zeros(count * frame_size, dtype=np.float64 if samples.dtype == np.float64 else np.float32)
    padded[: samples.shape[-1]] = samples
    return padded.reshape(count, frame_size).astype(np.float32)
