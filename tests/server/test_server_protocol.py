"""The /api/chat protocol against a real running server (demo model), with real aiohttp WebSocket clients
streaming real Ogg/Opus (sphn): handshake, audio and text, metadata, sampling parameters, Ogg pages in
both directions (including the opus-recorder shape of the reference web client), and every bad input,
while a neighbouring conversation keeps running unaffected."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import time
from urllib.parse import urlencode

import aiohttp
import numpy as np
import pytest
import sphn

from personaplex.ogg import FLAG_BOS, OggPage, opus_packet_samples, parse_pages

FRAME = 1920


# --- a real server in a background thread ------------------------------------------------------------------


class ServerThread:
    """A hub and the aiohttp server on their own event loop in a thread, as in production."""

    def __init__(self, model, **options):
        from personaplex.serving import ConversationHub, HubOptions

        server_kwargs = {k: options.pop(k) for k in ("auth_token", "send_buffer_bytes", "static_dir", "opus_workers",
                                                     "ssl_context") if k in options}
        self.hub = ConversationHub(model, HubOptions(**options))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._start(server_kwargs))
        self.url = f"ws://127.0.0.1:{self.server.port}/api/chat"
        self.http = f"http://127.0.0.1:{self.server.port}"
        self.stopped = False

    async def _start(self, kwargs):
        from personaplex.server.serve import start_server

        return await start_server(self.hub, host="127.0.0.1", port=0, **kwargs)

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        from personaplex.server.serve import stop_server

        if not self.stopped:  # a test may stop it before its fixture does
            self.stopped = True
            self.call(stop_server(self.server, self.hub))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(demo_model):
    running = ServerThread(demo_model, max_conversations=3, max_queue=1, input_timeout_seconds=None)
    yield running
    running.stop()


# --- client helpers ----------------------------------------------------------------------------------------


def chat_url(base: str, **params) -> str:
    params = {"text_prompt": "You enjoy having a good conversation.", "voice_prompt": "NATF2", **params}
    return f"{base}?{urlencode(params)}"


def opus_pages(seconds: float, seed: int = 0) -> list[bytes]:
    """A real Ogg/Opus stream (sphn), one page per list entry: header pages, then audio."""
    rng = np.random.default_rng(seed)
    writer = sphn.OpusStreamWriter(24000)
    data = b"".join(writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                    for _ in range(int(seconds * 12.5)))
    return [page.to_bytes() for page in parse_pages(data)]


class Received:
    def __init__(self):
        self.messages: list[tuple[float, int, bytes]] = []
        self.close_code: int | None = None

    def of(self, kind: int) -> list[bytes]:
        return [payload for _, k, payload in self.messages if k == kind]

    @property
    def metadata(self) -> list[dict]:
        return [json.loads(p) for p in self.of(0x04)]

    @property
    def error(self) -> str | None:
        errors = self.of(0x05)
        return errors[-1].decode() if errors else None

    def kinds(self) -> list[int]:
        return [k for _, k, _ in self.messages]


async def read_all(ws, received: Received, until=None) -> Received:
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            received.messages.append((time.monotonic(), message.data[0], message.data[1:]))
            if until is not None and until(received):
                break
    received.close_code = ws.close_code
    return received


async def converse(url: str, send=None, frames: int = 0, timeout: float = 60) -> Received:
    """Connect, wait for the handshake, run ``send(ws)`` alongside reading, stop after ``frames`` audio
    pages (then close) or when the server closes."""
    received = Received()
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        async def reader():
            def done(r):
                return frames and len([k for k in r.kinds() if k == 0x01]) >= frames + 2
            await read_all(ws, received, until=done)

        read_task = asyncio.create_task(reader())
        if send is not None:
            while 0x00 not in received.kinds() and not read_task.done():
                await asyncio.sleep(0.01)
            if not read_task.done():
                await send(ws)
        await asyncio.wait_for(read_task, timeout)
        if not ws.closed:
            await ws.close()
        received.close_code = received.close_code or ws.close_code
    return received


def run(coroutine):
    return asyncio.run(coroutine)


def agent_pages(received: Received) -> list[OggPage]:
    return [page for payload in received.of(0x01) for page in parse_pages(payload)]


# --- the happy path ----------------------------------------------------------------------------------------


def test_conversation_streams_audio_and_text_in_step(server):
    pages = opus_pages(2.0)

    async def send(ws):
        for page in pages:
            await ws.send_bytes(b"\x01" + page)
            await asyncio.sleep(0.02)

    received = run(converse(chat_url(server.url, seed=5), send, frames=20))
    kinds = received.kinds()
    assert kinds[0] == 0x04 and 0x00 in kinds
    assert kinds.index(0x00) < kinds.index(0x01)
    welcome = received.metadata[0]
    assert welcome["model"] == "demo" and welcome["limits"]["slots"] == 3
    assert welcome["persona"]["voice"] == "NATF2" and welcome["persona"]["seed"] == 5
    # The reference client's server-info panel needs these fields, and it validates every metadata
    # message whole: later ones (conversation started, queue position) repeat them.
    assert len(received.metadata) >= 2 and "conversation_id" in received.metadata[-1]
    for message in received.metadata:
        for key in ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "lm_model_file", "build_info"):
            assert key in message
    ogg = agent_pages(received)
    assert ogg[0].bos and ogg[0].packets[0].startswith(b"OpusHead")
    assert ogg[1].packets[0].startswith(b"OpusTags")
    # One Ogg page per message, valid checksums (parse_pages checks them), sequence numbers in order.
    assert all(len(parse_pages(p)) == 1 for p in received.of(0x01))
    assert [p.sequence for p in ogg] == list(range(len(ogg)))
    # Granule positions count 48 kHz samples: the sum of the packets' durations so far.
    total = 0
    for page in ogg[2:]:
        total += sum(opus_packet_samples(packet) for packet in page.packets)
        assert page.granule == total
    decoder = sphn.OpusStreamReader(24000)
    decoded = np.concatenate([decoder.append_bytes(p) for p in received.of(0x01)])
    assert len(decoded) >= 10 * FRAME and np.isfinite(decoded).all() and np.abs(decoded).max() > 0
    assert received.of(0x02), "the demo model emits text pieces"
    assert all(piece.decode("utf-8") for piece in received.of(0x02))


def test_text_follows_its_audio_page(server):
    received = run(converse(chat_url(server.url, seed=1), frames=12))
    kinds = received.kinds()
    after_handshake = kinds[kinds.index(0x00) + 1:]
    # Every text piece comes right after an audio page (text never runs ahead of its audio).
    for i, kind in enumerate(after_handshake):
        if kind == 0x02:
            assert after_handshake[i - 1] == 0x01


def test_fixed_seed_repeats_and_sampling_parameters_are_honoured(server):
    def texts(**params):
        received = run(converse(chat_url(server.url, **params), frames=15))
        return [p.decode() for p in received.of(0x02)][:12]

    first = texts(seed=42)
    assert first == texts(seed=42)
    assert first != texts(seed=43)
    greedy = texts(seed=1, text_temperature=0, audio_temperature=0)
    assert greedy == texts(seed=2, text_temperature=0, audio_temperature=0)  # argmax: the seed does not matter
    assert texts(seed=42, text_topk=1) != first


def test_end_of_stream_page_when_the_server_ends(demo_model):
    short = ServerThread(demo_model, max_conversations=1, max_conversation_seconds=1.0, input_timeout_seconds=None)
    try:
        received = run(converse(chat_url(short.url)))
    finally:
        short.stop()
    ogg = agent_pages(received)
    assert ogg[-1].eos and not ogg[-1].packets
    assert ogg[-1].granule == ogg[-2].granule > 0
    assert sum(p.eos for p in ogg) == 1
    assert "maximum length" in received.error
    assert received.close_code == 1000
    assert len(received.of(0x01)) >= 2 + 12  # headers, ~1 s of 80 ms frames (2 pages each), the end page


def test_opus_recorder_shaped_stream_is_understood(server):
    """The reference web client sends opus-recorder pages: OpusHead (pre-skip 3840, 48 kHz original rate),
    OpusTags 'Recorder JS', then pages of two 20 ms packets with 48 kHz granules and a random serial."""
    t = np.arange(24000 * 3) / 24000
    pages = recorder_stream((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    parsed = [parse_pages(p)[0] for p in pages]
    assert all(len(p.packets) <= 2 for p in parsed[2:])
    assert {opus_packet_samples(packet) for p in parsed[2:] for packet in p.packets} == {960}
    hub = server.hub
    decoded = []

    async def send(ws):
        for page in pages:
            await ws.send_bytes(b"\x01" + page)
            await asyncio.sleep(0.04)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server has decoded what was sent
            decoded[:] = [c._input.received_samples for c in list(hub._admitted)]
            if decoded and max(decoded) >= 0.95 * len(t):
                break
            await asyncio.sleep(0.02)
        await ws.close()

    received = run(converse(chat_url(server.url), send))
    assert received.error is None and 0x00 in received.kinds()
    # Every 20 ms packet became audio for the conversation (3 s sent, at least 2.85 s decoded).
    assert decoded and 0.95 * len(t) <= max(decoded) <= len(t)


def agent_frames_stepped(hub) -> float:
    return hub.metrics.registry.get_sample_value("personaplex_agent_frames_total", {"front_end": "chat"}) or 0.0


REFERENCE_CLIENT_QUERY = {"text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8", "audio_topk": "250",
                          "pad_mult": "0", "text_seed": "1234", "audio_seed": "5678", "repetition_penalty_context": "64",
                          "repetition_penalty": "1"}


def test_the_reference_clients_pace_loses_no_agent_audio(demo_model):
    """A client with the reference web client's parameters gets its handshake no sooner than 1.5 s after its
    socket opened (its player is not ready before), and its conversation's clock starts with its first audio:
    sending its first page 1.5 s after the handshake, it gets nothing before that page, then the agent's
    whole stream: OpusHead and OpusTags first, no page missing, and as many 80 ms of audio as frames the
    server stepped for it (up to the length limit, which ends the call)."""
    from personaplex.frontends.chat_protocol import REFERENCE_CLIENT_HANDSHAKE_SECONDS

    short = ServerThread(demo_model, max_conversations=1, max_conversation_seconds=2.0, input_timeout_seconds=None)
    t = np.arange(24000 * 8) / 24000
    pages = recorder_stream((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    sent_at = []

    async def send(ws):
        await asyncio.sleep(1.5)
        for page in pages:
            if ws.closed:
                return
            sent_at.append(time.monotonic())
            await ws.send_bytes(b"\x01" + page)
            await asyncio.sleep(0.04)

    try:
        before = agent_frames_stepped(short.hub)
        connected_at = time.monotonic()
        received = run(converse(chat_url(short.url, **REFERENCE_CLIENT_QUERY), send, timeout=120))
        stepped = agent_frames_stepped(short.hub) - before
    finally:
        short.stop()
    assert received.error is not None and "maximum length" in received.error
    handshake_at = next(at for at, kind, _ in received.messages if kind == 0x00)
    assert handshake_at - connected_at >= REFERENCE_CLIENT_HANDSHAKE_SECONDS
    audio = [(at, parse_pages(payload)[0]) for at, kind, payload in received.messages if kind == 0x01]
    assert sent_at and sent_at[0] >= handshake_at + 1.5
    assert audio[0][0] > sent_at[0], "agent audio arrived before the client's first page"
    agent = [page for _, page in audio]
    assert agent[0].bos and agent[0].packets[0].startswith(b"OpusHead")
    assert agent[1].packets[0].startswith(b"OpusTags")
    assert [page.sequence for page in agent] == list(range(len(agent))), "an agent page is missing"
    assert agent[-1].eos
    samples = sum(opus_packet_samples(packet) for page in agent[2:] for packet in page.packets)
    assert stepped == 25 and samples == 25 * 3840  # 80 ms at 48 kHz per frame stepped, all received
    assert agent[-1].granule == samples


def libopus_encoder(sample_rate: int = 24000, application: int = 2049):
    """An Opus encoder straight from libopus (as opus-recorder compiles it): 20 ms frames -> packets."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("opus") or "libopus.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        pytest.skip("libopus is not installed (apt-get install libopus0)")
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_encode_float.restype = ctypes.c_int32
    lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int,
                                      ctypes.c_char_p, ctypes.c_int32]
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    error = ctypes.c_int()
    encoder = lib.opus_encoder_create(sample_rate, 1, application, ctypes.byref(error))
    assert error.value == 0

    def encode(frame: np.ndarray) -> bytes:
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        out = ctypes.create_string_buffer(4000)
        size = lib.opus_encode_float(encoder, frame.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(frame), out, 4000)
        assert size > 0
        return out.raw[:size]

    return encode


