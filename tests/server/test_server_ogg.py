"""Ogg pages (parsing, checksums, writing), Opus packet durations, the server's page writer (48 kHz
granules, end-of-stream page), and the host names the server prints and certifies."""

from __future__ import annotations

import numpy as np
import pytest
import sphn

from personaplex.ogg import (
    FLAG_BOS,
    FLAG_EOS,
    OggError,
    OggPage,
    OpusPageWriter,
    ogg_crc,
    opus_packet_samples,
    parse_pages,
    split_pages,
)


def test_checksum_and_round_trip_of_sphn_pages():
    writer = sphn.OpusStreamWriter(24000)
    data = b"".join(writer.append_pcm(np.full(1920, 0.1 * k, dtype=np.float32)) for k in range(3))
    pages = parse_pages(data)  # checks every checksum sphn wrote
    assert pages[0].bos and pages[0].packets[0].startswith(b"OpusHead")
    assert b"".join(page.to_bytes() for page in pages) == data
    assert split_pages(data) == [page.to_bytes() for page in pages]
    broken = bytearray(data)
    broken[30] ^= 0xFF
    with pytest.raises(OggError, match="checksum"):
        parse_pages(bytes(broken))
    with pytest.raises(OggError):
        parse_pages(b"OggS" + bytes(10))
    assert ogg_crc(b"") == 0


def test_long_packets_use_255_lacing():
    packet = bytes(range(256)) * 3  # 768 bytes: lacing 255, 255, 255, 3
    page = OggPage(FLAG_BOS, 7, 99, 0, [packet, b"xy"])
    raw = page.to_bytes()
    assert raw[26] == 5 and list(raw[27:32]) == [255, 255, 255, 3, 2]
    parsed = parse_pages(raw)[0]
    assert parsed.packets == [packet, b"xy"] and parsed.granule == 7 and parsed.serial == 99


@pytest.mark.parametrize("toc, extra, samples", [
    (0b00001_0_00, b"", 960),  # SILK 20 ms, one frame
    (0b00011_0_00, b"", 2880),  # SILK 60 ms
    (0b01101_0_10, b"\x05", 1920),  # hybrid 20 ms, two frames
    (0b11111_0_01, b"", 1920),  # CELT 20 ms, two equal frames
    (0b11100_0_11, b"\x03", 360),  # CELT 2.5 ms, three frames
])
def test_opus_packet_durations(toc, extra, samples):
    assert opus_packet_samples(bytes([toc]) + extra + b"\0\0") == samples


def test_page_writer_granules_and_end_of_stream():
    writer = OpusPageWriter()
    pages = [raw for _ in range(5) for raw in writer.append(np.random.default_rng(0).uniform(-1, 1, 1920))]
    parsed = [parse_pages(raw)[0] for raw in pages]
    assert parsed[0].bos and parsed[1].packets[0].startswith(b"OpusTags")
    total = 0
    for page in parsed[2:]:
        total += sum(opus_packet_samples(p) for p in page.packets)
        assert page.granule == total
    assert total == 5 * 1920 * 2  # 400 ms of 24 kHz audio = 19200 samples at 48 kHz
    end = parse_pages(writer.finish())[0]
    assert end.flags == FLAG_EOS and end.packets == [] and end.granule == total
    assert end.sequence == parsed[-1].sequence + 1 and end.serial == parsed[-1].serial
    assert writer.finish() is None  # once
    # The whole stream, end page included, still decodes.
    reader = sphn.OpusStreamReader(24000)
    decoded = sum(len(reader.append_bytes(raw)) for raw in pages)
    assert decoded == 5 * 1920


def test_page_writer_fixes_granules_counted_at_24_khz():
    """An encoder library that writes 24 kHz granule positions (as older sphn did) gets them rewritten."""
    writer = OpusPageWriter()
    genuine = sphn.OpusStreamWriter(24000)

    class HalfGranules:
        def append_pcm(self, pcm):
            pages = parse_pages(genuine.append_pcm(pcm))
            for page in pages:
                page.granule //= 2
            return b"".join(page.to_bytes() for page in pages)

    writer._encoder = HalfGranules()
    parsed = [parse_pages(raw)[0] for _ in range(3) for raw in writer.append(np.zeros(1920, dtype=np.float32))]
    assert [p.granule for p in parsed[2:]] == [1920 * (k + 1) for k in range(len(parsed) - 2)]


def test_access_url_host_and_certificate_names(tmp_path):
    from personaplex.server.serve import access_host
    from personaplex.server.tls import local_names, tls_context

    assert access_host("127.0.0.1") == "127.0.0.1"
    assert access_host("::1") == "[::1]"
    assert access_host("localhost") == "localhost"
    for wildcard in ("0.0.0.0", "::"):
        host = access_host(wildcard)
        assert host not in ("0.0.0.0", "::", "[::]", "")
    names, addresses = local_names()
    assert "localhost" in names and "127.0.0.1" in addresses and "::1" in addresses
    context, generated = tls_context(tmp_path / "new")
    assert generated and context is not None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "new" / "cert.pem").read_bytes())
    alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in alternative.get_values_for_type(x509.DNSName)
    assert {str(a) for a in alternative.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cert.pem").write_text("only a certificate")
    from personaplex.server.tls import TLSError

    with pytest.raises(TLSError, match="key.pem is missing"):
        tls_context(tmp_path / "half")
    (tmp_path / "half" / "key.pem").write_text("garbage")
    with pytest.raises(TLSError, match="cannot load"):
        tls_context(tmp_path / "half")
