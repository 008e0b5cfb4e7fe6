"""A limit on new connections per remote address: one token bucket per address, checked right after
``accept()``, before any TLS or HTTP work.

A client that reconnects in a loop costs the event loop an HTTP parse and a WebSocket upgrade per
connection, however little each connection then gets; the busy loop holds the GIL and the engine's
ticks slip, so every caller hears it. Each address may open ``burst`` connections at once and then
``rate`` per second; past that its new connections are reset at once (``listener.py``).

The table of buckets stays small whatever the clients do: a bucket untouched for ``burst / rate``
seconds has refilled, which is the same as having no bucket, so it is forgotten (the table is kept in
order of last use, so the forgotten ones are always at its front); and past ``max_addresses`` the least
recently used bucket is forgotten for a new one.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Callable

# Addresses remembered at most (about 250 bytes each: 4 MB in all); only as many as connect within
# burst / rate seconds are ever kept, so the cap matters only when a great many addresses connect at once.
MAX_ADDRESSES = 16384
# IPv6 addresses are keyed by their /64 network: one host (a home line, a cloud VM) is usually handed a
# whole /64 and may pick any of its 2**64 addresses for each connection (privacy addresses), so a limit
# per full address would limit nothing. Hosts that share a /64 share a budget, as hosts behind one IPv4
# NAT share theirs. (A multiple of 8: the key keeps whole bytes.)
IPV6_PREFIX = 64
_IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d


def address_key(address) -> str:
    """The bucket key of a peer address as ``accept()`` returns it: ``(host, port[, flow, scope])``.

    IPv4 (and IPv4-mapped IPv6, ``::ffff:a.b.c.d``, as a dual-stack socket reports IPv4 peers) -> the
    dotted IPv4 address; other IPv6 -> its /64 network (``2001:db8:1:2::/64``); anything else (a Unix
    socket) -> the address as given. Socket calls, not ``ipaddress``: this runs for every connection."""
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return str(host)
    if ":" not in host:
        return host  # accept() reports IPv4 in its one canonical spelling
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])  # a link-local scope is no part of it
    except OSError:
        return host
    if packed[:12] == _IPV4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    prefix_bytes = IPV6_PREFIX // 8
    return socket.inet_ntop(socket.AF_INET6, packed[:prefix_bytes] + bytes(16 - prefix_bytes)) + f"/{IPV6_PREFIX}"


class NewConnectionLimit:
    """Token buckets per remote address: ``burst`` connections at once, then ``rate`` per second.

    ``rate`` 0 turns the limit off. ``clock``: seconds, monotonic (tests drive it)."""

    def __init__(self, rate: float, burst: int, max_addresses: int = MAX_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic):
        if rate < 0 or burst < 1 or max_addresses < 1:
            raise ValueError("rate must be >= 0, burst and max_addresses >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_addresses = max_addresses
        self._clock = clock
        # key -> (tokens left, when they were counted); in order of last use, oldest first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, address) -> bool:
        """Whether a new connection from ``address`` (as ``accept()`` returns it) may be served; takes a token."""
        if not self.enabled:
            return True
        now = self._clock()
        self._forget_refilled(now)
        key = address_key(address)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            tokens = self.burst
            while len(self._buckets) >= self.max_addresses:
                self._buckets.popitem(last=False)  # the least recently used address starts afresh
        else:
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused += 1
        self._buckets[key] = (tokens, now)  # to the end: the most recently used
        return allowed

    def _forget_refilled(self, now: float) -> None:
        """Drop the buckets untouched for long enough to be full again: they hold nothing a new one would not."""
        refill_seconds = self.burst / self.rate
        while self._buckets:
            key, (_, last) = next(iter(self._buckets.items()))
            if now - last < refill_seconds:
                return
            del self._buckets[key]
