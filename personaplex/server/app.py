"""The aiohttp application: every route of ``frontends/routes.py`` over one ``ConversationHub``.

The routes, their access rules and the plain HTTP endpoints are framework-neutral (``frontends/routes.py``,
``frontends/http_api.py``; a scale-out replica serves the same through Starlette, ``scaleout/asgi.py``). This
module is the aiohttp adapter: it runs the one access check before any handler (``_access_middleware``),
turns answers into aiohttp responses, reads voice uploads, and adds the WebSocket handlers of
``websockets.py``. Opening ``/?token=<token>`` sets the page's cookie and redirects to the page without the
token, so that a page that never adds ``?token=`` itself (the reference web client) works. Timeouts, the
connection cap and the slow-reader check are in ``limits.py`` and ``connections.py``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from ..frontends import http_api
from ..frontends.http_api import Answer, json_answer
from ..frontends.routes import Access, AccessRequest, access_of, check_access, served_routes
from ..frontends.security import TOKEN_COOKIE, OriginPolicy
from ..frontends.twilio import PhonePersonas
from ..serving.hub import HubBusy, HubClosed, PersonaError
from .connections import ConnectionGuard
from .limits import ServerLimits
from .websockets import websocket_handlers

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
    personas = PhonePersonas.given(phone_personas)
    personas.check_voices(hub.voices())

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
        return response_for(json_answer(200, {"voice": name}))

    index = Path(static_dir) / "index.html" if static_dir is not None else None
    handlers = {
        **websocket_handlers(hub, sessions=app[SESSIONS_KEY], auth_token=auth_token, limits=limits, guard=guard,
                             send_buffer_bytes=send_buffer_bytes, phone_personas=personas, encoders=encoders),
        "health": _endpoint(lambda request: http_api.health(hub)),
        "voices": _endpoint(lambda request: http_api.voices(hub, hub.options.allow_voice_upload)),
        "upload_voice": upload_voice,
        "metrics": _endpoint(lambda request: http_api.metrics(hub)),
        "home": _endpoint(lambda request: http_api.home(request.query.items(), auth_token, secure=request.secure,
                                                        index=index)),
    }
    add = {"GET": app.router.add_get, "POST": app.router.add_post}
    for route in served_routes(with_page=static_dir is not None):
        add[route.method](route.path, handlers[route.endpoint])
    if static_dir is not None and Path(static_dir).is_dir():
        app.router.add_static("/", Path(static_dir), follow_symlinks=False, show_index=False)
    return app


def response_for(answer: Answer) -> web.StreamResponse:
    """The aiohttp response that sends ``answer``."""
    if answer.file is not None:
        return web.FileResponse(answer.file)
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


def _endpoint(answer_for):
    """An aiohttp handler that sends ``answer_for(request)`` (an endpoint of ``frontends/http_api.py``)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return response_for(answer_for(request))

    return handler


def _access_middleware(token: str | None, origins: OriginPolicy, guard: ConnectionGuard | None):
    """Before any work: ``check_access`` (the Origin of WebSocket upgrades and POSTs, then the token). A
    connection serving an allowed request is marked busy in ``guard`` meanwhile; a phone stream only once it
    authenticates (``websockets.py``)."""
    @web.middleware
    async def check(request: web.Request, handler):
        refusal = check_access(AccessRequest(
            path=request.path, method=request.method,
            websocket=request.headers.get("Upgrade", "").lower() == "websocket",
            origin=request.headers.get("Origin"), host=request.host, query_token=request.query.get("token"),
            authorization=request.headers.get("Authorization"), cookie=request.cookies.get(TOKEN_COOKIE)),
            token, origins)
        if refusal is not None:
            return response_for(refusal)
        busy = guard is not None and access_of(request.path) is not Access.PHONE
        if busy:
            guard.mark_busy(request.transport)
        try:
            return await handler(request)
        finally:
            if busy:
                guard.mark_busy(request.transport, False)

    return check


def _json_error(status: int, message: str, headers: dict | None = None) -> web.StreamResponse:
    return response_for(json_answer(status, {"error": message}, headers))
