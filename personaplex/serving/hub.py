"""The conversation hub: live conversations from any front end, driven through one batched engine.

Every front end (the ``/api/chat`` WebSocket, the Realtime and phone bridges, scale-out replicas) opens
``Conversation`` objects on one ``ConversationHub``. The hub owns the ``Engine`` and one *engine
thread* that ticks every 80 ms on a drift-free schedule (tick k is due at start + k x 80 ms); GPU work
never runs on the asyncio event loop.

Per tick the engine thread:

1. applies the requests the event loop queued (joins, leaves), in order;
2. takes one 80 ms frame from each live conversation's jitter buffer (silence on an underrun) and runs
   one batched step, then hands each conversation its agent frame: output is in step with input,
   one frame per tick, whatever the client does;
3. spends what is left of the tick on joins: a persona's system prompt comes from the prefix cache
   (instant) or is prefilled in blocks between the steps, so live conversations keep ticking.

A conversation opened with ``start_on_audio`` (``/api/chat`` does so for the reference web client)
starts its clock at its caller's first audio instead: once its system prompt is applied it waits,
holding its slot but not stepping, until the first samples of the caller's audio have arrived (or the
input timeout passes), as in the reference server ("no input, no output" until then); its first step is
the next tick's. A client that is not listening yet when it is told to start thus misses none of the
agent's first words. The first samples rather than a full frame: a client that sends 20 ms packets
waits for one packet, not four (a first tick that finds less than a frame takes silence, as any
underrun; the partial audio stays for the next).

A tick that finishes after the next one was due counts as *late*; when the engine falls more than one
tick behind, the missed tick times are skipped (counted), never caught up in a burst: a slow machine
degrades (each client's jitter buffer drops its oldest audio) but never builds a backlog.

Admission: at most ``max_conversations`` conversations hold a slot; the next ``max_queue`` wait in a
FIFO queue (their position is reported through ``on_queue_position``); past that ``open`` raises
``HubBusy``. Cancelling ``open`` (a client that vanished) or closing a conversation frees its queue
place or slot at once, also in the middle of its prefill.

A conversation ends (``end_reason`` says why) when its client closes, when it reaches the operator's
maximum length (``max_conversation_seconds``; none by default: past the model's context the KV rings
slide, under the conversation's context policy), when no audio arrived for the input timeout, when its
client does not take its frames (more than ``max_output_frames`` waiting), or when the hub shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .. import startup
from ..app import model as model_flags
from ..config import FRAME_RATE, FRAME_SIZE
from ..engine import Engine, SamplingConfig, check_slots_fit, slots_that_fit
from ..engine.engine import CONTEXT_POLICIES
from ..errors import PersonaplexError, UsageError
from ..persona import BuildCancelled
from ..persona_store import (  # MAX_VOICE_NAME_BYTES and PersonaError: also part of the hub's interface
    DEFAULT_VOICE,
    MAX_VOICE_NAME_BYTES,
    PersonaError,
    PersonaStore,
    UploadLimits,
)
from ..text import SpokenText
from .jitter import InputJitterBuffer
from .metrics import HubMetrics
from .persona_builds import BuildsBusy, BuildsClosed, PersonaBuilds

log = logging.getLogger("personaplex.serving")

TICK_SECONDS = 1.0 / FRAME_RATE  # 80 ms
TICK_MARGIN_SECONDS = 0.005  # kept free at the end of a tick for the event loop's share of the GIL
JOIN_PATIENCE_TICKS = 5
ENGINE_SWITCH_INTERVAL_SECONDS = 0.001  # see ConversationHub.start


@dataclass(frozen=True)
class PersonaRequest:
    """Who the agent is in one conversation."""

    text_prompt: str = ""
    voice: str | None = None  # a preset name, resolved ONLY inside the server's voice folder (no paths)
    voice_audio: bytes | None = None  # an uploaded voice sample (wav/ogg/...), only if the server allows uploads
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # temperatures, top-k, seed
    # What the conversation keeps once it is longer than the model's context: one of CONTEXT_POLICIES
    # ("sliding": the reference's window; "pin-persona": the system prompt stays). None: the server's default.
    context_policy: str | None = None


@dataclass
class AgentFrame:
    pcm: np.ndarray  # float32 [1920], 24 kHz mono: the agent's audio for one 80 ms frame
    text: str | None  # the text piece the agent emitted in this frame (None for padding)


class HubBusy(PersonaplexError):
    """All slots are busy and the waiting queue is full."""


class HubClosed(PersonaplexError):
    """The hub is shutting down (or not started) and takes no conversations."""


class NotSupported(PersonaplexError):
    """The model or this server does not offer what was asked."""


@dataclass
class HubOptions:
    """Limits and timing of a hub (all optional; the defaults suit a real-time server)."""

    max_conversations: int = 4  # engine slots
    max_queue: int = 16  # conversations allowed to wait for a slot
    # None: no limit. Past the model's context the KV rings slide (each new frame evicts the oldest, the
    # system prompt's frames first or never, as the context policy says), so a conversation lasts as long
    # as its caller stays.
    max_conversation_seconds: float | None = None
    context_policy: str = "sliding"  # for conversations that do not choose one (see PersonaRequest.context_policy)
    tick_seconds: float = TICK_SECONDS  # 0: step as fast as possible (tests, offline-like use)
    input_timeout_seconds: float | None = 10.0  # end a conversation whose client sent no audio for this long
    jitter_buffer_seconds: float = 1.0  # user audio buffered at most; older audio is dropped past it
    max_output_frames: int = 25  # agent frames (2 s) a slow reader may fall behind before it is ended
    allow_voice_upload: bool = False
    max_voice_upload_bytes: int = 10 << 20  # one uploaded file
    max_voice_uploads: int = 32  # uploaded voices kept; past it the least recently used is forgotten
    max_voice_upload_total_bytes: int = 128 << 20  # all uploaded voices kept, together
    max_voice_seconds: float = 30.0  # longest voice audio decoded (uploads and preset audio files)
    persona_build_workers: int = 1  # threads that build personas (voice decoding, Mimi encoding)
    max_persona_builds_waiting: int = 8  # builds waiting for a worker; more callers are refused at once
    max_persona_changes: int = 8  # persona changes (session.update) per Realtime connection
    default_voice: str | None = DEFAULT_VOICE
    join_block_frames: int | None = None  # prompt frames per prefill block (None: the engine's default)
    kv_dtype: str = "model"  # "fp8": KV rings in FP8, about twice the conversations per GPU
    input_burst_seconds: float = 3.0  # audio a client may send ahead of real time before it is ended
    max_messages_per_second: float = 200.0  # messages a client may send per second (see input_budget.py)


class ConversationStream:
    """What a front end does with a live conversation, beside sending audio: its agent frames (``_output``, woken
    by ``_wake``), its end (``end_reason``, ``_ended``, ``_end``). Shared by the hub's ``Conversation`` and the
    front-end processes' ``remote_hub.RemoteConversation``."""

    end_reason: str | None
    _output: deque
    _wake: asyncio.Event
    _ended: asyncio.Event

    def _end(self, reason: str) -> None:
        raise NotImplementedError

    def send_text(self, text: str) -> None:
        """Inject a user text turn. The PersonaPlex models have no user text channel (the user speaks
        only through audio, and the agent's text channel is the agent's own words), so this raises."""
        raise NotSupported("text turns are not supported: this model hears the user only through audio")

    async def frames(self) -> AsyncIterator[AgentFrame]:
        """The agent's frames, one per 80 ms tick, until the conversation ends (``end_reason`` says why)."""
        while True:
            if self._output:
                yield self._output.popleft()
                continue
            if self.end_reason is not None:
                return
            self._wake.clear()
            await self._wake.wait()

    async def close(self, reason: str = "client closed") -> None:
        """End the conversation and free its slot (or queue place) at once; idempotent."""
        self._end(reason)

    async def ended(self) -> str:
        """Wait until the conversation ends (whoever ends it); returns ``end_reason``."""
        await self._ended.wait()
        return self.end_reason


