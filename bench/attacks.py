"""How an ordinary caller fares while a hostile client attacks the server (demo model, CPU, loopback).

    python bench/attacks.py [--duration 12] [--nice 19] [--attacks twilio_flood idle_sockets opus_flood realtime_flood]
        [--attacker-address 127.0.0.2] [--server-args --max-new-connections-per-address 0 ...]

Starts the real ``personaplex serve --model demo`` (with an access token) in a child process. For each
attack: a *quiet* phase (the ordinary caller alone), then an *attack* phase (the same caller while the
attack runs in another process). The caller streams real Ogg/Opus at real time on ``/api/chat`` and reads
everything; it reports its **real-time factor** (agent audio received / wall time, over the phase) and
its **worst gap** between two agent audio pages. The attacker connects from ``--attacker-address``
(127.0.0.2: another machine, as far as the server's limit on new connections per address goes; Linux
routes all of 127/8 to the loopback), the caller from 127.0.0.1; ``--attacker-address 127.0.0.1`` puts
both on one address. The server's own counters (``/metrics``) say how much
work the attacker got: audio decoded for it, messages refused undecoded, connections dropped; and the
server process's CPU use (cores, from /proc) compares the phases.

Attacks (the outside report's items):

- ``twilio_flood`` (1): 299-byte ``media`` messages as fast as possible on ``/twilio/media-stream``,
  no token, reconnecting whenever the server closes.
- ``idle_sockets`` (4): silent sockets, half-sent HTTP requests and ``/twilio`` upgrades without a token,
  1500 in all (the server's cap here: 1000), reopened as the server drops them; the caller also times
  ``/api/health``.
- ``opus_flood`` (5): an authorised ``/api/chat`` client that sends 30 s of valid Opus at once (about 100x
  real time), reconnecting whenever it is ended.
- ``realtime_flood`` (5): an authorised ``/v1/realtime`` client appending 1 s of audio per event as fast
  as it can, reconnecting whenever it is ended.

Goal (the report): the caller keeps >= 0.9x real time with no gap over 0.5 s under each attack. On a
small shared CPU the quiet phase is the reference: the demo model itself may not keep real time there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKEN = "bench-token"


# --- the server ----------------------------------------------------------------------------------------------


def start_server(log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    log = open(log_path, "wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "personaplex.cli", "serve", "--model", "demo", "--device", "cpu",
                                "--host", "127.0.0.1", "--port", "0", "--static", "none", "--auth-token", TOKEN,
                                "--max-conversations", "3", "--input-timeout", "0", *extra],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(rb"at http://127\.0\.0\.1:(\d+)", log_path.read_bytes())
        if found:
            return process, int(found.group(1))
        time.sleep(0.2)
    raise SystemExit(f"the server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the server process has used so far: its event loop and engine thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# --- the ordinary caller -------------------------------------------------------------------------------------


def opus_pages(seconds: float, seed: int = 0) -> list[bytes]:
    import sphn

    from personaplex.ogg import parse_pages

    rng = np.random.default_rng(seed)
    writer = sphn.OpusStreamWriter(24000)
    data = b"".join(writer.append_pcm((0.1 * rng.standard_normal(1920)).astype(np.float32))
                    for _ in range(int(seconds * 12.5)))
    return [page.to_bytes() for page in parse_pages(data)]


async def ordinary_caller(port: int, seconds: float) -> dict:
    """Real-time Opus up, agent audio down; returns its real-time factor and worst gap after the start."""
    import aiohttp
    import sphn

    pages = opus_pages(seconds + 1, seed=1)
    url = f"ws://127.0.0.1:{port}/api/chat?" + urlencode({"token": TOKEN, "text_prompt": "You are kind.", "seed": 3})
    arrivals: list[float] = []
    samples = 0
    decoder = sphn.OpusStreamReader(24000)
    health: list[float] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        handshake = asyncio.get_running_loop().create_future()

        async def read():
            nonlocal samples
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                kind = message.data[0]
                if kind == 0x00 and not handshake.done():
                    handshake.set_result(time.monotonic())
                elif kind == 0x01:
                    pcm = decoder.append_bytes(message.data[1:])
                    if pcm is not None and len(pcm):
                        samples += len(pcm)
                        arrivals.append(time.monotonic())
                elif kind == 0x05:
                    print("caller got an error:", message.data[1:].decode(), file=sys.stderr)

        reader = asyncio.create_task(read())
        started = await asyncio.wait_for(handshake, 120)
        for index, page in enumerate(pages):
            if time.monotonic() - started > seconds:
                break
            await ws.send_bytes(b"\x01" + page)
            if index % 25 == 0:  # every 2 s: is /api/health answering?
                asyncio.ensure_future(_time_health(http, port, health))
            await asyncio.sleep(max(0.0, started + index * 0.08 - time.monotonic()))
        ended = time.monotonic()
        await ws.close()
        await asyncio.wait_for(reader, 30)
    inside = [t for t in arrivals if t <= ended]
    gaps = np.diff(inside[5:]) if len(inside) > 6 else np.array([float("inf")])  # after the first frames
    audio_seconds = samples / 24000 * len(inside) / max(1, len(arrivals))
    return {"rtf": audio_seconds / (ended - started), "worst_gap": float(gaps.max()),
            "health_worst": max(health) if health else float("nan"), "health_checks": len(health)}


async def _time_health(http, port: int, results: list[float]) -> None:
    started = time.monotonic()
    try:
        async with http.get(f"http://127.0.0.1:{port}/api/health") as response:
            await response.read()
        results.append(time.monotonic() - started)
    except Exception:  # noqa: BLE001 - counted as a very slow answer
        results.append(float("inf"))


# --- the attacks (each in its own process) -------------------------------------------------------------------


def run_attack(name: str, port: int, seconds: float, report, nice: int, source: str) -> None:
    os.nice(nice)  # a remote attacker's CPU is not the server's: on one small machine it would compete for it
    stats = asyncio.run(ATTACKS[name](port, time.monotonic() + seconds, source))
    report.put(stats)


def attacker_session(source: str):
    """An aiohttp session whose connections come from ``source`` (the attacker's address)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def twilio_flood(port: int, until: float, source: str) -> dict:
    import aiohttp

    media = json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(
        b"\xff" * 160).decode()}})
    sent = connections = refused = 0
    async with attacker_session(source) as http:
        while time.monotonic() < until:
            try:
                async with http.ws_connect(f"ws://127.0.0.1:{port}/twilio/media-stream") as ws:
                    connections += 1
                    closed = asyncio.ensure_future(_until_closed(ws))
                    while not closed.done() and time.monotonic() < until:
                        await ws.send_str(media)
                        sent += 1
                        await asyncio.sleep(0)
                    closed.cancel()
            except (aiohttp.ClientError, ConnectionError):
                refused += 1
                await asyncio.sleep(0.01)
    return {"messages sent": sent, "connections": connections, "refused": refused}


