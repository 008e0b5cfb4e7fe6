"""The server's plain HTTP endpoints, independent of the web framework: health, voices, metrics and the page.

Each returns an ``Answer`` (status, body, headers, or a file to send) that the aiohttp server and the scale-out
replicas turn into their framework's response, so both send the same bytes. ``routes.py`` lists the routes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from .security import TOKEN_COOKIE, cookie_value, token_matches

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
NO_PAGE = "personaplex server: the web page is not installed; /api/chat is ready\n"


@dataclass(frozen=True)
class Answer:
    """A response for an adapter to send: ``body`` with its ``headers`` (Content-Type among them), or ``file``."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # send this file (status 200) instead of ``body``


def json_answer(status: int, content, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(content).encode("utf-8"), {"Content-Type": JSON, **(headers or {})})


def health(hub, **extra) -> Answer:
    """``GET /api/health``: whether the hub accepts conversations, its model (``untrained``: the demo model), its
    load (slots busy/free, queue length) and ``extra`` fields (a scale-out replica's name)."""
    model = hub.describe()
    return json_answer(200, {"ok": hub.accepting, "model": model["model"], "untrained": model["untrained"], **extra,
                             **hub.load()})


def voices(hub, uploads: bool) -> Answer:
    """``GET /api/voices``: the voice presets, the default one, and whether ``POST /api/voices`` takes uploads."""
    return json_answer(200, {"voices": hub.voices(), "default": hub.options.default_voice, "upload": uploads})


def metrics(hub) -> Answer:
    """``GET /metrics``: the hub's Prometheus metrics in the text format."""
    return Answer(200, hub.metrics.render().encode("utf-8"), {"Content-Type": hub.metrics.content_type})


def home(query: Iterable[tuple[str, str]], token: str | None, *, secure: bool, index: Path | None) -> Answer:
    """``GET /``: the page (``index``, or a line saying it is not installed); with a token set, ``?token=T`` signs
    the page in: the right token gets the page's cookie and a redirect to the same page without the token in its
    URL (other query parameters kept), so that it stays out of the history and of referrers; a wrong one gets 401
    and no cookie. ``query``: the request's query parameters, repeated names included; ``secure``: over TLS."""
    query = list(query)
    given = [value for name, value in query if name == "token"]
    if token and given:
        if not token_matches(given[0], token):
            return json_answer(401, {"error": "wrong token in ?token="}, {"Cache-Control": "no-store"})
        rest = [(name, value) for name, value in query if name != "token"]
        cookie = SimpleCookie()
        cookie[TOKEN_COOKIE] = cookie_value(token)
        cookie[TOKEN_COOKIE].update({"path": "/", "httponly": True, "samesite": "Strict", "secure": secure})
        # Relative: the page may be mounted under a path prefix by a reverse proxy.
        return Answer(303, headers={"Location": "./" + ("?" + urlencode(rest) if rest else ""),
                                    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                    "Set-Cookie": cookie[TOKEN_COOKIE].OutputString()})
    if index is not None and index.is_file():
        return Answer(200, file=index)
    return Answer(200, NO_PAGE.encode("utf-8"), {"Content-Type": TEXT})
