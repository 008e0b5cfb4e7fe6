"""Persona builds against a real running server (demo model, loopback): callers that would be refused cost
no build (capacity is checked first), builds are bounded in number and queue (more callers are refused
at once as busy), a flood of unique prompts leaves an ordinary caller's conversation intact, Realtime
``session.update`` persona changes are limited per connection, and shutdown never waits for a build in
progress (in process and through SIGTERM of ``personaplex serve``).

Real-time figures under a flood (>= 0.9x real time, no gap over 0.5 s) are measured by
``bench/persona_flood.py``, not here: this machine is small and shared."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import numpy as np
import pytest

from test_server_protocol import ServerThread as ProtocolServerThread
from test_server_protocol import opus_pages

from personaplex.ogg import parse_pages

REPO = Path(__file__).resolve().parents[2]


class ServerThread(ProtocolServerThread):
    """The protocol tests' server thread, with what these tests look at."""

    @property
    def builds(self):
        return self.hub._builds



def long_voice(name: str, seconds: float = 29.0) -> bytes:
    from personaplex.demo import synthesize_voice, wav_bytes

    return wav_bytes(synthesize_voice(name, seconds=seconds))


def chat_url(base: str, **params) -> str:
    return f"{base}?{urlencode({'text_prompt': 'hello', 'voice_prompt': 'NATF2', **params})}"


async def ordinary_caller(url: str, frames: int) -> dict:
    """Caller A: streams real-time Opus and counts the agent's audio pages until ``frames`` arrived."""
    pages = opus_pages(frames / 12.5 + 2)
    result = {"audio": 0, "error": None, "close": None}
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async def send():
            started = time.monotonic()
            for index, page in enumerate(pages):
                await asyncio.sleep(max(0.0, started + index * 0.08 - time.monotonic()))
                await ws.send_bytes(b"\x01" + page)

        sender = None
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            kind = message.data[0]
            if kind == 0x00:
                sender = asyncio.create_task(send())
            elif kind == 0x01:
                result["audio"] += 1
                if result["audio"] >= frames + 2:
                    break
            elif kind == 0x05:
                result["error"] = message.data[1:].decode()
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await ws.close()
        result["close"] = ws.close_code
    return result


