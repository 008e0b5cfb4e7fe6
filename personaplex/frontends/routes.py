"""The server's routes, in one list for both web frameworks, and the one access check that runs before any work.

The aiohttp server (``server/app.py``) and a scale-out replica (Starlette under Ray Serve, ``scaleout/asgi.py``)
are each built from ``ROUTES`` by a small adapter: it maps every route's ``endpoint`` to its handler and runs
``check_access`` on every request, before routing, so a refused request costs no handler, no WebSocket and no
conversation. Both answer a refusal with the same status and JSON body.

| route | access | what |
| --- | --- | --- |
| ``GET /api/chat`` | token or cookie | the WebSocket conversation protocol (``chat_protocol.py``) |
| ``GET /v1/realtime`` | API key | the OpenAI-Realtime-style WebSocket (``realtime.py``); ``?model=`` is ignored |
| ``GET /twilio/media-stream`` | phone | the Twilio Media Streams WebSocket (``twilio.py``) |
| ``GET /api/health`` | open | JSON: ``ok``, model, ``untrained`` (the demo model), slots busy/free, queue length |
| ``GET /api/voices`` | token or cookie | JSON: the voice presets (``{"voices": [...], "default": ..., "upload": bool}``) |
| ``POST /api/voices`` | token or cookie | body: an audio file (``--allow-voice-upload``); returns ``{"voice": "upload-..."}`` |
| ``GET /metrics`` | open | Prometheus text format |
| ``GET /`` and files | open | the web page (``--static``); ``/?token=T`` signs the page in (``http_api.home``) |

Access, with an auth token set (without one every route is open): *token or cookie*: ``Authorization: Bearer
<token>``, ``?token=<token>`` (browsers cannot set headers on WebSockets) or the page's cookie, which counts
only from the server's own origin or one listed by name (``security.py``); every other ``/api/*`` path is
treated the same (401 before 404). *API key*: the token alone, as the ``openai`` SDK sends its API key.
*Phone*: Twilio cannot send headers: a ``?token=`` on the stream URL must be right, and without one the
stream's ``start`` message must carry it (``phone_stream_token``). Before the token, WebSocket upgrades and
POSTs from a browser page of another origin get 403 (``--allowed-origins``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .http_api import Answer, json_answer
from .security import OriginPolicy, cookie_matches, token_from, token_matches


class Access(Enum):
    """What a route asks of a request when the server has an auth token."""

    OPEN = "open"
    TOKEN_OR_COOKIE = "token or cookie"
    API_KEY = "API key"  # the token only: the page's cookie does not open it
    PHONE = "phone"  # ?token= checked here when given; else the stream's start message carries it


@dataclass(frozen=True)
class Route:
    """One route: ``endpoint`` names the handler each adapter gives it."""

    method: str  # "GET" (WebSocket upgrades too) or "POST"
    path: str
    endpoint: str
    access: Access
    websocket: bool = False
    page: bool = False  # served only with a web page (``--static`` other than 'none')


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/chat", "chat", Access.TOKEN_OR_COOKIE, websocket=True),
    Route("GET", "/v1/realtime", "realtime", Access.API_KEY, websocket=True),
    Route("GET", "/twilio/media-stream", "twilio", Access.PHONE, websocket=True),
    Route("GET", "/api/health", "health", Access.OPEN),
    Route("GET", "/api/voices", "voices", Access.TOKEN_OR_COOKIE),
    Route("POST", "/api/voices", "upload_voice", Access.TOKEN_OR_COOKIE),
    Route("GET", "/metrics", "metrics", Access.OPEN),
    Route("GET", "/", "home", Access.OPEN, page=True),
)
# The web page's files are served below "/" after these routes, when ``--static`` is a folder.

ORIGIN_REFUSED = ("requests from this web page's origin are refused: start the server with --allowed-origins ORIGIN "
                  "to allow it")
TOKEN_REFUSED = ("missing or wrong token: send 'Authorization: Bearer <token>' or ?token=<token>, or open the page "
                 "once as /?token=<token>")
COOKIE_ORIGIN_REFUSED = ("the access cookie is accepted only from this server's own pages (or origins given by name "
                         "to --allowed-origins): send the token")
API_KEY_REFUSED = "missing or wrong token: send it as the API key (Authorization: Bearer <token>)"


def served_routes(with_page: bool) -> tuple[Route, ...]:
    """The routes of a server with (``with_page``) or without a web page."""
    return tuple(route for route in ROUTES if with_page or not route.page)


def access_of(path: str) -> Access:
    """The access of ``path``: its routes' (one per path, whatever the method), else token-or-cookie for any
    other ``/api/*`` path and open for the rest (the page's files, unknown paths)."""
    for route in ROUTES:
        if route.path == path:
            return route.access
    return Access.TOKEN_OR_COOKIE if path.startswith("/api/") else Access.OPEN


@dataclass(frozen=True)
class AccessRequest:
    """What the access check reads of a request (header values as the framework gives them)."""

    path: str
    method: str
    websocket: bool  # a WebSocket upgrade
    origin: str | None = None  # the Origin header
    host: str | None = None  # the Host header
    query_token: str | None = None  # ?token=
    authorization: str | None = None  # the Authorization header
    cookie: str | None = None  # the page's cookie (``security.TOKEN_COOKIE``)


def check_access(request: AccessRequest, token: str | None, origins: OriginPolicy) -> Answer | None:
    """The refusal for ``request`` (403 for a foreign origin, 401 for a missing or wrong token, 403 for the page's
    cookie from a page that may not use it), or None when it may proceed; never raises."""
    if (request.websocket or request.method == "POST") and not origins.allows(request.origin, request.host):
        return json_answer(403, {"error": ORIGIN_REFUSED})
    access = access_of(request.path)
    if not token or access is Access.OPEN:
        return None
    if access is Access.PHONE:
        if request.query_token is not None and not token_matches(request.query_token, token):
            return json_answer(401, {"error": "wrong token"})
        return None
    if token_matches(token_from(request.query_token, request.authorization), token):
        return None
    if access is Access.API_KEY:
        return json_answer(401, {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                           "message": API_KEY_REFUSED}})
    if not cookie_matches(request.cookie, token):
        return json_answer(401, {"error": TOKEN_REFUSED})
    if not origins.allows_cookie(request.origin, request.host):
        return json_answer(403, {"error": COOKIE_ORIGIN_REFUSED})
    return None


def phone_stream_token(token: str | None, query_token: str | None) -> str | None:
    """The token a phone stream's ``start`` message must carry (``run_twilio``'s ``auth_token``): None when the
    stream's URL already carried it (``check_access`` let it through) or the server has none."""
    return token if query_token is None else None

