"""Voice activity with Silero VAD (the ``silero-vad`` package ships its model: nothing is downloaded)."""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import PersonaplexError

VAD_RATE = 16_000


class MissingDependency(PersonaplexError):
    """An optional evaluation package is not installed."""


@lru_cache(maxsize=1)
def _model():
    try:
        from silero_vad import load_silero_vad
    except ImportError as error:
        raise MissingDependency("voice activity needs silero-vad: pip install 'personaplex[eval]'") from error
    with warnings.catch_warnings():
        # silero-vad ships a TorchScript model and loads it with torch.jit.load (and a deprecated importlib
        # call): torch warns that jit is deprecated, a FutureWarning in some releases, which users cannot act on.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=Warning)
        warnings.filterwarnings("ignore", message=r"path is deprecated", category=DeprecationWarning)
        return load_silero_vad()


def speech_segments(samples: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
    """Speech segments (start, end) in seconds, with the package's default settings (as the benchmark uses)."""
    import torch
    from silero_vad import get_speech_timestamps

    from ..audio import resample

    audio = resample(samples.astype(np.float32), sample_rate, VAD_RATE) if sample_rate != VAD_RATE else samples
    stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), _model(),
                                   sampling_rate=VAD_RATE)
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


def file_segments(path: Path) -> tuple[list[tuple[float, float]], float]:
    """Speech segments of an audio file and its duration in seconds."""
    from ..audio import read_audio

    samples = read_audio(path, VAD_RATE)
    return speech_segments(samples, VAD_RATE), len(samples) / VAD_RATE


def benchmark_backchannel_segments(path: Path) -> tuple[list[tuple[float, float]], float]:
    """Speech segments of an audio file as the benchmark's backchannel scorer gets them, and its true duration (s).

    The scorer calls ``get_speech_timestamps(wav, model, return_seconds=True)`` on the file's own samples without
    a sampling rate, so silero-vad takes them for 16 kHz audio and rounds each time to 0.1 s: the times of a
    24 kHz file come out 1.5x too late (a 16 kHz file's are right). The duration it divides by is the true one.
    Several channels are averaged (the benchmark's outputs are mono; its scorer would refuse stereo).
    """
    from ..audio import audio_file_format, read_audio

    model = _model()  # first: a missing package gets the install hint
    import torch
    from silero_vad import get_speech_timestamps

    file_rate, _ = audio_file_format(path)
    samples = read_audio(path, file_rate)  # no resampling: the file's own samples
    stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), model,
                                   return_seconds=True)
    return [(float(s["start"]), float(s["end"])) for s in stamps], len(samples) / file_rate