def recorder_stream(pcm: np.ndarray) -> list[bytes]:
    """Pages as opus-recorder streams them: 20 ms packets (480 samples at 24 kHz), two per page."""
    encode = libopus_encoder()
    packets = [encode(pcm[start:start + 480]) for start in range(0, len(pcm) - 479, 480)]
    serial = random.getrandbits(32)
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 3840, 48000, 0, 0)
    vendor = b"Recorder JS"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    pages = [OggPage(FLAG_BOS, 0, serial, 0, [head]).to_bytes(), OggPage(0, 0, serial, 1, [tags]).to_bytes()]
    granule = 0
    for i in range(0, len(packets), 2):
        granule += 960 * len(packets[i:i + 2])
        pages.append(OggPage(0, granule, serial, len(pages), packets[i:i + 2]).to_bytes())
    return pages


# --- HTTP endpoints and auth --------------------------------------------------------------------------------


def test_health_voices_and_metrics(server):
    async def fetch():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.http + "/api/health") as r:
                health = await r.json()
            async with session.get(server.http + "/api/voices") as r:
                voices = await r.json()
            async with session.get(server.http + "/metrics") as r:
                metrics = await r.text()
                content_type = r.headers["Content-Type"]
        return health, voices, metrics, content_type

    health, voices, metrics, content_type = run(fetch())
    assert health["ok"] is True and health["slots_free"] + health["slots_busy"] == 3 and health["queued"] == 0
    assert health["model"] == "demo" and health["untrained"] is True  # the web page says so before any call
    assert "NATF2" in voices["voices"] and voices["upload"] is False
    assert content_type.startswith("text/plain")
    for name in ("personaplex_conversations_active", "personaplex_conversations_queued", "personaplex_tick_seconds_bucket",
                 "personaplex_late_ticks_total", "personaplex_errors_total", 'personaplex_sessions_total{front_end="chat"}'):
        assert name in metrics, name


