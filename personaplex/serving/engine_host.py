"""The engine process's side of front-end processes: their conversations on the one ``ConversationHub``.

With ``personaplex serve --front-end-processes N`` the process that holds the model runs the hub and this
host; N front-end processes run the HTTP/WebSocket server, each with a ``remote_hub.RemoteHub`` in place
of the hub. Each front-end process has

- one connection to the host's Unix-domain control socket (``control_wire.py``): opening and closing
  conversations, persona builds, voice uploads, queue positions, end notices, the hub's load;
- one block of shared memory (``frame_channels.py``) with a channel per conversation: its caller's PCM in,
  the agent's frames out.

Per 80 ms tick the engine thread takes the audio every channel received (``before_tick``, one pass over
the shared memory, no system call), steps, and the agent frames go into the channels' output rings on this
process's event loop; then each front-end process gets **one** ``tick`` message, however many callers it
serves: system calls grow with processes, not callers.

A front-end process is not trusted with the engine: every message is bounded and checked (a malformed one
closes that process's connection), ring counters are checked on every read, and a process that stops
reading its socket is dropped. When a front-end process's connection ends (it exited, crashed, or broke
the protocol) its conversations end at once and their slots are freed; the other processes' calls go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import os
import threading
from collections.abc import Callable

from ..engine import SamplingConfig
from .control_wire import ControlProtocolError, encode_message, field, read_message
from .frame_channels import ChannelBlock, ChannelBroken
from .hub import HubBusy, HubClosed, NotSupported, PersonaError, PersonaRequest

log = logging.getLogger("personaplex.serving")

HELLO_TIMEOUT_SECONDS = 10.0  # a connection that does not introduce itself in this time is closed
MAX_UNSENT_BYTES = 8 << 20  # a front-end process that leaves this much unread on its socket is dropped
STATE_INTERVAL_SECONDS = 0.1  # how often a changed load (slots busy, queue) is sent to the front ends
CHANNEL_SLACK = 16  # channels per front-end process beyond the slots: ended calls whose end is not yet confirmed


class _Call:
    """One conversation of a front-end process, on its channel."""

    __slots__ = ("id", "conversation", "index", "channel", "pump", "front_closed", "pump_done")

    def __init__(self, conversation, index: int, channel):
        self.id = conversation.id
        self.conversation = conversation
        self.index = index
        self.channel = channel
        self.pump: asyncio.Task | None = None
        self.front_closed = False  # the front end said it is done with the channel
        self.pump_done = False  # every agent frame is in the ring and the end notice was sent


class FrontEndLink:
    """The host's view of one connected front-end process."""

    def __init__(self, host: EngineHost, index: int, pid: int, writer: asyncio.StreamWriter, block: ChannelBlock):
        self.host = host
        self.index = index
        self.pid = pid
        self.writer = writer
        self.block = block
        self.free = list(range(block.count - 1, -1, -1))
        self.calls: dict[str, _Call] = {}
        self.opening: dict[int, asyncio.Task] = {}
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        self.reason = ""
        self._tick_pending = False
        self._state_sent: dict | None = None

    def send(self, message: dict) -> None:
        if self.closed:
            return
        if self.writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.abort(f"it left {MAX_UNSENT_BYTES >> 20} MiB of messages unread")
            return
        self.writer.write(encode_message(message))

    def frames_ready(self) -> None:
        """Called for every agent frame put in a ring; one ``tick`` message goes out once this loop
        iteration's frames are all in (the pumps of one tick run in the same iteration)."""
        if not self._tick_pending:
            self._tick_pending = True
            asyncio.get_running_loop().call_soon(self._send_tick)

    def _send_tick(self) -> None:
        self._tick_pending = False
        self.send({"t": "tick"})

    def send_state(self) -> None:
        state = {"load": self.host.hub.load(), "accepting": self.host.hub.accepting}
        if state != self._state_sent:
            self._state_sent = state
            self.send({"t": "state", **state})

    def abort(self, reason: str) -> None:
        """Drop this front-end process: its connection closes, its conversations end (``EngineHost._serve``)."""
        if self.closed:
            return
        self.reason = reason
        self.closed = True
        self.writer.transport.abort()


