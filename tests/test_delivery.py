"""A call that lost audio is not reported as a success: ``personaplex client`` and ``personaplex loadtest``
say how many agent frames were missing or late and fail (exit status 2) past ``--max-missing`` /
``--max-late``. The server here is a real WebSocket server on loopback that speaks /api/chat with real
Ogg/Opus but answers only part of the frames, as an overloaded or broken server would."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import sphn
from aiohttp import web

from personaplex import client, loadtest
from personaplex.chat_client import Delivery
from personaplex.config import FRAME_SIZE, SAMPLE_RATE
from personaplex.loadtest import synthetic_voice
from personaplex.ogg import OpusPageWriter

ANSWERED_FRAMES = 5  # what the server sends back, whatever it hears


class ShortChangingServer:
    """/api/chat that sends the handshake, then ANSWERED_FRAMES agent frames at once and nothing more."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)
        self.url = f"ws://127.0.0.1:{self.port}/api/chat"

    async def chat(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x00")
        writer = OpusPageWriter(SAMPLE_RATE)
        tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(FRAME_SIZE) / SAMPLE_RATE).astype(np.float32)
        for _ in range(ANSWERED_FRAMES):
            for page in writer.append(tone):
                await ws.send_bytes(b"\x01" + page)
        async for _ in ws:  # keep listening until the caller hangs up
            pass
        return ws

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/api/chat", self.chat)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def short_server():
    server = ShortChangingServer()
    yield server
    server.stop()


def test_delivery_counts_and_limits():
    clean = Delivery(sent=200, missing=0, late=0)
    assert clean.describe() is None and clean.failure(1, 5) is None
    lossy = Delivery(sent=200, missing=3, late=12)
    assert "3 of 200 frames (1.5%) got no reply" in lossy.describe()
    assert "12 (6.0%) came too late" in lossy.describe()
    assert lossy.failure(1, 5) == "missing 1.5% > --max-missing 1%, late 6.0% > --max-late 5%"
    assert lossy.failure(2, 5) == "late 6.0% > --max-late 5%"
    assert lossy.failure(100, 100) is None
    assert Delivery(sent=0, missing=0, late=0).failure(0, 0) is None


def test_client_fails_when_frames_are_missing(short_server, tmp_path, capsys):
    source = tmp_path / "question.wav"
    sphn.write_wav(str(source), synthetic_voice(1.2, seed=3), SAMPLE_RATE)  # 15 frames
    code = client.main([str(source), "--url", short_server.url, "-o", str(tmp_path / "reply.wav")])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "got no reply" in captured.err and "--max-missing 1%" in captured.err
    assert (tmp_path / "reply.wav").is_file()  # what did arrive is still kept
    # The same call passes when the caller allows that much loss, and still says what was lost.
    code = client.main([str(source), "--url", short_server.url, "-o", str(tmp_path / "reply.wav"),
                        "--max-missing", "100"])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "warning:" in captured.err and "got no reply" in captured.err


def test_loadtest_fails_when_frames_are_missing(short_server, capsys):
    code = loadtest.main(["--url", short_server.url, "-n", "2", "--duration", "1.2"])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "over all clients" in captured.err and "--max-missing 1%" in captured.err
    missing = [int(line.split()[4]) for line in captured.out.splitlines() if line.strip()[:1].isdigit()]
    assert len(missing) == 2 and all(m > 0 for m in missing)
