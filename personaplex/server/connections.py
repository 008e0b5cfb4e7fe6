"""Open connections: a cap below the file descriptor limit, and quiet logging when descriptors run out.

``ConnectionGuard`` counts every descriptor a connection holds, from ``accept()`` (before aiohttp or a TLS
handshake sees it) until its socket is closed, and the accept loop (``listener.py``) asks it before each
``accept()``: the count never exceeds ``max_connections``. Each connection is *idle* (no request yet, a
TLS handshake, between keep-alive requests, or a WebSocket that has not authenticated) or *busy* (an
authorised request or conversation in progress; ``mark_busy``). At ``max_connections`` a new connection
drops the oldest idle one and is accepted once that one's socket is closed, so that sockets opened and
left silent can never lock out ``/api/health`` or real callers; when every connection is busy the new
one is accepted and closed at once. Before either, a connection from an address that opens new ones
faster than ``--max-new-connections-per-address`` allows (``address_limit.py``) is reset at once, before
any TLS or HTTP work. All are counted (``personaplex_connections_refused_total{reason}``: ``idle_dropped``,
``all_busy``, ``new_connection_rate``) and logged at most once per ``frontends.logs.LOG_INTERVAL_SECONDS``
each, with a count.

``quiet_accept_errors`` turns the event loop's ``socket.accept() out of system resource`` messages (one
per retry, with a traceback) into one line per ``frontends.logs.LOG_INTERVAL_SECONDS`` with a count.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable

from ..frontends.logs import RateLimitedLog
from .address_limit import NewConnectionLimit

log = logging.getLogger("personaplex.server")


class _Connection:
    """One accepted socket, from ``accept()`` until its descriptor is closed."""

    __slots__ = ("sock", "task", "transport", "busy", "state")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.task: asyncio.Task | None = None  # wraps the socket in a transport (and does the TLS handshake)
        self.transport: asyncio.BaseTransport | None = None  # once the protocol is connected
        self.busy = False
        self.state = "open"  # "open" -> "closing" (dropped, descriptor not closed yet) -> "closed"


class _GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; tells the guard when the connection opens and closes."""

    def __init__(self, guard: ConnectionGuard, connection: _Connection, inner: asyncio.Protocol):
        self._guard = guard
        self._connection = connection
        self._inner = inner
        self._started = False  # aiohttp saw the connection open (and must see it close)

    def connection_made(self, transport) -> None:
        if not self._guard._connected(self._connection, transport):
            transport.abort()  # dropped while its transport was being made
            return
        self._started = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        # The transport closes the socket right after this returns (plain) or has closed it (TLS).
        self._guard._release(self._connection)
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
    def __init__(self, max_connections: int, metrics=None, new_connections: NewConnectionLimit | None = None):
        self.max_connections = max_connections
        self.metrics = metrics
        self.new_connections = new_connections  # per remote address; None: no such limit
        self._rate_log = RateLimitedLog()  # its own: address refusals must not hide the cap's messages
        self._open: OrderedDict[_Connection, None] = OrderedDict()  # oldest first
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}
        self._closing = 0  # dropped connections whose descriptor is not closed yet
        self._log = RateLimitedLog()
        self.refused = 0
        self.evicted = 0
        self.peak_descriptors = 0  # most connection descriptors held at once
        self.on_room: Callable[[], None] | None = None  # called when a waiting connection may proceed

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def descriptors(self) -> int:
        """Connection descriptors held now: accepted (handshaking, connected) and dropped but not closed."""
        return len(self._open) + self._closing

    def mark_busy(self, transport, busy: bool = True) -> None:
        """An authorised request or conversation is (no longer) in progress on this connection."""
        connection = self._by_transport.get(transport)
        if connection is not None and connection.state == "open":
            connection.busy = busy
            if not busy:
                self._room_changed()

    def make_room(self) -> str:
        """Asked before each ``accept()``. ``"accept"``: a descriptor is free. ``"wait"``: one will be
        (the oldest idle connection was dropped for it, or a dropped one is still closing): call again on
        ``on_room``. ``"full"``: every connection is busy: accept the new one and ``refuse`` it."""
        if self.descriptors < self.max_connections:
            return "accept"
        if self._closing:
            return "wait"
        idle = next((connection for connection in self._open if not connection.busy), None)
        if idle is None:
            return "full"
        self.evicted += 1
        self._count_refusal("idle_dropped")
        self._log(logging.WARNING, "%d connections open (--max-connections): dropping the oldest idle ones",
                  len(self._open))
        self._drop(idle)
        return "wait"

    def refuse(self, sock: socket.socket) -> None:
        """Close a connection accepted while every other one is busy."""
        sock.close()
        self.refused += 1
        self._count_refusal("all_busy")
        self._log(logging.WARNING, "refusing connections: %d open, all busy (--max-connections)", len(self._open))

    def admit_address(self, sock: socket.socket, address) -> bool:
        """Asked right after ``accept()``: False when ``address`` opens new connections faster than its
        limit allows; the socket is then reset at once (no TLS, no HTTP; a reset leaves no TIME_WAIT
        behind on the server however many are refused)."""
        if self.new_connections is None or self.new_connections.allow(address):
            return True
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()
        self._count_refusal("new_connection_rate")
        limit = self.new_connections
        self._rate_log(logging.WARNING, "resetting new connections from %s: more than %g per second after a burst "
                       "of %d (--max-new-connections-per-address)", _host(address), limit.rate, limit.burst)
        return False

    def _count_refusal(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason=reason).inc()

    def serve(self, sock: socket.socket, inner_factory, ssl_context=None) -> None:
        """Hand an accepted socket (counted from now on) to aiohttp's protocol, through TLS if given."""
        connection = _Connection(sock)
        self._open[connection] = None
        self.peak_descriptors = max(self.peak_descriptors, self.descriptors)
        loop = asyncio.get_running_loop()
        connection.task = loop.create_task(loop.connect_accepted_socket(
            lambda: _GuardedProtocol(self, connection, inner_factory()), sock, ssl=ssl_context))
        connection.task.add_done_callback(lambda task: self._transport_made(connection, task))

    def drop_handshakes(self) -> None:
        """Close the connections whose transport is not made yet (the server stops listening)."""
        for connection in [c for c in self._open if c.transport is None]:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        del self._open[connection]
        connection.state = "closing"
        self._closing += 1
        if connection.transport is not None:
            connection.transport.abort()  # its protocol's connection_lost releases it, soon
        else:
            connection.task.cancel()  # its transport closes the socket; _transport_made releases it

    def _connected(self, connection: _Connection, transport) -> bool:
        connection.transport = transport
        if connection.state != "open":
            return False
        self._by_transport[transport] = connection
        self._room_changed()  # an idle connection to drop, for one waiting
        return True

    def _transport_made(self, connection: _Connection, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            return
        if connection.transport is None:  # no protocol will report it closed: its socket is, or is now
            connection.sock.close()
            self._release(connection)

    def _release(self, connection: _Connection) -> None:
        if connection.state == "open":
            del self._open[connection]
        elif connection.state == "closing":
            self._closing -= 1
        else:
            return
        connection.state = "closed"
        self._by_transport.pop(connection.transport, None)
        self._room_changed()

    def _room_changed(self) -> None:
        if self.on_room is not None:
            self.on_room()


def _host(address) -> str:
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


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
