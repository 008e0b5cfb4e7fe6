"""Open connections: a cap below the file descriptor limit, and quiet logging when descriptors run out.

``ConnectionGuard`` wraps the server's protocol factory. Each connection is *idle* (no request yet,
between keep-alive requests, or a WebSocket that has not authenticated) or *busy* (an authorised request
or conversation in progress; ``mark_busy``). At ``max_connections`` a new connection drops the oldest
idle one, so that sockets opened and left silent can never lock out ``/api/health`` or real callers;
when every connection is busy the new one is closed at once. Both are counted
(``personaplex_connections_refused_total``) and logged at most once per ``LOG_INTERVAL_SECONDS``.

``quiet_accept_errors`` turns the event loop's ``socket.accept() out of system resource`` messages (one
per retry, with a traceback) into one line per ``LOG_INTERVAL_SECONDS`` with a count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from aiohttp import web

log = logging.getLogger("personaplex.server")
LOG_INTERVAL_SECONDS = 10.0


class RateLimitedLog:
    """Log a recurring event at most once per interval, saying how many were not logged: what a client can
    trigger at will must not be able to fill the disk."""

    def __init__(self, logger: logging.Logger = log, interval: float = LOG_INTERVAL_SECONDS):
        self.logger = logger
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last message)"
        self._last, self._suppressed = now, 0
        self.logger.log(level, message, *args)


class _GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; tells the guard when the connection opens and closes."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self._started = False  # aiohttp saw the connection open (and must see it close)

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self._guard._admit(transport):
            transport.abort()
            return
        self._started = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self._guard._release(self.transport)
        if self._started:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._started:
            self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received() if self._started else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionGuard:
    def __init__(self, max_connections: int, metrics=None):
        self.max_connections = max_connections
        self.metrics = metrics
        self._open: OrderedDict[asyncio.BaseTransport, bool] = OrderedDict()  # transport -> busy, oldest first
        self._log = RateLimitedLog()
        self.refused = 0
        self.evicted = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def factory(self, inner_factory):
        """A protocol factory for ``loop.create_server`` around aiohttp's."""
        return lambda: _GuardedProtocol(self, inner_factory())

    def mark_busy(self, transport, busy: bool = True) -> None:
        """An authorised request or conversation is (no longer) in progress on this connection."""
        if transport in self._open:
            self._open[transport] = busy

    def _admit(self, transport) -> bool:
        if len(self._open) >= self.max_connections:
            idle = next((t for t, busy in self._open.items() if not busy), None)
            if self.metrics is not None:
                self.metrics.connections_refused.inc()
            if idle is None:
                self.refused += 1
                self._log(logging.WARNING, "refusing connections: %d open, all busy (--max-connections)",
                          len(self._open))
                return False
            self.evicted += 1
            self._log(logging.WARNING, "%d connections open (--max-connections): dropping the oldest idle ones",
                      len(self._open))
            del self._open[idle]
            idle.abort()  # its protocol's connection_lost still reaches aiohttp, soon
        self._open[transport] = False
        return True

    def _release(self, transport) -> None:
        self._open.pop(transport, None)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Rate-limit the event loop's reports of ``accept()`` failing for lack of descriptors."""
    limited = RateLimitedLog()
    previous = loop.get_exception_handler()

    def handler(loop, context) -> None:
        if "out of system resource" in str(context.get("message", "")):
            limited(logging.ERROR, "cannot accept connections: %s (raise the file limit, lower --max-connections)",
                    context.get("exception"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class GuardedSite(web.TCPSite):
    """``TCPSite`` whose connections pass through a ``ConnectionGuard``."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, *args, **kwargs):
        super().__init__(runner, *args, **kwargs)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.factory(self._runner.server), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address, reuse_port=self._reuse_port)
