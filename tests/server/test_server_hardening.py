"""Attacks on a real running server (demo model, loopback, bounded loops) and the behaviour that answers
them: authentication before any work (Twilio included), budgets on what one client may send, timeouts on
idle and half-open connections, a connection cap that never locks out real callers, a limit on new
connections per remote address (an attacker on 127.0.0.2, callers on 127.0.0.1), slow readers ended
and their connection reset, the Origin allow-list, and short, clear refusals for malformed input.

Where an attack runs next to an ordinary caller, the test asserts that the caller completes without an
error and that the server's counters show no work done for the attacker; how much real time the caller
keeps under each attack is measured by ``bench/attacks.py`` (a shared CI machine cannot time it)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from test_realtime import ServerThread, metric_value
from test_server_protocol import Received, opus_pages, read_all

from personaplex.server.limits import ServerLimits
from personaplex.frontends.security import OriginPolicy, token_matches
from personaplex.serving.input_budget import InputBudget, InputRateExceeded

TOKEN = "s3cret"
# Attackers connect from here, standing for another machine (Linux routes all of 127/8 to the loopback):
# the ordinary callers, on 127.0.0.1, keep their own budget of new connections per address.
ATTACKER = "127.0.0.2"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(demo_model):
    limits = ServerLimits(request_timeout=1.5, idle_timeout=1.5, max_connections=24,
                          allowed_origins=OriginPolicy(["https://app.example.com"]))
    running = ServerThread(demo_model, {"auth_token": TOKEN, "limits": limits}, max_conversations=3, max_queue=1,
                           input_timeout_seconds=None)
    yield running
    running.stop()


def chat_url(server, **params) -> str:
    params = {"text_prompt": "You enjoy having a good conversation.", "voice_prompt": "NATF2", "token": TOKEN,
              **params}
    return f"{server.ws}/api/chat?{urlencode(params)}"


def metric(server, name: str, **labels) -> float:
    return metric_value(server.metrics(), name, **labels)


async def ordinary_caller(server, seconds: float = 3.0) -> Received:
    """A well-behaved /api/chat caller: real Opus pages at real time, reading everything."""
    pages = opus_pages(seconds, seed=3)
    received = Received()
    async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server, seed=11), max_msg_size=0) as ws:
        reader = asyncio.create_task(read_all(ws, received))
        while 0x00 not in received.kinds() and not reader.done():
            await asyncio.sleep(0.01)
        start = time.monotonic()
        for index, page in enumerate(pages):
            await ws.send_bytes(b"\x01" + page)
            await asyncio.sleep(max(0.0, start + index * 0.08 - time.monotonic()))
        await ws.close()
        await asyncio.wait_for(reader, 30)
    return received


async def raw_request(server, data: bytes, read_timeout: float = 20.0) -> tuple[bytes, float]:
    """Send raw bytes; return what comes back until the server closes, and how long that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.server.port)
    start = time.monotonic()
    writer.write(data)
    await writer.drain()
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), read_timeout):
            answer += chunk
    except (ConnectionResetError, asyncio.TimeoutError):
        pass
    writer.close()
    return answer, time.monotonic() - start


async def wait_for(condition, deadline: float = 30.0, step: float = 0.05) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


# --- 1. authentication before any work, Twilio included ----------------------------------------------------


def twilio_media(payload: bytes = b"\xff" * 160) -> str:
    return json.dumps({"event": "media", "streamSid": "MZ1", "media": {"track": "inbound",
                                                                       "payload": base64.b64encode(payload).decode()}})


