"""Voices from untrusted sources against a real running server (demo model, loopback): decompression bombs
(a FLAC whose header claims 5 s but which holds 300 s, an Ogg/Opus file of 300 s), absurd sample rates,
upload size, count and byte caps, refused uploads deleted at once, error messages that name no server
folder, Ogg/Opus uploads, and Ogg pages with a bad checksum or a foreign serial number (in uploads and in
a live /api/chat stream)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import struct
import tempfile
import wave
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import numpy as np
import pytest
import sphn

from test_server_protocol import ServerThread as ProtocolServerThread

from personaplex.ogg import OggPage, parse_pages

FRAME = 1920
BLOCK = 4096  # FLAC block size of the crafted files


# --- a real server in a background thread ------------------------------------------------------------------


class ServerThread(ProtocolServerThread):
    """The protocol tests' server thread, with what these tests look at."""

    @property
    def upload_files(self) -> list[str]:
        return sorted(p.name for p in self.hub.personas.upload_dir.iterdir())



@pytest.fixture(scope="module")
def server(demo_model):
    running = ServerThread(demo_model, max_conversations=2, max_queue=0, input_timeout_seconds=None,
                           allow_voice_upload=True)
    yield running
    running.stop()


# --- crafted audio files -----------------------------------------------------------------------------------


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _coded_number(n: int) -> bytes:
    """FLAC's UTF-8-like frame number."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    return bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])


def flac_bomb(rate: int, claimed_seconds: float, held_seconds: float) -> bytes:
    """A mono 16-bit FLAC whose STREAMINFO claims ``claimed_seconds`` but whose frames hold
    ``held_seconds``: three blocks of noise, then constant blocks (5 bytes of subframe per 4096 samples)."""
    rng = np.random.default_rng(0)
    claimed = int(claimed_seconds * rate)
    info = struct.pack(">HH", BLOCK, BLOCK) + bytes(6) + ((rate << 44) | (15 << 36) | claimed).to_bytes(8, "big")
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, 34]) + info + bytes(16))
    for index in range(int(held_seconds * rate) // BLOCK):
        header = bytes([0xFF, 0xF8, 0xC0, 0x08]) + _coded_number(index)
        header += bytes([_crc8(header)])
        if index < 3:  # verbatim noise
            subframe = b"\x02" + (rng.standard_normal(BLOCK) * 3000).astype(">i2").tobytes()
        else:  # a constant block
            subframe = b"\x00" + struct.pack(">h", 1000)
        frame = header + subframe
        out += frame + struct.pack(">H", _crc16(frame))
    return bytes(out)


def wav_at(rate: int, seconds: float, channels: int = 1) -> bytes:
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal((int(rate * seconds), channels)) * 3000).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return buffer.getvalue()


def voice_sample(name: str = "custom", seconds: float = 3.0) -> np.ndarray:
    from personaplex.demo import synthesize_voice

    return synthesize_voice(name, seconds=seconds)


def ogg_opus_file(pcm: np.ndarray, tmp_path: Path, name: str = "voice.ogg") -> bytes:
    path = tmp_path / name
    sphn.write_opus(str(path), pcm.astype(np.float32)[None], 24000)
    return path.read_bytes()


def rewrite_pages(data: bytes, change) -> bytes:
    """Every page of an Ogg stream through ``change(index, page, raw) -> bytes``."""
    out = bytearray()
    for index, page in enumerate(parse_pages(data)):
        out += change(index, page, page.to_bytes())
    return bytes(out)


def damage_checksum(data: bytes, page_index: int) -> bytes:
    def change(index, page, raw):
        if index != page_index:
            return raw
        broken = bytearray(raw)
        broken[-1] ^= 0x55  # a body byte: the stored checksum no longer matches
        return bytes(broken)

    return rewrite_pages(data, change)


def foreign_serial(data: bytes, page_index: int) -> bytes:
    def change(index, page, raw):
        if index != page_index:
            return raw
        return dataclasses.replace(page, serial=page.serial ^ 0x5A5A).to_bytes()  # a valid page of another stream

    return rewrite_pages(data, change)


# --- measuring ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def peak_memory_rise_mib(action) -> tuple[object, float]:
    """(action's result, how far this process's peak resident memory rose above its start, MiB). The
    server runs in this process; the peak is reset first (Linux: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    result = action()
    return result, (_status_kib("VmHWM") - before) / 1024


def post_voice(server: ServerThread, data: bytes) -> tuple[int, dict]:
    async def post():
        async with aiohttp.ClientSession() as session, session.post(server.http + "/api/voices", data=data) as r:
            return r.status, json.loads(await r.text())

    return asyncio.run(post())


def recorded_before(pages: list[bytes]) -> list[float]:
    """For each page, the seconds of audio recorded before it (Opus granules count 48 kHz samples): when a
    live client sends it. A page that does not parse (a damaged one) goes with the page after it."""
    times, recorded = [], 0.0
    for page in pages:
        times.append(recorded)
        try:
            recorded = parse_pages(page, check_crc=False)[0].granule / 48000
        except Exception:  # noqa: BLE001 - not Ogg at all
            pass
    return times


def chat(url: str, frames: int = 4, pages: list[bytes] | None = None, send_at: list[float] | None = None,
         **params) -> dict:
    """One /api/chat conversation: send ``pages`` (after the handshake; page i ``send_at[i]`` seconds after
    it, default all at once) while reading ``frames`` agent audio messages; returns what happened,
    including a failed send, the server's 0x05 error text and the close code."""
    query = {"text_prompt": "hello", "voice_prompt": "NATF2", **params}
    pages = pages or []
    send_at = send_at or [0.0] * len(pages)

    async def talk():
        result = {"handshake": False, "audio": 0, "error": None, "close": None, "sent": 0, "send_error": None}
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}?{urlencode(query)}") as ws:
            async def send():
                started = asyncio.get_running_loop().time()
                try:
                    for page, at in zip(pages, send_at):
                        await asyncio.sleep(max(0.0, started + at - asyncio.get_running_loop().time()))
                        await ws.send_bytes(b"\x01" + page)
                        result["sent"] += 1
                except (aiohttp.ClientError, ConnectionError) as error:  # the server ended the call: it says why
                    result["send_error"] = repr(error)

            sender = None
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                kind = message.data[0]
                if kind == 0x00:
                    result["handshake"] = True
                    sender = asyncio.create_task(send())
                elif kind == 0x01:
                    result["audio"] += 1
                    if result["audio"] >= frames + 2 and (sender is None or sender.done()):
                        break
                elif kind == 0x05:
                    result["error"] = message.data[1:].decode()
            if sender is not None:
                await sender
            await ws.close()
            result["close"] = ws.close_code
        return result

    return asyncio.run(asyncio.wait_for(talk(), 120))