def test_auth_token(demo_model):
    secured = ServerThread(demo_model, max_conversations=1, auth_token="s3cret")

    async def probe():
        results = {}
        async with aiohttp.ClientSession() as session:
            for name, url, headers in (
                ("health", "/api/health", {}),
                ("voices", "/api/voices", {}),
                ("voices_bearer", "/api/voices", {"Authorization": "Bearer s3cret"}),
                ("voices_query", "/api/voices?token=s3cret", {}),
                ("voices_wrong", "/api/voices?token=nope", {}),
            ):
                async with session.get(secured.http + url, headers=headers) as r:
                    results[name] = r.status
            try:
                async with session.ws_connect(chat_url(secured.url)):
                    results["chat"] = 101
            except aiohttp.WSServerHandshakeError as error:
                results["chat"] = error.status
        received = await converse(chat_url(secured.url, token="s3cret"), frames=2)
        results["chat_token"] = 0x00 in received.kinds()
        return results

    try:
        results = run(probe())
    finally:
        secured.stop()
    assert results["health"] == 200
    assert results["voices"] == 401 and results["voices_wrong"] == 401 and results["chat"] == 401
    assert results["voices_bearer"] == 200 and results["voices_query"] == 200
    assert results["chat_token"] is True


def test_page_cookie_carries_the_token(demo_model, tmp_path):
    """``/?token=T`` sets the page's cookie and redirects without the token; the WebSocket and the API then
    work with the cookie alone, from the server's own origin only."""
    from http.cookies import SimpleCookie

    from personaplex.frontends.security import TOKEN_COOKIE, cookie_value
    from personaplex.server.tls import tls_context

    secured = ServerThread(demo_model, max_conversations=1, auth_token="s3cret", input_timeout_seconds=None)
    context, _ = tls_context(tmp_path / "tls")
    tls = ServerThread(demo_model, max_conversations=1, auth_token="s3cret", ssl_context=context)
    tls_http = tls.http.replace("http://", "https://")

    async def talk(session, url, headers=None):
        """Open a conversation and speak until 4 agent audio pages came back; returns the agent's audio
        pages (at least 6 with the two header pages) and the server's error, or minus the HTTP status."""
        try:
            async with session.ws_connect(url, headers=headers or {}, max_msg_size=0) as ws:
                received = Received()
                reader = asyncio.create_task(read_all(ws, received, until=lambda r: r.kinds().count(0x01) >= 6))
                while 0x00 not in received.kinds() and not reader.done():
                    await asyncio.sleep(0.01)
                for page in opus_pages(30.0):
                    if reader.done():
                        break
                    await ws.send_bytes(b"\x01" + page)
                    await asyncio.sleep(0.08)
                await asyncio.wait_for(reader, 60)
                return received.kinds().count(0x01), received.error
        except aiohttp.WSServerHandshakeError as error:
            return -error.status

    async def probe():
        results = {}
        # 127.0.0.1 is an IP address: aiohttp's jar keeps cookies of IP hosts only when "unsafe".
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(secured.http + "/?token=nope", allow_redirects=False) as r:
                results["wrong"] = r.status, r.headers.getall("Set-Cookie", [])
            results["jar_after_wrong"] = len(session.cookie_jar)
            async with session.get(secured.http + "/?token=s3cret&worker_addr=same", allow_redirects=False) as r:
                results["right"] = (r.status, r.headers.get("Location"), r.headers.getall("Set-Cookie", []),
                                    r.headers.get("Cache-Control"))
            async with session.get(secured.http + "/?token=s3cret") as r:  # followed: the page, token-free URL
                results["page"] = r.status, str(r.url), "<html" in (await r.text()).lower()
            async with session.get(secured.http + "/api/voices") as r:
                results["voices_cookie"] = r.status
            results["chat_cookie"] = await talk(session, chat_url(secured.url))
            own = {"Origin": secured.http}
            results["chat_cookie_own_origin"] = await talk(session, chat_url(secured.url), own)
            for name, origin in (("evil", "https://evil.example"), ("other_port", "http://localhost:3000")):
                results[f"chat_cookie_{name}"] = await talk(session, chat_url(secured.url), {"Origin": origin})
            # The same foreign-but-allowed origin with the token itself is still fine (the cookie rule only).
            results["chat_token_other_port"] = await talk(session, chat_url(secured.url, token="s3cret"),
                                                          {"Origin": "http://localhost:3000"})
        async with aiohttp.ClientSession() as session:  # no cookie at all
            async with session.get(secured.http + "/api/voices") as r:
                results["voices_none"] = r.status
            forged = {"Cookie": f"{TOKEN_COOKIE}=s3cret"}  # the token itself is not the cookie's value
            async with session.get(secured.http + "/api/voices", headers=forged) as r:
                results["voices_forged"] = r.status
            async with session.get(tls_http + "/?token=s3cret", allow_redirects=False, ssl=False) as r:
                results["tls"] = r.status, r.headers.getall("Set-Cookie", [])
        return results

    try:
        results = run(probe())
    finally:
        secured.stop()
        tls.stop()
    assert results["wrong"] == (401, []) and results["jar_after_wrong"] == 0
    status, location, cookies, cache = results["right"]
    assert status == 303 and location == "./?worker_addr=same" and cache == "no-store"
    assert len(cookies) == 1
    cookie = SimpleCookie(cookies[0])[TOKEN_COOKIE]
    assert cookie.value == cookie_value("s3cret") and "s3cret" not in cookies[0]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain http: a Secure cookie would never come back
    assert results["page"] == (200, secured.http + "/", True)
    assert results["voices_cookie"] == 200 and results["voices_none"] == 401 and results["voices_forged"] == 401
    assert results["chat_cookie"] == (6, None) and results["chat_cookie_own_origin"] == (6, None)
    assert results["chat_cookie_evil"] == -403 and results["chat_cookie_other_port"] == -403
    assert results["chat_token_other_port"] == (6, None)
    tls_status, tls_cookies = results["tls"]
    assert tls_status == 303 and SimpleCookie(tls_cookies[0])[TOKEN_COOKIE]["secure"]