def twilio_start(parameters: dict) -> str:
    return json.dumps({"event": "start", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "callSid": "CA1", "customParameters": parameters,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


def test_unauthenticated_twilio_streams_get_no_work_while_a_caller_talks(server):
    decoded_before = metric(server, "personaplex_input_decoded_seconds_total", front_end="twilio")
    sessions_before = metric(server, "personaplex_sessions_total", front_end="twilio")

    async def flood_without_token() -> tuple[int, float]:
        """The attack of the report: 299-byte media messages as fast as possible, no start."""
        sent = 0
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/twilio/media-stream") as ws:
            started = time.monotonic()
            closed = asyncio.create_task(ws.receive())  # the server's close frame
            try:
                for _ in range(5000):
                    await ws.send_str(twilio_media())
                    sent += 1
                    await asyncio.sleep(0)
                    if closed.done():
                        break
            except ConnectionResetError:
                pass
            await asyncio.wait_for(closed, 10)
            return sent, time.monotonic() - started

    async def start_with_wrong_token() -> int | None:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/twilio/media-stream") as ws:
            await ws.send_str(twilio_start({"token": "wrong"}))
            for _ in range(50):
                await ws.send_str(twilio_media())
            await asyncio.wait_for(ws.receive(), 10)
            return ws.close_code

    async def wrong_query_token() -> int:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"{server.ws}/twilio/media-stream?token=wrong"):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    async def scenario():
        caller = asyncio.create_task(ordinary_caller(server, 3.0))
        attacks = await asyncio.gather(*(flood_without_token() for _ in range(3)), start_with_wrong_token(),
                                       wrong_query_token())
        return await caller, attacks

    received, attacks = asyncio.run(scenario())
    floods, wrong_start, wrong_query = attacks[:3], attacks[3], attacks[4]
    assert received.error is None and len(received.of(0x01)) >= 20
    for sent, _ in floods:  # closed after a handful of messages, not after thousands
        assert sent < 5000
    assert wrong_start == 1000 and wrong_query == 401
    # Nothing was decoded and no conversation was opened for any of them.
    assert metric(server, "personaplex_input_decoded_seconds_total", front_end="twilio") == decoded_before
    assert metric(server, "personaplex_sessions_total", front_end="twilio") == sessions_before
    assert metric(server, "personaplex_errors_total", kind="twilio_no_start") >= 3
    assert metric(server, "personaplex_errors_total", kind="twilio_unauthorized") >= 1


def test_idle_unauthenticated_twilio_stream_is_closed(server):
    async def idle() -> float:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/twilio/media-stream") as ws:
            started = time.monotonic()
            message = await asyncio.wait_for(ws.receive(), 30)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return time.monotonic() - started

    assert 1.0 <= asyncio.run(idle()) < 20  # --idle-timeout 1.5 s here


def test_twilio_query_token_authenticates_at_the_upgrade(server):
    async def call() -> int:
        url = f"{server.ws}/twilio/media-stream?token={TOKEN}"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_str(twilio_start({}))
            media = 0
            start = time.monotonic()
            for chunk in range(60):
                await ws.send_str(twilio_media())
                try:
                    message = await asyncio.wait_for(ws.receive(), max(0.001, start + chunk * 0.02 - time.monotonic()))
                    media += message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["event"] == "media"
                except asyncio.TimeoutError:
                    pass
            deadline = time.monotonic() + 30
            while media == 0 and time.monotonic() < deadline:
                await ws.send_str(twilio_media())
                message = await ws.receive(timeout=30)
                media += message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["event"] == "media"
            return media

    assert asyncio.run(call()) >= 1


# --- 5. per-client input budget ----------------------------------------------------------------------------


def test_input_budget_refuses_audio_beyond_real_time_plus_burst():
    now = [0.0]
    budget = InputBudget(burst_seconds=2.0, max_messages_per_second=100, clock=lambda: now[0])
    now[0] += 5.0  # a connection open for a while holds the whole burst (a new one holds 1 s)
    for _ in range(25):  # 2 s of 80 ms frames at once: the burst
        budget.take_message()
        budget.check_audio()
        budget.spend_audio(0.08)
    with pytest.raises(InputRateExceeded, match="faster than real time"):
        budget.check_audio()
    now[0] += 1.0  # real time refills it
    budget.check_audio()
    with pytest.raises(InputRateExceeded, match="messages a second"):
        for _ in range(1000):
            budget.take_message()


def test_a_client_sending_opus_far_faster_than_real_time_is_ended(server):
    pages = opus_pages(30.0, seed=5)  # 30 s of audio, sent at once (~100x real time)
    decoded_before = metric(server, "personaplex_input_decoded_seconds_total", front_end="chat")

    async def flood() -> Received:
        received = Received()
        async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server, seed=2), max_msg_size=0) as ws:
            reader = asyncio.create_task(read_all(ws, received))
            while 0x00 not in received.kinds() and not reader.done():
                await asyncio.sleep(0.01)
            started = time.monotonic()
            try:
                for page in pages:
                    await ws.send_bytes(b"\x01" + page)
            except ConnectionResetError:
                pass
            await asyncio.wait_for(reader, 30)
            received.elapsed = time.monotonic() - started
        return received

    async def scenario():
        return await asyncio.gather(ordinary_caller(server, 4.0), flood())

    caller, attacker = asyncio.run(scenario())
    assert caller.error is None and len(caller.of(0x01)) >= 30
    assert attacker.error is not None and "faster than real time" in attacker.error
    assert attacker.close_code == 1008
    # Decoded for everyone meanwhile: the caller's 4 s, the attacker's burst (3 s) and what real time
    # allowed while it sent, plus one page: not its 30 s.
    decoded = metric(server, "personaplex_input_decoded_seconds_total", front_end="chat") - decoded_before
    assert decoded <= 4.0 + 3.0 + attacker.elapsed + 1.0, decoded