class Conversation(ConversationStream):
    """One live conversation; its methods are called on the event loop that opened it."""

    def __init__(self, hub: ConversationHub, front_end: str, input_timeout: float | None,
                 start_on_audio: bool = False):
        self.id = uuid.uuid4().hex[:12]
        self.start_on_audio = start_on_audio  # the clock starts with the caller's first audio
        self.slot = -1
        self.front_end = front_end
        self.end_reason: str | None = None
        self.input_timeout = input_timeout
        self.max_frames: int | None = None  # agent frames at most (None: no limit); set when the slot is granted
        self.frames_sent = 0  # agent frames queued for the front end so far
        self.prompt_frames = 0
        self.context_policy = hub.options.context_policy  # the one it runs under; set when the slot is granted
        self.cached_persona = False
        self._engine_frames = 0  # frames stepped (engine thread)
        self._frames_counter = hub.metrics.agent_frames.labels(front_end=front_end)
        self._dropped_counted = 0  # input samples dropped and already counted in the metrics (engine thread)
        self._spoken = SpokenText(hub.model.tokenizer)  # byte-fallback pieces -> characters (engine thread)
        self._hub = hub
        self._input = InputJitterBuffer(FRAME_SIZE, max(1, round(hub.options.jitter_buffer_seconds * FRAME_RATE)))
        self._output: deque[AgentFrame] = deque()
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self.output_overflow = False  # ended because its client did not take its frames
        self._joined: asyncio.Future = hub._loop.create_future()
        self.closed = threading.Event()  # read by the engine thread

    # --- front-end API -----------------------------------------------------------------------------

    def send_audio(self, pcm: np.ndarray) -> None:
        """User audio: float32 mono 24 kHz samples, any length (bounded jitter buffer, see jitter.py)."""
        if self.end_reason is None:
            self._input.push(pcm)

    # --- statistics ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        buffer = self._input
        return {
            "frames": self.frames_sent,
            "input_buffered_ms": round(buffer.buffered_samples / FRAME_SIZE * 1000 / FRAME_RATE),
            "input_dropped_ms": round(buffer.dropped_samples / FRAME_SIZE * 1000 / FRAME_RATE),
            "input_underruns": buffer.underruns,
            "output_waiting": len(self._output),
        }

    # --- called by the hub on the event loop --------------------------------------------------------

    def _end(self, reason: str) -> None:
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.closed.set()
        self._wake.set()
        self._ended.set()
        if not self._joined.done():
            self._joined.set_exception(HubClosed(reason))
            self._joined.exception()  # retrieved: nobody else may be awaiting it
        self._hub._conversation_ended(self, reason)

    def _deliver(self, frame: AgentFrame) -> None:
        if self.end_reason is not None:
            return
        if len(self._output) >= self._hub.options.max_output_frames:
            seconds = len(self._output) / FRAME_RATE
            self.output_overflow = True
            self._end(f"the client is not taking the agent's audio ({seconds:.1f} s behind)")
            return
        self._output.append(frame)
        self.frames_sent += 1
        self._wake.set()


