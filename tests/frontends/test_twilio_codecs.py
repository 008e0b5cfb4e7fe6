"""Wire audio formats of the integrations: G.711 mu-law against the standard's values and a reference
implementation, PCM16 and base64, and the streaming resampler against the whole-signal one."""

from __future__ import annotations

import base64
import importlib
import warnings

import numpy as np
import pytest

from personaplex.audio import resample
from personaplex.frontends.codecs import (
    AudioFormatError,
    StreamResampler,
    decode_base64,
    float_to_pcm16,
    float_to_pcm16_bytes,
    mulaw_to_pcm16,
    pcm16_bytes_to_float,
    pcm16_to_float,
    pcm16_to_mulaw,
)

# G.711 mu-law decoding: code byte -> 16-bit linear value (ITU-T G.711 table 2a, values x 4 for 16 bits).
MULAW_DECODED = {
    0x00: -32124, 0x01: -31100, 0x0F: -16764, 0x10: -15996, 0x20: -7932, 0x30: -3900, 0x40: -1884,
    0x50: -876, 0x60: -372, 0x70: -120, 0x7E: -8, 0x7F: 0,
    0x80: 32124, 0x8F: 16764, 0x90: 15996, 0xA0: 7932, 0xB0: 3900, 0xC0: 1884, 0xD0: 876, 0xE0: 372,
    0xF0: 120, 0xFE: 8, 0xFF: 0,
}
# Encoding: linear value -> code (segment ends and clipping; -1 is -4 in 14 bits, nearest to -8).
MULAW_ENCODED = {0: 0xFF, -1: 0x7E, 8: 0xFE, 32767: 0x80, -32768: 0x00, 120: 0xF0, -120: 0x70, 1000: 0xCE,
                 -1000: 0x4E}


def reference_audioop():
    """Python's audioop (stdlib up to 3.12, the audioop-lts package from 3.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:
            pytest.skip("audioop is not available (install audioop-lts on Python 3.13+)")


def speech_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding 120-220 Hz pitch under a syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 170 + 50 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2 / 4
    return (0.3 * envelope * voice / 2 + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def test_mulaw_decoding_matches_the_standard_table():
    codes = bytes(MULAW_DECODED)
    assert mulaw_to_pcm16(codes).tolist() == list(MULAW_DECODED.values())


def test_mulaw_encoding_of_known_values():
    values = np.array(list(MULAW_ENCODED), dtype=np.int16)
    assert list(pcm16_to_mulaw(values)) == list(MULAW_ENCODED.values())


def test_mulaw_is_bit_exact_with_audioop_over_every_sample_and_code():
    audioop = reference_audioop()
    every_sample = np.arange(-32768, 32768, dtype=np.int16)
    assert pcm16_to_mulaw(every_sample) == audioop.lin2ulaw(every_sample.astype("<i2").tobytes(), 2)
    every_code = bytes(range(256))
    assert mulaw_to_pcm16(every_code).astype("<i2").tobytes() == audioop.ulaw2lin(every_code, 2)


def test_mulaw_round_trip():
    codes = bytes(c for c in range(256) if c != 0x7F)  # 0x7F is "-0", which encodes back as 0xFF
    assert pcm16_to_mulaw(mulaw_to_pcm16(codes)) == codes
    # Decoding an encoded sample lands within half a quantisation step: about 1/32 of the magnitude
    # (plus the 14-bit truncation near zero).
    samples = np.arange(-32768, 32767, dtype=np.int16).astype(np.int32)
    error = np.abs(mulaw_to_pcm16(pcm16_to_mulaw(samples)).astype(np.int32) - samples)
    assert np.all(error <= np.abs(samples) / 30 + 8)
    # On speech-like audio that is the textbook ~38 dB of 8-bit mu-law.
    voice = speech_like(2.0, 8000)
    pcm = float_to_pcm16(voice)
    back = mulaw_to_pcm16(pcm16_to_mulaw(pcm)).astype(np.float64)
    snr = 10 * np.log10(np.sum(pcm.astype(np.float64) ** 2) / np.sum((back - pcm) ** 2))
    assert 30 < snr < 45


def test_pcm16_conversions():
    floats = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, np.nan, -np.inf], dtype=np.float32)
    assert float_to_pcm16(floats).tolist() == [0, 16384, -16384, 32767, -32768, 32767, 0, -32768]
    data = float_to_pcm16_bytes(np.array([0.25, -0.25], dtype=np.float32))
    assert data == np.array([8192, -8192], dtype="<i2").tobytes()
    assert pcm16_bytes_to_float(data).tolist() == [0.25, -0.25]
    assert pcm16_to_float(np.array([-32768, 16384], dtype=np.int16)).tolist() == [-1.0, 0.5]
    with pytest.raises(AudioFormatError, match="even number of bytes"):
        pcm16_bytes_to_float(b"\x00\x01\x02")


def test_base64_is_strict_and_says_what_was_wrong():
    assert decode_base64(base64.b64encode(b"\x01\x02").decode()) == b"\x01\x02"
    for bad in ("not base64!", "QUJ", 42, None):
        with pytest.raises(AudioFormatError, match="media payload"):
            decode_base64(bad, "media payload")


@pytest.mark.parametrize(("source", "target"), [(8000, 24000), (24000, 8000)])
def test_stream_resampler_is_the_whole_signal_resampler_delayed(source, target):
    rng = np.random.default_rng(1)
    signal = speech_like(1.0, source) + 0.05 * rng.standard_normal(source).astype(np.float32)
    resampler = StreamResampler(source, target)
    pieces, start = [], 0
    while start < len(signal):  # chunks of any size, as they come off a network
        size = int(rng.integers(1, 700))
        pieces.append(resampler(signal[start:start + size]))
        start += size
    streamed = np.concatenate(pieces)
    whole = resample(signal, source, target)
    assert len(streamed) == len(whole)
    delay = resampler.delay
    assert delay == 30 * target // max(source, target)  # 1.25 ms
    interior = slice(100, len(whole) - delay - 100)
    np.testing.assert_allclose(streamed[delay:][interior], whole[interior], atol=1e-5)


def test_resampling_there_and_back_keeps_a_tone():
    rate_high, rate_low, tone = 24000, 8000, 440.0
    t = np.arange(rate_high) / rate_high
    signal = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
    down, up = StreamResampler(rate_high, rate_low), StreamResampler(rate_low, rate_high)
    back = np.concatenate([up(down(signal[i:i + 1920])) for i in range(0, len(signal), 1920)])
    steady = back[4800:-4800]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
    frequency = np.argmax(spectrum) * rate_high / len(steady)
    assert abs(frequency - tone) < 2
    assert abs(np.sqrt(np.mean(steady**2)) - 0.5 / np.sqrt(2)) < 0.01
    # A tone above the 4 kHz telephone band is removed on the way down.
    high = (0.5 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    assert np.sqrt(np.mean(StreamResampler(rate_high, rate_low)(high)[400:] ** 2)) < 0.01