def test_a_realtime_client_flooding_events_is_ended(server):
    async def flood():
        events = []
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/v1/realtime", headers=headers) as ws:
            await ws.receive_json()
            chunk = base64.b64encode(b"\x00" * 2 * 24000).decode()  # 1 s of audio per event
            try:
                for _ in range(200):
                    await ws.send_json({"type": "input_audio_buffer.append", "audio": chunk})
            except ConnectionResetError:
                pass
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    events.append(json.loads(message.data))
            return events, ws.close_code

    events, code = asyncio.run(flood())
    errors = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert "input_rate_exceeded" in errors and code == 1008


# --- 4. timeouts, the connection cap, descriptors running out ---------------------------------------------


@pytest.mark.parametrize("data", [b"", b"GET /api/health HTTP/1.1\r\nHost: x\r\n",
                                  b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"],
                         ids=["silent", "half_sent_headers", "idle_keep_alive"])
def test_connections_without_a_complete_request_are_closed(server, data):
    answer, elapsed = asyncio.run(raw_request(server, data))
    assert elapsed < 15  # --request-timeout 1.5 s here; aiohttp's default would keep it an hour
    if data.endswith(b"\r\n\r\n"):
        assert answer.startswith(b"HTTP/1.1 200")  # served, then closed when idle
    else:
        assert answer == b""


def test_an_idle_realtime_session_is_closed(server):
    async def idle():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/v1/realtime", headers=headers) as ws:
            events = []
            async for message in ws:
                events.append(json.loads(message.data))
            return events, ws.close_code

    events, code = asyncio.run(asyncio.wait_for(idle(), 30))
    assert events[0]["type"] == "session.created"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "idle_timeout" and code == 1008


def test_idle_sockets_at_the_connection_cap_never_lock_out_callers(server):
    guard = server.server.guard
    refused_before = metric(server, "personaplex_connections_refused_total", reason="idle_dropped")

    async def scenario():
        idle = []
        for _ in range(3 * guard.max_connections):  # three times the cap of silent sockets and idle /twilio
            idle.append(await asyncio.open_connection("127.0.0.1", server.server.port, local_addr=(ATTACKER, 0)))
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ATTACKER, 0)))
        streams = [await http.ws_connect(f"{server.ws}/twilio/media-stream") for _ in range(guard.max_connections)]
        async with aiohttp.ClientSession() as fresh, fresh.get(f"{server.http}/api/health") as response:
            health = response.status
        caller = await ordinary_caller(server, 2.0)
        open_now = guard.open_connections
        for stream in streams:
            await stream.close()
        await http.close()
        for _, writer in idle:
            writer.close()
        return health, caller, open_now

    health, caller, open_now = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert health == 200
    assert caller.error is None and len(caller.of(0x01)) >= 15
    assert open_now <= guard.max_connections
    assert guard.peak_descriptors <= guard.max_connections  # counted from accept() to close
    assert metric(server, "personaplex_connections_refused_total", reason="idle_dropped") > refused_before


