"""The client side of the ``/api/chat`` protocol (``frontends/chat_protocol.py``): one conversation streamed
as real Ogg/Opus, shared by ``personaplex client`` and ``personaplex loadtest``.

``run_exchange`` connects, waits for the handshake, then sends one 80 ms frame per ``0x01`` message
(one Ogg page each, 48 kHz granule positions, an end-of-stream page at the end) while decoding
everything the server sends back. Pacing:

- real time (the default): frame k leaves at handshake + k x 80 ms, on a drift-free schedule;
- ``realtime=False``: no local clock; frames go out as fast as the server takes them, which is a few
  frames ahead of the agent's replies (the server answers one frame per 80 ms tick and drops user
  audio that runs further ahead, so sending everything at once would lose most of it).

Timing figures, as a listener hears the reply:

- ``late_frames``: agent frames that arrived after a listener with an 80 ms playback buffer needed
  them (an audible gap); after each, the listener's clock restarts from the late frame, as a real
  player re-buffers;
- ``latencies``: arrival of the agent's k-th frame minus the moment the k-th user frame was sent (the
  server answers frame for frame, so this is the end-to-end delay of the exchange).

Agent frame k answers user frame k: the reply's frame index is its place on the input's timeline.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from .config import FRAME_SIZE, SAMPLE_RATE
from .errors import PersonaplexError
from .ogg import OpusPageWriter

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE
FRAMES_AHEAD = 2  # without a clock: user frames sent beyond the agent's replies (the server's buffer target)

KIND_HANDSHAKE = 0x00
KIND_AUDIO = 0x01
KIND_TEXT = 0x02
KIND_METADATA = 0x04
KIND_ERROR = 0x05


class ChatClientError(PersonaplexError):
    """The client cannot talk to the server with these settings."""


def chat_url(url: str, defaults: Mapping[str, str | None], token: str | None = None) -> str:
    """``url`` with the ``defaults`` query parameters it does not set itself (None: left out) and the token."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ChatClientError(f"--url must start with ws:// or wss://, got {url!r}")
    query = dict(parse_qsl(parts.query))
    for name, value in defaults.items():
        if value is not None:
            query.setdefault(name, value)
    if token:
        query["token"] = token
    return urlunsplit(parts._replace(query=urlencode(query)))


def client_ssl_context(url: str, insecure: bool) -> ssl.SSLContext | None:
    """None (default verification), or for ``wss://`` with ``insecure`` a context that accepts any
    certificate (a server's self-signed one)."""
    if not (url.startswith("wss://") and insecure):
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def describe_connection_error(error: BaseException, url: str) -> str:
    """One line saying why the connection failed and what to do about it."""
    import aiohttp

    where = urlunsplit(urlsplit(url)._replace(query=""))  # never print the token
    if isinstance(error, aiohttp.WSServerHandshakeError):
        if error.status == 401:
            given = "token" in dict(parse_qsl(urlsplit(url).query))
            return (f"the server refused the {'token' if given else 'connection'} (HTTP 401, missing or wrong "
                    f"token): pass the server's --auth-token value with --token")
        return f"the server refused the WebSocket at {where} (HTTP {error.status}): is it a personaplex /api/chat URL?"
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return (f"the certificate of {where} is not trusted ({error.certificate_error}); "
                "for a server's self-signed certificate pass --insecure")
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect to {where} ({error.os_error.strerror or error}): is 'personaplex serve' running there?"
    if isinstance(error, asyncio.TimeoutError):
        return f"no answer from {where} in time"
    return f"{type(error).__name__}: {error}"


DEFAULT_URL = "ws://localhost:8998/api/chat"  # what 'personaplex serve' listens on by default
DEFAULT_MAX_MISSING_PERCENT = 1.0
DEFAULT_MAX_LATE_PERCENT = 5.0


