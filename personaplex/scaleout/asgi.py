"""The single server's routes as an ASGI (Starlette) application over one ``ConversationHub``.

A scale-out replica serves exactly what ``personaplex serve`` serves: the routes of ``frontends/routes.py`` with
the same access check before any work, the same plain HTTP endpoints (``frontends/http_api.py``) and the same
transport-agnostic protocol handlers (``run_chat``, ``run_realtime``, ``run_twilio``); only the framework differs
(Starlette under Ray Serve's proxy instead of aiohttp). What differs in a replica: ``/api/health`` names it
(``replica``), and voice uploads are refused (an upload would live in one replica only).

A refused WebSocket upgrade gets the same HTTP status and JSON body as from the single server where the ASGI
server offers the WebSocket denial response (uvicorn does, behind Ray Serve's proxy too); elsewhere the
upgrade is closed with 1008, which the server answers with HTTP 403.
"""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketState

from ..frontends import http_api
from ..frontends.http_api import Answer, json_answer
from ..frontends.routes import AccessRequest, check_access, phone_stream_token, served_routes
from ..frontends.security import TOKEN_COOKIE, OriginPolicy
from ..server.limits import ServerLimits

log = logging.getLogger("personaplex.scaleout")

CLOSE_POLICY = 1008
UPLOAD_REFUSED = ("uploaded voices are not available when serving with replicas (each upload would live in one "
                  "replica only): put the voice in --voice-prompt-dir on every node instead")


class StarletteTransport:
    """``MessageTransport`` (see ``personaplex/frontends/chat_protocol.py``) over a Starlette WebSocket."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._gone = False

    async def receive(self) -> bytes | str | None:
        if self._gone:
            return None
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self._gone = True
            return None
        if message.get("bytes") is not None:
            return message["bytes"]
        if message.get("text") is not None:
            return message["text"]
        return None

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def send_text(self, data: str) -> None:
        await self.ws.send_text(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._gone or self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        self._gone = True
        await self.ws.close(code=code, reason=reason)


def build_asgi_app(hub, *, static_dir: Path | None, auth_token: str | None = None, phone_personas=None,
                   replica: str = "", encoders=None, limits: ServerLimits | None = None) -> Starlette:
    """Routes of the single server over ``hub`` (started by the caller). ``replica`` names this replica
    in ``/api/health``. ``encoders``: an ``OpusEncoderPool`` for /api/chat, started at the first conversation
    (on the loop that serves it); None: this process encodes. ``limits``: the idle timeout and the Origin
    allow-list (default: the server's defaults)."""
    from ..frontends.chat_protocol import run_chat
    from ..frontends.realtime import run_realtime
    from ..frontends.twilio import PhonePersonas, run_twilio

    limits = limits or ServerLimits()
    personas = PhonePersonas.given(phone_personas)

    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        if encoders is not None and not encoders.started:
            await encoders.start()
        await run_chat(hub, ws.query_params, StarletteTransport(ws), encoders=encoders)

    async def realtime(ws: WebSocket) -> None:
        beta = "realtime=v1" in ws.headers.get("openai-beta", "").replace(" ", "")
        await ws.accept()
        await run_realtime(hub, StarletteTransport(ws), beta=beta, idle_timeout=limits.idle_timeout)

    async def twilio(ws: WebSocket) -> None:
        await ws.accept()
        await run_twilio(hub, StarletteTransport(ws), personas=personas, idle_timeout=limits.idle_timeout,
                         auth_token=phone_stream_token(auth_token, ws.query_params.get("token")))

    async def upload_voice(request: Request) -> Response:
        return response_for(json_answer(403, {"error": UPLOAD_REFUSED}))

    index = Path(static_dir) / "index.html" if static_dir is not None else None
    handlers = {
        "chat": chat, "realtime": realtime, "twilio": twilio, "upload_voice": upload_voice,
        "health": _endpoint(lambda request: http_api.health(hub, replica=replica)),
        "voices": _endpoint(lambda request: http_api.voices(hub, uploads=False)),
        "metrics": _endpoint(lambda request: http_api.metrics(hub)),
        "home": _endpoint(lambda request: http_api.home(request.query_params.multi_items(), auth_token,
                                                        secure=request.url.scheme == "https", index=index)),
    }
    routes = [WebSocketRoute(route.path, handlers[route.endpoint]) if route.websocket else
              Route(route.path, handlers[route.endpoint], methods=[route.method])
              for route in served_routes(with_page=static_dir is not None)]
    if static_dir is not None and Path(static_dir).is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=str(static_dir), html=True)))
    access = Middleware(AccessCheck, token=auth_token, origins=limits.allowed_origins)
    return Starlette(routes=routes, middleware=[access])


def response_for(answer: Answer) -> Response:
    """The Starlette response that sends ``answer``."""
    if answer.file is not None:
        return FileResponse(answer.file)
    return Response(answer.body, status_code=answer.status, headers=answer.headers)


def _endpoint(answer_for):
    """A Starlette endpoint that sends ``answer_for(request)`` (an endpoint of ``frontends/http_api.py``)."""
    async def endpoint(request: Request) -> Response:
        return response_for(answer_for(request))

    return endpoint


class AccessCheck:
    """ASGI middleware: ``check_access`` on every request and WebSocket upgrade, before routing."""

    def __init__(self, app, *, token: str | None, origins: OriginPolicy):
        self.app = app
        self.token = token
        self.origins = origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        websocket = scope["type"] == "websocket"
        refusal = check_access(AccessRequest(
            path=_route_path(scope), method=scope.get("method", "GET"), websocket=websocket,
            origin=connection.headers.get("origin"), host=connection.headers.get("host"),
            query_token=connection.query_params.get("token"), authorization=connection.headers.get("authorization"),
            cookie=connection.cookies.get(TOKEN_COOKIE)), self.token, self.origins)
        if refusal is None:
            await self.app(scope, receive, send)
        elif not websocket:
            await response_for(refusal)(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await WebSocket(scope, receive, send).send_denial_response(response_for(refusal))
        else:  # before accepting: the server refuses the upgrade with HTTP 403
            await WebSocket(scope, receive, send).close(code=CLOSE_POLICY)


def _route_path(scope) -> str:
    """The path the routes match: the request's path without the application's mount point (``root_path``,
    which ASGI servers include in ``path`` too)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path