def test_tls_handshakes_never_sent_count_against_the_cap_and_are_dropped_first(demo_model, tmp_path):
    """Sockets that open TCP and never start TLS hold descriptors too: counted, and dropped as idle ones."""
    import ssl

    from personaplex.server.tls import tls_context

    context, _ = tls_context(tmp_path / "tls")
    running = ServerThread(demo_model, {"ssl_context": context, "limits": ServerLimits(max_connections=8)},
                           max_conversations=1, max_queue=0, input_timeout_seconds=None)
    guard = running.server.guard
    try:
        silent = [socket.create_connection(("127.0.0.1", running.server.port), timeout=5, source_address=(ATTACKER, 0))
                  for _ in range(24)]
        client = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))
        client.check_hostname = False

        async def health() -> int:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"https://127.0.0.1:{running.server.port}/api/health", ssl=client) as response:
                return response.status

        status = asyncio.run(asyncio.wait_for(health(), 60))
        for sock in silent:
            sock.close()
    finally:
        running.stop()
    assert status == 200
    assert guard.evicted >= 16 and guard.peak_descriptors <= guard.max_connections


def _serve_subprocess(tmp_path, nofile: int, *flags: str):
    """``personaplex serve --model demo`` in a child process with a file descriptor limit of ``nofile``."""
    log = open(tmp_path / "server.log", "w+b")

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "personaplex.cli", "serve", "--model", "demo", "--device", "cpu",
                                "--port", "0", "--host", "127.0.0.1", "--static", "none", "--opus-workers", "0",
                                "--max-conversations", "1", *flags],
                               stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit, env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(rb"at http://127\.0\.0\.1:(\d+)", (tmp_path / "server.log").read_bytes())
        if found:
            return process, int(found.group(1)), tmp_path / "server.log"
        time.sleep(0.2)
    process.kill()
    raise AssertionError((tmp_path / "server.log").read_text(errors="replace")[-2000:])


