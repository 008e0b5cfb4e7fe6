"""The server's connection limits: what each flag bounds, its safe default, and how it is parsed.

| flag | default | bounds |
| --- | --- | --- |
| ``--request-timeout`` | 15 s | a connection with no complete request (fresh, half-sent headers, idle keep-alive) and the body of an upload |
| ``--idle-timeout`` | 30 s | a WebSocket before its conversation starts: a Realtime session with no event, a Twilio stream without an authenticated ``start`` (counted from the upgrade) |
| ``--max-connections`` | the descriptors left free at start less a reserve, at most 4096 | open connections; at the limit the oldest idle or unauthenticated one is dropped, else the new one |
| ``--max-new-connections-per-address`` | 20 per second | new connections from one remote address (IPv6: one /64), after a burst; more are reset at once, before any HTTP work |
| ``--new-connection-burst`` | 256 | new connections one address may open at once (``personaplex loadtest -n 150`` from one host fits) |
| ``--input-burst`` | 3 s | user audio a client may send ahead of real time (then it is ended) |
| ``--max-messages-per-second`` | 200 | messages a client may send per second, with the same burst |
| ``--allowed-origins`` | same origin and localhost | browser origins that may open WebSockets and POST |

A client that does not read the agent's audio is ended after ``max_output_frames`` (2 s) whatever its
kernel buffers hold: the server pings every WebSocket and resets the connection of one that does not
answer within that time (a pong travels behind the audio still unread).
"""

from __future__ import annotations

import argparse
import resource
from dataclasses import dataclass

from ..frontends.security import OriginPolicy

# Descriptors kept free beyond those open at start and the connections' own (the cap counts every
# accepted socket until it is closed: listener.py): uploads, voice files, workers' pipes, logs, and the
# one of a connection accepted only to be refused.
FD_RESERVE = 128
MAX_DEFAULT_CONNECTIONS = 4096
# New connections per remote address: far above what one host's real callers open (a call is one connection
# for minutes; a load test from one host opens its N at once), far below a client reconnecting in a loop
# (hundreds per second). Behind a reverse proxy every connection comes from the proxy: raise it or use 0.
NEW_CONNECTIONS_PER_ADDRESS = 20.0
NEW_CONNECTION_BURST = 256


@dataclass(frozen=True)
class ServerLimits:
    request_timeout: float = 15.0
    idle_timeout: float = 30.0
    max_connections: int | None = None  # None: from the file descriptor limit (default_max_connections)
    new_connections_per_address: float = NEW_CONNECTIONS_PER_ADDRESS  # per second after the burst; 0: no limit
    new_connection_burst: int = NEW_CONNECTION_BURST
    allowed_origins: OriginPolicy = OriginPolicy()
    ping_interval: float = 0.5  # seconds between the pings that measure how far behind a client reads


def default_max_connections() -> int:
    """Connections that fit this process's file descriptor limit (raised to the hard limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
            soft = max(soft, wanted)
        except (ValueError, OSError):
            pass
    return max(16, min(MAX_DEFAULT_CONNECTIONS, soft - _open_descriptors() - FD_RESERVE))


def _open_descriptors() -> int:
    """Descriptors this process holds now (libraries, model files, the event loop...)."""
    import os

    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 128  # cannot tell: assume a typical count


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection limits (see the README's Security section)")
    group.add_argument("--request-timeout", type=float, default=15.0,
                       help="seconds a connection may take to send a complete request (and an upload's body), "
                            "and may stay idle between requests (default 15)")
    group.add_argument("--idle-timeout", type=float, default=30.0,
                       help="seconds a WebSocket may stay silent before its conversation starts: a Realtime session "
                            "sending no event, a Twilio stream without an authenticated 'start' (default 30)")
    group.add_argument("--max-connections", type=int, default=None,
                       help="open connections at most; at the limit the oldest idle or unauthenticated one is "
                            "dropped (default: the file descriptors left free at start less 128, at most 4096)")
    group.add_argument("--max-new-connections-per-address", type=float, default=NEW_CONNECTIONS_PER_ADDRESS,
                       metavar="PER_SECOND",
                       help="new connections one remote address (an IPv6 /64) may open per second after a burst; "
                            "more are reset at once, before any HTTP work (default %(default)g; 0: no limit). Behind "
                            "a reverse proxy every connection comes from the proxy's address: raise it or use 0")
    group.add_argument("--new-connection-burst", type=int, default=NEW_CONNECTION_BURST, metavar="N",
                       help="new connections one address may open at once before the per-second limit applies "
                            "(default %(default)d)")
    group.add_argument("--input-burst", type=float, default=3.0, dest="input_burst_seconds",
                       help="seconds of audio a client may send ahead of real time; a client further ahead is "
                            "ended (default 3)")
    group.add_argument("--max-messages-per-second", type=float, default=200.0,
                       help="messages a client may send per second (with the same burst); more end it (default 200)")
    group.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                       help="comma-separated browser origins (https://app.example.com) allowed to open WebSockets "
                            "and POST, besides the server's own origin and localhost; '*': any (default: none)")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """``ServerLimits`` from the flags; raises ``ValueError`` with the flag's name when one is out of range."""
    if args.request_timeout <= 0 or args.idle_timeout <= 0:
        raise ValueError("--request-timeout and --idle-timeout must be positive")
    if args.max_connections is not None and args.max_connections < 2:
        raise ValueError("--max-connections must be at least 2")
    if args.max_new_connections_per_address < 0:
        raise ValueError("--max-new-connections-per-address must be 0 (no limit) or more")
    if args.new_connection_burst < 1:
        raise ValueError("--new-connection-burst must be at least 1")
    return ServerLimits(request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                        max_connections=args.max_connections,
                        new_connections_per_address=args.max_new_connections_per_address,
                        new_connection_burst=args.new_connection_burst,
                        allowed_origins=OriginPolicy.parse(args.allowed_origins))