# --- queueing and disconnects -------------------------------------------------------------------------------


def test_queue_position_then_refusal_then_slot(demo_model):
    small = ServerThread(demo_model, max_conversations=1, max_queue=1, input_timeout_seconds=None)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            first = await session.ws_connect(chat_url(small.url))
            first_got = Received()
            first_reader = asyncio.create_task(read_all(first, first_got))
            while 0x00 not in first_got.kinds():
                await asyncio.sleep(0.01)
            second = await session.ws_connect(chat_url(small.url))
            second_got = Received()
            second_reader = asyncio.create_task(read_all(second, second_got))
            while not any("queue_position" in m for m in second_got.metadata):
                await asyncio.sleep(0.01)
            third = await converse(chat_url(small.url))  # queue full: refused
            assert small.hub.load()["queued"] == 1
            await first.close()
            await first_reader
            while 0x00 not in second_got.kinds():  # the waiting caller gets the slot
                await asyncio.sleep(0.01)
            await second.close()
            await second_reader
            return second_got, third

    try:
        second, third = run(asyncio.wait_for(scenario(), 180))
    finally:
        small.stop()
    assert next(m["queue_position"] for m in second.metadata if "queue_position" in m) == 1
    assert all("text_temperature" in m for m in second.metadata)
    assert "busy" in third.error and third.close_code == 1013
    assert 0x00 not in third.kinds()


