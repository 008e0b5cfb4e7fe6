"""``personaplex loadtest``: N concurrent synthetic callers against a running server, at real-time pace.

Each client opens ``/api/chat``, waits for the handshake, then streams real Ogg/Opus (an input wav, or a
synthetic voice-like signal) at exactly real time (one 80 ms frame every 80 ms, on a drift-free
schedule) for ``--duration`` seconds while decoding everything the server sends back. Per client it
reports:

- ``frames``: agent audio frames received (80 ms each, counted from the decoded Opus audio);
- ``missing``: frames expected for the time streamed but not received;
- ``late``: frames that arrived after a listener with an 80 ms playback buffer needed them (an audible
  gap); after each, that listener's clock restarts from the late frame, as a real player re-buffers;
- ``latency p50/p90/p99``: arrival of the agent's k-th frame minus the moment the client sent its
  k-th frame (the server answers frame for frame, so this is the end-to-end delay of the exchange);
- ``join``: seconds from connecting to the handshake (queueing and persona prefill);
- ``error``: a ``0x05`` message or a connection failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .app.console import run_command
from .chat_client import (
    DEFAULT_URL, FRAME_SECONDS, ClientReport, Delivery, add_delivery_arguments, chat_url, client_ssl_context,
    run_exchange,
)
from .config import FRAME_SIZE, SAMPLE_RATE
from .errors import PersonaplexError
from .realtime_client import run_realtime_client


class LoadTestError(PersonaplexError):
    """The load test cannot run with these settings."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="personaplex loadtest")
    parser.description = ("Run N concurrent synthetic callers against a running server, streaming real Ogg/Opus "
                          "at real-time pace, and report received, missing and late frames, latency and errors.")
    parser.epilog = "example: personaplex loadtest --url ws://localhost:8998/api/chat -n 8 --duration 30"
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's /api/chat WebSocket URL (ws:// or wss://), "
                        f"or its /v1/realtime URL to drive the Realtime-style endpoint (default {DEFAULT_URL})")
    parser.add_argument("-n", "--clients", type=int, default=4, help="concurrent callers (default 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each caller streams (default 20)")
    parser.add_argument("--input-wav", type=Path, help="user audio to stream, looped (default: a synthetic voice)")
    parser.add_argument("--text-prompt", default="You enjoy having a good conversation.", help="persona text")
    parser.add_argument("--voice-prompt", default="NATF2", help="voice preset name (default NATF2)")
    parser.add_argument("--token", default=None, help="auth token of the server (sent as ?token=)")
    parser.add_argument("--insecure", action="store_true", help="accept a self-signed certificate (wss://)")
    parser.add_argument("--processes", type=int, default=1,
                        help="spread the clients over this many processes (for many clients: their own Opus "
                             "encoding and decoding must not be the bottleneck; default 1)")
    parser.add_argument("--json", type=Path, help="also write the per-client results as JSON here")
    add_delivery_arguments(parser)
    return parser


