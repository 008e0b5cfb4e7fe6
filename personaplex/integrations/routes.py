"""aiohttp routes of the integrations, added to the server's application by ``build_app``.

| route | what |
| --- | --- |
| ``GET /v1/realtime`` | the OpenAI-Realtime-style WebSocket (``realtime.py``); ``?model=`` is accepted and ignored |
| ``GET /twilio/media-stream`` | the Twilio Media Streams WebSocket (``twilio.py``) |

With an auth token the Realtime endpoint needs ``Authorization: Bearer <token>`` (what the ``openai`` SDK
sends as its API key) or ``?token=<token>``; Twilio cannot send headers, so the phone bridge checks a
``token`` stream parameter instead.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from aiohttp import web

from .realtime import MAX_EVENT_BYTES, run_realtime
from .twilio import MAX_MESSAGE_BYTES, PhonePersonas, run_twilio

REALTIME_PATH = "/v1/realtime"
TWILIO_PATH = "/twilio/media-stream"


def add_integration_routes(app: web.Application, hub, *, auth_token: str | None = None,
                           sessions: set | None = None, phone_personas: Path | PhonePersonas | None = None) -> None:
    """Add the Realtime and Twilio WebSocket routes. ``sessions`` (the server's set of open WebSockets)
    lets a graceful shutdown wait for them; ``phone_personas`` is the persona file of the phone bridge."""
    from ..server.app import AiohttpTransport

    personas = phone_personas if isinstance(phone_personas, PhonePersonas) else \
        PhonePersonas.load(phone_personas) if phone_personas is not None else PhonePersonas()
    personas.check_voices(hub.voices())
    open_sockets = sessions if sessions is not None else set()

    async def realtime(request: web.Request) -> web.StreamResponse:
        if auth_token and not _bearer_ok(request, auth_token):
            return web.json_response({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                                "message": "missing or wrong token: send it as the API key "
                                                           "(Authorization: Bearer <token>)"}}, status=401)
        beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "").replace(" ", "")
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_EVENT_BYTES, compress=False, autoping=True)
        await ws.prepare(request)
        open_sockets.add(ws)
        try:
            await run_realtime(hub, AiohttpTransport(ws), beta=beta)
        finally:
            open_sockets.discard(ws)
        return ws

    async def twilio(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_MESSAGE_BYTES, compress=False, autoping=True)
        await ws.prepare(request)
        open_sockets.add(ws)
        try:
            await run_twilio(hub, AiohttpTransport(ws), personas=personas, auth_token=auth_token)
        finally:
            open_sockets.discard(ws)
        return ws

    app.router.add_get(REALTIME_PATH, realtime)
    app.router.add_get(TWILIO_PATH, twilio)


def _bearer_ok(request: web.Request, token: str) -> bool:
    given = request.query.get("token", "")
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))
