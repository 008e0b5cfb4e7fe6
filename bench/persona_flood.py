"""An ordinary caller's real time while attackers flood the server with persona work.

    python bench/persona_flood.py --phase-seconds 20 [--attackers 8] [--server-pythonpath DIR]
        [--attacker-address 127.0.0.2]

Starts the real ``personaplex serve --model demo --allow-voice-upload`` (a separate process, loopback)
and caller A, a real-time /api/chat client streaming Ogg/Opus from this process. Then, one phase after
another, while A talks:

- ``quiet``: nothing else;
- ``chat flood, one prompt``: attackers open /api/chat with the same persona each time (prefix cache
  hits: no persona build, no prefill), wait for the handshake or the refusal, and leave;
- ``chat flood``: the same with a new, unique text prompt each time (a persona build and a prefill each);
- ``realtime flood``: attackers send /v1/realtime ``session.update`` events with new instructions, over
  and over (reconnecting when the server stops taking persona changes on a connection);
- ``upload flood``: attackers upload unique 29 s voice samples (each a full voice decode and Mimi
  encode) and open /api/chat with them;
- ``bomb``: attackers upload a FLAC that claims 5 s and holds 300 s.

The attackers connect from ``--attacker-address`` (127.0.0.2: another machine to the server's limit on
new connections per address; Linux routes all of 127/8 to the loopback), caller A from 127.0.0.1;
``--attacker-address 127.0.0.1`` puts them on one address.

Per phase (its table row is printed as soon as the phase ends): A's real-time factor (agent audio received, from the Ogg granule positions, over wall time),
the longest gap between two of A's agent pages, p99 gap, and what the attackers got (attempts, refused as
busy, other refusals, accepted). The target (issue: hardening) is >= 0.9x real time and no gap over 0.5 s.
``--server-pythonpath`` runs another checkout's server (e.g. the code before the fix) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from personaplex.demo import synthesize_voice  # noqa: E402
from personaplex.ogg import parse_pages  # noqa: E402

FRAME = 1920


# --- the server --------------------------------------------------------------------------------------------


def start_server(pythonpath: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "personaplex.server", "--model", "demo", "--host", "127.0.0.1", "--port", "0",
               "--allow-voice-upload", "--static", "none", *extra]
    # cwd: "python -m" puts the working directory first on the import path.
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                              cwd=pythonpath)
    for line in server.stdout:
        found = re.search(r"(http://\S+)", line)
        if found and "Access" in line:
            return server, found.group(1)
    raise SystemExit("the server did not start")


# --- caller A ----------------------------------------------------------------------------------------------


class CallerA:
    """Streams real-time Ogg/Opus and records (arrival time, granule) of every agent audio page."""

    def __init__(self, base: str):
        self.url = base.replace("http", "ws") + "/api/chat?" + urlencode(
            {"text_prompt": "You are caller A's friendly agent.", "voice_prompt": "NATF2", "seed": 1})
        self.pages: list[tuple[float, int]] = []
        self.error: str | None = None
        self.joined = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        import sphn

        writer = sphn.OpusStreamWriter(24000)
        rng = np.random.default_rng(0)
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, max_msg_size=0) as ws:
            async def send():
                started = time.monotonic()
                index = 0
                while not stop.is_set():
                    await asyncio.sleep(max(0.0, started + index * 0.08 - time.monotonic()))
                    data = writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                    for page in parse_pages(data):
                        await ws.send_bytes(b"\x01" + page.to_bytes())
                    index += 1
                await ws.close()

            sender = None
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                kind = message.data[0]
                if kind == 0x00:
                    self.joined.set()
                    sender = asyncio.create_task(send())
                elif kind == 0x01 and len(message.data) > 27:
                    granule = struct.unpack_from("<q", message.data, 1 + 6)[0]
                    if granule > 0:
                        self.pages.append((time.monotonic(), granule))
                elif kind == 0x05:
                    self.error = message.data[1:].decode()
            if sender is not None:
                await asyncio.gather(sender, return_exceptions=True)

    def window(self, start: float, end: float) -> dict:
        inside = [(t, g) for t, g in self.pages if start <= t <= end]
        if len(inside) < 2:
            return {"rt": 0.0, "max_gap": end - start, "p99_gap": end - start}
        times = np.array([t for t, _ in inside])
        audio = (inside[-1][1] - inside[0][1]) / 48_000
        gaps = np.diff(np.concatenate([[start], times, [end]]))
        return {"rt": audio / (times[-1] - times[0]), "max_gap": float(gaps.max()),
                "p99_gap": float(np.percentile(gaps, 99))}


# --- attackers ---------------------------------------------------------------------------------------------


class Tally:
    def __init__(self):
        self.attempts = self.busy = self.refused = self.accepted = self.failed = 0

    def row(self) -> str:
        return f"{self.attempts} | {self.busy} | {self.refused} | {self.accepted} | {self.failed}"


def attacker_session(source: str) -> aiohttp.ClientSession:
    """A session whose connections come from ``source`` (the attacker's address)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def chat_once(base: str, query: dict, tally: Tally, source: str) -> None:
    url = base.replace("http", "ws") + "/api/chat?" + urlencode(query)
    tally.attempts += 1
    try:
        async with attacker_session(source) as session, session.ws_connect(url) as ws:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                if message.data[0] == 0x00:
                    tally.accepted += 1
                    break
                if message.data[0] == 0x05:
                    text = message.data[1:].decode()
                    if "busy" in text:
                        tally.busy += 1
                    else:
                        tally.refused += 1
                    break
    except (aiohttp.ClientError, asyncio.TimeoutError):
        tally.failed += 1
        await asyncio.sleep(0.01)  # refused at connect: try again soon, not in a busy loop beside caller A


async def chat_flood(base: str, stop: asyncio.Event, tally: Tally, worker: int, source: str,
                     unique: bool = True) -> None:
    count = 0
    while not stop.is_set():
        count += 1
        prompt = f"attacker {worker} prompt {count} {time.time_ns()}" if unique else "the same prompt each time"
        await chat_once(base, {"text_prompt": prompt, "voice_prompt": "NATF2"}, tally, source)


async def realtime_flood(base: str, stop: asyncio.Event, tally: Tally, worker: int, source: str) -> None:
    url = base.replace("http", "ws") + "/v1/realtime"
    count = 0
    while not stop.is_set():
        try:
            async with attacker_session(source) as session, session.ws_connect(url) as ws:
                while not stop.is_set():
                    count += 1
                    tally.attempts += 1
                    instructions = f"attacker {worker} instructions {count} {time.time_ns()}"
                    await ws.send_str(json.dumps({"type": "session.update",
                                                  "session": {"type": "realtime", "instructions": instructions}}))
                    outcome = "accepted"
                    while True:
                        message = await ws.receive()
                        if message.type != aiohttp.WSMsgType.TEXT:
                            outcome = "closed"
                            break
                        event = json.loads(message.data)
                        if event["type"] == "error":
                            code = event["error"].get("code")
                            outcome = {"server_busy": "busy",
                                       "too_many_persona_changes": "limited"}.get(code, "refused")
                            break  # refused: no session.updated follows (waiting for one held this attacker)
                        if event["type"] == "session.updated":
                            break
                    if outcome == "closed":
                        tally.failed += 1
                        break
                    if outcome == "accepted":
                        tally.accepted += 1
                    elif outcome == "busy":
                        tally.busy += 1
                    else:
                        tally.refused += 1
                    if outcome == "limited":
                        break  # this connection takes no more persona changes: open another
        except (aiohttp.ClientError, asyncio.TimeoutError):
            tally.failed += 1
            await asyncio.sleep(0.01)  # refused at connect: try again soon, not in a busy loop


async def upload_flood(base: str, stop: asyncio.Event, tally: Tally, worker: int, source: str,
                       payload=None) -> None:
    count = 0
    async with attacker_session(source) as session:
        while not stop.is_set():
            count += 1
            data = payload if payload is not None else unique_voice(worker, count)
            tally.attempts += 1
            try:
                async with session.post(base + "/api/voices", data=data) as response:
                    body = json.loads(await response.text())
                    if response.status == 200:
                        tally.accepted += 1
                        await chat_once(base, {"text_prompt": "hi", "voice_prompt": body["voice"]}, Tally(), source)
                    elif response.status == 503:
                        tally.busy += 1
                        await asyncio.sleep(0.2)
                    else:
                        tally.refused += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                tally.failed += 1
                await asyncio.sleep(0.01)


_VOICE = None


def unique_voice(worker: int, count: int) -> bytes:
    """A 29 s voice sample, made unique by its last two bytes (a new voice build for the server). The
    sample is synthesised once, before caller A starts: this process's event loop must stay free."""
    global _VOICE
    if _VOICE is None:
        pcm = np.clip(np.round(synthesize_voice("attacker", seconds=29.0) * 32767), -32768, 32767).astype("<i2")
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(24000)
            wav.writeframes(pcm.tobytes())
        _VOICE = buffer.getvalue()
    return _VOICE[:-2] + struct.pack("<h", (worker * 7919 + count) % 30000)


def flac_bomb() -> bytes:
    """A 68 kB FLAC whose header claims 5 s and whose frames hold 300 s (see tests/server/test_voice_limits.py)."""
    sys.path.insert(0, str(REPO / "tests" / "server"))
    from test_voice_limits import flac_bomb as make

    return make(48000, 5, 300)


# --- the run -----------------------------------------------------------------------------------------------


TABLE_HEADER = ("| phase | A real time | A longest gap s | A p99 gap s | attempts | busy | other refusals | accepted "
                "| failed |\n|---|---|---|---|---|---|---|---|---|")


def table_row(name: str, a: dict, tally: Tally) -> str:
    verdict = "" if a["rt"] >= 0.9 and a["max_gap"] <= 0.5 else " (below target)"
    return f"| {name} | {a['rt']:.2f}x{verdict} | {a['max_gap']:.2f} | {a['p99_gap']:.2f} | {tally.row()} |"


async def run(args) -> list[tuple[str, dict, Tally]]:
    unique_voice(0, 0)  # synthesised now, not while caller A talks
    bomb = flac_bomb()
    server, base = start_server(Path(args.server_pythonpath or REPO), args.server_args)
    rows = []
    try:
        stop_a = asyncio.Event()
        caller = CallerA(base)
        talking = asyncio.create_task(caller.run(stop_a))
        await asyncio.wait_for(caller.joined.wait(), 120)
        await asyncio.sleep(3)  # settle
        source = args.attacker_address
        phases = [
            ("quiet", None),
            ("chat flood, one prompt", lambda stop, tally, i: chat_flood(base, stop, tally, i, source, unique=False)),
            ("chat flood", lambda stop, tally, i: chat_flood(base, stop, tally, i, source)),
            ("realtime flood", lambda stop, tally, i: realtime_flood(base, stop, tally, i, source)),
            ("upload flood", lambda stop, tally, i: upload_flood(base, stop, tally, i, source)),
            ("bomb", lambda stop, tally, i: upload_flood(base, stop, tally, i, source, payload=bomb)),
        ]
        print(TABLE_HEADER, flush=True)
        for name, attack in phases:
            if args.phases and name not in args.phases:
                continue
            print(f"{name}: started", file=sys.stderr, flush=True)  # a run cut short says where it was
            stop = asyncio.Event()
            tally = Tally()
            attackers = [asyncio.create_task(attack(stop, tally, i)) for i in range(args.attackers)] if attack else []
            start = time.monotonic()
            # A phase that overruns its time by a minute prints every thread's stack (the event loop blocked?).
            faulthandler.dump_traceback_later(args.phase_seconds + 60, repeat=True)
            await asyncio.sleep(args.phase_seconds)
            end = time.monotonic()
            stop.set()
            for task in attackers:
                task.cancel()
            # Bounded: an attacker stuck in a connection's close must not hold up the report.
            _, stuck = await asyncio.wait(attackers, timeout=10) if attackers else (set(), set())
            if stuck:
                print(f"{name}: {len(stuck)} attacker(s) still closing after 10 s", file=sys.stderr, flush=True)
            faulthandler.cancel_dump_traceback_later()
            rows.append((name, caller.window(start, end), tally))
            print(table_row(*rows[-1]), flush=True)  # now: a run cut short still reports the phases it ran
            await asyncio.sleep(3)  # let the server settle between phases
        stop_a.set()
        await asyncio.wait_for(talking, 30)
        if caller.error:
            print(f"caller A ended with: {caller.error}")
    finally:
        signalled = time.monotonic()
        server.terminate()  # SIGTERM, as a service manager stops it
        try:
            server.wait(60)
            print(f"server exited {time.monotonic() - signalled:.1f} s after SIGTERM (code {server.returncode})")
        except subprocess.TimeoutExpired:
            print("server still running 60 s after SIGTERM: killed")
            server.kill()
            server.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--attackers", type=int, default=8, help="concurrent attacking clients per phase")
    parser.add_argument("--phases", nargs="*", default=None, help="only these phases (names as in the table)")
    parser.add_argument("--server-pythonpath", default=None, help="checkout whose server runs (default: this one)")
    parser.add_argument("--attacker-address", default="127.0.0.2",
                        help="local address the attackers connect from (default 127.0.0.2; 127.0.0.1: caller A's)")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more flags for personaplex serve (last on the line)")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print()  # the whole table again, together
    print(TABLE_HEADER)
    for row in rows:
        print(table_row(*row))
    print(f"\nattackers from {args.attacker_address}, caller A from 127.0.0.1", flush=True)


if __name__ == "__main__":
    main()