# --- decompression bombs and odd formats (uploads) ---------------------------------------------------------


def test_flac_bomb_is_refused_after_decoding_no_more_than_the_limit(server, tmp_path):
    bomb = flac_bomb(48000, claimed_seconds=5, held_seconds=300)
    assert len(bomb) < 100_000
    # The attack is real: an unbounded decoder finds 300 s behind the 5 s header.
    (tmp_path / "bomb.flac").write_bytes(bomb)
    assert sphn.FileReader(str(tmp_path / "bomb.flac")).duration_sec == 5.0
    assert sphn.read(str(tmp_path / "bomb.flac"))[0].shape[-1] >= 299 * 48000
    del_before = server.upload_files

    (status, body), rise = peak_memory_rise_mib(lambda: post_voice(server, bomb))
    assert status == 400 and "limited to 30 s" in body["error"], body
    # 300 s decoded, resampled and normalised would take hundreds of MiB (its Mimi encoding more);
    # 30.5 s at 48 kHz is 6 MiB of float32.
    assert rise < 120, f"peak memory rose by {rise:.0f} MiB"
    assert server.upload_files == del_before  # nothing of the refused upload stays


def test_ogg_opus_bomb_is_refused_and_ogg_opus_uploads_work(server, tmp_path):
    long_silence = ogg_opus_file(np.zeros(24000 * 300, dtype=np.float32), tmp_path, "long.ogg")
    (status, body), rise = peak_memory_rise_mib(lambda: post_voice(server, long_silence))
    assert status == 400 and "limited to 30 s" in body["error"], body
    assert rise < 120, f"peak memory rose by {rise:.0f} MiB"

    good = ogg_opus_file(voice_sample("opus voice"), tmp_path)
    status, body = post_voice(server, good)
    assert status == 200 and body["voice"].startswith("upload-"), body
    talk = chat(server.url, voice_prompt=body["voice"])
    assert talk["handshake"] and talk["error"] is None and talk["audio"] >= 4


