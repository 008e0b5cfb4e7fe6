"""The aiohttp application: the ``/api/chat`` WebSocket, health, voices, metrics and the web page.

| route | what |
| --- | --- |
| ``GET /api/chat`` | the WebSocket conversation protocol (``chat_protocol.py``) |
| ``GET /api/health`` | JSON: ``ok``, model (``untrained``: the demo model), slots busy/free, queue length (never needs the token) |
| ``GET /api/voices`` | JSON: the voice presets (``{"voices": [...], "default": ..., "upload": bool}``) |
| ``POST /api/voices`` | body: an audio file (wav/flac/ogg/mp3), only with ``--allow-voice-upload``; returns ``{"voice": "upload-..."}`` to pass as ``voice_prompt`` |
| ``GET /metrics`` | Prometheus text format |
| ``GET /`` and files | the web page (``--static``) |

With an auth token every ``/api/*`` route but ``/api/health`` needs ``Authorization: Bearer <token>`` or
``?token=<token>`` (browsers cannot set headers on WebSockets); others get 401.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from pathlib import Path

from aiohttp import WSMsgType, web

from ..serving.hub import PersonaError
from .chat_protocol import MAX_MESSAGE_BYTES, run_chat

log = logging.getLogger("personaplex.server")

HUB_KEY = web.AppKey("hub", object)
SESSIONS_KEY = web.AppKey("sessions", set)
DEFAULT_STATIC = Path(__file__).parent / "static"
MAX_URL_BYTES = 64 << 10


class AiohttpTransport:
    """``MessageTransport`` over an aiohttp ``WebSocketResponse``."""

    def __init__(self, ws: web.WebSocketResponse, transport=None, max_buffered: int | None = None):
        self.ws = ws
        self._transport = transport
        self._max_buffered = max_buffered

    async def receive(self) -> bytes | str | None:
        message = await self.ws.receive()
        if message.type == WSMsgType.BINARY:
            return message.data
        if message.type == WSMsgType.TEXT:
            return message.data
        return None  # close, closing, closed or a transport error

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)
        # aiohttp waits for the socket only now and then; wait here whenever more than the bound is
        # still unsent, so that a client that does not read stops taking frames (and the hub notices).
        transport = self._transport
        while (self._max_buffered and transport is not None and not transport.is_closing()
               and transport.get_write_buffer_size() > self._max_buffered):
            await asyncio.sleep(0.02)

    async def send_text(self, data: str) -> None:
        await self.ws.send_str(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode("utf-8"))


def build_app(hub, *, static_dir: Path | None = DEFAULT_STATIC, auth_token: str | None = None,
              send_buffer_bytes: int | None = 64 << 10, phone_personas=None, encoders=None) -> web.Application:
    """The application around a started-or-not ``ConversationHub``. ``send_buffer_bytes`` bounds what
    the kernel and aiohttp buffer for a client that does not read (so the hub notices it soon).
    ``phone_personas``: the persona file (or ``PhonePersonas``) of the phone bridge. ``encoders``: a started
    ``OpusEncoderPool`` for the agent's audio of /api/chat (None: encoded in this process)."""
    app = web.Application(
        middlewares=[_auth_middleware(auth_token)], client_max_size=hub.options.max_voice_upload_bytes,
        # Long text prompts travel in the query string: allow long request lines.
        handler_args={"max_line_size": MAX_URL_BYTES, "max_field_size": MAX_URL_BYTES},
    )
    app[HUB_KEY] = hub
    app[SESSIONS_KEY] = set()

    async def chat(request: web.Request) -> web.StreamResponse:
        # aiohttp's own limit is only a backstop: the protocol refuses big messages itself, with a 0x05.
        # heartbeat: a client whose connection silently died is noticed (no pong) even with no input timeout.
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_MESSAGE_BYTES, compress=False, autoping=True, heartbeat=20.0)
        await ws.prepare(request)
        _bound_send_buffer(request, send_buffer_bytes)
        app[SESSIONS_KEY].add(ws)
        try:
            await run_chat(hub, request.query, AiohttpTransport(ws, request.transport, send_buffer_bytes),
                           encoders=encoders)
        finally:
            app[SESSIONS_KEY].discard(ws)
        return ws

    async def health(request: web.Request) -> web.Response:
        load = hub.load()
        model = hub.describe()
        return web.json_response({"ok": hub.accepting, "model": model["model"], "untrained": model["untrained"], **load})

    async def voices(request: web.Request) -> web.Response:
        return web.json_response({"voices": hub.voices(), "default": hub.options.default_voice,
                                  "upload": hub.options.allow_voice_upload})

    async def upload_voice(request: web.Request) -> web.Response:
        if not hub.options.allow_voice_upload:
            return _json_error(403, "this server does not accept uploaded voices (start it with --allow-voice-upload)")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, f"voice samples are limited to {hub.options.max_voice_upload_bytes} bytes")
        try:
            name = await hub.add_voice_upload(data)
        except PersonaError as error:
            return _json_error(400, str(error))
        return web.json_response({"voice": name})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=hub.metrics.render().encode("utf-8"),
                            headers={"Content-Type": hub.metrics.content_type})

    app.router.add_get("/api/chat", chat)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/voices", voices)
    app.router.add_post("/api/voices", upload_voice)
    app.router.add_get("/metrics", metrics)
    # /v1/realtime and /twilio/media-stream (personaplex.integrations): they check the token themselves.
    from ..integrations.routes import add_integration_routes

    add_integration_routes(app, hub, auth_token=auth_token, sessions=app[SESSIONS_KEY],
                           phone_personas=phone_personas)
    if static_dir is not None:
        static_dir = Path(static_dir)
        index = static_dir / "index.html"

        async def home(request: web.Request) -> web.StreamResponse:
            if index.is_file():
                return web.FileResponse(index)
            return web.Response(text="personaplex server: the web page is not installed; /api/chat is ready\n")

        app.router.add_get("/", home)
        if static_dir.is_dir():
            app.router.add_static("/", static_dir, follow_symlinks=False, show_index=False)
    return app


def _auth_middleware(token: str | None):
    @web.middleware
    async def check(request: web.Request, handler):
        path = request.path
        if token and path.startswith("/api/") and path != "/api/health":
            given = request.query.get("token", "")
            header = request.headers.get("Authorization", "")
            if header.lower().startswith("bearer "):
                given = header[7:].strip()
            if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
                return _json_error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or ?token=<token>")
        return await handler(request)

    return check


def _json_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")


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