def test_disconnect_while_queued_or_during_prefill_frees_at_once(demo_model):
    # A prefill spread over many ticks (1 frame per block), so that the client can vanish in its middle.
    slow_join = ServerThread(demo_model, max_conversations=1, max_queue=2, input_timeout_seconds=None,
                             join_block_frames=1)
    hub = slow_join.hub

    async def scenario():
        async with aiohttp.ClientSession() as session:
            long_prompt = " ".join(["a fresh persona with a long prompt, prefilled one frame per block"] * 30)
            ws = await session.ws_connect(chat_url(slow_join.url, text_prompt=long_prompt))
            while not hub.engine._joining:
                await asyncio.sleep(0.001)
            await ws.close()  # vanish mid-prefill
            deadline = time.monotonic() + 2  # "at once": the prefill (986 one-frame blocks) takes far longer
            while (hub.engine._joining or hub.load()["slots_busy"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            prefill_freed = not hub.engine._joining and hub.load()["slots_busy"] == 0
            holder = await session.ws_connect(chat_url(slow_join.url))
            got = Received()
            reader = asyncio.create_task(read_all(holder, got))
            while 0x00 not in got.kinds():
                await asyncio.sleep(0.01)
            waiter = await session.ws_connect(chat_url(slow_join.url))
            while hub.load()["queued"] != 1:
                await asyncio.sleep(0.005)
            await waiter.close()  # vanish while queued
            deadline = time.monotonic() + 10  # "at once": the slot's holder talks on for as long as the test runs
            while hub.load()["queued"] and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            queue_freed = hub.load()["queued"] == 0
            await holder.close()
            await reader
            return prefill_freed, queue_freed

    try:
        prefill_freed, queue_freed = run(asyncio.wait_for(scenario(), 60))
    finally:
        slow_join.stop()
    assert prefill_freed and queue_freed


# --- long calls ---------------------------------------------------------------------------------------------


async def call_until(url: str, done, deadline: float) -> tuple[Received, int]:
    """A caller that talks (real Ogg/Opus, in real time) until ``done()`` holds, then hangs up; returns what
    it received and the samples of agent audio it decoded."""
    received = Received()
    decoder = sphn.OpusStreamReader(24000)
    decoded = [0]
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        async def reader():
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    received.messages.append((time.monotonic(), message.data[0], message.data[1:]))
                    if message.data[0] == 0x01:
                        pcm = decoder.append_bytes(message.data[1:])
                        decoded[0] += 0 if pcm is None else len(pcm)

        read_task = asyncio.create_task(reader())
        writer = sphn.OpusStreamWriter(24000)
        rng = np.random.default_rng(len(url))
        start = time.monotonic()
        sent = 0
        while not done(decoded[0]) and not read_task.done():
            assert time.monotonic() - start < deadline, f"still waiting after {deadline:g} s of streaming"
            if 0x00 in received.kinds():  # talk from the handshake on
                for page in parse_pages(writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))):
                    await ws.send_bytes(b"\x01" + page.to_bytes())
                sent += 1
            await asyncio.sleep(max(0.0, start + sent * 0.08 - time.monotonic()) if sent else 0.01)
        await ws.close()
        await asyncio.wait_for(read_task, 30)
    received.close_code = ws.close_code
    return received, decoded[0]