def _flood_sockets(port: int, count: int, threads: int = 8) -> list[socket.socket]:
    """``count`` connections opened as fast as ``threads`` clients can (bursts fill the listen backlog),
    each client from its own address (127.0.0.2, .3, ...): many machines, each within its budget of new
    connections per address, which only the connection cap answers."""
    sockets = []

    def connect(share: int, source: str) -> None:
        for _ in range(share):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)))
            except OSError:
                return

    clients = [threading.Thread(target=connect, args=(count // threads, f"127.0.0.{2 + index}"))
               for index in range(threads)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    return sockets


class _DescriptorCount:
    """Samples how many descriptors a process holds (Linux ``/proc``), from now until ``stop``."""

    def __init__(self, pid: int):
        self._folder = Path(f"/proc/{pid}/fd")
        self.at_start = self.count()
        self.peak = self.at_start
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def count(self) -> int:
        try:
            return len(os.listdir(self._folder))
        except OSError:
            return 0

    def _sample(self) -> None:
        while not self._stopped.is_set():
            self.peak = max(self.peak, self.count())

    def stop(self) -> int:
        self._stopped.set()
        self._thread.join()
        return self.peak


def _health(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=60) as response:
        return response.status


@pytest.mark.slow
def test_descriptor_exhaustion_is_avoided_by_default_and_never_floods_the_log(tmp_path):
    # Default cap: below the descriptor limit, and every accepted socket counts against it until it is
    # closed, so accept() never fails and /api/health answers.
    process, port, log = _serve_subprocess(tmp_path, 512)
    cap = int(re.search(rb"accepting at most (\d+) connections", log.read_bytes()).group(1))
    descriptors = _DescriptorCount(process.pid)
    held = []
    try:
        held = _flood_sockets(port, 800)
        time.sleep(1.0)
        assert _health(port) == 200
    finally:
        peak = descriptors.stop()
        for sock in held:
            sock.close()
        process.terminate()
        process.wait(30)
    assert b"out of system resource" not in log.read_bytes() and b"cannot accept" not in log.read_bytes()
    if descriptors.at_start:  # Linux: the connections never held more descriptors than the cap (+1: one refused)
        assert peak <= descriptors.at_start + cap + 1, (peak, descriptors.at_start, cap)

    # A cap set above the limit: accept() fails, and that is logged once per 10 s, with a count.
    (tmp_path / "second").mkdir()
    process, port, log = _serve_subprocess(tmp_path / "second", 512, "--max-connections", "5000")
    flooded = time.monotonic()
    try:
        held = _flood_sockets(port, 800)
        time.sleep(5.0)
    finally:
        for sock in held:
            sock.close()
        process.terminate()
        process.wait(30)
    text = log.read_bytes()
    allowed = 1 + int((time.monotonic() - flooded) / 10)  # one line per 10 s at most
    assert 1 <= text.count(b"cannot accept connections") <= allowed, text[-3000:]
    assert len(text) < 20_000 and b"Traceback" not in text


# --- connection churn from one address ----------------------------------------------------------------------


async def _raw_health(port: int, source: str) -> bytes:
    """One new connection from ``source`` asking for /api/health; everything the server sent back (b"": the
    connection was closed or reset without an HTTP answer)."""
    try:  # a reset can come before the client's connect() has even returned
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except ConnectionError:
        return b""
    answer = b""
    try:
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(65536), 20):
            answer += chunk
    except (ConnectionError, OSError):
        pass
    writer.close()
    return answer


def test_an_address_reconnecting_in_a_loop_is_reset_at_once_while_others_are_served(demo_model, caplog):
    caplog.set_level(logging.WARNING, logger="personaplex.server")
    rate, burst = 2.0, 5
    running = ServerThread(demo_model, {"limits": ServerLimits(new_connections_per_address=rate,
                                                               new_connection_burst=burst)},
                           max_conversations=2, max_queue=0, input_timeout_seconds=None)
    port = running.server.port

    async def attacker(count: int = 40) -> tuple[list[bytes], float]:
        started = time.monotonic()
        answers = [await _raw_health(port, ATTACKER) for _ in range(count)]
        return answers, time.monotonic() - started

    async def websocket_attacker(count: int = 20) -> int:
        """A Twilio flood's reconnect loop, as bench/attacks.py runs it: how many upgrades were refused."""
        refused = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ATTACKER, 0))) as http:
            for _ in range(count):
                try:
                    async with http.ws_connect(f"{running.ws}/twilio/media-stream") as ws:
                        await ws.send_str(twilio_media())
                except (aiohttp.ClientError, ConnectionError):
                    refused += 1
        return refused

    async def scenario():
        caller = asyncio.create_task(ordinary_caller(running, 3.0))
        answers, seconds = await attacker()
        refused_websockets = await websocket_attacker()
        # Right after the flood: the attacker is still refused, the ordinary address is not.
        still_refused = await _raw_health(port, ATTACKER)
        async with aiohttp.ClientSession() as http, http.get(f"{running.http}/api/health") as response:
            health = response.status
        return answers, seconds, refused_websockets, still_refused, health, await caller

    try:
        refused_before = metric(running, "personaplex_connections_refused_total", reason="new_connection_rate")
        answers, seconds, refused_websockets, still_refused, health, received = \
            asyncio.run(asyncio.wait_for(scenario(), 120))
        refused_after = metric(running, "personaplex_connections_refused_total", reason="new_connection_rate")
    finally:
        running.stop()

    served = [answer for answer in answers if answer]
    refused = len(answers) - len(served)
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in served)
    assert answers[:burst] == served[:burst]  # the burst is served, in full
    # Past the burst, no more than the rate allows over the time the loop took (+1: a token in the making).
    assert burst <= len(served) <= burst + rate * seconds + 1, (len(served), seconds)
    assert refused >= 1 and refused_websockets >= 1 and still_refused == b""
    assert refused_after - refused_before >= refused + refused_websockets + 1
    assert health == 200
    assert received.error is None and len(received.of(0x01)) >= 20  # the caller on 127.0.0.1 kept talking
    lines = [record for record in caplog.records if "--max-new-connections-per-address" in record.getMessage()]
    assert 1 <= len(lines) <= 1 + (seconds + 60) / 10  # once per 10 s, with a count, not once per refusal
    assert ATTACKER in lines[0].getMessage()