def add_delivery_arguments(parser) -> None:
    """--max-missing / --max-late: how much of the agent's audio may go missing or arrive late before the
    command fails (exit status 2), for the client and the load test alike."""
    group = parser.add_argument_group("pass/fail")
    group.add_argument("--max-missing", type=float, default=DEFAULT_MAX_MISSING_PERCENT, metavar="PERCENT",
                       help="fail when more than this share of the frames sent got no agent frame back "
                            f"(default {DEFAULT_MAX_MISSING_PERCENT:g}%%; 100: never)")
    group.add_argument("--max-late", type=float, default=DEFAULT_MAX_LATE_PERCENT, metavar="PERCENT",
                       help="fail when more than this share of the agent's frames came too late for an 80 ms "
                            f"playback buffer (an audible gap; default {DEFAULT_MAX_LATE_PERCENT:g}%%; 100: never)")


@dataclass
class Delivery:
    """How much of the agent's audio came back, and in time, for the frames sent."""

    sent: int
    missing: int
    late: int

    def percent(self, count: int) -> float:
        return 100.0 * count / self.sent if self.sent else 0.0

    def describe(self) -> str | None:
        """One sentence on missing and late frames, or None when every frame came back in time."""
        problems = []
        if self.missing:
            problems.append(f"{self.missing} of {self.sent} frames ({self.percent(self.missing):.1f}%) got no reply")
        if self.late:
            problems.append(f"{self.late} ({self.percent(self.late):.1f}%) came too late for an 80 ms playback buffer")
        if not problems:
            return None
        return "; ".join(problems) + ": the reply has gaps (the server fell behind real time or audio was lost)"

    def failure(self, max_missing_percent: float, max_late_percent: float) -> str | None:
        """Why this delivery fails the limits (percent of the frames sent), or None when it passes."""
        broken = []
        if self.percent(self.missing) > max_missing_percent:
            broken.append(f"missing {self.percent(self.missing):.1f}% > --max-missing {max_missing_percent:g}%")
        if self.percent(self.late) > max_late_percent:
            broken.append(f"late {self.percent(self.late):.1f}% > --max-late {max_late_percent:g}%")
        return ", ".join(broken) or None

    def warn_and_judge(self, args, scope: str = "") -> str | None:
        """Print the warning line (stderr) when frames were missing or late; return why the delivery fails the
        command's ``--max-missing``/``--max-late``, or None."""
        problem = self.describe()
        if problem is not None:
            print(f"warning: {scope}{problem}", file=sys.stderr, flush=True)
        return self.failure(args.max_missing, args.max_late)


@dataclass
class ClientReport:
    """What one caller of the load test measured (``personaplex loadtest``, over either protocol)."""

    index: int
    join_seconds: float | None = None
    sent_frames: int = 0
    received_samples: int = 0
    text_pieces: int = 0
    late_frames: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def frames(self) -> int:
        return self.received_samples // FRAME_SIZE

    @property
    def missing(self) -> int:
        return max(0, self.sent_frames - self.frames)

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None


@dataclass
class TextPiece:
    frame: int  # the agent frame this piece came with: its place on the conversation's timeline
    text: str

    @property
    def seconds(self) -> float:
        return round(self.frame * FRAME_SECONDS, 2)


@dataclass
class Exchange:
    """Everything one conversation sent back, and how it arrived."""

    join_seconds: float | None = None  # connect -> handshake (queueing and persona prefill)
    sent_frames: int = 0
    received_samples: int = 0
    reply: list[np.ndarray] = field(default_factory=list)  # decoded agent audio, 24 kHz (only when kept)
    text: list[TextPiece] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the latest 0x04 message
    late_frames: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str | None = None  # a 0x05 message, an unexpected close or a connection failure
    error_from_server: bool = False  # ``error`` is the server's own 0x05 text
    close_code: int | None = None
    send_times: list[float] = field(default_factory=list)
    _anchor: float | None = None  # when the listener's playback clock says frame 0 arrived

    @property
    def frames(self) -> int:
        return self.received_samples // FRAME_SIZE

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None

    def take_audio(self, pcm: np.ndarray, now: float, keep: bool) -> None:
        before = self.frames
        self.received_samples += len(pcm)
        if keep and len(pcm):
            self.reply.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        for k in range(before, self.frames):
            # A frame later than an 80 ms playback buffer allows is a gap; the player then re-buffers.
            if self._anchor is None:
                self._anchor = now - k * FRAME_SECONDS
            if now > self._anchor + (k + 1) * FRAME_SECONDS:
                self.late_frames += 1
                self._anchor = now - k * FRAME_SECONDS
            if k < len(self.send_times):
                self.latencies.append(now - self.send_times[k])

    def reply_audio(self) -> np.ndarray:
        """The kept agent audio [T], 24 kHz, frame 0 at sample 0."""
        return np.concatenate(self.reply) if self.reply else np.zeros(0, dtype=np.float32)