@pytest.mark.slow
def test_calls_go_on_past_the_context_under_either_context_policy(short_context_demo):
    """Two calls at once, one per context policy (``?context_policy=``), each longer than the model's context:
    both go on until the caller hangs up, with no error, each under its own policy in the engine."""
    from test_realtime import LONG_CALL_DEADLINE, LONG_CALL_PROMPTS, LongCalls, metric_value

    server = ServerThread(short_context_demo, max_conversations=2, max_queue=0, input_timeout_seconds=None)
    try:
        calls = LongCalls(server)
        before = server.hub.metrics.render()

        def heard_past_the_context(policy):
            # Both calls past the context (server side), and this caller has heard every frame of it.
            wanted = calls.frames_past_the_prompt(policy)
            return lambda samples: calls.past_the_context() and samples >= (wanted - 1) * FRAME

        async def both():
            return await asyncio.gather(*(
                call_until(chat_url(server.url, text_prompt=text, context_policy=policy),
                           heard_past_the_context(policy), LONG_CALL_DEADLINE)
                for policy, text in LONG_CALL_PROMPTS.items()))

        results = run(both())
        calls.check_the_engine()
        after = calls.wait_for_the_ends(before)
    finally:
        server.stop()
    assert metric_value(after, "personaplex_conversations_ended_total", reason="client_closed") == 2
    for policy, (received, samples) in zip(LONG_CALL_PROMPTS, results):
        assert received.error is None, received.error  # no 0x05: the server never ended the call
        assert samples >= (calls.frames_past_the_prompt(policy) - 1) * FRAME
        welcome, started = received.metadata[0], received.metadata[-1]
        assert welcome["persona"]["context_policy"] == policy and started["context_policy"] == policy
        assert started["max_conversation_seconds"] is None  # no length limit
        assert received.close_code == 1000


# --- bad input ----------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(f"zq{i}x" for i in range(6000))

BAD_INPUTS = {
    # name: (query overrides, messages to send after the handshake (None: none), expected close code, words)
    "text_message": ({}, ["hello"], 1003, "text messages"),
    "empty_message": ({}, [b""], 1003, "empty message"),
    "unknown_kind": ({}, [b"\x09abc"], 1003, "unsupported message kind 0x09"),
    "control_kind": ({}, [b"\x03\x00"], 1003, "unsupported message kind 0x03"),
    "garbage_ogg": ({}, [b"\x01" + b"this is not an ogg page at all" * 3], 1007, "invalid audio"),
    "oversized": ({}, [b"\x01" + bytes(300_000)], 1009, "at most"),
    "text_turn_refused": ({}, [b"\x06hello there"], 1003, "text turns are not supported"),
    "voice_dotdot": ({"voice_prompt": "../NATF2"}, None, 1008, "invalid voice name"),
    "voice_absolute": ({"voice_prompt": "/etc/passwd"}, None, 1008, "invalid voice name"),
    "voice_missing": ({"voice_prompt": "NOBODY"}, None, 1008, "unknown voice"),
    "prompt_too_long": ({"text_prompt": LONG_PROMPT}, None, 1008, "shorten the text prompt"),
    "bad_temperature": ({"text_temperature": "hot"}, None, 1008, "text_temperature"),
    "nan_temperature": ({"audio_temperature": "nan"}, None, 1008, "audio_temperature"),
    "bad_topk": ({"text_topk": "0"}, None, 1008, "text_topk"),
    "huge_topk": ({"audio_topk": "999999"}, None, 1008, "audio_topk"),
    "bad_seed": ({"seed": "1.5"}, None, 1008, "seed"),
    "bad_context_policy": ({"context_policy": "forever"}, None, 1008, "invalid context_policy='forever'"),
}


