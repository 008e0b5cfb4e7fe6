"""``personaplex serve`` (also ``python -m personaplex.server``): the real-time server.

Flags follow the reference server (``--host --port --static --ssl --hf-repo --moshi-weight --mimi-weight
--tokenizer --voice-prompt-dir --device --cpu-offload``) plus the model presets of the offline tool and
the limits of live serving. SIGINT/SIGTERM shut down gracefully: stop accepting, end every conversation
with a reason (``0x05``), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ..app.console import announce_ready, log_to_stderr, run_command
# The flags live in flags.py (``personaplex scale serve`` takes them too). The server's modules (aiohttp, the
# engine, torch) are imported only when it starts, so that --help and argument errors answer at once.
from .flags import DEFAULT_STATIC, ServerError, access_host, build_parser, static_folder
from .limits import ServerLimits, default_max_connections, limits_from_args

log = logging.getLogger("personaplex.server")
SHUTDOWN_GRACE_SECONDS = 5.0


def run(args: argparse.Namespace) -> None:
    from ..serving.hub import ConversationHub

    log_to_stderr()
    static_dir = static_folder(args.static)
    if args.opus_workers < 0:  # like every setting, checked before gigabytes of weights load
        raise ServerError("--opus-workers must be 0 or more (0: encode in the server process)")
    try:
        limits = limits_from_args(args)
    except ValueError as exc:
        raise ServerError(str(exc)) from None
    ssl_context = None
    if args.ssl is not None:  # before loading gigabytes of weights: bad settings fail fast
        from .tls import tls_context

        ssl_context, generated = tls_context(args.ssl)
        if generated:
            log.info("generated a self-signed certificate in %s (browsers will ask to accept it once)", args.ssl)
    from ..frontends.twilio import PhonePersonas

    phone_personas = PhonePersonas.given(getattr(args, "phone_personas", None))  # checked before loading weights, too
    front_ends = getattr(args, "front_end_processes", 1)
    if front_ends < 1:
        raise ServerError("--front-end-processes must be at least 1")
    if front_ends > 1:  # the engine here, the connections in other processes (front_end_processes.py)
        from .front_end_processes import run_with_front_ends

        scheme = "https" if ssl_context is not None else "http"
        return run_with_front_ends(args, url_for=lambda port: f"{scheme}://{access_host(args.host)}:{port}")
    hub = ConversationHub.from_args(args)
    if hub.model.untrained:
        log.info("note: the demo model has random, untrained weights: it babbles")
    asyncio.run(serve(hub, host=args.host, port=args.port, static_dir=static_dir, ssl_context=ssl_context,
                      auth_token=args.auth_token, phone_personas=phone_personas, opus_workers=args.opus_workers,
                      limits=limits))


@dataclass
class RunningServer:
    runner: object
    site: object
    port: int
    url: str
    encoders: object | None = None  # an opus_pool.OpusEncoderPool
    guard: object | None = None  # a connections.ConnectionGuard


async def start_server(hub, *, host: str = "localhost", port: int = 0, static_dir: Path | None = DEFAULT_STATIC,
                       ssl_context=None, auth_token: str | None = None,
                       send_buffer_bytes: int | None = 64 << 10, phone_personas=None,
                       opus_workers: int = 0, limits: ServerLimits | None = None,
                       sockets: list | None = None) -> RunningServer:
    """Start the hub and listen; returns where. ``host`` is really bound (every interface only for
    0.0.0.0 / ::). ``opus_workers``: processes that encode the agent's audio (0: this process does).
    ``limits``: timeouts, connection cap, new connections per address, Origin allow-list (``limits.py``;
    default: the flags' defaults). ``sockets``: listening sockets shared with other processes (instead of
    binding ``host``:``port``)."""
    from aiohttp import web

    from ..frontends.opus_pool import OpusEncoderPool
    from .address_limit import NewConnectionLimit
    from .app import build_app
    from .connections import ConnectionGuard, quiet_accept_errors
    from .listener import GuardedSite

    limits = limits or ServerLimits()
    quiet_accept_errors(asyncio.get_running_loop())
    await hub.start()
    encoders = None
    if opus_workers:
        encoders = OpusEncoderPool(opus_workers)
        await encoders.start()
    # Counted once everything else is open: the cap leaves descriptors free for what comes later.
    new_connections = None
    if limits.new_connections_per_address > 0:
        new_connections = NewConnectionLimit(limits.new_connections_per_address, limits.new_connection_burst)
    guard = ConnectionGuard(limits.max_connections or default_max_connections(), hub.metrics, new_connections)
    log.info("accepting at most %d connections at once (--max-connections)", guard.max_connections)
    if new_connections is not None:
        log.info("new connections from one address: %g per second after %d at once "
                 "(--max-new-connections-per-address, --new-connection-burst)", new_connections.rate,
                 new_connections.burst)
    app = build_app(hub, static_dir=static_dir, auth_token=auth_token, send_buffer_bytes=send_buffer_bytes,
                    phone_personas=phone_personas, encoders=encoders, limits=limits, guard=guard)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    site = GuardedSite(runner, guard, host=host, port=port, ssl_context=ssl_context, sockets=sockets)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await hub.close()
        if encoders is not None:
            await encoders.close()
        raise ServerError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host")
    bound = site._server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    return RunningServer(runner, site, bound, f"{scheme}://{access_host(host)}:{bound}", encoders, guard)


async def stop_server(server: RunningServer, hub, reason: str = "the server is shutting down") -> None:
    """Graceful stop: no new connections, every conversation ended with ``reason``, handlers finished."""
    from .app import SESSIONS_KEY

    await server.site.stop()
    await hub.close(reason)
    sessions = server.runner.app[SESSIONS_KEY]
    for _ in range(int(SHUTDOWN_GRACE_SECONDS / 0.05)):
        if not sessions:
            break
        await asyncio.sleep(0.05)
    await server.runner.cleanup()
    if server.encoders is not None:
        await server.encoders.close()


async def serve(hub, **options) -> None:
    server = await start_server(hub, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce_ready(hub.describe(), server.url)
    await stop.wait()
    print("shutting down: ending conversations", flush=True)
    await stop_server(server, hub)
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
