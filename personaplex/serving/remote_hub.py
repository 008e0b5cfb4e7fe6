"""The hub as a front-end process sees it: ``ConversationHub``'s public API over the engine process's host.

A front-end process of ``personaplex serve --front-end-processes N`` runs the unchanged HTTP/WebSocket
server and front ends (``/api/chat``, ``/v1/realtime``, ``/twilio/media-stream``) on a ``RemoteHub``:
``open`` / ``build_persona`` / ``add_voice_upload`` are requests to ``engine_host.EngineHost`` on the control
socket, a ``RemoteConversation`` writes its caller's PCM into its shared-memory channel and reads the
agent's frames from it when the engine's per-tick message arrives. ``describe``, ``voices`` and
``options`` are the engine's, sent once at connection; ``load`` is the engine's latest (sent when it
changes, at most every 100 ms) plus this process's pid (``front_end_pid``: which process serves a call).

When the connection to the engine process ends, every conversation of this process ends with a reason and
``lost`` is set (the process then shuts down).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import fields

import numpy as np

from ..config import FRAME_RATE, FRAME_SIZE
from .control_wire import MAX_JSON_BYTES, ControlProtocolError, encode_message, read_message
from .frame_channels import ChannelBlock, ChannelBroken
from .hub import (
    AgentFrame, ConversationStream, HubBusy, HubClosed, HubOptions, NotSupported, PersonaError, PersonaRequest,
)
from .metrics import HubMetrics

log = logging.getLogger("personaplex.serving")

ENGINE_GONE = "the server's engine process stopped; please reconnect"
_ERRORS = {"persona": PersonaError, "busy": HubBusy, "closed": HubClosed, "unsupported": NotSupported}


def request_message(request: PersonaRequest) -> dict:
    """The JSON form of a persona request (its uploaded voice travels as the message's raw bytes)."""
    s = request.sampling
    return {"text_prompt": request.text_prompt, "voice": request.voice, "context_policy": request.context_policy,
            "sampling": {"text_temperature": s.text_temperature, "text_top_k": s.text_top_k,
                         "audio_temperature": s.audio_temperature, "audio_top_k": s.audio_top_k,
                         "greedy": s.greedy, "seed": s.seed}}


class RemoteConversation(ConversationStream):
    """One conversation served by the engine process; the same API as ``hub.Conversation``."""

    def __init__(self, hub: RemoteHub, opened: dict, channel, front_end: str, start_on_audio: bool):
        self.id = opened["c"]
        self.slot = opened["slot"]
        self.front_end = front_end
        self.start_on_audio = start_on_audio
        self.max_frames = opened["max_frames"]
        self.prompt_frames = opened["prompt_frames"]
        self.context_policy = opened["context_policy"]
        self.cached_persona = opened["cached_persona"]
        self.input_timeout = opened["input_timeout"]
        self.end_reason: str | None = None
        self.output_overflow = False
        self.frames_sent = 0
        self.input_dropped_samples = 0  # audio that did not fit the channel (a client far ahead of real time)
        self._hub = hub
        self._channel = channel
        self._read = 0  # agent frames taken from the ring
        self._output: deque[AgentFrame] = deque()
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()

    # --- front-end API (as hub.Conversation) ----------------------------------------------------------------

    def send_audio(self, pcm: np.ndarray) -> None:
        """User audio: float32 mono 24 kHz samples, any length."""
        if self.end_reason is None:
            dropped = self._channel.input.put(np.asarray(pcm, dtype=np.float32).reshape(-1))
            if dropped:
                self.input_dropped_samples += dropped
                self._hub.metrics.input_dropped.inc(dropped / 24000)

    def stats(self) -> dict:
        return {"frames": self.frames_sent, "output_waiting": len(self._output),
                "input_waiting_ms": round(self._channel.input.waiting_samples / FRAME_SIZE * 1000 / FRAME_RATE)
                if self.end_reason is None else 0,
                "input_dropped_ms": round(self.input_dropped_samples / FRAME_SIZE * 1000 / FRAME_RATE)}

    # --- called by the RemoteHub ----------------------------------------------------------------------------

    def _take_frames(self, until: int | None = None) -> None:
        """Move the agent frames written to the channel (up to frame ``until``) into the output queue."""
        written = self._channel.output.written if until is None else until
        while self._read < written and self.end_reason is None:
            try:
                pcm, text = self._channel.output.get(self._read)
            except ChannelBroken:
                self._end("this server process fell behind the engine; please reconnect")
                return
            self._read += 1
            if len(self._output) >= self._hub.options.max_output_frames:
                seconds = len(self._output) / FRAME_RATE
                self.output_overflow = True
                self._end(f"the client is not taking the agent's audio ({seconds:.1f} s behind)")
                return
            self._output.append(AgentFrame(pcm, text))
            self.frames_sent += 1
            self._wake.set()

    def _end(self, reason: str, tell_engine: bool = True) -> None:
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self._wake.set()
        self._ended.set()
        self._hub._conversation_ended(self, reason, tell_engine)


class RemoteHub:
    """``ConversationHub``'s public API in a front-end process (see the module's notes)."""

    def __init__(self, socket_path: str, key: str, index: int):
        self.socket_path = socket_path
        self.index = index
        self._key = key
        self.metrics = HubMetrics()
        self.options = HubOptions()
        self.config: dict = {}  # the server settings this process runs with (from the engine process)
        self.lost = asyncio.Event()  # the connection to the engine process ended
        self._describe: dict = {}
        self._voices: list[str] = []
        self._load: dict = {}
        self._accepting = False
        self._closed = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._block: ChannelBlock | None = None
        self._receiver: asyncio.Task | None = None
        self._next_id = 0
        self._pending: dict[int, tuple[asyncio.Future, Callable[[int], None] | None]] = {}
        self._conversations: dict[str, RemoteConversation] = {}
        self.tick_notices = 0  # per-tick messages received: one per engine tick with frames, whatever the calls

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def connect(self) -> dict:
        """Introduce this process to the engine process; returns the server settings to run with."""
        self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
        self._write({"t": "hello", "key": self._key, "index": self.index, "pid": os.getpid()})
        received = await read_message(self._reader, 0)
        if received is None or received[0]["t"] != "welcome":
            raise ConnectionError("the engine process refused this front-end process")
        welcome = received[0]
        known = {f.name for f in fields(HubOptions)}
        self.options = HubOptions(**{k: v for k, v in welcome["options"].items() if k in known})
        self._describe, self._voices = welcome["describe"], welcome["voices"]
        self._load, self._accepting = welcome["load"], welcome["accepting"]
        self._block = ChannelBlock.attach(welcome["block"], welcome["channels"])
        self.config = welcome["config"]
        return self.config

    async def start(self) -> None:
        """Start receiving from the engine process (``connect`` first); idempotent."""
        if self._receiver is None:
            self._receiver = asyncio.create_task(self._receive())

    async def close(self, reason: str = "the server is shutting down") -> None:
        self._closed = True
        for conversation in list(self._conversations.values()):
            conversation._end(reason)
        self._fail_pending(HubClosed(reason))
        if self._writer is not None:
            self._writer.close()
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)

    def report_listening(self, port: int) -> None:
        self._write({"t": "listening", "port": port})

    # --- descriptions ---------------------------------------------------------------------------------------

    def describe(self) -> dict:
        return dict(self._describe)

    def load(self) -> dict:
        return {**self._load, "front_end_pid": os.getpid()}

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._closed and not self.lost.is_set()

    def voices(self) -> list[str]:
        return list(self._voices)

    # --- requests -------------------------------------------------------------------------------------------

    async def open(self, request: PersonaRequest, *, front_end: str,
                   on_queue_position: Callable[[int], None] | None = None,
                   input_timeout_seconds: float | None | type[Ellipsis] = ...,
                   start_on_audio: bool = False) -> RemoteConversation:
        """As ``ConversationHub.open``; cancelling it releases the queue place or slot at once."""
        timeout = "default" if input_timeout_seconds is ... else input_timeout_seconds
        request_id, answer = self._request(
            {"t": "open", "request": request_message(request), "front_end": front_end,
             "start_on_audio": start_on_audio, "input_timeout": timeout}, request.voice_audio or b"",
            on_queue_position)
        try:
            opened = await answer
        except asyncio.CancelledError:
            self._pending.pop(request_id, None)
            if not self.lost.is_set():
                self._write({"t": "cancel", "id": request_id})
            raise
        conversation = RemoteConversation(self, opened, self._block.channels[opened["channel"]], front_end,
                                          start_on_audio)
        self._conversations[conversation.id] = conversation
        return conversation

    async def build_persona(self, request: PersonaRequest):
        """Check (and build, in the engine process) a persona; raises as ``ConversationHub.build_persona``."""
        _, answer = self._request({"t": "persona", "request": request_message(request)}, request.voice_audio or b"")
        return await answer

    async def add_voice_upload(self, data: bytes) -> str:
        if not self.options.allow_voice_upload:
            raise PersonaError("this server does not accept uploaded voices (start it with --allow-voice-upload)")
        if len(data) > self.options.max_voice_upload_bytes:
            raise PersonaError(f"the uploaded voice sample has {len(data)} bytes; at most "
                               f"{self.options.max_voice_upload_bytes} are accepted")
        _, answer = self._request({"t": "upload"}, data)
        return await answer

    def _request(self, message: dict, raw: bytes, on_queue_position=None) -> tuple[int, asyncio.Future]:
        if self._closed or self.lost.is_set():
            raise HubClosed(ENGINE_GONE if self.lost.is_set() else "the server is shutting down")
        if len(raw) > self.options.max_voice_upload_bytes:  # the engine process would drop this connection
            raise PersonaError(f"the voice sample has {len(raw)} bytes; at most {self.options.max_voice_upload_bytes} "
                               "are accepted")
        self._next_id += 1
        data = encode_message({**message, "id": self._next_id}, raw)
        if len(data) - len(raw) > MAX_JSON_BYTES:
            raise PersonaError("the persona's text prompt is far longer than the model's context")
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = (future, on_queue_position)
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)
        return self._next_id, future

    def _write(self, message: dict, raw: bytes = b"") -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode_message(message, raw))

    # --- messages from the engine process -------------------------------------------------------------------

    async def _receive(self) -> None:
        try:
            while True:
                received = await read_message(self._reader, 0)
                if received is None:
                    break
                self._dispatch(received[0])
        except (ControlProtocolError, ConnectionError, OSError) as exc:
            log.error("the connection to the engine process failed: %s", exc)
        finally:
            self._engine_lost()

    def _dispatch(self, message: dict) -> None:
        kind = message["t"]
        if kind == "tick":
            self.tick_notices += 1
            for conversation in list(self._conversations.values()):
                conversation._take_frames()
        elif kind == "ended":
            conversation = self._conversations.get(message["c"])
            if conversation is not None:
                conversation._take_frames(until=message["frames"])
                conversation._end(message["reason"])  # tells the engine its channel is free
        elif kind in ("opened", "done", "error"):
            future, _ = self._pending.pop(message["id"], (None, None))
            if future is None or future.done():
                if kind == "opened":  # its caller left meanwhile: end it
                    self._write({"t": "close", "c": message["c"], "reason": "the client left"})
                return
            if kind == "error":
                future.set_exception(_ERRORS.get(message["kind"], HubClosed)(message["message"]))
            else:
                future.set_result(message if kind == "opened" else message["result"])
        elif kind == "queue":
            _, callback = self._pending.get(message["id"], (None, None))
            if callback is not None:
                try:
                    callback(message["position"])
                except Exception:  # noqa: BLE001 - a front end's callback must not break the connection
                    log.exception("queue position callback failed")
        elif kind == "state":
            self._load, self._accepting = message["load"], message["accepting"]

    def _conversation_ended(self, conversation: RemoteConversation, reason: str, tell_engine: bool) -> None:
        self._conversations.pop(conversation.id, None)
        if tell_engine:
            self._write({"t": "close", "c": conversation.id, "reason": reason[:200]})

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: its caller may have left

    def _engine_lost(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        self._accepting = False
        for conversation in list(self._conversations.values()):
            conversation._end(ENGINE_GONE if not self._closed else "the server is shutting down", tell_engine=False)
        self._fail_pending(HubClosed(ENGINE_GONE))
