"""The aiohttp application: the ``/api/chat`` WebSocket, health, voices, metrics and the web page.

| route | what |
| --- | --- |
| ``GET /api/chat`` | the WebSocket conversation protocol (``frontends/chat_protocol.py``) |
| ``GET /api/health`` | JSON: ``ok``, model (``untrained``: the demo model), slots busy/free, queue length (never needs the token) |
| ``GET /api/voices`` | JSON: the voice presets (``{"voices": [...], "default": ..., "upload": bool}``) |
| ``POST /api/voices`` | body: an audio file (wav/flac/ogg/mp3), only with ``--allow-voice-upload``; returns ``{"voice": "upload-..."}`` to pass as ``voice_prompt`` |
| ``GET /metrics`` | Prometheus text format |
| ``GET /`` and files | the web page (``--static``) |

With an auth token every ``/api/*`` route but ``/api/health`` needs ``Authorization: Bearer <token>``,
``?token=<token>`` (browsers cannot set headers on WebSockets) or the page's cookie; others get 401.
Opening ``/?token=<token>`` sets that cookie and redirects to the page without the token (a wrong token
gets 401 and no cookie), so that a page that never adds ``?token=`` itself (the reference web client)
works. WebSocket upgrades and POSTs from a browser page of another origin get 403 (``frontends/security.py``,
``--allowed-origins``); a request that only the cookie authenticates must come from the server's own
origin or a listed one. Timeouts, the connection cap and the slow-reader check are in ``limits.py`` and
``connections.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from ..frontends.chat_protocol import KIND_ERROR, MAX_MESSAGE_BYTES, run_chat
from ..frontends.security import TOKEN_COOKIE, OriginPolicy, cookie_matches, cookie_value, token_from, token_matches
from ..serving.hub import HubBusy, HubClosed, PersonaError
from .connections import ConnectionGuard
from .integration_routes import TWILIO_PATH, add_integration_routes
from .limits import ServerLimits
from .transport import AiohttpTransport, GuardedWebSocketResponse

log = logging.getLogger("personaplex.server")

HUB_KEY = web.AppKey("hub", object)
SESSIONS_KEY = web.AppKey("sessions", set)
LIMITS_KEY = web.AppKey("limits", ServerLimits)
DEFAULT_STATIC = Path(__file__).parent / "static"
MAX_URL_BYTES = 64 << 10


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
    # /v1/realtime and /twilio/media-stream (integration_routes.py): they check the token themselves.
    add_integration_routes(app, hub, auth_token=auth_token, sessions=app[SESSIONS_KEY],
                           phone_personas=phone_personas, limits=limits, guard=guard)
    if static_dir is not None:
        static_dir = Path(static_dir)
        index = static_dir / "index.html"

        async def home(request: web.Request) -> web.StreamResponse:
            if auth_token and "token" in request.query:
                return _sign_in(request, auth_token)
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
    a phone stream only once it authenticates (``frontends/twilio.py``)."""
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
                if not cookie_matches(request.cookies.get(TOKEN_COOKIE), token):
                    return _json_error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or "
                                            "?token=<token>, or open the page once as /?token=<token>")
                if not origins.allows_cookie(request.headers.get("Origin"), request.host):
                    return _json_error(403, "the access cookie is accepted only from this server's own pages "
                                            "(or origins given by name to --allowed-origins): send the token")
        busy = guard is not None and path != TWILIO_PATH
        if busy:
            guard.mark_busy(request.transport)
        try:
            return await handler(request)
        finally:
            if busy:
                guard.mark_busy(request.transport, False)

    return check


def _sign_in(request: web.Request, token: str) -> web.Response:
    """``GET /?token=T``: the right token gets the page's cookie and a redirect to the same page without
    the token in its URL (other query parameters kept), so that it stays out of the history and of
    referrers; a wrong one gets 401 and no cookie."""
    if not token_matches(request.query.get("token"), token):
        return _json_error(401, "wrong token in ?token=", headers={"Cache-Control": "no-store"})
    rest = [(name, value) for name, value in request.query.items() if name != "token"]
    # Relative: the page may be mounted under a path prefix by a reverse proxy.
    location = "./" + ("?" + urlencode(rest) if rest else "")
    response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store",
                                                 "Referrer-Policy": "no-referrer"})
    response.set_cookie(TOKEN_COOKIE, cookie_value(token), path="/", httponly=True, samesite="Strict",
                        secure=request.secure)
    return response


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
