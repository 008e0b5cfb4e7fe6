"""aiohttp WebSockets as the protocol handlers' ``MessageTransport``: every route's WebSocket, the
``/api/chat`` one and the front ends' (``/v1/realtime``, ``/twilio/media-stream``) alike."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from aiohttp import WSCloseCode, WSMsgType, web

from ..frontends.chat_protocol import SEND_TIMEOUT

log = logging.getLogger("personaplex.server")


class GuardedWebSocketResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` that tells the client why before aiohttp closes for an oversized message.

    aiohttp refuses a message over ``max_msg_size`` while reading its header and closes at once (1009);
    ``too_big_message`` (the protocol's error message: a ``0x05`` or a Realtime ``error`` event) goes out
    just before that close frame.
    """

    too_big_message: bytes | str | None = None

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        notice = self.too_big_message
        if code == WSCloseCode.MESSAGE_TOO_BIG and notice is not None and not self.closed:
            self.too_big_message = None
            try:
                send = self.send_bytes(notice) if isinstance(notice, bytes) else self.send_str(notice)
                await asyncio.wait_for(send, SEND_TIMEOUT)
            except Exception:  # noqa: BLE001 - the client is gone: nothing to tell it
                log.debug("could not send the message-too-big notice", exc_info=True)
            message = message or b"message too big"
        return await super().close(code=code, message=message, drain=drain)


class AiohttpTransport:
    """``MessageTransport`` over an aiohttp ``WebSocketResponse``.

    ``reader_timeout`` (seconds): the client must answer the pings sent every ``ping_interval`` within
    this time. A pong travels behind every frame still unread, so a late pong means a client that does
    not take its audio, whatever its kernel buffers hold: its TCP connection is reset (``end_reason``
    says why) and ``receive`` returns None.
    """

    def __init__(self, ws: web.WebSocketResponse, transport=None, max_buffered: int | None = None, *,
                 reader_timeout: float | None = None, ping_interval: float = 0.5):
        self.ws = ws
        self._transport = transport
        self._max_buffered = max_buffered
        self.end_reason: str | None = None  # why the server dropped the connection, if it did
        self._pings: deque[tuple[int, float]] = deque()  # (payload counter, time sent), oldest first
        self._watchdog = None
        # Started at the first message sent: a connection the server says nothing to (an unauthenticated
        # phone stream) costs no pings.
        self._watch = (reader_timeout, ping_interval) if reader_timeout and transport is not None else None

    async def receive(self) -> bytes | str | None:
        while True:
            message = await self.ws.receive()
            if message.type == WSMsgType.BINARY:
                return message.data
            if message.type == WSMsgType.TEXT:
                return message.data
            if message.type == WSMsgType.PING:
                await self.ws.pong(message.data)
                continue
            if message.type == WSMsgType.PONG:
                self._pong(message.data)
                continue
            self._stop_watchdog()
            return None  # close, closing, closed or a transport error

    async def send_bytes(self, data: bytes) -> None:
        self._start_watchdog()
        await self.ws.send_bytes(data)
        await self._wait_for_room()

    async def send_text(self, data: str) -> None:
        self._start_watchdog()
        await self.ws.send_str(data)
        await self._wait_for_room()

    def _start_watchdog(self) -> None:
        if self._watch is not None:
            self._watchdog = asyncio.ensure_future(self._watch_reader(*self._watch))
            self._watch = None

    async def _wait_for_room(self) -> None:
        # aiohttp waits for the socket only now and then; wait here whenever more than the bound is
        # still unsent, so that a client that does not read stops taking frames (and the hub notices).
        transport = self._transport
        while (self._max_buffered and transport is not None and not transport.is_closing()
               and transport.get_write_buffer_size() > self._max_buffered):
            await asyncio.sleep(0.02)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._stop_watchdog()
        try:
            await self.ws.close(code=code, message=reason.encode("utf-8"))
        finally:
            self.drop_if_stuck()

    def drop_if_stuck(self) -> None:
        """Reset the TCP connection if bytes we sent are still waiting for the client: a client that does
        not read must not keep the connection (and its buffers) open after its session ended."""
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.get_write_buffer_size():
            transport.abort()

    # --- how far behind the client reads ------------------------------------------------------------

    def _pong(self, payload: bytes) -> None:
        try:
            answered = int(payload)
        except ValueError:
            return  # an unsolicited pong
        while self._pings and self._pings[0][0] <= answered:
            self._pings.popleft()

    async def _watch_reader(self, timeout: float, interval: float) -> None:
        counter = 0
        while not self.ws.closed:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if self._pings and now - self._pings[0][1] > timeout:
                self.end_reason = f"the client is not taking the agent's audio ({timeout:.1f} s behind)"
                log.info("dropping a client that reads nothing: no answer to a ping for %.1f s", timeout)
                self._transport.abort()
                return
            if len(self._pings) < 8:
                counter += 1
                self._pings.append((counter, now))
                try:
                    await asyncio.wait_for(self.ws.ping(str(counter).encode()), interval)
                except asyncio.TimeoutError:
                    pass  # the socket is full: the next round decides
                except Exception:  # noqa: BLE001 - closed meanwhile
                    return

    def _stop_watchdog(self) -> None:
        self._watch = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
