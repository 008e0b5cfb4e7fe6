"""An aiohttp application served on 127.0.0.1 from a thread of its own: the scripted servers that the web
page tests point a real browser at."""

from __future__ import annotations

import asyncio
import threading


class LoopbackServer:
    """Serves one application on a free port of 127.0.0.1 (``port``) until ``stop``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port: int | None = None

    def serve(self, app) -> None:
        from aiohttp import web

        started = threading.Event()

        async def serve():
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
