"""What the web page tells a visitor about the server, in headless Chromium: that it runs the untrained demo
model (from /api/health before any call, and from a conversation's metadata), that it falls behind real time
(its audio comes at half speed here), and the transcript with byte-fallback pieces joined into characters.
The server is a small aiohttp app speaking /api/chat with real Ogg/Opus, so its pace is set by the test."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from loopback import LoopbackServer
from test_web_ui import STATIC, browser, open_page, start_conversation, stop_conversation  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


class SlowDemoServer(LoopbackServer):
    """Claims the demo model; answers one 80 ms frame every 160 ms whatever it hears (half real time)."""

    def __init__(self, *, untrained: bool = True, frame_interval: float = 0.16):
        self.untrained = untrained
        self.frame_interval = frame_interval
        super().__init__()

    async def health(self, request):
        from aiohttp import web

        return web.json_response({"ok": True, "model": "demo", "untrained": self.untrained, "slots_busy": 0,
                                  "slots_free": 1, "queued": 0})

    async def voices(self, request):
        from aiohttp import web

        return web.json_response({"voices": ["NATF2.pt", "NATM1.pt"], "default": "NATF2.pt"})

    async def chat(self, request):
        import sphn
        from aiohttp import web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x00")
        await ws.send_bytes(b"\x04" + json.dumps({"model": "demo", "untrained": self.untrained}).encode())
        # " café", the é as two byte-fallback pieces, as a server that sends raw pieces would.
        for piece in (" caf", "<0xC3>", "<0xA9>", " ok"):
            await ws.send_bytes(b"\x02" + piece.encode())

        async def speak():
            writer = sphn.OpusStreamWriter(24_000)
            t = np.arange(1920) / 24_000
            frame = 0
            while not ws.closed:
                tone = (0.3 * np.sin(2 * np.pi * 330 * (t + frame * 0.08))).astype(np.float32)
                pages = writer.append_pcm(tone)
                if pages:
                    await ws.send_bytes(b"\x01" + pages)
                frame += 1
                await asyncio.sleep(self.frame_interval)

        speaker = asyncio.create_task(speak())
        async for _ in ws:
            pass
        speaker.cancel()
        return ws

    def start(self) -> None:
        from aiohttp import web

        async def index(request):
            return web.FileResponse(STATIC / "index.html")

        app = web.Application()
        app.router.add_get("/api/health", self.health)
        app.router.add_get("/api/voices", self.voices)
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/", index)
        app.router.add_static("/", STATIC)
        self.serve(app)


@pytest.fixture
def slow_demo_server():
    server = SlowDemoServer()
    server.start()
    yield server
    server.stop()


def notice(page, notice_id: str) -> str | None:
    return page.js(f"(personaplex.notices.find(n => n.id === '{notice_id}') || {{}}).text || null")


def test_demo_model_notice_before_a_call_then_behind_real_time_and_joined_text(browser, slow_demo_server):  # noqa: F811
    page = open_page(browser, f"http://127.0.0.1:{slow_demo_server.port}/")
    demo = notice(page, "demo-model")
    assert demo and "demo model" in demo and "untrained" in demo  # said on arrival, before any call
    assert notice(page, "behind") is None
    start_conversation(page)
    page.wait("personaplex.transcript().includes('café ok')", timeout=30, what="the joined transcript")
    assert "<0x" not in page.js("personaplex.transcript()") and "\ufffd" not in page.js("personaplex.transcript()")
    page.wait("personaplex.notices.some(n => n.id === 'behind')", timeout=60, what="the behind-real-time notice")
    behind = notice(page, "behind")
    assert "falling behind real time" in behind and "ran dry" in behind
    stats = page.js("personaplex.stats")
    assert stats["latencySeconds"] >= 1.5 or stats["playback"]["underruns"] >= 5  # what the page measured
    stop_conversation(page)
    assert notice(page, "demo-model")  # still there: it is about the server, not the call
    assert not page.errors, page.errors


def test_no_notices_for_a_trained_model_at_full_speed(browser):  # noqa: F811
    server = SlowDemoServer(untrained=False, frame_interval=0.08)
    server.start()
    try:
        page = open_page(browser, f"http://127.0.0.1:{server.port}/")
        start_conversation(page)
        page.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 3", timeout=60,
                  what="three seconds of agent audio")
        assert notice(page, "demo-model") is None
        stop_conversation(page)
    finally:
        server.stop()