async def bad_client(url: str, name: str) -> Received:
    overrides, messages, _, _ = BAD_INPUTS[name]

    async def send(ws):
        for message in messages:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))

    return await converse(chat_url(url, **overrides), send if messages else None)


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gets_an_error_and_a_clean_close(server, name):
    _, messages, code, words = BAD_INPUTS[name]
    received = run(asyncio.wait_for(bad_client(server.url, name), 60))
    assert received.error is not None and words in received.error, received.error
    assert received.close_code == code
    assert received.kinds()[-1] == 0x05
    if messages is None:  # refused before any conversation started
        assert 0x00 not in received.kinds()


@pytest.mark.slow
def test_client_that_never_reads_is_ended(demo_model):
    # Small socket buffers so that backpressure shows within seconds.
    stuck_server = ServerThread(demo_model, max_conversations=2, send_buffer_bytes=4096, input_timeout_seconds=None,
                                max_output_frames=10)
    hub = stuck_server.hub

    async def scenario():
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(chat_url(stuck_server.url))
            while True:
                message = await ws.receive()
                if message.data[0] == 0x00:
                    break
            transport = ws._response.connection.transport
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            transport.pause_reading()  # from now on this client reads nothing
            deadline = time.monotonic() + 90
            while hub.load()["slots_busy"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            freed = hub.load()["slots_busy"] == 0
            transport.resume_reading()
            await read_all(ws, Received())
            return freed

    try:
        freed = run(asyncio.wait_for(scenario(), 120))
    finally:
        stuck_server.stop()
    assert freed
    ended = [line for line in hub.metrics.render().splitlines() if line.startswith("personaplex_conversations_ended")]
    assert any('reason="slow_reader"' in line for line in ended), ended


@pytest.mark.slow
def test_neighbour_unaffected_by_bad_clients(demo_model):
    """Conversation B (fixed seed, sending nothing: its input is exactly silence) gets the same text alone
    and while every bad client of the list above comes and goes next to it, and keeps getting frames."""
    shared = ServerThread(demo_model, max_conversations=3, max_queue=2, input_timeout_seconds=None)
    frames = 60
    url = chat_url(shared.url, seed=777, text_prompt="the neighbour")

    async def neighbour_with_bad_clients():
        neighbour = asyncio.create_task(converse(url, frames=frames, timeout=120))
        while shared.hub.load()["slots_busy"] == 0:
            await asyncio.sleep(0.01)
        errors = []
        for name in sorted(BAD_INPUTS):
            errors.append((await bad_client(shared.url, name)).error)
        # A client vanishing in the middle of its prefill, too.
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(chat_url(shared.url, text_prompt="vanishing"))
            await ws.close()
        return await neighbour, errors

    try:
        alone = run(converse(url, frames=frames, timeout=120))
        together, errors = run(asyncio.wait_for(neighbour_with_bad_clients(), 240))
    finally:
        shared.stop()
    assert all(errors)
    assert together.error is None
    assert [p.decode() for p in together.of(0x02)] == [p.decode() for p in alone.of(0x02)]
    times = [t for t, kind, _ in together.messages if kind == 0x01][2:]
    gaps = np.diff(times)
    # No stall: no gap of more than 1 s (12.5 frames) on a machine that keeps real time; where a loaded
    # machine steps slower (this run's own pace), the same 12.5 frames of it. On top of that, one tick's
    # engine work: a join that waited too long runs one prefill block anyway (one late tick, by design),
    # and on a starved machine that block alone can outlast 12.5 steps. A bad client cannot lengthen a
    # tick otherwise (the engine thread does no I/O), so a stalled event loop still fails this.
    frame_seconds = (times[-1] - times[0]) / (len(times) - 1)
    longest_tick = shared.hub.longest_tick_seconds
    allowed = max(1.0, 12.5 * frame_seconds) + longest_tick
    assert len(times) >= frames - 2 and gaps.max() < allowed, \
        f"longest gap between agent pages {gaps.max():.2f} s ({frame_seconds:.3f} s per frame on average, " \
        f"longest engine tick {longest_tick:.2f} s)"


@pytest.mark.slow
def test_eight_simultaneous_conversations(demo_model):
    eight = ServerThread(demo_model, max_conversations=8, max_queue=0, input_timeout_seconds=None)
    busiest = []

    async def scenario():
        everyone_live = asyncio.Event()
        someone_refused = asyncio.Event()  # a caller closed before its handshake: the others stop too
        live = []

        async def caller(index):
            rng = np.random.default_rng(index)
            writer = sphn.OpusStreamWriter(24000)
            received = Received()
            url = chat_url(eight.url, seed=index, voice_prompt=f"NATM{index % 4}")
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                def enough(r):
                    if 0x00 in r.kinds() and index not in live:
                        live.append(index)
                        if len(live) == 8:
                            everyone_live.set()
                    return someone_refused.is_set() or (everyone_live.is_set() and len(r.of(0x01)) >= 30)
                reader = asyncio.create_task(read_all(ws, received, until=enough))
                while 0x00 not in received.kinds() and not reader.done():
                    await asyncio.sleep(0.01)
                if 0x00 not in received.kinds():
                    someone_refused.set()
                # Talk at real time until this caller has heard enough: not a fixed length, since on a loaded
                # machine the last caller can go live long after the first.
                while not reader.done():
                    pcm = (0.1 * rng.standard_normal(FRAME)).astype(np.float32)
                    for page in parse_pages(writer.append_pcm(pcm)):
                        await ws.send_bytes(b"\x01" + page.to_bytes())
                    await asyncio.sleep(0.08)
                await reader
            return received

        callers = asyncio.gather(*(caller(i) for i in range(8)))
        while not callers.done():
            busiest.append(eight.hub.load()["slots_busy"])
            await asyncio.sleep(0.05)
        return await callers

    try:
        results = run(asyncio.wait_for(scenario(), 600))  # generous: a loaded machine steps slower
    finally:
        eight.stop()
    assert max(busiest) == 8  # all eight live at once
    for received in results:
        assert received.error is None and 0x00 in received.kinds()
        assert len(received.of(0x01)) >= 30 and received.of(0x02)
    assert len({tuple(p.decode() for p in r.of(0x02)[:10]) for r in results}) == 8  # eight distinct conversations


def test_host_is_really_bound(demo_model):
    """Bound to 127.0.0.1, the server is not reachable through this machine's other addresses."""
    from personaplex.server.tls import lan_address

    other = lan_address()
    if other is None:
        pytest.skip("this machine has no address besides loopback")
    local = ServerThread(demo_model, max_conversations=1)
    try:
        with socket.create_connection(("127.0.0.1", local.server.port), timeout=5):
            pass
        with pytest.raises(OSError), socket.create_connection((other, local.server.port), timeout=5):
            pass
    finally:
        local.stop()


def test_voice_upload_over_http(demo_model, server):
    from personaplex.demo import synthesize_voice, wav_bytes

    uploads = ServerThread(demo_model, max_conversations=1, allow_voice_upload=True, input_timeout_seconds=None)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.http + "/api/voices", data=b"RIFF") as r:
                refused = r.status, (await r.json())["error"]
            async with session.post(uploads.http + "/api/voices", data=wav_bytes(synthesize_voice("VARM2", seconds=3.0))) as r:
                accepted = r.status, await r.json()
            async with session.post(uploads.http + "/api/voices", data=b"definitely not audio") as r:
                garbage = r.status, (await r.json())["error"]
        received = await converse(chat_url(uploads.url, voice_prompt=accepted[1]["voice"]), frames=4)
        return refused, accepted, garbage, received

    try:
        refused, accepted, garbage, received = run(scenario())
    finally:
        uploads.stop()
    assert refused[0] == 403 and "--allow-voice-upload" in refused[1]
    assert accepted[0] == 200 and accepted[1]["voice"].startswith("upload-")
    assert garbage[0] == 400 and "not audio" in garbage[1]
    assert received.error is None and 0x00 in received.kinds()