def test_the_default_limit_serves_a_load_test_from_one_host(demo_model):
    """``personaplex loadtest -n 150`` opens its connections nearly at once from one address: the default
    burst takes them all (here 150 health checks at once, from an address no other test uses)."""
    running = ServerThread(demo_model, {}, max_conversations=1, max_queue=0, input_timeout_seconds=None)

    async def load_test_host(count: int = 150) -> list[bytes]:
        return await asyncio.gather(*(_raw_health(running.server.port, "127.0.0.3") for _ in range(count)))

    try:
        answers = asyncio.run(asyncio.wait_for(load_test_host(), 120))
        refused = metric(running, "personaplex_connections_refused_total", reason="new_connection_rate")
    finally:
        running.stop()
    assert sum(answer.startswith(b"HTTP/1.1 200") for answer in answers) == 150
    assert refused == 0


# --- 7. a client that stops reading -------------------------------------------------------------------------


def test_a_client_that_stops_reading_is_ended_and_its_connection_reset(server):
    hub, guard = server.hub, server.server.guard

    async def scenario():
        pages = opus_pages(60.0, seed=9)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(chat_url(server, seed=4))
            while (await ws.receive()).data[0] != 0x00:
                pass
            ws._response.connection.transport.pause_reading()  # reads nothing from now on, keeps sending
            stopped = time.monotonic()
            reset = None
            start = time.monotonic()
            for index, page in enumerate(pages):
                try:
                    await ws.send_bytes(b"\x01" + page)
                except (ConnectionResetError, ConnectionError):
                    reset = time.monotonic() - stopped
                    break
                await asyncio.sleep(max(0.0, start + index * 0.08 - time.monotonic()))
                if ws._response.connection is None or ws._response.connection.transport is None \
                        or ws._response.connection.transport.is_closing():
                    reset = time.monotonic() - stopped
                    break
            freed = await wait_for(lambda: hub.load()["slots_busy"] == 0, 10)
            return reset, freed

    reset, freed = asyncio.run(asyncio.wait_for(scenario(), 120))
    print(f"connection reset {reset:.2f} s after the client stopped reading")
    assert freed
    assert reset is not None and reset < 10, reset  # the report measured ~70 s, and the TCP connection kept open
    assert 'reason="slow_reader"' in server.metrics()


# --- 8. Origin allow-list -----------------------------------------------------------------------------------


