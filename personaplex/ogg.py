"""Ogg pages of an Opus stream (RFC 3533, RFC 7845): parsing, writing, and the page writer the server uses.

The wire protocol sends exactly one Ogg page per message, so the server splits what the Opus encoder
produces into pages, makes sure every page's granule position counts 48 kHz samples as Ogg Opus
requires (whatever the encoder library wrote), and ends the stream with an end-of-stream page.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import PersonaplexError

CAPTURE = b"OggS"
HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments
FLAG_CONTINUED = 0x01
FLAG_BOS = 0x02
FLAG_EOS = 0x04
OPUS_RATE = 48_000  # granule positions of Ogg Opus count samples at 48 kHz, whatever the coded rate


class OggError(PersonaplexError):
    """Bytes that are not a well-formed Ogg page."""


# The Ogg checksum is CRC-32 with polynomial 0x04C11DB7, MSB first, initial value 0 and no final xor: zlib's
# CRC-32 (the same polynomial, LSB first, with inverted start and end) over bit-reversed bytes, reversed
# back. It runs in C, about 25 times faster than a Python loop (live streams check every page).
_REVERSED_BITS = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))


def ogg_crc(data: bytes) -> int:
    """The Ogg checksum (CRC-32, polynomial 0x04C11DB7, no reflection, initial value 0)."""
    reflected = zlib.crc32(data.translate(_REVERSED_BITS), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


@dataclass
class OggPage:
    flags: int
    granule: int
    serial: int
    sequence: int
    packets: list[bytes]  # complete packets (and a trailing partial one when the last lacing value is 255)
    crc: int = 0

    @property
    def bos(self) -> bool:
        return bool(self.flags & FLAG_BOS)

    @property
    def eos(self) -> bool:
        return bool(self.flags & FLAG_EOS)

    def to_bytes(self) -> bytes:
        lacing = bytearray()
        for packet in self.packets:
            lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
        if len(lacing) > 255:
            raise OggError("too many packets for one Ogg page")
        header = HEADER.pack(CAPTURE, 0, self.flags, self.granule, self.serial, self.sequence, 0, len(lacing))
        body = header + bytes(lacing) + b"".join(self.packets)
        crc = ogg_crc(body)
        return body[:22] + struct.pack("<I", crc) + body[26:]


def parse_pages(data: bytes, *, check_crc: bool = True) -> list[OggPage]:
    """Every page in ``data`` (which must hold whole pages only); raises ``OggError``."""
    return [page for page, _ in iter_pages(data, check_crc=check_crc)]


def iter_pages(data: bytes, *, check_crc: bool = True):
    """(page, its bytes) for every page in ``data``, one at a time; raises ``OggError`` at the first
    malformed page (so that a caller can stop decoding a long stream early)."""
    position = 0
    while position < len(data):
        if len(data) - position < HEADER.size:
            raise OggError("truncated Ogg page header")
        capture, version, flags, granule, serial, sequence, crc, count = HEADER.unpack_from(data, position)
        if capture != CAPTURE or version != 0:
            raise OggError("not an Ogg page (bad capture pattern or version)")
        lacing = data[position + HEADER.size : position + HEADER.size + count]
        body_start = position + HEADER.size + count
        body_end = body_start + sum(lacing)
        if len(lacing) < count or body_end > len(data):
            raise OggError("truncated Ogg page")
        raw = data[position:body_end]
        if check_crc and ogg_crc(raw[:22] + b"\0\0\0\0" + raw[26:]) != crc:
            raise OggError(f"Ogg page {sequence} has a bad checksum")
        packets, current, offset = [], bytearray(), body_start
        for size in lacing:
            current += data[offset : offset + size]
            offset += size
            if size < 255:
                packets.append(bytes(current))
                current = bytearray()
        if current:
            packets.append(bytes(current))
        yield OggPage(flags, granule, serial, sequence, packets, crc), raw
        position = body_end


class LivePageCheck:
    """The checks a live Ogg stream (one page per message) gets before its decoder sees a page.

    A page with a bad checksum or the serial number of another stream is damaged or foreign: it is
    dropped (its audio is lost, like a lost packet, and Opus conceals it) and counted, and the call goes
    on. Bytes that are not an Ogg page at all are an error (``OggError``)."""

    def __init__(self) -> None:
        self.serial: int | None = None
        self.dropped_bad_checksum = 0
        self.dropped_foreign_serial = 0

    def accept(self, message: bytes) -> bool:
        """True when ``message`` (whole Ogg pages) may go to the decoder, False when it is dropped."""
        pages = list(iter_pages(message, check_crc=False))
        if not pages:
            raise OggError("an empty audio message: send one Ogg page per message")
        for page, raw in pages:
            if ogg_crc(raw[:22] + b"\0\0\0\0" + raw[26:]) != page.crc:
                self.dropped_bad_checksum += 1
                return False
            if self.serial is None:
                self.serial = page.serial
            elif page.serial != self.serial:
                self.dropped_foreign_serial += 1
                return False
        return True


def split_pages(data: bytes) -> list[bytes]:
    """Cut a byte string of whole Ogg pages into one byte string per page (no checksum work)."""
    out = []
    position = 0
    while position < len(data):
        count = data[position + 26]
        size = HEADER.size + count + sum(data[position + HEADER.size : position + HEADER.size + count])
        out.append(data[position : position + size])
        position += size
    return out


def opus_packet_samples(packet: bytes) -> int:
    """Duration of an Opus packet in 48 kHz samples, from its TOC byte (RFC 6716, section 3.1)."""
    if not packet:
        return 0
    config = packet[0] >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config % 4]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (480, 960)[config % 2]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config % 4]
    code = packet[0] & 0x03
    count = 1 if code == 0 else 2 if code in (1, 2) else (packet[1] & 0x3F if len(packet) > 1 else 0)
    return frame * count


class PageStream:
    """Where an Ogg/Opus stream of pages stands (serial, last page, granule) and its end-of-stream page."""

    def __init__(self) -> None:
        self._granule = 0
        self._serial: int | None = None
        self._sequence = -1
        self.finished = False

    def finish(self) -> bytes | None:
        """The end-of-stream page (no packets; the final granule position), once; None before any page."""
        if self.finished or self._serial is None:
            return None
        self.finished = True
        return OggPage(FLAG_EOS, self._granule, self._serial, self._sequence + 1, []).to_bytes()


class OpusPageWriter(PageStream):
    """24 kHz mono PCM -> Ogg/Opus pages, one byte string per page, with 48 kHz granule positions
    and an end-of-stream page (``finish``)."""

    def __init__(self, sample_rate: int = 24_000):
        import sphn

        super().__init__()
        self._encoder = sphn.OpusStreamWriter(sample_rate)

    def append(self, pcm: np.ndarray) -> list[bytes]:
        """Encode float32 samples (a multiple of 20 ms; the server gives 80 ms frames) into pages."""
        samples = np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0)
        data = self._encoder.append_pcm(samples)
        pages = []
        for raw in split_pages(data or b""):
            page = parse_pages(raw, check_crc=False)[0]
            self._serial, self._sequence = page.serial, page.sequence
            if page.bos or (page.packets and page.packets[0][:8] == b"OpusTags"):
                pages.append(raw)
                continue
            self._granule += sum(opus_packet_samples(p) for p in page.packets)
            if page.granule != self._granule:  # an encoder library that counts 24 kHz samples
                page.granule = self._granule
                raw = page.to_bytes()
            pages.append(raw)
        return pages

    def position(self) -> tuple[int | None, int, int]:
        """(serial, last page's sequence number, granule position): what ``finish`` needs."""
        return self._serial, self._sequence, self._granule

    async def encode(self, pcm: np.ndarray) -> list[bytes]:
        """``append`` for callers that may also be given a writer in another process (``OpusEncoderPool``)."""
        return self.append(pcm)

    def close(self) -> None:
        """Nothing to release in this process."""