class EngineHost:
    """Serves front-end processes from the engine process: accepts their control connections and runs
    their conversations on ``hub`` (a started ``ConversationHub``)."""

    def __init__(self, hub, *, key: str, front_ends: int, config_for: Callable[[int], dict],
                 on_listening: Callable[[int, int, int], None] | None = None):
        self.hub = hub
        self.key = key
        self.front_ends = front_ends
        self.channels_per_front_end = hub.engine.max_slots + CHANNEL_SLACK
        self.config_for = config_for  # index -> the server settings that front-end process runs with
        self.on_listening = on_listening  # (index, pid, port) once a front-end process listens
        self.links: dict[int, FrontEndLink] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inputs: dict[str, tuple[object, object, FrontEndLink]] = {}  # id -> (conversation, input ring, link)
        # Held by the engine thread while it reads input rings, and by the event loop to change ``_inputs``
        # or unmap a block: a block unmapped under a read in progress would crash the engine process.
        self._inputs_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state_task: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()
        self.protocol_errors = 0
        from prometheus_client import CollectorRegistry, Gauge

        from .metrics import GAUGE_MODE, PREFIX

        # Its own registry (several hosts in one process, as in tests); with shared metrics it is summed anyway.
        self.connected = Gauge(f"{PREFIX}_front_end_processes_connected", "Front-end processes connected to the "
                               "engine process", registry=CollectorRegistry(), multiprocess_mode=GAUGE_MODE)
        self.stopping = False  # set when the server shuts down: front ends leaving is expected

    async def start(self, socket_path: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.hub.before_tick.append(self._take_input)
        self._server = await asyncio.start_unix_server(self._accept, path=socket_path)
        os.chmod(socket_path, 0o600)
        self._state_task = asyncio.create_task(self._send_states())

    async def close(self, reason: str = "the server is shutting down") -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._state_task is not None:
            self._state_task.cancel()
        for link in list(self.links.values()):
            link.abort(reason)
        for task in list(self._connections):
            await asyncio.gather(task, return_exceptions=True)
        if self._take_input in self.hub.before_tick:
            self.hub.before_tick.remove(self._take_input)

    # --- the engine thread ---------------------------------------------------------------------------------

    def _take_input(self) -> None:
        """Engine thread, start of a tick: every channel's new audio into its conversation's jitter buffer."""
        with self._inputs_lock:
            for conversation, ring, link in self._inputs.values():
                try:
                    pcm = ring.take()
                except ChannelBroken as exc:
                    self._loop.call_soon_threadsafe(self._broken, link, str(exc))
                    continue
                except Exception:  # noqa: BLE001 - never let one channel stop the tick
                    log.exception("reading a front end's audio failed")
                    continue
                if pcm is not None:
                    conversation.send_audio(pcm)

    def _broken(self, link: FrontEndLink, what: str) -> None:
        self.protocol_errors += 1
        self.hub.metrics.record_error("front_end_protocol")
        log.error("front-end process %d (pid %d) broke its shared memory (%s): its calls end", link.index,
                  link.pid, what)
        link.abort("it broke its shared memory")

    # --- connections ---------------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._connection(reader, writer)
        finally:
            self._connections.discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(read_message(reader, 0), HELLO_TIMEOUT_SECONDS)
            link = self._introduce(hello, writer)
        except (ControlProtocolError, asyncio.TimeoutError, ConnectionError) as exc:
            self.protocol_errors += 1
            self.hub.metrics.record_error("front_end_protocol")
            log.warning("refused a connection on the control socket: %s", exc or "no hello in time")
            writer.transport.abort()
            return
        log.info("front-end process %d (pid %d) connected", link.index, link.pid)
        self.connected.inc()
        try:
            await self._serve(link, reader)
        finally:
            self.connected.dec()
            await self._drop(link)

    def _introduce(self, hello, writer: asyncio.StreamWriter) -> FrontEndLink:
        if hello is None:
            raise ControlProtocolError("the connection ended before its hello")
        message, _ = hello
        if message["t"] != "hello" or not hmac.compare_digest(str(field(message, "key", str)), self.key):
            raise ControlProtocolError("the first message is not a hello with this server's key")
        index, pid = field(message, "index", int), field(message, "pid", int)
        if not 0 <= index < self.front_ends:
            raise ControlProtocolError(f"front-end index {index} out of range")
        previous = self.links.get(index)
        if previous is not None:  # a restarted process before its predecessor's connection was seen closing
            previous.abort("a new process took its place")
        block = ChannelBlock.create(self.channels_per_front_end)
        link = FrontEndLink(self, index, pid, writer, block)
        self.links[index] = link
        hub = self.hub
        link.send({"t": "welcome", "block": block.name, "channels": block.count,
                   "options": dataclasses.asdict(hub.options), "describe": hub.describe(), "voices": hub.voices(),
                   "load": hub.load(), "accepting": hub.accepting, "config": self.config_for(index)})
        return link

    async def _serve(self, link: FrontEndLink, reader: asyncio.StreamReader) -> None:
        max_raw = self.hub.options.max_voice_upload_bytes
        while not link.closed:
            try:
                received = await read_message(reader, max_raw)
            except ControlProtocolError as exc:
                self._protocol_error(link, str(exc))
                return
            except (ConnectionError, OSError):
                return
            if received is None:
                return
            message, raw = received
            try:
                self._dispatch(link, message, raw)
            except ControlProtocolError as exc:
                self._protocol_error(link, str(exc))
                return

    def _protocol_error(self, link: FrontEndLink, what: str) -> None:
        self.protocol_errors += 1
        self.hub.metrics.record_error("front_end_protocol")
        log.error("front-end process %d (pid %d) sent a malformed message (%s): its calls end", link.index,
                  link.pid, what)
        link.abort("it sent a malformed message")

    def _dispatch(self, link: FrontEndLink, message: dict, raw: bytes) -> None:
        kind = message["t"]
        if kind == "close":
            call = link.calls.get(field(message, "c", str))
            if call is not None:
                call.front_closed = True
                self._start(link, call.conversation.close(str(field(message, "reason", str))[:200]))
                self._release_when_done(link, call)
        elif kind == "open":
            request_id = field(message, "id", int)
            request = persona_request(field(message, "request", dict), raw)
            front_end = field(message, "front_end", str)[:40]
            start_on_audio = field(message, "start_on_audio", bool)
            timeout = input_timeout(message.get("input_timeout"))
            link.opening[request_id] = self._start(
                link, self._open(link, request_id, request, front_end, start_on_audio, timeout))
        elif kind == "cancel":
            task = link.opening.get(field(message, "id", int))
            if task is not None:
                task.cancel()
        elif kind == "persona":
            request_id = field(message, "id", int)
            request = persona_request(field(message, "request", dict), raw)
            self._start(link, self._answer(link, request_id, self._built(request)))
        elif kind == "upload":
            request_id = field(message, "id", int)
            self._start(link, self._answer(link, request_id, self.hub.add_voice_upload(raw)))
        elif kind == "listening":
            port = field(message, "port", int)
            if self.on_listening is not None:
                self.on_listening(link.index, link.pid, port)
        else:
            raise ControlProtocolError(f"unknown message type {kind[:40]!r}")

    def _start(self, link: FrontEndLink, work) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        link.tasks.add(task)
        task.add_done_callback(link.tasks.discard)
        return task

    async def _built(self, request: PersonaRequest) -> bool:
        await self.hub.build_persona(request)
        return True

    async def _answer(self, link: FrontEndLink, request_id: int, work) -> None:
        try:
            result = await work
        except Exception as error:  # noqa: BLE001 - every outcome goes back to the asking front end
            link.send(error_reply(request_id, error))
            return
        link.send({"t": "done", "id": request_id, "result": result})

    async def _open(self, link: FrontEndLink, request_id: int, request: PersonaRequest, front_end: str,
                    start_on_audio: bool, timeout) -> None:
        def position(place: int) -> None:
            link.send({"t": "queue", "id": request_id, "position": place})

        try:
            conversation = await self.hub.open(request, front_end=front_end, on_queue_position=position,
                                               input_timeout_seconds=timeout, start_on_audio=start_on_audio)
        except asyncio.CancelledError:
            link.send({"t": "error", "id": request_id, "kind": "closed", "message": "cancelled"})
            raise
        except Exception as error:  # noqa: BLE001
            link.send(error_reply(request_id, error))
            return
        finally:
            link.opening.pop(request_id, None)
        if link.closed or not link.free:
            reason = "the front-end process stopped" if link.closed else "no free channel in this front-end process"
            await conversation.close(reason)
            link.send({"t": "error", "id": request_id, "kind": "busy", "message": reason})
            return
        index = link.free.pop()
        channel = link.block.channels[index]
        channel.reset()
        call = _Call(conversation, index, channel)
        link.calls[call.id] = call
        with self._inputs_lock:
            self._inputs[call.id] = (conversation, channel.input, link)
        link.send({"t": "opened", "id": request_id, "c": call.id, "channel": index, "slot": conversation.slot,
                   "max_frames": conversation.max_frames, "prompt_frames": conversation.prompt_frames,
                   "context_policy": conversation.context_policy, "cached_persona": conversation.cached_persona,
                   "input_timeout": conversation.input_timeout})
        call.pump = self._start(link, self._pump(link, call))

    async def _pump(self, link: FrontEndLink, call: _Call) -> None:
        """The conversation's agent frames into its ring, then its end notice."""
        conversation = call.conversation
        ring = call.channel.output
        try:
            async for frame in conversation.frames():
                ring.put(frame.pcm, frame.text)
                link.frames_ready()
        finally:
            with self._inputs_lock:
                self._inputs.pop(call.id, None)
            link.send({"t": "ended", "c": call.id, "reason": conversation.end_reason or "ended",
                       "frames": ring.written})
            call.pump_done = True
            self._release_when_done(link, call)

    def _release_when_done(self, link: FrontEndLink, call: _Call) -> None:
        if call.front_closed and call.pump_done and link.calls.get(call.id) is call:
            del link.calls[call.id]
            link.free.append(call.index)

    async def _drop(self, link: FrontEndLink) -> None:
        """The link's connection ended: end its conversations and requests now, then free its memory."""
        reason = link.reason or "its connection closed"
        link.closed = True
        link.writer.transport.abort()
        if self.links.get(link.index) is link:
            del self.links[link.index]
        calls = list(link.calls.values())
        with self._inputs_lock:
            for call in calls:
                self._inputs.pop(call.id, None)
        for call in calls:
            await call.conversation.close("the server's front-end process for this call stopped")
        for task in list(link.tasks):
            task.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)
        log.log(logging.INFO if self.stopping else logging.WARNING, "front-end process %d (pid %d) is gone (%s): "
                "%d of its calls ended", link.index, link.pid, reason, len(calls))
        link.calls.clear()
        link.block.close()  # safe: its rings left _inputs under the lock, so no engine-thread read is in progress

    async def _send_states(self) -> None:
        metrics = self.hub.metrics
        while True:
            await asyncio.sleep(STATE_INTERVAL_SECONDS)
            for link in list(self.links.values()):
                link.send_state()
            mirror_function_gauges(metrics)


