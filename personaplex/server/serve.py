"""``personaplex serve`` (also ``python -m personaplex.server``): the real-time server.

Flags follow the reference server (``--host --port --static --ssl --hf-repo --moshi-weight --mimi-weight
--tokenizer --voice-prompt-dir --device --cpu-offload``) plus the model presets of the offline tool and
the limits of live serving. SIGINT/SIGTERM shut down gracefully: stop accepting, end every conversation
with a reason (``0x05``), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import startup
from ..app.console import run_command
from ..app.flags import CONTEXT_POLICY_CHOICES, add_model_arguments
from ..errors import PersonaplexError
from .limits import ServerLimits, add_limit_arguments, default_max_connections, limits_from_args

# The built-in web page (the same folder as app.DEFAULT_STATIC). The server's modules (aiohttp, the engine,
# torch) are imported only when it starts, so that --help and argument errors answer at once.
DEFAULT_STATIC = Path(__file__).parent / "static"

log = logging.getLogger("personaplex.server")
SHUTDOWN_GRACE_SECONDS = 5.0


class ServerError(PersonaplexError):
    """The server cannot start with these settings."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="personaplex serve")
    parser.description = (
        "Serve live full-duplex conversations over WebSocket (/api/chat, compatible with the reference web "
        "client) and the web page, many conversations at once on one batched engine."
    )
    parser.epilog = "example: personaplex serve --model demo --port 8998   (then open http://localhost:8998)"
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="localhost",
                     help="address to bind (default localhost; 0.0.0.0 or :: for every interface)")
    net.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 picks a free one)")
    net.add_argument("--static", default=None,
                     help="folder of the web page to serve at / (default: the built-in page; 'none': no page)")
    net.add_argument("--ssl", type=Path, default=None, metavar="DIR",
                     help="serve HTTPS with DIR/cert.pem and DIR/key.pem, generating a self-signed certificate "
                          "there if they are absent (browsers need https for the microphone off localhost)")
    net.add_argument("--auth-token", default=os.environ.get("PERSONAPLEX_AUTH_TOKEN"),
                     help="require this token on /api/* (header 'Authorization: Bearer T' or ?token=T); "
                          "default: $PERSONAPLEX_AUTH_TOKEN, unset = no auth")
    net.add_argument("--front-end-processes", type=int, default=1, metavar="N",
                     help="processes that serve the connections (WebSocket, Opus, Realtime, Twilio) on the one port, "
                          "exchanging audio with the engine, which runs in this process, through shared memory "
                          "(default 1: one process does everything). Use N > 1 when one process's CPU limits the "
                          "callers before the GPU does (many tens of callers on a big GPU); as a start one per 32 "
                          "callers, at most the CPU cores left, then measure (bench/server_capacity.py). A "
                          "front-end process that fails ends only its own calls and is restarted; the connection "
                          "limits are divided over the processes")
    limits = parser.add_argument_group("conversations")
    limits.add_argument("--max-conversations", type=int, default=None,
                        help="conversations served at once (engine slots; default: what fits the GPU, at most 64; "
                             "4 on a CPU)")
    limits.add_argument("--max-queue", type=int, default=16,
                        help="callers that may wait for a free slot (default 16); more are refused")
    limits.add_argument("--max-conversation-seconds", type=float, default=None,
                        help="end conversations after this long (default: no limit; past the model's context the "
                             "conversation goes on under its --context-policy)")
    limits.add_argument("--context-policy", choices=CONTEXT_POLICY_CHOICES, default="sliding",
                        help="what a conversation longer than the model's context (4 min for PersonaPlex-7B) keeps, "
                             "for conversations that do not choose: 'sliding' (default, as the reference) forgets "
                             "the oldest frames, the persona's system prompt first; 'pin-persona' keeps the system "
                             "prompt and slides over the conversation after it")
    limits.add_argument("--input-timeout", type=float, default=10.0, dest="input_timeout_seconds",
                        help="end a conversation whose client sent no audio for this many seconds (default 10; "
                             "0: never)")
    limits.add_argument("--kv-dtype", choices=["model", "fp8"], default="model",
                        help="KV cache precision: 'fp8' holds about twice the conversations per GPU (default: "
                             "the model's dtype)")
    limits.add_argument("--opus-workers", type=int, default=default_opus_workers(),
                        help="processes that Opus-encode the agent's audio, so that the event loop keeps up with "
                             f"many callers (default {default_opus_workers()}: a quarter of this machine's CPUs, "
                             "1 to 8; 0: encode in the server process)")
    voices = parser.add_argument_group("voices and personas (limits on work that clients can cause)")
    voices.add_argument("--allow-voice-upload", action="store_true",
                        help="let clients upload a voice sample (POST /api/voices) to use as the agent's voice")
    voices.add_argument("--max-voice-upload-bytes", type=int, default=10 << 20,
                        help="largest uploaded voice file in bytes (default 10 MiB); larger uploads get 413")
    voices.add_argument("--max-voice-uploads", type=int, default=32,
                        help="uploaded voices kept (default 32); past it the least recently used is forgotten")
    voices.add_argument("--max-voice-upload-total-bytes", type=int, default=128 << 20,
                        help="bytes of all uploaded voices kept together (default 128 MiB); past it the least "
                             "recently used are forgotten")
    voices.add_argument("--max-voice-seconds", type=float, default=30.0,
                        help="longest voice audio decoded, uploads and preset audio files alike (default 30); "
                             "decoding stops there, whatever the file's header claims, and the voice is refused")
    voices.add_argument("--persona-build-workers", type=int, default=1,
                        help="threads that build personas (voice decoding and encoding, at a low CPU priority; "
                             "default 1)")
    voices.add_argument("--max-persona-builds-waiting", type=int, default=8,
                        help="persona builds that may wait for a worker (default 8); callers past that are "
                             "refused at once as busy")
    voices.add_argument("--max-persona-changes", type=int, default=8,
                        help="persona changes (session.update with new instructions or voice) per /v1/realtime "
                             "connection (default 8); more get an error event")
    add_limit_arguments(parser)
    phone = parser.add_argument_group("phone calls (Twilio Media Streams at /twilio/media-stream)")
    phone.add_argument("--phone-personas", type=Path, default=None, metavar="FILE",
                       help="JSON file mapping called numbers and persona names to personas (see the README)")
    add_model_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> None:
    from ..serving.hub import ConversationHub

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    phone_personas = None
    if getattr(args, "phone_personas", None) is not None:  # checked before loading weights, too
        from ..frontends.twilio import PhonePersonas

        phone_personas = PhonePersonas.load(args.phone_personas)
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


def default_opus_workers() -> int:
    """A quarter of the CPUs, 1 to 8: one worker encodes ~60 callers on a core; the rest is for the loop."""
    return max(1, min(8, (os.cpu_count() or 4) // 4))


def static_folder(value: str | None) -> Path | None:
    if value is None:
        return DEFAULT_STATIC
    if value.lower() == "none":
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ServerError(f"--static folder not found: {path} (give a folder, or 'none' to serve no page)")
    return path


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
    info = hub.describe()
    startup.report("ready to serve, since the process started", startup.seconds_since_process_start())
    print(f"personaplex server ready: model {info['model']}, {info['slots']} conversation slots, "
          f"queue {info['max_queue']}", flush=True)
    print(f"Access the Web UI directly at {server.url}", flush=True)
    await stop.wait()
    print("shutting down: ending conversations", flush=True)
    await stop_server(server, hub)
    print("stopped", flush=True)


def access_host(host: str) -> str:
    """The host part of a URL that reaches a server bound to ``host``, computed without network traffic."""
    from .tls import lan_address

    if host in ("", "0.0.0.0", "::"):
        host = lan_address() or "localhost"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
