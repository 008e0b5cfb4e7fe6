"""The single server's routes as an ASGI (Starlette) application over one ``ConversationHub``.

A scale-out replica serves exactly what ``personaplex serve`` serves, through the same transport-agnostic
protocol handlers (``run_chat``, ``run_realtime``, ``run_twilio``); only the framework differs
(Starlette under Ray Serve's proxy instead of aiohttp):

| route | what |
| --- | --- |
| ``GET /api/chat`` | the WebSocket conversation protocol (``personaplex/frontends/chat_protocol.py``) |
| ``GET /v1/realtime`` | the Realtime-style WebSocket (``personaplex/frontends/realtime.py``) |
| ``GET /twilio/media-stream`` | the Twilio Media Streams WebSocket (``personaplex/frontends/twilio.py``) |
| ``GET /api/health`` | JSON of this replica: ok, model, slots busy/free, ``replica`` |
| ``GET /api/voices`` | the voice presets; uploads are refused (an upload would live in one replica only) |
| ``GET /metrics`` | this replica's Prometheus metrics |
| ``GET /`` and files | the web page (``/?token=T`` sets the page's cookie, as in ``server/app.py``) |
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketState

from ..server.limits import ServerLimits
from ..frontends.security import TOKEN_COOKIE, cookie_matches, cookie_value, token_from, token_matches

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
    allow-list of WebSocket upgrades (default: the server's defaults)."""
    from ..frontends.realtime import run_realtime
    from ..frontends.twilio import PhonePersonas, run_twilio
    from ..frontends.chat_protocol import run_chat

    limits = limits or ServerLimits()

    personas = phone_personas if isinstance(phone_personas, PhonePersonas) else \
        PhonePersonas.load(phone_personas) if phone_personas is not None else PhonePersonas()

    def authorized(connection: Request | WebSocket, cookie: bool = True) -> bool:
        """The token (header or ?token=), or the page's cookie from the server's own or a listed origin;
        ``cookie=False``: the token only (the Realtime route, whose clients send it as their API key)."""
        if not auth_token:
            return True
        given = token_from(connection.query_params.get("token"), connection.headers.get("authorization"))
        if token_matches(given, auth_token):
            return True
        return cookie and cookie_matches(connection.cookies.get(TOKEN_COOKIE), auth_token) and \
            limits.allowed_origins.allows_cookie(connection.headers.get("origin"), connection.headers.get("host"))

    def origin_allowed(ws: WebSocket) -> bool:
        return limits.allowed_origins.allows(ws.headers.get("origin"), ws.headers.get("host"))

    async def chat(ws: WebSocket) -> None:
        if not origin_allowed(ws) or not authorized(ws):
            await ws.close(code=CLOSE_POLICY)  # before accepting: the upgrade is refused (HTTP 403)
            return
        await ws.accept()
        if encoders is not None and not encoders.started:
            await encoders.start()
        await run_chat(hub, ws.query_params, StarletteTransport(ws), encoders=encoders)

    async def realtime(ws: WebSocket) -> None:
        if not origin_allowed(ws) or not authorized(ws, cookie=False):
            await ws.close(code=CLOSE_POLICY)
            return
        beta = "realtime=v1" in ws.headers.get("openai-beta", "").replace(" ", "")
        await ws.accept()
        await run_realtime(hub, StarletteTransport(ws), beta=beta, idle_timeout=limits.idle_timeout)

    async def twilio(ws: WebSocket) -> None:  # Twilio sends no headers: the token is a stream parameter
        query_token = ws.query_params.get("token")
        if not origin_allowed(ws) or (auth_token and query_token is not None and not token_matches(query_token,
                                                                                                  auth_token)):
            await ws.close(code=CLOSE_POLICY)
            return
        await ws.accept()
        await run_twilio(hub, StarletteTransport(ws), personas=personas,
                         auth_token=auth_token if query_token is None else None, idle_timeout=limits.idle_timeout)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": hub.accepting, "model": hub.describe()["model"], "replica": replica,
                             **hub.load()})

    async def voices(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        if request.method == "POST":
            return JSONResponse({"error": UPLOAD_REFUSED}, status_code=403)
        return JSONResponse({"voices": hub.voices(), "default": hub.options.default_voice, "upload": False})

    async def metrics(request: Request) -> Response:
        return Response(hub.metrics.render().encode("utf-8"), headers={"Content-Type": hub.metrics.content_type})

    routes = [
        WebSocketRoute("/api/chat", chat),
        WebSocketRoute("/v1/realtime", realtime),
        WebSocketRoute("/twilio/media-stream", twilio),
        Route("/api/health", health),
        Route("/api/voices", voices, methods=["GET", "POST"]),
        Route("/metrics", metrics),
    ]
    if static_dir is not None and Path(static_dir).is_dir():
        index = Path(static_dir) / "index.html"

        async def home(request: Request) -> Response:
            if auth_token and "token" in request.query_params:
                return _sign_in(request, auth_token)
            if index.is_file():
                return FileResponse(index)
            return PlainTextResponse("personaplex server: the web page is not installed; /api/chat is ready\n")

        routes.append(Route("/", home))
        routes.append(Mount("/", app=StaticFiles(directory=str(static_dir), html=True)))
    elif static_dir is not None:
        async def home(request: Request) -> Response:
            return PlainTextResponse("personaplex server: the web page is not installed; /api/chat is ready\n")

        routes.append(Route("/", home))
    return Starlette(routes=routes)


def _sign_in(request: Request, token: str) -> Response:
    """``GET /?token=T``: the page's cookie and a redirect without the token, or 401 (``server/app.py``)."""
    if not token_matches(request.query_params.get("token"), token):
        return JSONResponse({"error": "wrong token in ?token="}, status_code=401, headers={"Cache-Control": "no-store"})
    rest = [(name, value) for name, value in request.query_params.multi_items() if name != "token"]
    response = Response(status_code=303, headers={"Location": "./" + ("?" + urlencode(rest) if rest else ""),
                                                  "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    response.set_cookie(TOKEN_COOKIE, cookie_value(token), path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


def _unauthorized() -> Response:
    return Response(json.dumps({"error": "missing or wrong token: send 'Authorization: Bearer <token>' or "
                                         "?token=<token>"}), status_code=401, media_type="application/json")
