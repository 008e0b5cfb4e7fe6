"""Who may use the server: the access token and the ``Origin`` allow-list.

The token is compared as bytes in constant time, whatever the client sent: a header that is not UTF-8
(aiohttp keeps its bytes as surrogate escapes) is simply a wrong token, never a server error.

The ``Origin`` check stops a web page on another site from driving the server through the visitor's
browser (WebSocket upgrades and POSTs are not covered by the browser's same-origin policy). Only
requests that carry an ``Origin`` header are checked: browsers always send one on these requests,
non-browser clients (Twilio, SDKs, scripts) do not. Allowed: the server's own origin (the ``Host`` the
request was sent to), any port of ``localhost`` / ``127.0.0.1`` / ``[::1]``, and the ``--allowed-origins``
list (``*`` allows every origin).

The web page's cookie: a browser cannot put a header on a WebSocket, and a page it did not write (the
reference web client) never adds ``?token=``. Opening ``/?token=T`` once sets the cookie
``personaplex_token`` (``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` over TLS) and redirects
to the page without the token in its URL; the page's WebSocket and API calls then carry the cookie. It
holds an HMAC of the token, not the token, so it is no API key for the other routes. A request that only
the cookie authenticates must come from the server's own origin or one listed in ``--allowed-origins``
(``allows_cookie``): ``SameSite`` keeps the cookie from other sites, but a page of another port on the same
machine, or of another subdomain, is the same "site" to a browser and would send it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "personaplex_token"
_COOKIE_LABEL = b"personaplex web page cookie v1"


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


def cookie_value(token: str) -> str:
    """What the page's cookie holds for ``token``: hex HMAC-SHA256 keyed with the token (cookie-safe
    characters whatever the token holds; the token itself never sits in the browser's cookie jar)."""
    return hmac.new(token.encode("utf-8"), _COOKIE_LABEL, hashlib.sha256).hexdigest()


def cookie_matches(given: str | None, token: str) -> bool:
    """Whether a request's ``personaplex_token`` cookie belongs to ``token`` (constant time); never raises."""
    return given is not None and token_matches(given, cookie_value(token))


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
        parts = _web_origin(origin)
        if parts is None:
            return False
        if parts.hostname in LOCAL_HOSTS:
            return True
        return host is not None and parts.netloc == host.strip().lower()

    def allows_cookie(self, origin: str | None, host: str | None) -> bool:
        """Whether a request that only the page's cookie authenticates may proceed: one without ``Origin``
        (not a browser page), or from the server's own origin or an origin listed by name. Neither ``*``
        nor the any-port ``localhost`` rule counts here: those pages may be the same site as the server,
        whose requests carry a ``SameSite=Strict`` cookie."""
        if origin is None:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed:
            return True
        parts = _web_origin(origin)
        return parts is not None and host is not None and parts.netloc == host.strip().lower()


def _web_origin(origin: str):
    """The parts of an http(s) origin; None for "null" (sandboxed frames, file://), other schemes and junk."""
    try:
        parts = urlsplit(origin)
        hostname = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not hostname:
        return None
    return parts
