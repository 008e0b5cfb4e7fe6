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
``?token=<token>`` (browsers cannot set headers on WebSockets); others get 401. WebSocket upgrades and
POSTs from a browser page of another origin get 403 (``security.py``, ``--allowed-origins``). Timeouts,
the connection cap and the slow-reader check are in ``limits.py`` and ``connections.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from ..serving.hub import HubBusy, HubClosed, PersonaError
from .chat_protocol import KIND_ERROR, MAX_MESSAGE_BYTES, SEND_TIMEOUT, run_chat
from .connections import ConnectionGuard
from .limits import ServerLimits
from .security import OriginPolicy, token_from, token_matches

log = logging.getLogger("personaplex.server")

HUB_KEY = web.AppKey("hub", object)
SESSIONS_KEY = web.AppKey("sessions", set)
LIMITS_KEY = web.AppKey("limits", ServerLimits)
DEFAULT_STATIC = Path(__file__).parent / "static"
MAX_URL_BYTES = 64 << 10


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


def build_app(hub, *, static_dir: Path | None = DEFAULT_STATIC, auth_token: str | None = None,
              send_buffer_bytes: int | None = 64 << 10, phone_personas=None, encoders=None,
              limits: ServerLimits | None = None, guard: ConnectionGuard | None = None) -> web.Application:
    """The application around a started-or-not ``ConversationHub``. ``send_buffer_bytes`` bounds what
    the kernel and aiohttp buffer for a client that does not read (so the hub notices it soon).
    ``phone_personas``: the persona file (or ``PhonePersonas``) of the phone bridge. ``encoders``: a started
    ``OpusEncoderPool`` for the agent's audio of /api/chat (None: encoded in this process). ``limits``:
    timeouts and the Origin allow-list (``limits.py``); ``guard``: the ``ConnectionGuard`` of the site
    (connections with an authorised request in progress are marked busy in it)."""
    limits = limits or ServerLimits()
    app = web.Application(
        middlewares=[_access_middleware(auth_token, limits.allowed_origins, guard)],
        client_max_size=hub.options.max_voice_upload_bytes,
        # Long text prompts travel in the query string: allow long request lines. keepalive_timeout also
        # closes a connection that has not sent a complete request (half-sent headers) in that time.
        handler_args={"max_line_size": MAX_URL_BYTES, "max_field_size": MAX_URL_BYTES,
                      "keepalive_timeout": limits.request_timeout},
    )
    app[HUB_KEY] = hub
    app[SESSIONS_KEY] = set()
    app[LIMITS_KEY] = limits
    reader_timeout = hub.options.max_output_frames / 12.5  # the hub's own bound on a slow reader, in seconds

    async def chat(request: web.Request) -> web.StreamResponse:
        # aiohttp's limit is a backstop: the protocol refuses big messages itself, with a 0x05; beyond
        # aiohttp's limit the 0x05 goes out just before aiohttp's close.
        ws = GuardedWebSocketResponse(max_msg_size=4 * MAX_MESSAGE_BYTES, compress=False, autoping=False)
        ws.too_big_message = bytes([KIND_ERROR]) + (
            f"message of more than {4 * MAX_MESSAGE_BYTES} bytes; at most {MAX_MESSAGE_BYTES} are accepted "
            "(one Ogg page per message)").encode()
        await ws.prepare(request)
        _bound_send_buffer(request, send_buffer_bytes)
        app[SESSIONS_KEY].add(ws)
        transport = AiohttpTransport(ws, request.transport, send_buffer_bytes, reader_timeout=reader_timeout,
                                     ping_interval=limits.ping_interval)
        try:
            await run_chat(hub, request.query, transport, encoders=encoders)
        finally:
            app[SESSIONS_KEY].discard(ws)
            transport.drop_if_stuck()
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
            data = await asyncio.wait_for(request.read(), limits.request_timeout)
        except asyncio.TimeoutError:
            return _json_error(408, f"the upload took longer than {limits.request_timeout:g} s (--request-timeout)")
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, f"voice samples are limited to {hub.options.max_voice_upload_bytes} bytes")
        try:
            name = await hub.add_voice_upload(data)
        except PersonaError as error:
            return _json_error(400, str(error))
        except (HubBusy, HubClosed) as error:  # too many personas being built, or shutting down
            return _json_error(503, str(error), headers={"Retry-After": "5"})
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
                           phone_personas=phone_personas, limits=limits, guard=guard)
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


def _access_middleware(token: str | None, origins: OriginPolicy, guard: ConnectionGuard | None):
    """Before any work: the Origin of WebSocket upgrades and POSTs, then the token on ``/api/*`` (but
    ``/api/health``). A connection serving an allowed request is marked busy in ``guard`` meanwhile;
    a phone stream only once it authenticates (``twilio.py``)."""
    from ..integrations.routes import TWILIO_PATH

    @web.middleware
    async def check(request: web.Request, handler):
        path = request.path
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if (upgrade or request.method == "POST") and not origins.allows(request.headers.get("Origin"), request.host):
            return _json_error(403, "requests from this web page's origin are refused: start the server with "
                                    "--allowed-origins ORIGIN to allow it")
        if token and path.startswith("/api/") and path != "/api/health":
            given = token_from(request.query.get("token"), request.headers.get("Authorization"))
            if not token_matches(given, token):
                return _json_error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or ?token=<token>")
        busy = guard is not None and path != TWILIO_PATH
        if busy:
            guard.mark_busy(request.transport)
        try:
            return await handler(request)
        finally:
            if busy:
                guard.mark_busy(request.transport, False)

    return check


def _json_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json",
                        headers=headers)


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
