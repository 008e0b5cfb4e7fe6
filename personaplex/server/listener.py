"""The server's listening sockets, with an accept loop paced by the ``ConnectionGuard``.

asyncio's own loop (``loop.create_server``) accepts up to a backlog (128) of sockets per readiness event
and hands each to its protocol a few loop iterations later, so a burst of connections can hold several
backlogs of descriptors before the cap sees the first of them, however low the cap. Here the guard is
asked before every ``accept()``: at the cap a connection waits in the kernel's backlog until a descriptor
is really closed, and the descriptors held by connections never exceed ``--max-connections``. Right
after ``accept()`` the guard also checks the new connection's remote address against its limit on new
connections per address, so that a refused one costs an ``accept()`` and a ``close()``, nothing more.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys

from aiohttp import web

from .connections import ConnectionGuard

# accept() errors that mean "no descriptor or memory now": retry after this many seconds (as asyncio does)
ACCEPT_RETRY_SECONDS = 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def listening_sockets(host: str | None, port: int, backlog: int, reuse_address: bool | None = None,
                            reuse_port: bool | None = None) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of ``host`` (every interface when None),
    as ``loop.create_server`` makes them; raises ``OSError`` naming the address that cannot be bound."""
    infos = await asyncio.get_running_loop().getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                                         type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return bind_listening(infos, port, backlog, reuse_address, reuse_port)


def bind_listening(infos: list, port: int, backlog: int, reuse_address: bool | None = None,
                   reuse_port: bool | None = None) -> list[socket.socket]:
    """``listening_sockets`` for the resolved addresses ``infos`` (``getaddrinfo``'s answer). With port 0 every
    address gets the port the first one was given."""
    if reuse_address is None:
        reuse_address = os.name == "posix" and sys.platform != "cygwin"
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # unique, in the resolver's order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, True)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)  # "::" must not take IPv4's port
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                         f"{(exc.strerror or str(exc)).lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class GuardedListener:
    """Accepts on ``sockets`` while the guard has room; what ``BaseSite.stop`` closes (the part of
    ``asyncio.Server`` it uses: ``sockets``, ``close``, ``wait_closed``, ``is_serving``)."""

    def __init__(self, sockets: list[socket.socket], guard: ConnectionGuard, protocol_factory, ssl_context=None,
                 backlog: int = 128, accepts_per_wakeup: int | None = None):
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._guard = guard
        self._protocol_factory = protocol_factory
        self._ssl_context = ssl_context
        self._backlog = backlog
        self._accepts_per_wakeup = accepts_per_wakeup or backlog
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        guard.on_room = self._resume

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return not self._closed

    def start(self) -> None:
        self._resume()

    def close(self) -> None:
        """Stop listening (the connections already made stay open: aiohttp's shutdown ends them)."""
        if self._closed:
            return
        self._closed = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._guard.on_room = None
        self._guard.drop_handshakes()

    async def wait_closed(self) -> None:
        await asyncio.sleep(0)  # the listening sockets close at once; connections are aiohttp's to end

    def _resume(self) -> None:
        if self._reading or self._closed or (self._retry is not None and not self._retry.cancelled()):
            return
        self._reading = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self) -> None:
        if not self._reading:
            return
        self._reading = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())

    def _retry_later(self) -> None:
        self._pause()

        def retry() -> None:
            self._retry = None
            self._resume()

        self._retry = self._loop.call_later(ACCEPT_RETRY_SECONDS, retry)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._accepts_per_wakeup):  # then let the loop run other work
            room = self._guard.make_room()
            if room == "wait":
                self._pause()  # the guard calls on_room when a descriptor is closed or an idle one appears
                return
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # Only with a cap above what the process may open; quiet_accept_errors rate-limits this.
                self._loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                                   "exception": exc, "socket": listening})
                self._retry_later()
                return
            if not self._guard.admit_address(sock, address):  # reset at once: no TLS, no HTTP
                continue
            if room == "full":
                self._guard.refuse(sock)
                continue
            sock.setblocking(False)
            self._guard.serve(sock, self._protocol_factory, self._ssl_context)


class GuardedSite(web.TCPSite):
    """``TCPSite`` whose connections are accepted by a ``GuardedListener`` and counted by a ``ConnectionGuard``.
    ``sockets``: listening sockets made elsewhere (another process's, shared with this one) instead of new ones."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, *args,
                 sockets: list[socket.socket] | None = None, **kwargs):
        super().__init__(runner, *args, **kwargs)
        self.guard = guard
        self._given_sockets = sockets

    async def start(self) -> None:
        await web.BaseSite.start(self)
        sockets = self._given_sockets or await listening_sockets(self._host, self._port, self._backlog,
                                                                 self._reuse_address, self._reuse_port)
        # Sockets shared with other processes: one connection per wake-up, then the other processes (woken by the
        # same readiness) take the next ones; a burst of callers is spread instead of taken by whoever woke first.
        listener = GuardedListener(sockets, self.guard, self._runner.server, self._ssl_context, self._backlog,
                                   accepts_per_wakeup=1 if self._given_sockets else None)
        listener.start()
        self._server = listener
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
