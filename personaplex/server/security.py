"""Who may use the server: the access token and the ``Origin`` allow-list.

The token is compared as bytes in constant time, whatever the client sent: a header that is not UTF-8
(aiohttp keeps its bytes as surrogate escapes) is simply a wrong token, never a server error.

The ``Origin`` check stops a web page on another site from driving the server through the visitor's
browser (WebSocket upgrades and POSTs are not covered by the browser's same-origin policy). Only
requests that carry an ``Origin`` header are checked: browsers always send one on these requests,
non-browser clients (Twilio, SDKs, scripts) do not. Allowed: the server's own origin (the ``Host`` the
request was sent to), any port of ``localhost`` / ``127.0.0.1`` / ``[::1]``, and the ``--allowed-origins``
list (``*`` allows every origin).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a client's token with the server's; never raises."""
    given_bytes = (given or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given_bytes, token.encode("utf-8"))


def token_from(query_token: str | None, authorization: str | None) -> str:
    """The token a request carries: ``Authorization: Bearer T`` wins over ``?token=T``."""
    header = authorization or ""
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return query_token or ""


class OriginPolicy:
    """Which browser origins may open WebSockets and POST (``--allowed-origins``)."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.allow_all = False
        self.allowed: set[str] = set()
        for origin in allowed:
            origin = origin.strip().rstrip("/").lower()
            if origin == "*":
                self.allow_all = True
            elif origin:
                self.allowed.add(origin)

    @classmethod
    def parse(cls, value: str | None) -> OriginPolicy:
        """From the flag's value: comma-separated origins (``https://app.example.com``), ``*``, or None."""
        return cls((value or "").split(","))

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with header ``Origin: origin`` sent to ``Host: host`` may proceed."""
        if origin is None or self.allow_all:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed:
            return True
        try:
            parts = urlsplit(origin)
            origin_host = parts.hostname
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not origin_host:
            return False  # "null" (sandboxed frames, file://) and other schemes
        if origin_host in LOCAL_HOSTS:
            return True
        return host is not None and parts.netloc == host.strip().lower()