async def idle_sockets(port: int, until: float, source: str, count: int = 1500) -> dict:
    kinds = [b"", b"GET /api/voices HTTP/1.1\r\nHost: x\r\n",
             b"GET /twilio/media-stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"]
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = dropped = refused = 0
    while time.monotonic() < until:
        alive = []
        for reader, writer in held:
            if reader.at_eof() or writer.is_closing():
                dropped += 1
                writer.close()
            else:
                alive.append((reader, writer))
        held = alive
        while len(held) < count and time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                refused += 1
                break
            writer.write(kinds[opened % len(kinds)])
            opened += 1
            held.append((reader, writer))
            asyncio.ensure_future(_drain(reader))
            if opened % 50 == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
    for _, writer in held:
        writer.close()
    return {"sockets opened": opened, "dropped by the server": dropped, "refused at connect": refused}


async def _until_closed(ws) -> None:
    """Read (and drop) everything the server sends until it closes."""
    async for _ in ws:
        pass


async def _drain(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, OSError):
        pass


async def opus_flood(port: int, until: float, source: str) -> dict:
    import aiohttp

    pages = opus_pages(30.0, seed=7)
    url = f"ws://127.0.0.1:{port}/api/chat?" + urlencode({"token": TOKEN, "text_prompt": "You are kind."})
    sent = connections = refused = 0
    async with attacker_session(source) as http:
        while time.monotonic() < until:
            try:
                async with http.ws_connect(url, max_msg_size=0) as ws:
                    connections += 1
                    while (await ws.receive(timeout=60)).data[0] != 0x00:
                        pass
                    closed = asyncio.ensure_future(_until_closed(ws))
                    for page in pages:
                        if closed.done() or time.monotonic() > until:
                            break
                        await ws.send_bytes(b"\x01" + page)
                        sent += 1
                        await asyncio.sleep(0)
                    while not closed.done() and time.monotonic() < until:
                        await asyncio.sleep(0.05)
                    closed.cancel()
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, TypeError):
                refused += 1
                await asyncio.sleep(0.05)
    return {"pages sent": sent, "connections": connections, "failed": refused}


