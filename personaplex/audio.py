"""Reading and preparing audio: any common format to mono 24 kHz float32, loudness normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import pyloudnorm
import sphn

from .config import FRAME_SIZE, SAMPLE_RATE
from .errors import PersonaplexError
from .ogg import FLAG_BOS, FLAG_CONTINUED, OggError, OggPage, iter_pages


class AudioError(PersonaplexError):
    """An audio file is missing, unreadable, empty or unusable."""


@dataclass(frozen=True)
class AudioLimits:
    """Bounds on decoding audio from an untrusted source (an uploaded voice sample, a voice file a client
    names). They are enforced while decoding, never taken from the file's header: a few kilobytes of a
    compressed format can hold hours of audio, and a header can claim any length or sample rate.

    max_seconds: decoded audio longer than this is refused after decoding at most this much (plus
    ``DECODE_MARGIN_SECONDS``); min_rate/max_rate (Hz) and max_channels are checked before any decoding;
    max_resample_factor bounds the polyphase factors of the rate change to 24 kHz (a rate such as
    191,999 Hz would need a filter of millions of taps)."""

    max_seconds: float = 30.0
    min_rate: int = 8_000
    max_rate: int = 192_000
    max_channels: int = 2
    max_resample_factor: int = 1_000


DECODE_MARGIN_SECONDS = 0.5  # decoded past the limit, to tell "exactly the limit" from "longer"


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, *, limits: AudioLimits | None = None) -> np.ndarray:
    """Decode wav/flac/ogg (Vorbis or Opus)/mp3 (via sphn) into mono float32 samples at ``sample_rate``; shape [T].

    Integer PCM maps to [-1, 1) as v / 32768; several channels are averaged. With ``limits`` (audio
    from an untrusted source) the decoding stops at the length limit and refuses odd formats before
    it starts; error messages then name the file only by its base name.
    """
    path = Path(path)
    label = path.name if limits is not None else str(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {label}")
    if _is_ogg_opus(path):
        mono, file_rate = _read_ogg_opus(path, label, limits), OPUS_DECODE_RATE
    else:
        mono, file_rate = _read_with_symphonia(path, label, limits)
    if mono.size == 0:
        raise AudioError(f"{label} contains no audio samples")
    return resample(mono, int(file_rate), sample_rate)


OPUS_DECODE_RATE = 24_000  # Opus decodes natively at 24 kHz (one of its internal rates): no resampling


def _read_with_symphonia(path: Path, label: str, limits: AudioLimits | None) -> tuple[np.ndarray, int]:
    """Mono float32 [T] and its rate, through sphn's decoders (wav, flac, ogg/vorbis, mp3)."""
    try:
        if limits is None:
            samples, file_rate = sphn.read(str(path))
        else:
            reader = sphn.FileReader(str(path))
            file_rate, channels = int(reader.sample_rate), int(reader.channels)
            _check_format(file_rate, channels, limits, label)
            # A header that claims "too long" is safe to trust; one that claims "short" is not.
            if reader.duration_sec > limits.max_seconds + DECODE_MARGIN_SECONDS:
                raise _too_long(reader.duration_sec, limits, label)
            # decode() stops once it has this many samples, whatever the header claims.
            samples = reader.decode(0.0, limits.max_seconds + DECODE_MARGIN_SECONDS)
    except AudioError:
        raise
    except Exception as exc:  # sphn raises plain exceptions with the decoder's message
        if limits is None:
            raise AudioError(f"cannot decode {label} as audio ({exc}); use wav, flac, ogg or mp3") from exc
        # The decoder's own words may name the file's place: say only what went wrong.
        raise AudioError(f"cannot decode {label}: it is not audio in a known format "
                         "(use wav, flac, ogg or mp3)") from exc
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None]
    if limits is not None and samples.shape[-1] > limits.max_seconds * file_rate:
        raise _too_long(None, limits, label)
    if samples.size == 0:
        return samples.reshape(-1), int(file_rate)
    mono = samples[0] if samples.shape[0] == 1 else samples.mean(axis=0, dtype=np.float32)
    return mono, int(file_rate)