@pytest.mark.parametrize("rate, channels, words", [
    (1_000_003, 1, "sample rate of 1000003 Hz"),
    (4_000, 1, "sample rate of 4000 Hz"),
    (191_999, 1, "unusual sample rate"),
    (24_000, 4, "4 channels"),
])
def test_absurd_formats_are_refused_before_decoding(server, rate, channels, words):
    data = wav_at(rate, 0.24 if rate > 100_000 else 2.0, channels)
    (status, body), rise = peak_memory_rise_mib(lambda: post_voice(server, data))
    assert status == 400 and words in body["error"], body
    assert rise < 60, f"peak memory rose by {rise:.0f} MiB"
    assert not [name for name in server.upload_files if "checking" in name]


def test_standard_rates_and_flac_are_accepted(server):
    for data in (wav_at(44_100, 2.0), wav_at(48_000, 2.0, channels=2), flac_bomb(16000, 3, 3)):
        status, body = post_voice(server, data)
        assert status == 200 and body["voice"].startswith("upload-"), body


def test_upload_over_the_byte_limit_gets_413(demo_model):
    small = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None,
                         allow_voice_upload=True, max_voice_upload_bytes=50_000)
    try:
        status, body = post_voice(small, wav_at(24_000, 2.0))  # 96 kB
        files = small.upload_files
    finally:
        small.stop()
    assert status == 413 and "50000 bytes" in body["error"]
    assert files == []


# --- uploads: refused ones deleted, count and byte caps ----------------------------------------------------


def test_refused_uploads_leave_nothing_and_uploads_are_capped(demo_model):
    one = len(wav_at(24_000, 2.0))
    capped = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None,
                          allow_voice_upload=True, max_voice_uploads=2, max_voice_upload_total_bytes=10 * one)
    try:
        for refused in (b"definitely not audio", wav_at(1_000_003, 0.1), flac_bomb(48000, 5, 60),
                        wav_at(24_000, 31.0), np.zeros(10, dtype=np.int16).tobytes()):
            status, _ = post_voice(capped, refused)
            assert status == 400
        assert capped.upload_files == []  # every refused upload deleted at once, not at shutdown

        names = []
        for index in range(3):
            status, body = post_voice(capped, wav_at(24_000, 2.0 + 0.1 * index))
            assert status == 200
            names.append(body["voice"])
        kept = capped.upload_files
        oldest = chat(capped.url, voice_prompt=names[0])
        newest = chat(capped.url, voice_prompt=names[2])
    finally:
        capped.stop()
    assert len(kept) == 2  # the count cap: the least recently used was forgotten
    assert oldest["error"] is not None and "upload the sample again" in oldest["error"] and oldest["close"] == 1008
    assert newest["handshake"] and newest["error"] is None


def test_upload_byte_total_is_capped(demo_model):
    samples = [wav_at(24_000, 2.0 + 0.1 * index) for index in range(3)]
    capped = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None,
                          allow_voice_upload=True, max_voice_uploads=100,
                          max_voice_upload_total_bytes=len(samples[1]) + len(samples[2]))
    try:
        for sample in samples:
            assert post_voice(capped, sample)[0] == 200
        kept = capped.upload_files
        total = sum((capped.hub.personas.upload_dir / name).stat().st_size for name in kept)
    finally:
        capped.stop()
    assert len(kept) == 2 and total <= len(samples[1]) + len(samples[2])


# --- error messages name no server folder ------------------------------------------------------------------


def assert_no_server_paths(message: str, *folders) -> None:
    for folder in {*map(str, folders), tempfile.gettempdir(), str(Path.home())}:
        assert folder not in message, f"{folder!r} revealed in {message!r}"


