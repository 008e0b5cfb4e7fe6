"""The aiohttp handlers of the WebSocket routes: ``/api/chat``, ``/v1/realtime`` and ``/twilio/media-stream``.

Each wraps the socket in an ``AiohttpTransport`` and runs the front end's protocol handler over it
(``frontends/chat_protocol.py``, ``realtime.py``, ``twilio.py``). The access check (``frontends/routes.py``) has
already run when they are called. Every open socket sits in ``sessions`` so that a graceful shutdown can wait
for it. A phone stream does nothing but wait for its authenticated ``start`` (``--idle-timeout``), and only
then is its connection marked busy in the connection guard.
"""

from __future__ import annotations

import socket

from aiohttp import web

from ..frontends.chat_protocol import KIND_ERROR, MAX_MESSAGE_BYTES, run_chat
from ..frontends.realtime import MAX_EVENT_BYTES, event_too_large_notice, run_realtime
from ..frontends.routes import phone_stream_token
from ..frontends.twilio import MAX_MESSAGE_BYTES as MAX_PHONE_MESSAGE_BYTES
from ..frontends.twilio import PhonePersonas, run_twilio
from .limits import ServerLimits
from .transport import AiohttpTransport, GuardedWebSocketResponse


def websocket_handlers(hub, *, sessions: set, auth_token: str | None, limits: ServerLimits, guard=None,
                       send_buffer_bytes: int | None = 64 << 10, phone_personas: PhonePersonas | None = None,
                       encoders=None) -> dict:
    """The handlers of the WebSocket routes by endpoint name (``chat``, ``realtime``, ``twilio``).
    ``send_buffer_bytes`` bounds what the kernel and aiohttp buffer for a client of /api/chat that does not
    read (so the hub notices it soon); ``encoders``: an ``OpusEncoderPool`` for /api/chat (None: this
    process encodes); ``guard``: the site's ``ConnectionGuard``."""
    personas = phone_personas if phone_personas is not None else PhonePersonas()
    reader_timeout = hub.options.max_output_frames / 12.5  # the hub's own bound on a slow reader, in seconds

    async def run_socket(ws: GuardedWebSocketResponse, request: web.Request, buffer_bytes: int | None, run,
                         bound_send_buffer: bool = False) -> None:
        """Upgrade, then ``run(transport)`` (a protocol handler) until the conversation ends."""
        await ws.prepare(request)
        if bound_send_buffer:
            _bound_send_buffer(request, buffer_bytes)
        sessions.add(ws)
        transport = AiohttpTransport(ws, request.transport, buffer_bytes, reader_timeout=reader_timeout,
                                     ping_interval=limits.ping_interval)
        try:
            await run(transport)
        finally:
            sessions.discard(ws)
            transport.drop_if_stuck()

    async def chat(request: web.Request) -> web.StreamResponse:
        # aiohttp's limit is a backstop: the protocol refuses big messages itself, with a 0x05; beyond
        # aiohttp's limit the 0x05 goes out just before aiohttp's close.
        ws = GuardedWebSocketResponse(max_msg_size=4 * MAX_MESSAGE_BYTES, compress=False, autoping=False)
        ws.too_big_message = bytes([KIND_ERROR]) + (
            f"message of more than {4 * MAX_MESSAGE_BYTES} bytes; at most {MAX_MESSAGE_BYTES} are accepted "
            "(one Ogg page per message)").encode()
        await run_socket(ws, request, send_buffer_bytes, bound_send_buffer=True,
                         run=lambda transport: run_chat(hub, request.query, transport, encoders=encoders))
        return ws

    async def realtime(request: web.Request) -> web.StreamResponse:
        beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "").replace(" ", "")
        ws = GuardedWebSocketResponse(max_msg_size=4 * MAX_EVENT_BYTES, compress=False, autoping=False)
        ws.too_big_message = event_too_large_notice(4 * MAX_EVENT_BYTES)
        await run_socket(ws, request, 64 << 10,
                         lambda transport: run_realtime(hub, transport, beta=beta, idle_timeout=limits.idle_timeout))
        return ws

    async def twilio(request: web.Request) -> web.StreamResponse:
        ws = GuardedWebSocketResponse(max_msg_size=4 * MAX_PHONE_MESSAGE_BYTES, compress=False, autoping=False)
        start_token = phone_stream_token(auth_token, request.query.get("token"))

        def on_authenticated() -> None:
            if guard is not None:
                guard.mark_busy(request.transport)

        try:
            await run_socket(ws, request, 64 << 10, lambda transport: run_twilio(
                hub, transport, personas=personas, auth_token=start_token, idle_timeout=limits.idle_timeout,
                on_authenticated=on_authenticated))
        finally:
            if guard is not None:
                guard.mark_busy(request.transport, False)
        return ws

    return {"chat": chat, "realtime": realtime, "twilio": twilio}


def _bound_send_buffer(request: web.Request, size: int | None) -> None:
    if not size:
        return
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        transport.set_write_buffer_limits(high=size)
    except (OSError, AttributeError, NotImplementedError):  # not every transport allows it (TLS, pipes)
        pass