def mirror_function_gauges(metrics) -> None:
    """Metrics shared over processes are read from files, which a gauge computed by a function never writes:
    store its current value (the persona builds in progress)."""
    value = metrics.registry.get_sample_value("personaplex_persona_builds_in_progress")
    if value is not None:
        metrics.persona_builds.set(value)


def error_reply(request_id: int, error: BaseException) -> dict:
    kind = {PersonaError: "persona", HubBusy: "busy", HubClosed: "closed", NotSupported: "unsupported"}.get(
        type(error), "internal")
    if kind == "internal":
        log.error("a front end's request failed: %r", error)
    return {"t": "error", "id": request_id, "kind": kind, "message": str(error) if kind != "internal" else
            "internal server error"}


def input_timeout(value):
    """The ``input_timeout`` of an open message: "default" (the hub's), None (never) or positive seconds."""
    if value == "default":
        return ...
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ControlProtocolError("input_timeout must be 'default', null or positive seconds")
    return float(value)


_SAMPLING_FIELDS = {"text_temperature": float, "text_top_k": int, "audio_temperature": float, "audio_top_k": int,
                    "greedy": bool}


def persona_request(data: dict, voice_audio: bytes) -> PersonaRequest:
    """A ``PersonaRequest`` from its JSON form (``remote_hub.request_message``), every field type-checked:
    the hub checks the values (ranges, voices, policies) as for any caller."""
    text_prompt = field(data, "text_prompt", str)
    voice = field(data, "voice", str, optional=True)
    policy = field(data, "context_policy", str, optional=True)
    sampling_data = field(data, "sampling", dict)
    values = {}
    for name, kind in _SAMPLING_FIELDS.items():
        value = field(sampling_data, name, (int, float) if kind is float else kind)
        if kind is float and not math.isfinite(value):
            raise ControlProtocolError(f"sampling {name} is not finite")
        values[name] = float(value) if kind is float else value
    seed = field(sampling_data, "seed", int, optional=True)
    if seed is not None and not 0 <= seed < 2**63:
        raise ControlProtocolError("sampling seed out of range")
    for name in ("text_top_k", "audio_top_k"):
        if not 1 <= values[name] <= 1 << 20:
            raise ControlProtocolError(f"sampling {name} out of range")
    return PersonaRequest(text_prompt=text_prompt, voice=voice, voice_audio=voice_audio or None,
                          sampling=SamplingConfig(**values, seed=seed), context_policy=policy)