def test_origin_policy():
    default = OriginPolicy.parse(None)
    assert default.allows(None, "voice.example.com")  # not a browser
    assert default.allows("http://localhost:5173", "voice.example.com")
    assert default.allows("http://127.0.0.1:1", "voice.example.com")
    assert default.allows("http://[::1]:8998", "voice.example.com")
    assert default.allows("https://voice.example.com:8998", "voice.example.com:8998")  # same origin
    assert not default.allows("https://evil.example", "voice.example.com:8998")
    assert not default.allows("null", "voice.example.com")
    assert not default.allows("https://voice.example.com.evil.example", "voice.example.com")
    listed = OriginPolicy.parse("https://app.example.com, https://other.example/")
    assert listed.allows("https://other.example", "x") and not listed.allows("http://app.example.com", "x")
    assert OriginPolicy.parse("*").allows("https://anything.example", "x")
    # A request that only the page's cookie authenticates: own origin or one named, nothing else.
    assert default.allows_cookie(None, "voice.example.com")  # not a browser page
    assert default.allows_cookie("https://voice.example.com:8998", "voice.example.com:8998")
    assert not default.allows_cookie("http://localhost:5173", "voice.example.com")  # same machine, same "site"
    assert not default.allows_cookie("http://localhost:5173", "localhost:8998")  # another port: another origin
    assert not default.allows_cookie("https://other.voice.example.com", "voice.example.com")
    assert not default.allows_cookie("null", "voice.example.com")
    assert listed.allows_cookie("https://other.example", "x")
    assert not OriginPolicy.parse("*").allows_cookie("https://anything.example", "x")


def test_foreign_origins_cannot_open_websockets_or_post(server):
    async def probe():
        results = {}
        async with aiohttp.ClientSession() as http:
            for name, origin in (("evil", "https://evil.example"), ("listed", "https://app.example.com"),
                                 ("localhost", "http://localhost:3000"), ("none", None)):
                headers = {"Origin": origin} if origin else {}
                try:
                    async with http.ws_connect(chat_url(server), headers=headers):
                        results[name] = 101
                except aiohttp.WSServerHandshakeError as error:
                    results[name] = error.status
            for path in ("/v1/realtime", "/twilio/media-stream"):
                try:
                    async with http.ws_connect(f"{server.ws}{path}", headers={"Origin": "https://evil.example",
                                                                              "Authorization": f"Bearer {TOKEN}"}):
                        results[path] = 101
                except aiohttp.WSServerHandshakeError as error:
                    results[path] = error.status
            async with http.post(f"{server.http}/api/voices?token={TOKEN}", data=b"RIFF....",
                                 headers={"Origin": "https://evil.example"}) as response:
                results["post"] = response.status, await response.text()
        return results

    results = asyncio.run(probe())
    assert results["evil"] == 403 and results["/v1/realtime"] == 403 and results["/twilio/media-stream"] == 403
    assert results["listed"] == 101 and results["localhost"] == 101 and results["none"] == 101
    assert results["post"][0] == 403 and "--allowed-origins" in results["post"][1]


# --- 9, 10, 11, 14: malformed input gets a short, clear refusal ----------------------------------------------


def test_a_huge_voice_name_is_refused_with_1008_and_never_logged_whole(server, caplog):
    caplog.set_level(logging.DEBUG)
    name = "N" * 60_000

    async def chat():
        received = Received()
        async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server, voice_prompt=name)) as ws:
            await read_all(ws, received)
        return received

    async def realtime():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/v1/realtime", headers=headers) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "session.update", "session": {"voice": "V" * 300}})
            first = await ws.receive_json(timeout=30)
            return first

    received = asyncio.run(chat())
    assert received.close_code == 1008 and "at most 255 bytes" in received.error and len(received.error) < 200
    error = asyncio.run(realtime())
    assert error["type"] == "error" and error["error"]["code"] == "invalid_persona"
    assert "at most 255 bytes" in error["error"]["message"]
    assert all(len(record.getMessage()) < 2000 for record in caplog.records)


def test_a_non_utf8_authorization_header_is_a_401(server):
    async def probe(path: str) -> bytes:
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n").encode() + \
            b"Authorization: Bearer \xff\xfe\xfd\r\n\r\n"
        answer, _ = await raw_request(server, request)
        return answer

    for path in ("/api/voices", "/v1/realtime"):
        assert asyncio.run(probe(path)).startswith(b"HTTP/1.1 401"), path
    assert token_matches("\udcff", TOKEN) is False