def test_errors_name_no_server_folder(demo_model, tmp_path):
    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "NATF2.wav").write_bytes(wav_at(24_000, 2.0))
    (voices / "BOMB.flac").write_bytes(flac_bomb(48000, 5, 120))
    (voices / "BROKEN.wav").write_bytes(b"RIFF....WAVEfmt not really")
    model = dataclasses.replace(demo_model, voices_dir=voices)
    running = ServerThread(model, max_conversations=1, max_queue=0, input_timeout_seconds=None,
                           allow_voice_upload=True)
    upload_dir = running.hub.personas.upload_dir
    try:
        messages = {name: chat(running.url, voice_prompt=name) for name in ("NOBODY", "BOMB", "BROKEN")}
        upload = post_voice(running, b"RIFF$\x00\x00\x00WAVEfmt garbage")
        realtime = asyncio.run(_realtime_voice_error(running, "NOBODY"))
    finally:
        running.stop()
    assert "unknown voice" in messages["NOBODY"]["error"] and "NATF2" in messages["NOBODY"]["error"]
    assert "limited to 30 s" in messages["BOMB"]["error"]
    assert "not audio" in messages["BROKEN"]["error"]
    assert all(m["close"] == 1008 for m in messages.values())
    assert upload[0] == 400
    assert "unknown voice" in realtime
    for message in [m["error"] for m in messages.values()] + [upload[1]["error"], realtime]:
        assert_no_server_paths(message, voices, voices.resolve(), upload_dir, demo_model.voices_dir)


async def _realtime_voice_error(server: ServerThread, voice: str) -> str:
    url = server.url.replace("/api/chat", "/v1/realtime")
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "session.update", "session": {"type": "realtime", "voice": voice}}))
        async for message in ws:
            event = json.loads(message.data)
            if event["type"] == "error":
                return event["error"]["message"]
    raise AssertionError("no error event")


# --- Ogg pages with a bad checksum or another stream's serial ----------------------------------------------


def test_damaged_ogg_uploads_are_refused(server, tmp_path):
    good = ogg_opus_file(voice_sample("damaged", seconds=12.0), tmp_path)
    assert len(parse_pages(good)) >= 4
    for damaged, words in ((damage_checksum(good, 3), "bad checksum"), (foreign_serial(good, 3), "another stream")):
        before = server.upload_files
        status, body = post_voice(server, damaged)
        assert status == 400 and words in body["error"], body
        assert server.upload_files == before


def live_pages(seconds: float) -> list[bytes]:
    rng = np.random.default_rng(3)
    writer = sphn.OpusStreamWriter(24000)
    data = b"".join(writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                    for _ in range(int(seconds * 12.5)))
    return [page.to_bytes() for page in parse_pages(data)]


def test_live_stream_drops_and_counts_damaged_and_foreign_pages(server):
    pages = live_pages(3.0)
    assert len(pages) > 20
    bad_checksum = {5, 9, 14}
    foreign = {7, 18}
    sent = []
    for index, raw in enumerate(pages):
        if index in bad_checksum:
            broken = bytearray(raw)
            broken[-1] ^= 0x55
            raw = bytes(broken)
        elif index in foreign:
            page = parse_pages(raw)[0]
            raw = OggPage(page.flags, page.granule, page.serial ^ 0x5A5A, page.sequence, page.packets).to_bytes()
        sent.append(raw)
    before = _dropped(server)
    # Streamed as it is recorded, like a microphone: the input budget (--input-burst) ends a client that
    # sends faster than real time, whatever its pages hold.
    talk = chat(server.url, frames=len(sent) // 2 + 10, pages=sent, send_at=recorded_before(pages))
    assert talk["handshake"] and talk["error"] is None and talk["send_error"] is None, talk  # the call went on
    assert talk["sent"] == len(sent), talk
    assert talk["audio"] >= len(sent) // 2 + 10
    assert _dropped(server) - before == len(bad_checksum) + len(foreign)


def _dropped(server: ServerThread) -> float:
    for line in server.hub.metrics.render().splitlines():
        if line.startswith('personaplex_errors_total{kind="ogg_page_dropped"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_not_ogg_at_all_still_ends_the_call(server):
    talk = chat(server.url, frames=40, pages=[b"this is not an Ogg page at all"])
    assert talk["error"] is not None and "invalid audio" in talk["error"] and talk["close"] == 1007
