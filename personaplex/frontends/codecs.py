"""Telephony and wire audio formats: G.711 mu-law, PCM16 little-endian, base64, streaming resampling.

The model speaks and hears float32 mono at 24 kHz. The Realtime-style endpoint carries base64 PCM16 at
24 kHz (or G.711 mu-law at 8 kHz), phone calls carry base64 mu-law at 8 kHz in 20 ms chunks.

G.711 mu-law follows the ITU-T G.711 segment law on a 14-bit magnitude (the 16-bit sample shifted right
by two, as Python's former ``audioop.lin2ulaw`` does), so bytes are identical to what every telephony
stack produces and accepts.
"""

from __future__ import annotations

import base64
import binascii
from math import gcd

import numpy as np

from ..errors import PersonaplexError

MULAW_RATE = 8_000
_MULAW_BIAS = 0x84  # 132: added to 16-bit magnitudes so that every segment starts at a power of two
_MULAW_CLIP = 8159  # largest 14-bit magnitude before the bias
_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


class AudioFormatError(PersonaplexError):
    """Audio on the wire is not in the announced format (bad base64, odd PCM16 length...)."""


# --- G.711 mu-law ------------------------------------------------------------------------------------------


def _mulaw_decode_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((code & 0x0F) << 3) + _MULAW_BIAS) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, _MULAW_BIAS - magnitude, magnitude - _MULAW_BIAS).astype(np.int16)


_MULAW_TO_PCM16 = _mulaw_decode_table()


def pcm16_to_mulaw(samples: np.ndarray) -> bytes:
    """int16 samples [T] -> T bytes of G.711 mu-law."""
    value = np.asarray(samples, dtype=np.int16).astype(np.int32) >> 2  # 14-bit, arithmetic shift
    negative = value < 0
    magnitude = np.minimum(np.where(negative, -value, value), _MULAW_CLIP) + (_MULAW_BIAS >> 2)
    segment = np.searchsorted(_SEGMENT_ENDS, magnitude, side="left")
    mantissa = (magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    code ^= np.where(negative, 0x7F, 0xFF)
    return code.astype(np.uint8).tobytes()


def mulaw_to_pcm16(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples, one per byte."""
    return _MULAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]


# --- PCM16 and float ---------------------------------------------------------------------------------------


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1) -> int16 (v x 32768, rounded and clipped; non-finite values become 0)."""
    scaled = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0) * 32768.0
    return np.clip(np.rint(scaled), -32768, 32767).astype(np.int16)


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 -> float32 as v / 32768 (the convention of ``personaplex.audio.read_audio``)."""
    return np.asarray(samples, dtype=np.int16).astype(np.float32) / 32768.0


def pcm16_bytes_to_float(data: bytes) -> np.ndarray:
    """Little-endian PCM16 bytes -> float32 samples; raises ``AudioFormatError`` on an odd length."""
    if len(data) % 2:
        raise AudioFormatError(f"PCM16 audio must have an even number of bytes (got {len(data)})")
    return pcm16_to_float(np.frombuffer(data, dtype="<i2"))


def float_to_pcm16_bytes(samples: np.ndarray) -> bytes:
    return float_to_pcm16(samples).astype("<i2").tobytes()


def decode_base64(text: object, what: str = "audio") -> bytes:
    """Strict base64 -> bytes; raises ``AudioFormatError`` saying what was expected."""
    if not isinstance(text, str):
        raise AudioFormatError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AudioFormatError(f"{what} is not valid base64") from None


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- streaming resampling ----------------------------------------------------------------------------------


class StreamResampler:
    """Rational-rate resampling of a stream delivered in chunks of any size.

    ``personaplex.audio.resample`` (``scipy.signal.resample_poly``) is zero-phase over a whole signal;
    applied chunk by chunk it would click at every chunk border. This keeps the filter state between
    chunks instead and uses the same filter (Kaiser-windowed sinc, 10 taps per side per phase, beta 5),
    so its output is ``resample`` of the whole stream delayed by ``delay`` output samples
    (1.25 ms for 8 <-> 24 kHz).
    """

    def __init__(self, source_rate: int, target_rate: int):
        from scipy.signal import firwin

        common = gcd(source_rate, target_rate)
        self.up, self.down = target_rate // common, source_rate // common
        half_len = 10 * max(self.up, self.down)
        self.taps = firwin(2 * half_len + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0)) * self.up
        self.delay = half_len // self.down  # output samples (exact when down divides half_len)
        self._state = np.zeros(len(self.taps) - 1)
        self._phase = 0  # index, in the upsampled stream, of the next sample to keep

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """float32 [T] at the source rate -> float32 at the target rate (about T x up / down samples)."""
        from scipy.signal import lfilter

        samples = np.asarray(samples, dtype=np.float64).reshape(-1)
        if self.up == self.down == 1:
            return samples.astype(np.float32)
        upsampled = np.zeros(len(samples) * self.up)
        upsampled[:: self.up] = samples
        filtered, self._state = lfilter(self.taps, 1.0, upsampled, zi=self._state)
        kept = filtered[self._phase :: self.down]
        self._phase = (self._phase - len(upsampled)) % self.down
        return kept.astype(np.float32)