async def flood_caller(url: str, hold: asyncio.Event | None = None) -> tuple[str, str | None, int | None]:
    """Connect with a persona; ('joined' | 'refused' | 'closed', error text, close code). With ``hold``, a
    caller that joined stays until it is set."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            if message.data[0] == 0x00:
                if hold is not None:
                    await hold.wait()
                await ws.close()
                return "joined", None, ws.close_code
            if message.data[0] == 0x05:
                error = message.data[1:].decode()
                await ws.receive()
                return "refused", error, ws.close_code
        return "closed", None, ws.close_code


async def post(url: str, data: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as response:
        return response.status, json.loads(await response.text())


async def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --- admission before work ---------------------------------------------------------------------------------


def test_callers_refused_for_capacity_cost_no_persona_build(demo_model):
    running = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None)

    async def scenario():
        hold = asyncio.Event()
        holder = asyncio.create_task(flood_caller(chat_url(running.url, text_prompt="holder"), hold))
        await wait_for(lambda: running.hub.load()["slots_busy"] == 1)
        started = running.builds.started
        outcomes = await asyncio.gather(*(flood_caller(chat_url(running.url, text_prompt=f"unique prompt {i}"))
                                          for i in range(12)))
        builds = running.builds.started - started
        hold.set()
        return await holder, outcomes, builds

    try:
        holder, outcomes, builds = asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        running.stop()
    assert holder[0] == "joined"
    assert all(kind == "refused" and code == 1013 and "busy" in error for kind, error, code in outcomes), outcomes
    assert builds == 0  # refused before any persona work


def test_flood_of_unique_prompts_is_bounded_and_leaves_an_ordinary_caller_intact(demo_model):
    running = ServerThread(demo_model, max_conversations=3, max_queue=1, input_timeout_seconds=None,
                           persona_build_workers=1, max_persona_builds_waiting=2)
    frames = 60

    async def scenario():
        caller = asyncio.create_task(ordinary_caller(chat_url(running.url, text_prompt="caller A", seed=5), frames))
        await wait_for(lambda: running.hub.load()["slots_busy"] >= 1)
        outcomes = []
        round_ = 0
        while not caller.done():  # waves of unique prompts for as long as A talks
            outcomes += await asyncio.gather(*(flood_caller(chat_url(running.url, text_prompt=f"flood {round_} {i}"))
                                               for i in range(10)))
            round_ += 1
        return await caller, outcomes

    try:
        caller, outcomes = asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        running.stop()
    assert caller["error"] is None and caller["audio"] >= frames + 2, caller
    assert outcomes and all(kind == "joined" or (code == 1013 and "busy" in error) for kind, error, code in outcomes)
    assert any(kind == "refused" for kind, _, _ in outcomes)  # the flood was bigger than the server
    assert running.builds.peak_running <= 1  # one build thread, whatever the flood


def test_builds_are_capped_and_the_loop_keeps_serving_while_a_build_runs(demo_model):
    """One build thread, no waiting place: while it is busy (held here by a build that waits for a signal,
    so that the check does not depend on how fast this machine encodes), every new build is refused at
    once, over every route, and the event loop keeps answering."""
    running = ServerThread(demo_model, max_conversations=2, max_queue=0, input_timeout_seconds=None,
                           allow_voice_upload=True, persona_build_workers=1, max_persona_builds_waiting=0)
    release = threading.Event()

    async def scenario():
        held = asyncio.run_coroutine_threadsafe(
            running.builds.run(("held build",), lambda cancelled: release.wait(120)), running.loop)
        await wait_for(lambda: running.builds.running == 1)
        async with aiohttp.ClientSession() as session, session.get(running.http + "/api/health") as health:
            health_status = health.status
        second = await post(running.http + "/api/voices", long_voice("second"))
        busy_chat = await flood_caller(chat_url(running.url, text_prompt="a new persona while building"))
        still_building = running.builds.running == 1
        release.set()
        await asyncio.wrap_future(held)
        first = await post(running.http + "/api/voices", long_voice("first", seconds=3.0))
        return first, second, busy_chat, health_status, still_building

    try:
        first, second, busy_chat, health_status, still_building = asyncio.run(asyncio.wait_for(scenario(), 300))
        metrics = running.hub.metrics.render()
    finally:
        release.set()
        running.stop()
    assert still_building
    assert health_status == 200
    assert second[0] == 503 and "persona builds are in progress" in second[1]["error"]
    assert busy_chat[0] == "refused" and busy_chat[2] == 1013 and "persona builds are in progress" in busy_chat[1]
    assert 'personaplex_errors_total{kind="persona_builds_busy"} 2.0' in metrics
    assert first[0] == 200 and first[1]["voice"].startswith("upload-")  # served once the thread was free


def voice_variants(seconds: float, count: int) -> list[bytes]:
    """``count`` different WAV uploads of one synthesized voice (their last sample differs): each costs a
    whole build, as none is in the cache."""
    sample = long_voice("during", seconds)
    return [sample[:-2] + index.to_bytes(2, "little") for index in range(count)]


BUILDING_SECONDS = 3.0  # builds measured back to back, at least: three times the longest gap allowed
MAX_GAP_SECONDS = 1.0  # between agent audio pages while building (0.15 s here, 0.6 s with the CPU loaded)
MIN_RATE_SHARE = 0.5  # of the agent audio seconds per second before the builds, kept while building


def test_ordinary_caller_keeps_talking_during_a_long_build(demo_model):
    """Agent audio keeps arriving for caller A, with no gap over ``MAX_GAP_SECONDS`` and at least half as
    many seconds of it per second as before (counted by the pages' granule positions), while 29 s voice
    samples are decoded and encoded back to back for at least
    ``BUILDING_SECONDS`` (builds run at a lower CPU priority than the engine; on a fast machine one build
    is short, so as many are queued as fill that time)."""
    running = ServerThread(demo_model, max_conversations=2, max_queue=0, input_timeout_seconds=None,
                           allow_voice_upload=True, max_persona_builds_waiting=31)
    # Made before the conversation: synthesizing in the client's event loop would stop it reading, and the
    # server rightly drops a client that does not read its audio for 2 s.
    voices = voice_variants(29.0, 32)
    arrivals: list[float] = []  # when each agent audio page came
    audio: list[float] = []  # and the agent audio seconds sent up to its end (its granule position)

    async def scenario():
        async def count_audio():
            pages = opus_pages(120)
            async with aiohttp.ClientSession() as session, session.ws_connect(chat_url(running.url)) as ws:
                started = None
                index = 0
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.BINARY:
                        break
                    if message.data[0] == 0x00:
                        started = time.monotonic()
                    if started is not None:
                        while index < len(pages) and time.monotonic() >= started + index * 0.08:
                            await ws.send_bytes(b"\x01" + pages[index])
                            index += 1
                    if message.data[0] == 0x01:
                        arrivals.append(time.monotonic())
                        audio.append(parse_pages(message.data[1:])[0].granule / 48000)
                    elif message.data[0] == 0x05:
                        raise AssertionError(f"the call ended: {message.data[1:].decode()}")
            raise AssertionError(f"the call ended (close code {ws.close_code})")

        async def build(uploads: list[bytes]) -> tuple[float, float]:
            """Upload them all at once (the build thread takes one after the other): (start, end) of the builds."""
            finished = running.builds.finished
            posts = [asyncio.create_task(post(running.http + "/api/voices", data)) for data in uploads]
            await wait_for(lambda: running.builds.running == 1 or running.builds.finished > finished)
            start = time.monotonic()
            await wait_for(lambda: running.builds.finished == finished + len(uploads))
            end = time.monotonic()
            results = await asyncio.gather(*posts)
            assert [status for status, _ in results] == [200] * len(uploads), results
            return start, end

        caller = asyncio.create_task(count_audio())
        await wait_for(lambda: len(arrivals) > 5 or caller.done())
        assert not caller.done(), caller.exception()
        quiet = time.monotonic()
        await asyncio.sleep(2.0)  # the rate without builds
        quiet = (quiet, time.monotonic())
        windows, used = [], 0  # (start, end) of each batch of builds
        while sum(end - start for start, end in windows) < BUILDING_SECONDS and used < len(voices):
            built = sum(end - start for start, end in windows)
            # Builds take 0.2-10 s (CPU speed and load): queue enough to fill the time left, with a margin.
            count = 1 if not windows else int(2 * (BUILDING_SECONDS - built) / max(built / used, 0.01)) + 1
            count = min(count, len(voices) - used)
            windows.append(await build(voices[used:used + count]))
            used += count
            assert not caller.done(), caller.exception()
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        return quiet, windows, used

    try:
        quiet, windows, used = asyncio.run(asyncio.wait_for(scenario(), 600))
    finally:
        running.stop()
    def audio_seconds(start: float, end: float) -> float:
        """Agent audio that arrived between ``start`` and ``end``."""
        index = np.searchsorted(arrivals, [start, end], side="right") - 1
        return audio[index[1]] - audio[index[0]] if index[1] >= 0 else 0.0

    building = sum(end - start for start, end in windows)
    longest_gap = max(np.diff([start, *(t for t in arrivals if start <= t <= end), end]).max()
                      for start, end in windows)
    rate_before = audio_seconds(*quiet) / (quiet[1] - quiet[0])
    rate_during = sum(audio_seconds(start, end) for start, end in windows) / building
    print(f"{used} builds in {len(windows)} batches, building {building:.2f} s; agent audio {rate_before:.2f} s/s "
          f"before, {rate_during:.2f} s/s while building, longest gap {longest_gap:.3f} s")
    assert building >= BUILDING_SECONDS, (used, windows)  # long enough to prove something
    assert longest_gap <= MAX_GAP_SECONDS, (longest_gap, windows)  # frames kept coming while it built
    assert rate_during >= MIN_RATE_SHARE * rate_before, (rate_during, rate_before)


# --- Realtime session.update ------------------------------------------------------------------------------


def test_realtime_persona_changes_are_limited_per_connection(demo_model):
    running = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None,
                           max_persona_changes=3)

    async def scenario():
        started = running.builds.started
        events = []
        url = running.url.replace("/api/chat", "/v1/realtime")
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            for index in range(6):
                await ws.send_str(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "instructions": f"new instructions number {index}"}}))
                while True:
                    event = json.loads((await ws.receive()).data)
                    if event["type"] in ("session.updated", "error"):
                        events.append(event)
                    if event["type"] == "session.updated":
                        break
            last = events[-1]["session"]["instructions"]
        return events, running.builds.started - started, last

    try:
        events, builds, last = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        running.stop()
    errors = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert errors == ["too_many_persona_changes"] * 3
    assert builds <= 3
    assert last == "new instructions number 2"  # the refused changes did not apply


# --- shutdown ----------------------------------------------------------------------------------------------


def test_shutdown_does_not_wait_for_a_persona_build(demo_model):
    running = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None,
                           allow_voice_upload=True)

    async def start_build():
        upload = asyncio.ensure_future(post(running.http + "/api/voices", long_voice("shutdown")))
        await wait_for(lambda: running.builds.running == 1)
        return upload

    client_loop = asyncio.new_event_loop()
    try:
        upload = client_loop.run_until_complete(start_build())
        running.stop()  # what SIGTERM runs
        building_when_stopped = running.builds.running == 1
        try:
            status = client_loop.run_until_complete(asyncio.wait_for(upload, 30))[0]
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = None
    finally:
        client_loop.close()
    assert building_when_stopped  # the server stopped while the build was still running
    assert status in (None, 503)  # the uploader was told (or disconnected), never given a half-built voice
    deadline = time.monotonic() + 60
    while running.builds.running and time.monotonic() < deadline:  # it stops at its next chunk
        time.sleep(0.05)
    assert running.builds.running == 0 and running.builds.abandoned == 1 and running.builds.finished == 0


@pytest.mark.slow
def test_sigterm_during_a_persona_build_exits_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "personaplex.server", "--model", "demo", "--host", "127.0.0.1", "--port", "0",
         "--allow-voice-upload", "--max-conversations", "1", "--opus-workers", "0", "--static", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url = None
        for line in server.stdout:
            found = re.search(r"(http://\S+)", line)
            if found and "Access" in line:
                url = found.group(1)
                break
        assert url, "the server did not start"

        async def build_then_signal():
            upload = asyncio.ensure_future(post(url + "/api/voices", long_voice("sigterm")))
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    async with session.get(url + "/metrics") as response:
                        if "personaplex_persona_builds_in_progress 1.0" in await response.text():
                            break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("no persona build seen")
            server.send_signal(signal.SIGTERM)
            try:
                return (await asyncio.wait_for(upload, 60))[0]
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None

        status = asyncio.run(build_then_signal())
        code = server.wait(timeout=120)
        rest = server.stdout.read()
        errors = server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert code == 0, errors[-2000:]
    assert "stopped" in rest
    assert "Traceback" not in errors, errors[-2000:]
    assert status in (None, 503)