async def realtime_flood(port: int, until: float, source: str) -> dict:
    import aiohttp

    chunk = base64.b64encode(b"\x00" * 48000).decode()  # 1 s of PCM16 per event
    sent = connections = refused = 0
    async with attacker_session(source) as http:
        while time.monotonic() < until:
            try:
                async with http.ws_connect(f"ws://127.0.0.1:{port}/v1/realtime",
                                           headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
                    connections += 1
                    closed = asyncio.ensure_future(_until_closed(ws))
                    while not closed.done() and time.monotonic() < until:
                        await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                        sent += 1
                        await asyncio.sleep(0)
                    closed.cancel()
            except (aiohttp.ClientError, ConnectionError):
                refused += 1
                await asyncio.sleep(0.05)
    return {"events sent": sent, "connections": connections, "refused": refused}


ATTACKS = {"twilio_flood": twilio_flood, "idle_sockets": idle_sockets, "opus_flood": opus_flood,
           "realtime_flood": realtime_flood}
RATE_REFUSED = 'personaplex_connections_refused_total{reason="new_connection_rate"}'
COUNTERS = {
    "twilio_flood": ['personaplex_input_decoded_seconds_total{front_end="twilio"}',
                     'personaplex_input_refused_messages_total{reason="before_start"}',
                     'personaplex_errors_total{kind="twilio_no_start"}', RATE_REFUSED],
    "idle_sockets": ['personaplex_connections_refused_total{reason="idle_dropped"}',
                     'personaplex_connections_refused_total{reason="all_busy"}', RATE_REFUSED],
    "opus_flood": ['personaplex_input_decoded_seconds_total{front_end="chat"}',
                   'personaplex_input_refused_messages_total{reason="input_rate"}', RATE_REFUSED],
    "realtime_flood": ['personaplex_input_decoded_seconds_total{front_end="realtime"}',
                       'personaplex_input_refused_messages_total{reason="input_rate_exceeded"}', RATE_REFUSED],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per phase (default 12)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--nice", type=int, default=19,
                        help="CPU niceness of the attacking process (default 19: it stands in for a client on another "
                             "machine; 0: it competes with the server for this machine's CPU)")
    parser.add_argument("--max-connections", type=int, default=1000, help="the server's cap (default 1000)")
    parser.add_argument("--attacker-address", default="127.0.0.2",
                        help="local address the attacks connect from (default 127.0.0.2: another machine to the "
                             "server's limit on new connections per address; 127.0.0.1: the caller's own address)")
    parser.add_argument("--log", type=Path, default=Path("/tmp/personaplex-attacks-server.log"))
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more flags for personaplex serve (last on the line), e.g. "
                             "--max-new-connections-per-address 0")
    args = parser.parse_args()

    # A connection cap of 1000: the report's server had a 1024 descriptor limit.
    process, port = start_server(args.log, ["--max-connections", str(args.max_connections), *args.server_args])
    rows = []
    try:
        context = multiprocessing.get_context("spawn")
        for name in args.attacks:
            cpu, wall = cpu_seconds(process.pid), time.monotonic()
            quiet = asyncio.run(ordinary_caller(port, args.duration))
            quiet["server_cpu"] = (cpu_seconds(process.pid) - cpu) / (time.monotonic() - wall)
            before = metrics(port)
            report = context.Queue()
            attacker = context.Process(target=run_attack, args=(name, port, args.duration + 4, report, args.nice,
                                                                args.attacker_address))
            attacker.start()
            time.sleep(2.0)  # the attack is under way before the caller starts
            cpu, wall = cpu_seconds(process.pid), time.monotonic()
            loud = asyncio.run(ordinary_caller(port, args.duration))
            loud["server_cpu"] = (cpu_seconds(process.pid) - cpu) / (time.monotonic() - wall)
            attacker.join(120)
            stats = report.get(timeout=30) if not report.empty() else {}
            after = metrics(port)
            counters = {key.split("{")[0].replace("personaplex_", "") + (
                "{" + key.split("{")[1] if "{" in key else ""): after.get(key, 0) - before.get(key, 0)
                for key in COUNTERS[name]}
            rows.append((name, quiet, loud, stats, counters))
            print(f"{name}: quiet {quiet}, attack {loud}, attacker {stats}, server {counters}", flush=True)
    finally:
        process.terminate()
        process.wait(30)

    print()
    print("| attack | caller RTF quiet / attack | worst gap quiet / attack (s) | server CPU quiet / attack (cores) "
          "| /api/health worst under attack (s) | attacker | server counters during the attack |")
    print("|---|---|---|---|---|---|---|")
    for name, quiet, loud, stats, counters in rows:
        attacker = ", ".join(f"{k} {v}" for k, v in stats.items())
        server = ", ".join(f"{k} {v:g}" for k, v in counters.items())
        print(f"| {name} | {quiet['rtf']:.2f} / {loud['rtf']:.2f} | {quiet['worst_gap']:.2f} / {loud['worst_gap']:.2f} "
              f"| {quiet['server_cpu']:.2f} / {loud['server_cpu']:.2f} | {loud['health_worst']:.2f} | {attacker} "
              f"| {server} |")
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; attacker niceness "
          f"{args.nice}, attacker address {args.attacker_address}, server flags {' '.join(args.server_args) or '-'}")
    print(f"\nserver log: {args.log} ({args.log.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