def test_malformed_twilio_marks_never_end_a_call(server):
    async def call():
        url = f"{server.ws}/twilio/media-stream?token={TOKEN}"
        media_after = 0
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_str(twilio_start({}))
            for name in ("frame-²", "frame-" + "9" * 5000, "frame-", 42):
                await ws.send_str(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": name}}))
            start = time.monotonic()
            deadline = start + 60
            index = 0
            while media_after < 5 and time.monotonic() < deadline:
                await ws.send_str(twilio_media())
                index += 1
                try:
                    message = await ws.receive(timeout=max(0.001, start + index * 0.02 - time.monotonic()))
                except asyncio.TimeoutError:
                    continue
                assert message.type == aiohttp.WSMsgType.TEXT, message
                media_after += json.loads(message.data)["event"] == "media"
            return media_after, ws.closed

    before = metric(server, "personaplex_errors_total", kind="twilio_invalid_mark")
    media_after, closed = asyncio.run(call())
    assert media_after >= 5 and not closed
    assert metric(server, "personaplex_errors_total", kind="twilio_invalid_mark") == before + 4


def test_messages_beyond_the_websocket_limit_get_the_documented_error(server):
    async def chat():
        received = Received()
        async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server), max_msg_size=0) as ws:
            reader = asyncio.create_task(read_all(ws, received))
            while 0x04 not in received.kinds():
                await asyncio.sleep(0.01)
            try:
                await ws.send_bytes(b"\x01" + bytes(600 << 10))
            except ConnectionError:  # refused while still sending: what was received before is kept
                pass
            await asyncio.wait_for(reader, 30)
        return received

    async def realtime():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        events = []
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/v1/realtime", headers=headers,
                                                                     max_msg_size=0) as ws:
            await ws.receive_json()
            try:
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (5 << 20)}))
            except ConnectionError:  # refused while still sending: what was received before is kept
                pass
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    events.append(json.loads(message.data))
            return events, ws.close_code

    # The notice comes before the close; a client still sending when the server closes may see the close
    # as a reset (1006) rather than the close frame (1009).
    received = asyncio.run(chat())
    assert received.close_code in (1009, 1006) and "at most 131072" in received.error
    events, code = asyncio.run(realtime())
    assert code in (1009, 1006), code
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "event_too_large", events[-1]


def test_limit_flags_are_documented():
    from personaplex.server.serve import build_parser

    text = build_parser().format_help()
    flags = ("--request-timeout", "--idle-timeout", "--max-connections", "--max-new-connections-per-address",
             "--new-connection-burst", "--input-burst", "--max-messages-per-second", "--allowed-origins")
    for flag in flags:
        assert flag in text
    readme = (REPO / "README.md").read_text()
    for flag in flags:
        assert flag in readme, flag


def test_limit_flags_are_checked_before_loading_anything():
    from personaplex.server.limits import limits_from_args
    from personaplex.server.serve import build_parser

    parser = build_parser()
    limits = limits_from_args(parser.parse_args(["--allowed-origins", "https://app.example.com",
                                                 "--max-connections", "100"]))
    assert limits.max_connections == 100 and limits.allowed_origins.allows("https://app.example.com", "x")
    # The flags' defaults are those of a server started from Python without limits (start_server).
    defaults, python = limits_from_args(parser.parse_args([])), ServerLimits()
    assert (defaults.new_connections_per_address, defaults.new_connection_burst) == \
        (python.new_connections_per_address, python.new_connection_burst) == (20.0, 256)
    limits = limits_from_args(parser.parse_args(["--max-new-connections-per-address", "0",
                                                 "--new-connection-burst", "3"]))
    assert (limits.new_connections_per_address, limits.new_connection_burst) == (0.0, 3)
    for flags in (["--request-timeout", "0"], ["--idle-timeout", "-1"], ["--max-connections", "1"],
                  ["--max-new-connections-per-address", "-1"], ["--new-connection-burst", "0"]):
        with pytest.raises(ValueError, match=flags[0]):
            limits_from_args(parser.parse_args(flags))
