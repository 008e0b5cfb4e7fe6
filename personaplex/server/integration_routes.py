"""aiohttp routes of the Realtime and Twilio front ends, added to the server's application by ``build_app``.

| route | what |
| --- | --- |
| ``GET /v1/realtime`` | the OpenAI-Realtime-style WebSocket (``frontends/realtime.py``); ``?model=`` is accepted and ignored |
| ``GET /twilio/media-stream`` | the Twilio Media Streams WebSocket (``frontends/twilio.py``) |

With an auth token the Realtime endpoint needs ``Authorization: Bearer <token>`` (what the ``openai`` SDK
sends as its API key) or ``?token=<token>``; Twilio cannot send headers, so the phone bridge checks a
``token`` stream parameter (or ``?token=`` on the stream URL: a wrong one is refused before the upgrade).
A phone stream does nothing but wait for its authenticated ``start`` (``--idle-timeout``).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..frontends.realtime import MAX_EVENT_BYTES, event_too_large_notice, run_realtime
from ..frontends.security import token_from, token_matches
from ..frontends.twilio import MAX_MESSAGE_BYTES, PhonePersonas, run_twilio
from .limits import ServerLimits
from .transport import AiohttpTransport, GuardedWebSocketResponse

REALTIME_PATH = "/v1/realtime"
TWILIO_PATH = "/twilio/media-stream"


def add_integration_routes(app: web.Application, hub, *, auth_token: str | None = None,
                           sessions: set | None = None, phone_personas: Path | PhonePersonas | None = None,
                           limits=None, guard=None) -> None:
    """Add the Realtime and Twilio WebSocket routes. ``sessions`` (the server's set of open WebSockets)
    lets a graceful shutdown wait for them; ``phone_personas`` is the persona file of the phone bridge;
    ``limits`` (``ServerLimits``) and ``guard`` (``ConnectionGuard``) come from the server."""
    limits = limits or ServerLimits()
    personas = phone_personas if isinstance(phone_personas, PhonePersonas) else \
        PhonePersonas.load(phone_personas) if phone_personas is not None else PhonePersonas()
    personas.check_voices(hub.voices())
    open_sockets = sessions if sessions is not None else set()
    reader_timeout = hub.options.max_output_frames / 12.5  # the hub's bound on a slow reader, in seconds

    def transport_for(ws, request):
        return AiohttpTransport(ws, request.transport, 64 << 10, reader_timeout=reader_timeout,
                                ping_interval=limits.ping_interval)

    async def realtime(request: web.Request) -> web.StreamResponse:
        if auth_token and not token_matches(token_from(request.query.get("token"),
                                                       request.headers.get("Authorization")), auth_token):
            return web.json_response({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                                "message": "missing or wrong token: send it as the API key "
                                                           "(Authorization: Bearer <token>)"}}, status=401)
        beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "").replace(" ", "")
        ws = GuardedWebSocketResponse(max_msg_size=4 * MAX_EVENT_BYTES, compress=False, autoping=False)
        ws.too_big_message = event_too_large_notice(4 * MAX_EVENT_BYTES)
        await ws.prepare(request)
        open_sockets.add(ws)
        transport = transport_for(ws, request)
        try:
            await run_realtime(hub, transport, beta=beta, idle_timeout=limits.idle_timeout)
        finally:
            open_sockets.discard(ws)
            transport.drop_if_stuck()
        return ws

    async def twilio(request: web.Request) -> web.StreamResponse:
        # Twilio cannot send headers: the token is a stream parameter of 'start', or ?token= on the URL.
        query_token = request.query.get("token")
        authenticated = not auth_token
        if auth_token and query_token is not None:
            if not token_matches(query_token, auth_token):
                return web.json_response({"error": "wrong token"}, status=401)
            authenticated = True
        ws = GuardedWebSocketResponse(max_msg_size=4 * MAX_MESSAGE_BYTES, compress=False, autoping=False)
        await ws.prepare(request)
        open_sockets.add(ws)
        transport = transport_for(ws, request)

        def on_authenticated() -> None:
            if guard is not None:
                guard.mark_busy(request.transport)

        try:
            await run_twilio(hub, transport, personas=personas, auth_token=None if authenticated else auth_token,
                             idle_timeout=limits.idle_timeout, on_authenticated=on_authenticated)
        finally:
            open_sockets.discard(ws)
            transport.drop_if_stuck()
            if guard is not None:
                guard.mark_busy(request.transport, False)
        return ws

    app.router.add_get(REALTIME_PATH, realtime)
    app.router.add_get(TWILIO_PATH, twilio)