# --- the agent's audio encoded in worker processes (--opus-workers) ----------------------------------------


def test_opus_workers_serve_conversations_and_a_dead_worker_ends_only_its_own(demo_model):
    """With the encoders in worker processes the stream is the same protocol; a worker that dies ends the
    conversation it encoded with a 0x05 and close code 1011, while another conversation goes on and a new
    one is served (in the surviving worker)."""
    running = ServerThread(demo_model, max_conversations=3, max_queue=0, input_timeout_seconds=None, opus_workers=2)
    try:
        pool = running.server.encoders
        assert pool is not None and pool.alive == 2
        pages = opus_pages(6.0)

        async def send(ws):
            try:
                for page in pages:  # at real time: the server ends a client far ahead of it (--input-burst)
                    await ws.send_bytes(b"\x01" + page)
                    await asyncio.sleep(0.08)
            except aiohttp.ClientConnectionResetError:  # the server ended this conversation
                pass

        async def main():
            async def live(count: int) -> None:
                while len(running.hub._live) < count:
                    await asyncio.sleep(0.02)

            # One after the other, so that the first one's encoder is the first worker's (round robin).
            doomed = asyncio.create_task(converse(chat_url(running.url, seed=1), send))
            await asyncio.wait_for(live(1), 90)
            survivor = asyncio.create_task(converse(chat_url(running.url, seed=2), send, frames=40))
            await asyncio.wait_for(live(2), 90)
            await asyncio.sleep(0.5)  # both conversations are streaming agent audio
            pool._workers[0].process.kill()
            return await doomed, await survivor

        doomed, survivor = run(main())
        assert doomed.close_code == 1011 and "audio encoder stopped" in (doomed.error or "")
        assert survivor.error is None and len(survivor.of(0x01)) >= 40
        ogg = agent_pages(survivor)
        assert ogg[0].bos and [p.sequence for p in ogg] == list(range(len(ogg)))
        assert pool.alive == 1
        after = run(converse(chat_url(running.url, seed=3), frames=10))
        assert after.error is None and len(after.of(0x01)) >= 10
    finally:
        running.stop()
    assert pool.alive == 0