@dataclass
class _Join:
    conversation: Conversation
    prompt: object  # persona.SystemPrompt
    sampling: SamplingConfig
    context_policy: str


@dataclass
class _Leave:
    conversation: Conversation


class ConversationHub:
    """Owns the Engine and one engine thread that ticks every 80 ms (GPU work never on the event loop)."""

    def __init__(self, model, options: HubOptions | None = None, *, engine=None):
        self.model = model
        self.options = options or HubOptions()
        if self.options.max_conversations < 1 or self.options.max_queue < 0:
            raise ValueError("max_conversations must be at least 1 and max_queue at least 0")
        if self.options.context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy must be one of {', '.join(CONTEXT_POLICIES)}, "
                             f"got {self.options.context_policy!r}")
        self.engine = engine or Engine(model.lm, model.mimi, max_slots=self.options.max_conversations,
                                       kv_dtype=self.options.kv_dtype)
        if self.options.join_block_frames:
            self.engine.join_chunk_frames = self.options.join_block_frames
        self.metrics = HubMetrics()
        self.metrics.slots.set(self.engine.max_slots)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deferred: deque = deque()  # commands a full tick left for the next one
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = True
        self._admitted: set[Conversation] = set()
        self._waiting: deque[tuple[asyncio.Future, Callable[[int], None] | None, Conversation]] = deque()
        o = self.options
        # Personas, voices and uploads; the hub only runs their builds on threads of its own (admission, queue).
        self.personas = PersonaStore(
            model, allow_paths=False, default_voice=o.default_voice, max_voice_seconds=o.max_voice_seconds,
            uploads=UploadLimits(o.max_voice_upload_bytes, o.max_voice_uploads, o.max_voice_upload_total_bytes)
            if o.allow_voice_upload else None)
        self._builds = PersonaBuilds(self.options.persona_build_workers, self.options.max_persona_builds_waiting)
        self.metrics.persona_builds.set_function(lambda: self._builds.in_progress)
        # Engine-thread callbacks at the start of every tick, before the frames are taken: front ends in other
        # processes hand over their callers' audio here (engine_host.py). They must not raise.
        self.before_tick: list[Callable[[], None]] = []
        # Engine-thread state.
        self._live: dict[int, Conversation] = {}
        self._joining: dict[int, tuple[Conversation, float]] = {}
        self._waiting_for_audio: dict[int, Conversation] = {}  # persona applied, clock not started
        self.late_ticks = 0
        self.ticks = 0
        self.longest_tick_seconds = 0.0  # engine work of the longest tick so far (a forced join block shows here)
        self._join_block_seconds = 0.0  # moving average of one prefill block
        self._cached_join_seconds = 0.0  # moving average of a join from the prefix cache
        self._step_seconds = 0.0  # moving average of a tick's step (audio in, engine step, frames out)
        self._join_waited = 0  # ticks the pending joins found no room
        self._joins_deferred = 0  # ticks the next join request found no room

    # --- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_args(cls, args) -> ConversationHub:
        """A hub from command-line arguments: the model flags of ``personaplex offline`` plus the server's
        limits (``max_conversations``, ``max_queue``, ``max_conversation_seconds``, ``allow_voice_upload``...)
        and the default ``context_policy``."""
        options = HubOptions()
        for name in ("max_conversations", "max_queue", "max_conversation_seconds", "allow_voice_upload",
                     "input_timeout_seconds", "tick_seconds", "kv_dtype", "input_burst_seconds",
                     "max_messages_per_second", "max_voice_upload_bytes",
                     "max_voice_uploads", "max_voice_upload_total_bytes", "max_voice_seconds",
                     "persona_build_workers", "max_persona_builds_waiting", "max_persona_changes",
                     "context_policy"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(options, name, value)
        if options.input_timeout_seconds is not None and options.input_timeout_seconds <= 0:
            options.input_timeout_seconds = None  # 0: never time out
        if getattr(args, "max_conversations", None) is not None and options.max_conversations < 1:
            raise UsageError("--max-conversations must be at least 1")
        if options.max_queue < 0:
            raise UsageError("--max-queue must be 0 or more")
        if options.max_conversation_seconds is not None and options.max_conversation_seconds <= 0:
            raise UsageError("--max-conversation-seconds must be positive")
        if options.context_policy not in CONTEXT_POLICIES:
            raise UsageError(f"--context-policy must be one of {', '.join(CONTEXT_POLICIES)}")
        if options.input_burst_seconds <= 0 or options.max_messages_per_second <= 0:
            raise UsageError("--input-burst and --max-messages-per-second must be positive")
        for flag, value, low in (("--max-voice-upload-bytes", options.max_voice_upload_bytes, 1),
                                 ("--max-voice-uploads", options.max_voice_uploads, 1),
                                 ("--max-voice-upload-total-bytes", options.max_voice_upload_total_bytes, 1),
                                 ("--max-voice-seconds", options.max_voice_seconds, 1),
                                 ("--persona-build-workers", options.persona_build_workers, 1),
                                 ("--max-persona-builds-waiting", options.max_persona_builds_waiting, 0),
                                 ("--max-persona-changes", options.max_persona_changes, 0)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low}")
        # The same loading as every command: device, --quantize, --cpu-offload, with its advice printed.
        with startup.phase("load model (read weights, build)", announce=True):
            slots = getattr(args, "max_conversations", None) or 1
            model = model_flags.load_model_for_args(args, model_flags.resolve_model_assets(args), slots=slots)
        if getattr(args, "max_conversations", None) is None:
            options.max_conversations = min(64, slots_that_fit(model.lm, model.mimi, options.kv_dtype))
        else:
            check_slots_fit(model.lm, model.mimi, options.max_conversations, options.kv_dtype)
        with startup.phase(f"engine state for {options.max_conversations} slots"):
            return cls(model, options)

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread (captures CUDA graphs first on a GPU). Call on the serving event loop."""
        # The engine thread waits for the GPU several times a tick, releasing the GIL; winning it back from
        # a busy event loop takes up to one switch interval each (Python's default: 5 ms), which made
        # 32-caller ticks take ~100 ms around a 20 ms step. A shorter interval bounds that wait.
        sys.setswitchinterval(min(sys.getswitchinterval(), ENGINE_SWITCH_INTERVAL_SECONDS))
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        started = time.perf_counter()
        # No capture pauses once callers talk (pinning graphs too when pin-persona is the default).
        captured = await asyncio.to_thread(self.engine.capture_graphs,
                                           pinning=self.options.context_policy == "pin-persona")
        if captured:
            startup.report("all CUDA graphs", time.perf_counter() - started, f"{captured} graphs")
        await asyncio.to_thread(self._warm_up_join)
        self._closed = False
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="personaplex-engine", daemon=True)
        self._thread.start()

    def _warm_up_join(self) -> None:
        """One join of the default persona, run the live way before anyone calls: the prefill's first-use
        costs (and its compilation on a GPU) are paid now, and that persona starts from the prefix cache."""
        started = time.perf_counter()
        try:
            self.engine.warm_up_join(self.personas.system_prompt(None, ""))
        except PersonaError as exc:
            log.warning("no warm-up join (%s): the first join pays its one-time costs", exc)
            return
        startup.report("warm-up join of the default persona", time.perf_counter() - started)

    async def close(self, reason: str = "the server is shutting down") -> None:
        """Graceful shutdown: refuse new conversations, end waiting and live ones with ``reason``, stop
        the engine thread."""
        self._closed = True
        self._builds.close(reason)  # nobody waits for a persona build in progress
        while self._waiting:
            future, _, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(HubClosed(reason))
        for conversation in list(self._admitted):
            conversation._end(reason)
        self._update_queue_gauges()
        if self._thread is not None:
            self._stopping.set()
            self._wakeup.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.personas.close()

    # --- descriptions ------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """Model and limits, for metadata messages and /api/health."""
        o = self.options
        return {
            "model": self.model.name,
            "untrained": bool(getattr(self.model, "untrained", False)),
            "slots": self.engine.max_slots,
            "max_queue": o.max_queue,
            "max_conversation_seconds": o.max_conversation_seconds or None,  # None: no limit
            "context_seconds": self._context_seconds(),
            "context_policy": o.context_policy,  # the default; a conversation may choose another
            "input_timeout_seconds": o.input_timeout_seconds,
            "voice_upload": o.allow_voice_upload,
            "frame_ms": 80,
            "sample_rate": 24000,
        }

    def load(self) -> dict:
        """Slots busy/free and the queue length, right now."""
        busy = len(self._admitted)
        return {"slots_busy": busy, "slots_free": self.engine.max_slots - busy, "queued": len(self._waiting),
                "max_queue": self.options.max_queue}

    @property
    def accepting(self) -> bool:
        """Whether new conversations are taken (started and not shutting down)."""
        return not self._closed

    def voices(self) -> list[str]:
        """Available voice presets (names to pass as ``PersonaRequest.voice``)."""
        return self.personas.voices()

    def _context_seconds(self) -> float:
        return (self.model.lm.config.context - 1) / FRAME_RATE

    # --- opening conversations -------------------------------------------------------------------------

    async def open(
        self, request: PersonaRequest, *, front_end: str, on_queue_position: Callable[[int], None] | None = None,
        input_timeout_seconds: float | None | type[Ellipsis] = ..., start_on_audio: bool = False,
    ) -> Conversation:
        """Build the persona, wait for a slot (bounded queue), join it; returns once the system prompt is
        applied. Raises ``PersonaError`` (bad persona or context policy), ``HubBusy`` (queue full), ``HubClosed``.
        ``input_timeout_seconds`` overrides the hub's for this conversation (None: never time out).
        ``start_on_audio``: the conversation's first step waits for the caller's first audio (see the
        module's notes); otherwise it steps from the tick after the prompt is applied.
        Cancelling the awaiting task releases the queue place or slot at once."""
        if self._closed:
            raise HubClosed("the server is shutting down")
        timeout = self.options.input_timeout_seconds if input_timeout_seconds is ... else input_timeout_seconds
        policy = self.context_policy(request)
        self._refuse_when_full()  # before any persona work: a caller that would be refused costs nothing
        prompt = await self.build_persona(request)
        if self._closed:
            raise HubClosed("the server is shutting down")
        conversation = Conversation(self, front_end, timeout, start_on_audio)
        try:
            await self._admit(conversation, on_queue_position)
        except HubBusy:
            self.metrics.refused.inc()
            raise
        except asyncio.CancelledError:
            conversation._end("the client left while waiting for a slot")
            raise
        self.metrics.sessions.labels(front_end=front_end).inc()
        self._commands.put(_Join(conversation, prompt, request.sampling, policy))
        self._wakeup.set()
        try:
            await asyncio.shield(conversation._joined)
        except asyncio.CancelledError:
            conversation._end("the client left while its persona was being applied")
            raise
        return conversation

    def context_policy(self, request: PersonaRequest) -> str:
        """The context policy ``request`` runs under (its own, else the server's); raises ``PersonaError``
        for an unknown one."""
        policy = self.options.context_policy if request.context_policy is None else request.context_policy
        if policy not in CONTEXT_POLICIES:
            raise PersonaError(f"unknown context policy {str(policy)[:40]!r}: use one of {', '.join(CONTEXT_POLICIES)}")
        return policy

    def _refuse_when_full(self) -> None:
        if len(self._admitted) >= self.engine.max_slots and len(self._waiting) >= self.options.max_queue:
            self.metrics.refused.inc()
            raise HubBusy(
                f"all {self.engine.max_slots} conversation slots are busy and {len(self._waiting)} callers are "
                "already waiting; try again in a minute"
            )

    async def _admit(self, conversation: Conversation, on_queue_position: Callable[[int], None] | None) -> None:
        """Return when ``conversation`` holds a slot; wait in the FIFO queue while all are taken."""
        if len(self._admitted) < self.engine.max_slots and not self._waiting:
            self._admitted.add(conversation)
            self._update_queue_gauges()
            return
        if len(self._waiting) >= self.options.max_queue:
            raise HubBusy(
                f"all {self.engine.max_slots} conversation slots are busy and {len(self._waiting)} callers are "
                "already waiting; try again in a minute"
            )
        entry = (self._loop.create_future(), on_queue_position, conversation)
        self._waiting.append(entry)
        self._update_queue_gauges()
        self._report_positions()
        try:
            await entry[0]
        finally:
            if entry in self._waiting:  # cancelled or failed while waiting
                self._waiting.remove(entry)
                self._update_queue_gauges()
                self._report_positions()

    def _grant_next(self) -> None:
        """Hand free slots to the longest-waiting callers (the slot is theirs from this moment)."""
        while self._waiting and len(self._admitted) < self.engine.max_slots:
            future, _, conversation = self._waiting.popleft()
            if not future.done():
                self._admitted.add(conversation)
                future.set_result(None)
        self._update_queue_gauges()
        self._report_positions()

    def _report_positions(self) -> None:
        for position, (_, callback, _) in enumerate(self._waiting, start=1):
            if callback is not None:
                try:
                    callback(position)
                except Exception:  # a front end's callback must not break the queue
                    log.exception("queue position callback failed")

    def _update_queue_gauges(self) -> None:
        self.metrics.active.set(len(self._admitted))
        self.metrics.queued.set(len(self._waiting))

    def _conversation_ended(self, conversation: Conversation, reason: str) -> None:
        self.metrics.ended.labels(reason=_reason_label(reason)).inc()
        if conversation._engine_frames:
            self.metrics.conversation_seconds.observe(conversation._engine_frames / FRAME_RATE)
        if conversation in self._admitted:
            self._admitted.discard(conversation)
            self._commands.put(_Leave(conversation))
            self._wakeup.set()
            self._update_queue_gauges()
            if not self._closed:
                self._grant_next()

    # --- personas ----------------------------------------------------------------------------------------

    async def build_persona(self, request: PersonaRequest):
        """The system prompt of a persona (``PersonaStore``: cached per voice and text); raises ``PersonaError``,
        or ``HubBusy`` when too many personas are being built, ``HubClosed`` when shutting down. The work runs on
        the persona build threads (``persona_builds.py``), never on the event loop."""
        if request.voice_audio is not None:
            name = await self.add_voice_upload(request.voice_audio)
            request = replace(request, voice=name, voice_audio=None)
        voice_path = self.personas.voice_path(request.voice)
        text = request.text_prompt
        prompt = self.personas.cached(voice_path, text)
        if prompt is not None:
            return prompt
        return await self._run_build(("prompt", str(voice_path), text),
                                     lambda cancelled: self.personas.build(voice_path, text, cancelled))

    async def add_voice_upload(self, data: bytes) -> str:
        """Check an uploaded voice sample and keep it; returns the preset-like name (``upload-<digest>``)
        that ``PersonaRequest.voice`` then accepts. Raises ``PersonaError`` when uploads are off or the
        sample is unusable (nothing of a refused sample stays on disk), ``HubBusy`` when too many personas
        are being built. At most ``max_voice_uploads`` samples of ``max_voice_upload_total_bytes``
        together are kept: past that the least recently used ones are forgotten."""
        name = self.personas.upload_name(data)
        if self.personas.has_upload(name):
            return name
        return await self._run_build(("upload", name), lambda cancelled: self.personas.add_upload(data, cancelled))

    async def _run_build(self, key: tuple, work):
        try:
            return await self._builds.run(key, work)
        except BuildsBusy as exc:
            self.metrics.record_error("persona_builds_busy")
            raise HubBusy(str(exc)) from None
        except BuildsClosed as exc:
            raise HubClosed(str(exc)) from None
        except BuildCancelled:
            raise HubClosed("the persona build was abandoned") from None

    # --- the engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        period = self.options.tick_seconds
        engine = self.engine
        # Pinned on a GPU machine, so that the copy to the device does not stage through pageable memory
        # (the step reads its results back before the next tick writes this buffer again).
        pcm = torch.zeros(engine.max_slots, FRAME_SIZE, pin_memory=engine.device.type == "cuda")
        deadline = time.perf_counter()
        while not self._stopping.is_set():
            if not (self._live or self._joining or self._waiting_for_audio or self._deferred) and self._commands.empty():
                # Nothing to do: sleep until a request arrives, then restart the schedule.
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                deadline = time.perf_counter()
                continue
            started = time.perf_counter()
            try:
                for hook in self.before_tick:
                    hook()
                self._apply_commands(deadline + period if period > 0 else None)
                self._start_on_audio()
                if self._live:
                    stepped = time.perf_counter()
                    self._tick(pcm)
                    self._step_seconds = _moving_average(self._step_seconds, time.perf_counter() - stepped)
                self._advance_joins(deadline + period if period > 0 else None)
            except Exception:  # an engine failure ends the conversations it touched, not the server
                log.exception("engine failure")
                self.metrics.record_error("engine")
                touched = [c for c, _ in self._joining.values()] + list(self._live.values()) + \
                    list(self._waiting_for_audio.values())
                for conversation in touched:
                    self._end_from_engine(conversation, "internal engine error; please reconnect")
            finished = time.perf_counter()
            self.metrics.tick_seconds.observe(finished - started)
            self.longest_tick_seconds = max(self.longest_tick_seconds, finished - started)
            self.ticks += 1
            if period <= 0:
                continue
            deadline += period
            if finished > deadline:
                self.late_ticks += 1
                self.metrics.late_ticks.inc()
                behind = int((finished - deadline) // period)
                if behind:
                    self.metrics.skipped_ticks.inc(behind)
                    deadline += behind * period
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    def _next_command(self):
        if self._deferred:
            return self._deferred.popleft()
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply_commands(self, until: float | None = None) -> None:
        """Apply the queued requests in order. While others talk, a join from the prefix cache runs only if
        the tick still has room for it and the step before ``until`` (perf_counter; measured averages):
        a burst of callers joins over a few ticks instead of making one tick miss real time. A join that
        found no room for ``JOIN_PATIENCE_TICKS`` ticks runs anyway: on a machine whose step alone overruns
        the tick there is never room, and one late tick is better than callers that never join."""
        engine = self.engine
        while (command := self._next_command()) is not None:
            conversation = command.conversation
            if (isinstance(command, _Join) and until is not None and self._live
                    and self._joins_deferred < JOIN_PATIENCE_TICKS
                    and time.perf_counter() + self._cached_join_seconds + self._step_seconds
                    > until - TICK_MARGIN_SECONDS):
                self._joins_deferred += 1
                self._deferred.appendleft(command)
                return
            if isinstance(command, _Join):
                self._joins_deferred = 0
            if isinstance(command, _Leave):
                self._release_slot(conversation)
                continue
            if conversation.closed.is_set():
                continue
            free = engine.free_slots()
            if not free:  # cannot happen while admission counts slots; refuse rather than crash
                self._end_from_engine(conversation, "no free slot")
                continue
            slot = free[0]
            conversation.slot = slot
            prompt = command.prompt
            limit = self.options.max_conversation_seconds
            conversation.max_frames = max(1, int(limit * FRAME_RATE)) if limit else None
            conversation.prompt_frames = prompt.num_steps
            conversation.context_policy = command.context_policy
            try:
                began = time.perf_counter()
                cached = engine.begin_join(slot, slot + 1, prompt, command.sampling,
                                           context_policy=command.context_policy, hold=conversation.start_on_audio)
            except ValueError as exc:  # sampling settings out of range
                self._end_from_engine(conversation, f"cannot start: {exc}")
                continue
            self.metrics.joins.labels(context_policy=command.context_policy).inc()
            if cached:
                self._cached_join_seconds = _moving_average(self._cached_join_seconds, time.perf_counter() - began)
                self.metrics.prefix_cache_hits.inc()
                conversation.cached_persona = True
                self._go_live(conversation, time.perf_counter())
            else:
                self._joining[slot] = (conversation, time.perf_counter())

    def _advance_joins(self, until: float | None) -> None:
        """Prefill queued personas in blocks while the tick has time left before ``until`` (perf_counter).

        A block runs only when the time left fits one (measured: a moving average), so that joins never
        make live conversations late; a join that found no room for ``JOIN_PATIENCE_TICKS`` ticks runs a
        block anyway (one late tick rather than a join that never ends). Requests (a client leaving
        mid-prefill) are applied between ticks.
        """
        ran = False
        while self._joining:
            if until is not None:
                left = until - time.perf_counter() - TICK_MARGIN_SECONDS
                if self._live and left < self._join_block_seconds and self._join_waited < JOIN_PATIENCE_TICKS:
                    self._join_waited += 1
                    return
                if not self._live and ran and left <= 0:
                    return
            ran = True
            started = time.perf_counter()
            for slot in self.engine.advance_joins(frame_budget=1):
                conversation, granted = self._joining.pop(slot)
                self._go_live(conversation, granted)
            spent = time.perf_counter() - started
            self._join_block_seconds = _moving_average(self._join_block_seconds, spent)
            self._join_waited = 0
            if until is None:
                return

    def _go_live(self, conversation: Conversation, granted: float) -> None:
        self.metrics.join_seconds.observe(time.perf_counter() - granted)
        if conversation.start_on_audio:
            self._waiting_for_audio[conversation.slot] = conversation
        else:
            self._live[conversation.slot] = conversation
        conversation._input.reset_idle()  # the input timeout counts from here, also while waiting for audio
        self._loop.call_soon_threadsafe(_resolve, conversation._joined)

    def _start_on_audio(self) -> None:
        """Start the clock of each waiting conversation whose caller's first audio has arrived: its first
        step is this tick's. One whose caller sent nothing for the input timeout is ended."""
        if not self._waiting_for_audio:
            return
        now = time.monotonic()
        for slot, conversation in list(self._waiting_for_audio.items()):
            buffer = conversation._input
            timeout = conversation.input_timeout
            if buffer.received_samples > 0:
                del self._waiting_for_audio[slot]
                self.engine.start(slot)
                self._live[slot] = conversation
            elif timeout is not None and buffer.idle_seconds(now) > timeout:
                self._end_from_engine(conversation, f"no audio from the client for {timeout:g} s")

    def _tick(self, pcm) -> None:
        # Per-conversation work below touches numpy only: every torch call releases the GIL, and winning
        # it back from a busy event loop costs up to a switch interval (5 ms) each (bench/hub_tick.py).
        pcm_host = pcm.numpy()
        pcm_host.fill(0.0)
        now = time.monotonic()
        for slot, conversation in list(self._live.items()):
            timeout = conversation.input_timeout
            if timeout is not None and conversation._input.idle_seconds(now) > timeout:
                self._end_from_engine(conversation, f"no audio from the client for {timeout:g} s")
                continue
            buffer = conversation._input
            underruns = buffer.underruns
            pcm_host[slot] = buffer.pop_frame()
            if buffer.underruns != underruns:
                self.metrics.input_underruns.inc()
            dropped = buffer.dropped_samples - conversation._dropped_counted  # dropped by the network side
            if dropped:
                conversation._dropped_counted += dropped
                self.metrics.input_dropped.inc(dropped / 24000)
        if not self._live:
            return
        out = self.engine.step(pcm)
        text_tokens, agent_pcm = out.tokens[:, 0].tolist(), out.pcm.numpy()
        deliveries = []
        for slot, conversation in list(self._live.items()):
            token = text_tokens[slot]
            deliveries.append((conversation, AgentFrame(agent_pcm[slot].copy(), conversation._spoken.push(token) or None)))
            conversation._engine_frames += 1
            conversation._frames_counter.inc()
        # One wake-up of the event loop per tick, whatever the number of conversations; the frames go out
        # before the end notices queued after them.
        self._loop.call_soon_threadsafe(_deliver_all, deliveries)
        for conversation, _ in deliveries:
            if conversation.max_frames is not None and conversation._engine_frames >= conversation.max_frames:
                seconds = conversation.max_frames / FRAME_RATE
                self._end_from_engine(conversation, f"the conversation reached its maximum length ({seconds:.0f} s)")

    def _release_slot(self, conversation: Conversation) -> None:
        """Free the engine slot ``conversation`` holds, whether live, joining or waiting for audio (engine thread)."""
        slot = conversation.slot
        if slot >= 0 and (self._live.get(slot) is conversation or self._joining.get(slot, (None,))[0] is conversation
                          or self._waiting_for_audio.get(slot) is conversation):
            self.engine.leave(slot)
            self._live.pop(slot, None)
            self._joining.pop(slot, None)
            self._waiting_for_audio.pop(slot, None)

    def _end_from_engine(self, conversation: Conversation, reason: str) -> None:
        """End a conversation from the engine thread: free its slot now, tell the event loop."""
        self._release_slot(conversation)
        conversation.closed.set()
        self._loop.call_soon_threadsafe(conversation._end, reason)


def _deliver_all(deliveries: list[tuple[Conversation, AgentFrame]]) -> None:
    for conversation, frame in deliveries:
        conversation._deliver(frame)


def _moving_average(average: float, sample: float) -> float:
    """Of per-tick costs: the first sample, then mostly the past (one slow tick does not swing it)."""
    return sample if not average else 0.8 * average + 0.2 * sample


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _reason_label(reason: str) -> str:
    """A low-cardinality metrics label for an end reason."""
    for word, label in (("client closed", "client_closed"), ("client left", "client_left"),
                        ("maximum length", "max_length"), ("no audio", "input_timeout"),
                        ("not taking", "slow_reader"), ("shutting down", "shutdown"), ("engine", "engine_error")):
        if word in reason:
            return label
    return "other"