def synthetic_voice(seconds: float, seed: int) -> np.ndarray:
    """A voice-like test signal [T] at 24 kHz: a gliding harmonic tone in syllable-like bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = (np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)) > -0.2).astype(np.float32)
    return (0.15 * voice * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def client_url(args: argparse.Namespace, index: int) -> str:
    defaults = {"text_prompt": args.text_prompt, "voice_prompt": args.voice_prompt, "seed": str(index)}
    return chat_url(args.url, defaults, args.token)


async def run_client(index: int, url: str, audio: np.ndarray, duration: float, ssl_context=None) -> ClientReport:
    def looped(k: int) -> np.ndarray:
        start = (k * FRAME_SIZE) % max(1, len(audio) - FRAME_SIZE)
        return audio[start:start + FRAME_SIZE]

    frames = (looped(k) for k in range(int(duration / FRAME_SECONDS)))
    exchange = await run_exchange(url, frames, ssl_context=ssl_context)
    return ClientReport(index, join_seconds=exchange.join_seconds, sent_frames=exchange.sent_frames,
                        received_samples=exchange.received_samples, text_pieces=len(exchange.text),
                        late_frames=exchange.late_frames, latencies=exchange.latencies, error=exchange.error)


async def run_clients(args: argparse.Namespace, indices: list[int] | None = None) -> list[ClientReport]:
    audio = load_input(args)
    ssl_context = client_ssl_context(args.url, args.insecure)
    indices = list(range(args.clients)) if indices is None else indices
    client = run_client
    if urlsplit(args.url).path.rstrip("/").endswith("/v1/realtime"):  # the Realtime-style endpoint
        client = run_realtime_client
    tasks = [client(i, client_url(args, i), audio, args.duration, ssl_context) for i in indices]
    return list(await asyncio.gather(*tasks))


def _run_share(args: argparse.Namespace, indices: list[int]) -> list[ClientReport]:
    return asyncio.run(run_clients(args, indices))


def run_all(args: argparse.Namespace) -> list[ClientReport]:
    """Every client, spread over ``args.processes`` processes so that the callers' own Opus work does not
    slow them down (one process encodes and decodes about 60 real-time streams per core)."""
    processes = max(1, min(getattr(args, "processes", 1) or 1, args.clients))
    if processes == 1:
        return asyncio.run(run_clients(args))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [list(range(args.clients))[k::processes] for k in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_run_share, [args] * processes, shares))
    return sorted((r for share in results for r in share), key=lambda r: r.index)


def load_input(args: argparse.Namespace) -> np.ndarray:
    if args.input_wav is None:
        return synthetic_voice(max(args.duration, 1.0) + 1.0, seed=1)
    from .audio import read_audio

    audio = read_audio(args.input_wav)
    if len(audio) < FRAME_SIZE:
        raise LoadTestError(f"{args.input_wav} is shorter than one 80 ms frame")
    return audio


def format_table(reports: list[ClientReport]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    header = (f"{'client':>6} {'join s':>7} {'sent':>6} {'frames':>6} {'missing':>7} {'late':>5} "
              f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'text':>5}  error")
    lines = [header]
    for r in reports:
        join = "-" if r.join_seconds is None else f"{r.join_seconds:.2f}"
        lines.append(f"{r.index:>6} {join:>7} {r.sent_frames:>6} {r.frames:>6} {r.missing:>7} {r.late_frames:>5} "
                     f"{ms(r.percentile(50)):>7} {ms(r.percentile(90)):>7} {ms(r.percentile(99)):>7} "
                     f"{r.text_pieces:>5}  {r.error or ''}")
    everything = [x for r in reports for x in r.latencies]
    ok = sum(r.error is None for r in reports)
    total = ClientReport(-1, latencies=everything)
    lines.append(
        f"all: {ok}/{len(reports)} clients without error; frames {sum(r.frames for r in reports)}, missing "
        f"{sum(r.missing for r in reports)}, late {sum(r.late_frames for r in reports)}; latency p50 "
        f"{ms(total.percentile(50))} ms, p90 {ms(total.percentile(90))} ms, p99 {ms(total.percentile(99))} ms"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    if args.clients < 1:
        raise LoadTestError("-n must be at least 1")
    if args.duration <= 0:
        raise LoadTestError("--duration must be positive")
    client_url(args, 0)  # validates the URL
    print(f"{args.clients} client(s) streaming {args.duration:g} s each to {args.url}", file=sys.stderr, flush=True)
    reports = run_all(args)
    print(format_table(reports), flush=True)
    if args.json:
        args.json.write_text(json.dumps([
            {"client": r.index, "join_seconds": r.join_seconds, "sent_frames": r.sent_frames, "frames": r.frames,
             "missing": r.missing, "late": r.late_frames, "latency_p50": r.percentile(50),
             "latency_p90": r.percentile(90), "latency_p99": r.percentile(99), "text_pieces": r.text_pieces,
             "error": r.error} for r in reports
        ], indent=1), encoding="utf-8")
    if all(r.error is not None for r in reports):
        raise LoadTestError(f"every client failed; first error: {reports[0].error}")
    failure = total_delivery(reports).warn_and_judge(args, "over all clients, ")
    if failure is not None:
        raise LoadTestError(f"the calls did not come through whole ({failure})")


def total_delivery(reports: list[ClientReport]) -> Delivery:
    """Missing and late frames summed over every client, against every frame sent."""
    return Delivery(sum(r.sent_frames for r in reports), sum(r.missing for r in reports),
                    sum(r.late_frames for r in reports))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