async def run_exchange(url: str, frames: Iterable[np.ndarray], *, ssl_context: ssl.SSLContext | None = None,
                       realtime: bool = True, tail_seconds: float = 1.0, keep_reply: bool = False,
                       on_frames: Callable[[Exchange], None] | None = None) -> Exchange:
    """One conversation: send ``frames`` (float32 [1920] each, 24 kHz) after the handshake, collect the reply.

    After the last frame the client waits until every sent frame is answered (at most ``tail_seconds``),
    then hangs up. ``on_frames`` is called whenever agent audio arrived. Never raises for what the server
    or the network does: failures are in ``error``."""
    import aiohttp
    import sphn

    exchange = Exchange()
    started = time.monotonic()
    reader = sphn.OpusStreamReader(SAMPLE_RATE)
    writer = OpusPageWriter(SAMPLE_RATE)
    answered = asyncio.Event()  # set whenever agent audio arrives

    async def wait_for_answers(count: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while exchange.frames < count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            answered.clear()
            try:
                await asyncio.wait_for(answered.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def send(ws) -> None:
        try:
            begin = time.monotonic()
            for k, frame in enumerate(frames):
                if realtime:
                    await asyncio.sleep(max(0.0, begin + k * FRAME_SECONDS - time.monotonic()))
                else:
                    await wait_for_answers(k - FRAMES_AHEAD, None)
                pages = writer.append(frame)
                exchange.send_times.append(time.monotonic())
                exchange.sent_frames += 1
                for page in pages:
                    await ws.send_bytes(bytes([KIND_AUDIO]) + page)
            end = writer.finish()
            if end is not None:
                await ws.send_bytes(bytes([KIND_AUDIO]) + end)
            await wait_for_answers(exchange.sent_frames, tail_seconds)
        finally:  # done, failed or cancelled: hang up (which also ends the reading loop)
            await ws.close()

    verify = ssl_context or True  # True: the default certificate checks
    sender: asyncio.Task | None = None
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(url, ssl=verify, max_msg_size=0) as ws:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                    continue
                kind, payload = message.data[0], message.data[1:]
                now = time.monotonic()
                if kind == KIND_HANDSHAKE and sender is None:
                    exchange.join_seconds = now - started
                    sender = asyncio.create_task(send(ws))
                elif kind == KIND_AUDIO:
                    exchange.take_audio(reader.append_bytes(payload), now, keep_reply)
                    answered.set()
                    if on_frames is not None:
                        on_frames(exchange)
                elif kind == KIND_TEXT:
                    exchange.text.append(TextPiece(max(0, -(-exchange.received_samples // FRAME_SIZE) - 1),
                                                   payload.decode("utf-8", "replace")))
                elif kind == KIND_METADATA:
                    try:
                        exchange.metadata = json.loads(payload)
                    except ValueError:
                        pass  # metadata is informative only
                elif kind == KIND_ERROR:
                    exchange.error = payload.decode("utf-8", "replace")
                    exchange.error_from_server = True
            exchange.close_code = ws.close_code
            if sender is not None:
                if not sender.done():  # the server hung up first: stop sending
                    sender.cancel()
                (outcome,) = await asyncio.gather(sender, return_exceptions=True)
                if isinstance(outcome, Exception) and exchange.error is None:
                    exchange.error = f"sending failed: {describe_connection_error(outcome, url)}"
            if exchange.error is None:
                if sender is None:
                    exchange.error = f"closed before the handshake (code {ws.close_code})"
                elif ws.close_code not in (None, 1000):
                    exchange.error = f"the server closed the connection (code {ws.close_code})"
    except Exception as exc:  # noqa: BLE001 - a failed connection is a result, not a crash
        exchange.error = exchange.error or describe_connection_error(exc, url)
        if sender is not None and not sender.done():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return exchange
