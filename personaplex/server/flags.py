"""The flags of ``personaplex serve`` and the settings read from them, outside the command itself.

``personaplex serve`` (``serve.py``) and ``personaplex scale serve`` (``scaleout/cli.py``) take the same flags,
and every scale-out replica reads its defaults from this parser (``scaleout/deployment.py``), so the parser lives
here, below the commands. The command builds on it; nothing here loads a model or imports aiohttp.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from ..app.flags import CONTEXT_POLICY_CHOICES, add_model_arguments
from ..errors import PersonaplexError
from .limits import add_limit_arguments

# The built-in web page (the same folder as app.DEFAULT_STATIC).
DEFAULT_STATIC = Path(__file__).parent / "static"


class ServerError(PersonaplexError):
    """The server cannot start with these settings."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of ``personaplex serve``, added to ``parser`` (a new one named ``personaplex serve`` when None)."""
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


def default_opus_workers() -> int:
    """A quarter of the CPUs, 1 to 8: one worker encodes ~60 callers on a core; the rest is for the loop."""
    return max(1, min(8, (os.cpu_count() or 4) // 4))


def static_folder(value: str | None) -> Path | None:
    """The page folder of ``--static``: the built-in page for None, no page for 'none'; raises ``ServerError``."""
    if value is None:
        return DEFAULT_STATIC
    if value.lower() == "none":
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ServerError(f"--static folder not found: {path} (give a folder, or 'none' to serve no page)")
    return path


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
