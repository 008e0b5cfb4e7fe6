"""One route list for both web frameworks: the aiohttp server and a scale-out replica's Starlette app serve exactly
the routes of ``frontends/routes.py`` and refuse a request the same way (status, headers that matter, body bytes),
each over a real socket on loopback with a real HTTP client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import aiohttp
import pytest

from personaplex.frontends.routes import ROUTES, Access, Route, access_of, served_routes

TOKEN = "s3cret"
pytest.importorskip("starlette", reason="the replica app needs Starlette: pip install -e '.[scaleout]'")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def hub(demo_model):
    """A hub that is never started: these requests are all answered before any conversation."""
    from personaplex.serving import ConversationHub, HubOptions

    return ConversationHub(demo_model, HubOptions(max_conversations=1))


def _aiohttp_routes(app) -> set[tuple[str, str]]:
    from aiohttp import web

    return {(route.method, route.resource.canonical) for route in app.router.routes()
            if route.method != "HEAD" and not isinstance(route.resource, web.StaticResource)}


def _starlette_routes(app) -> tuple[set[tuple[str, str]], set[str]]:
    """(method, path) of every route but the static files' mount, and the paths of the WebSocket routes."""
    from starlette.routing import Route, WebSocketRoute

    routes, websockets = set(), set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            routes.add(("GET", route.path))
            websockets.add(route.path)
        elif isinstance(route, Route):
            routes |= {(method, route.path) for method in route.methods if method != "HEAD"}
    return routes, websockets


def test_each_path_has_one_access_rule_and_other_api_paths_need_the_token():
    for route in ROUTES:
        assert {r.access for r in ROUTES if r.path == route.path} == {route.access}, route.path
    assert access_of("/api/nowhere") is Access.TOKEN_OR_COOKIE and access_of("/js/main.js") is Access.OPEN
    assert {r.path for r in ROUTES if r.access is Access.OPEN} == {"/api/health", "/metrics", "/"}


@pytest.mark.parametrize("with_page", [True, False])
def test_both_apps_serve_the_routes_of_the_one_list(hub, with_page):
    from personaplex.scaleout.asgi import build_asgi_app
    from personaplex.server.app import DEFAULT_STATIC, build_app

    static = DEFAULT_STATIC if with_page else None
    expected = {(route.method, route.path) for route in served_routes(with_page)}
    assert ("GET", "/") in expected if with_page else ("GET", "/") not in expected
    assert _aiohttp_routes(build_app(hub, static_dir=static, auth_token=TOKEN)) == expected
    routes, websockets = _starlette_routes(build_asgi_app(hub, static_dir=static, auth_token=TOKEN))
    assert routes == expected
    assert websockets == {route.path for route in ROUTES if route.websocket}


def _requests() -> list[tuple[str, str, str, dict]]:
    """(name, method, path with query, headers) of requests that must be refused, for every guarded route."""
    from personaplex.frontends.security import TOKEN_COOKIE, cookie_value

    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    cookie = {"Cookie": f"{TOKEN_COOKIE}={cookie_value(TOKEN)}"}
    found = []
    unknown = Route("GET", "/api/nowhere", "none", Access.TOKEN_OR_COOKIE)  # 401 before 404 on both
    guarded = [route for route in ROUTES if route.access is not Access.OPEN] + [unknown]
    for route in guarded:
        base = dict(upgrade) if route.websocket else {}
        where = f"{route.method} {route.path}"
        found.append((f"{where} wrong ?token=", route.method, f"{route.path}?token=wrong", base))
        if route.websocket or route.method == "POST":  # what a browser lets a foreign page send
            found.append((f"{where} foreign origin", route.method, f"{route.path}?token={TOKEN}",
                          {**base, "Origin": "https://evil.example"}))
        if route.access is not Access.PHONE:  # a phone stream without ?token= shows its token later, in 'start'
            found += [
                (f"{where} no token", route.method, route.path, base),
                (f"{where} wrong bearer", route.method, route.path, {**base, "Authorization": "Bearer wrong"}),
                (f"{where} forged cookie", route.method, route.path, {**base, "Cookie": f"{TOKEN_COOKIE}={TOKEN}"}),
                (f"{where} cookie from another port", route.method, route.path,
                 {**base, **cookie, "Origin": "http://localhost:3000"}),
            ]
    return found


async def _ask(http: aiohttp.ClientSession, base: str, method: str, path: str, headers: dict):
    async with http.request(method, base + path, headers=headers, data=b"RIFF...." if method == "POST" else None,
                            allow_redirects=False) as response:
        return response.status, response.headers.get("Content-Type"), await response.read()


def test_both_apps_refuse_a_request_the_same_way(hub):
    """Every guarded route with a wrong or missing token, a forged cookie, the page's cookie from another
    origin, or from a foreign web page: the same refusal from both apps, and no refusal with the token."""
    import uvicorn
    from aiohttp import web

    from personaplex.scaleout.asgi import build_asgi_app
    from personaplex.server.app import DEFAULT_STATIC, build_app

    requests = _requests()

    async def scenario():
        runner = web.AppRunner(build_app(hub, static_dir=DEFAULT_STATIC, auth_token=TOKEN))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        single = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        port = _free_port()
        asgi = build_asgi_app(hub, static_dir=DEFAULT_STATIC, auth_token=TOKEN, replica="replica-a")
        server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        serving = asyncio.ensure_future(server.serve())
        answers = {}
        try:
            while not server.started:
                await asyncio.sleep(0.05)
            replica = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                for name, method, path, headers in requests:
                    answers[name] = [await _ask(http, base, method, path, headers) for base in (single, replica)]
                allowed = [await _ask(http, base, "GET", "/api/voices", {"Authorization": f"Bearer {TOKEN}"})
                           for base in (single, replica)]
        finally:
            server.should_exit = True
            await serving
            await runner.cleanup()
        return answers, allowed

    answers, allowed = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert len(answers) == len(requests) >= 20
    for name, (from_single, from_replica) in answers.items():
        assert from_single == from_replica, name
        status, content_type, body = from_single
        assert status in (401, 403) and content_type.startswith("application/json") and b'"error"' in body, name
    assert answers["GET /api/voices no token"][0][0] == 401
    assert answers["GET /api/chat cookie from another port"][0][0] == 403
    assert b"invalid_api_key" in answers["GET /v1/realtime wrong bearer"][0][2]
    assert [status for status, _, _ in allowed] == [200, 200]
