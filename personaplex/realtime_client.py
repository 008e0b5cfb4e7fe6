"""One synthetic caller of ``personaplex loadtest`` over the Realtime-style endpoint (``/v1/realtime``).

Same measurements as the ``/api/chat`` caller (``personaplex/loadtest.py``), over the Realtime protocol:
``session.update`` with the persona of the URL's query (``text_prompt``, ``voice_prompt``, ``seed``, as the
load test builds it), ``response.create`` to start the conversation (the counterpart of the handshake:
``join`` is connect -> ``response.created``), then base64 PCM16 ``input_audio_buffer.append`` events at
exactly real time while counting ``response.output_audio.delta`` audio and transcript deltas.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import numpy as np

from .chat_client import FRAME_SECONDS, ClientReport
from .config import FRAME_SIZE
from .frontends.codecs import float_to_pcm16_bytes

AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
TRANSCRIPT_DELTAS = ("response.output_audio_transcript.delta", "response.audio_transcript.delta")


def is_realtime_url(url: str) -> bool:
    return urlsplit(url).path.rstrip("/").endswith("/v1/realtime")


async def run_realtime_client(index: int, url: str, audio: np.ndarray, duration: float,
                              ssl_context=None) -> ClientReport:
    import aiohttp

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    headers = {"Authorization": f"Bearer {query['token']}"} if query.get("token") else {}
    connect_url = urlunsplit(parts._replace(query=""))
    session_update = {"type": "session.update", "session": {
        "type": "realtime", "instructions": query.get("text_prompt", ""),
        "audio": {"output": {"voice": query.get("voice_prompt") or None}},
        "sampling": {"seed": int(query.get("seed", index))}}}

    report = ClientReport(index)
    started = time.monotonic()
    send_times: list[float] = []
    anchor: float | None = None
    frames_to_send = int(duration / FRAME_SECONDS)

    async def send(ws) -> None:
        begin = time.monotonic()
        for k in range(frames_to_send):
            await asyncio.sleep(max(0.0, begin + k * FRAME_SECONDS - time.monotonic()))
            start = (k * FRAME_SIZE) % max(1, len(audio) - FRAME_SIZE)
            chunk = base64.b64encode(float_to_pcm16_bytes(audio[start:start + FRAME_SIZE])).decode("ascii")
            send_times.append(time.monotonic())
            report.sent_frames += 1
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await asyncio.sleep(1.0)  # the last answers, then hang up
        await ws.close()

    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                connect_url, ssl=ssl_context or True, headers=headers, max_msg_size=0) as ws:
            sender = None
            await ws.send_str(json.dumps(session_update))
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                kind = event.get("type")
                now = time.monotonic()
                if kind == "session.updated" and sender is None and report.join_seconds is None:
                    await ws.send_str(json.dumps({"type": "response.create"}))
                elif kind == "response.created" and sender is None:
                    report.join_seconds = now - started
                    sender = asyncio.create_task(send(ws))
                elif kind in AUDIO_DELTAS:
                    before = report.frames
                    report.received_samples += len(base64.b64decode(event["delta"])) // 2
                    for k in range(before, report.frames):
                        # As in the /api/chat caller: a listener with an 80 ms playback buffer.
                        if anchor is None:
                            anchor = now - k * FRAME_SECONDS
                        if now > anchor + (k + 1) * FRAME_SECONDS:
                            report.late_frames += 1
                            anchor = now - k * FRAME_SECONDS
                        if k < len(send_times):
                            report.latencies.append(now - send_times[k])
                elif kind in TRANSCRIPT_DELTAS:
                    report.text_pieces += 1
                elif kind == "error" and report.error is None:
                    error = event.get("error") or {}
                    report.error = f"{error.get('code')}: {error.get('message')}"
            if sender is not None:
                await asyncio.gather(sender, return_exceptions=True)
            elif report.error is None:
                report.error = f"closed before the conversation started (code {ws.close_code})"
    except Exception as exc:  # noqa: BLE001 - one caller's failure is a result, not a crash of the test
        report.error = report.error or f"{type(exc).__name__}: {exc}"
    return report