def _check_format(rate: int, channels: int, limits: AudioLimits, label: str) -> None:
    """Refuse sample rates and channel counts that no voice recording has, before decoding anything."""
    if not limits.min_rate <= rate <= limits.max_rate:
        raise AudioError(f"{label} has a sample rate of {rate} Hz; use a recording at {limits.min_rate // 1000} to "
                         f"{limits.max_rate // 1000} kHz (e.g. 16, 24, 44.1 or 48 kHz)")
    common = gcd(rate, SAMPLE_RATE)
    if max(rate // common, SAMPLE_RATE // common) > limits.max_resample_factor:
        raise AudioError(f"{label} has an unusual sample rate ({rate} Hz); use a standard rate such as 16000, "
                         "22050, 24000, 44100 or 48000 Hz")
    if not 1 <= channels <= limits.max_channels:
        raise AudioError(f"{label} has {channels} channels; use a mono or stereo recording")


def _too_long(claimed: float | None, limits: AudioLimits, label: str) -> AudioError:
    length = f"lasts {claimed:.0f} s" if claimed is not None else f"lasts more than {limits.max_seconds:g} s"
    return AudioTooLongError(f"{label} {length}: voice samples are limited to {limits.max_seconds:g} s "
                             "(a few seconds of clear speech is best)")


class AudioTooLongError(AudioError):
    """Decoded audio is longer than the limit for its source."""


def _is_ogg_opus(path: Path) -> bool:
    """An Ogg stream whose first packet is an ``OpusHead`` (symphonia decodes Vorbis, not Opus)."""
    with open(path, "rb") as file:
        head = file.read(64)
    if head[:4] != b"OggS" or len(head) < 27:
        return False
    body = 27 + head[26]
    return head[body : body + 8] == b"OpusHead"


OPUS_PACKETS_PER_DECODE = 4  # sphn's stream decoder fails on pages of many packets: it gets small ones


def _read_ogg_opus(path: Path, label: str, limits: AudioLimits | None) -> np.ndarray:
    """Mono float32 [T] at 24 kHz from an Ogg/Opus file, page by page: every page's checksum and serial
    number are checked, and decoding stops as soon as the length limit is passed.

    The packets are handed to sphn's stream decoder in small pages of their own (a file's page may hold
    255 packets, which that decoder cannot take at once); packets continued across pages are joined first.
    """
    data = path.read_bytes()
    decoder = sphn.OpusStreamReader(OPUS_DECODE_RATE)
    limit = None if limits is None else int(limits.max_seconds * OPUS_DECODE_RATE)
    parts, decoded, serial, sequence, pending, skip = [], 0, None, 0, b"", 0
    try:
        for page, raw in iter_pages(data):
            if serial is None:
                serial = page.serial
            elif page.serial != serial:
                raise OggError(f"a page of another stream (serial {page.serial}, expected {serial})")
            packets = list(page.packets)
            if pending and packets and page.flags & FLAG_CONTINUED:
                packets[0] = pending + packets[0]
            elif pending:
                raise OggError("a packet continued on a page that does not continue it")
            pending = b""
            if raw[HEADER_SIZE + raw[HEADER_SIZE - 1] - 1] == 255 and packets:  # last packet goes on next page
                pending = packets.pop()
            if packets and packets[0][:8] == b"OpusHead" and len(packets[0]) >= 12:
                # Pre-skip: encoder delay at the start, in 48 kHz samples (RFC 7845), not part of the audio.
                skip = int.from_bytes(packets[0][10:12], "little") * OPUS_DECODE_RATE // 48_000
            for first in range(0, len(packets), OPUS_PACKETS_PER_DECODE):
                chunk = OggPage(page.flags & FLAG_BOS if first == 0 else 0, page.granule, serial, sequence,
                                packets[first : first + OPUS_PACKETS_PER_DECODE])
                sequence += 1
                pcm = decoder.append_bytes(chunk.to_bytes())
                if pcm is None or not len(pcm):
                    continue
                pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
                dropped, skip = min(skip, pcm.size), skip - min(skip, pcm.size)
                pcm = pcm[dropped:]
                parts.append(pcm)
                decoded += pcm.size
                if limit is not None and decoded > limit:
                    raise _too_long(None, limits, label)
    except AudioError:
        raise
    except Exception as exc:  # OggError, or sphn's plain exceptions for a broken Opus stream
        raise AudioError(f"cannot decode {label} as Ogg/Opus audio ({exc})") from exc
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


HEADER_SIZE = 27  # bytes of an Ogg page header before its lacing values


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
