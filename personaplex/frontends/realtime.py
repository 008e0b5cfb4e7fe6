"""The OpenAI-Realtime-style endpoint (``/v1/realtime``): the subset of the Realtime API protocol that a
full-duplex model can honour, so that voice-agent frameworks and the official ``openai`` SDK talk to
PersonaPlex unchanged.

Two dialects, chosen per connection the way the hosted API does it: a client that sends the header
``OpenAI-Beta: realtime=v1`` (``client.beta.realtime.connect``) gets the beta event names
(``response.audio.delta``, ``response.audio_transcript.delta``, flat session fields); every other client
gets the GA names (``response.output_audio.delta``, ``response.output_audio_transcript.delta``,
``session.audio.input/output``). Both dialects accept both session shapes.

Full-duplex semantics
---------------------
- The conversation (and its persona) starts at the first ``input_audio_buffer.append`` or
  ``response.create``. ``session.update`` before that sets the persona: ``instructions`` is the text
  prompt, ``voice`` (or ``audio.output.voice``) a voice preset of the server (``GET /api/voices``),
  ``temperature`` both sampling temperatures, and the extension object ``sampling`` any of
  ``text_temperature``, ``text_topk``, ``audio_temperature``, ``audio_topk``, ``seed``; the extension
  field ``context_policy`` (``sliding`` or ``pin-persona``; null: the server's ``--context-policy``) what
  the conversation keeps once it is longer than the model's context. The persona is checked at once (an
  unknown voice or an over-long prompt gets an ``error`` event, the rest of the update still applies).
  After the start, persona fields (the context policy too) cannot change (``session_already_started``).
  A connection may change its persona ``max_persona_changes`` times (each change may cost a persona
  build); further changes get ``too_many_persona_changes``, and a change while the persona builds are
  full gets ``server_busy``; the session keeps its persona either way.
- Audio appended while the persona is being applied is dropped (as on ``/api/chat``): stream audio
  continuously from the start, silence included; a client silent for the server's input timeout is ended.
- Then the agent's audio flows continuously, one ``response.output_audio.delta`` per 80 ms, in step with
  the user's audio, inside one long response (``response.created`` at the start, ``response.done`` at the
  end). There are no turns and no server VAD: the model listens while it speaks and yields by itself when
  interrupted. ``turn_detection`` is accepted and reported as ``null``; ``input_audio_buffer.commit`` and
  ``.clear`` are acknowledged and change nothing.
- ``response.output_audio_transcript.delta`` carries the agent's own words as it says them.
- ``conversation.item.create`` with a user ``input_text`` message is handed to the conversation as a text
  turn; the PersonaPlex models hear the user only as audio, so it is refused with
  ``text_turns_not_supported``.
- Anything else gets an ``error`` event (``unknown_event``, ``unsupported_event``, ``invalid_json``,
  ``invalid_audio``...) and the session carries on. The server ends a session with an ``error`` event
  (``conversation_ended``, ``server_busy``...) then closes the WebSocket.
- Limits, checked before an event is parsed or its audio decoded: a client sending more events than
  ``--max-messages-per-second`` or audio more than ``--input-burst`` seconds ahead of real time gets
  ``input_rate_exceeded`` and is closed (1008); a session that sends no event for ``--idle-timeout``
  before its conversation starts gets ``idle_timeout`` and is closed (1008); an event beyond the
  WebSocket's size limit gets ``event_too_large`` just before the close (1009).

Audio formats: ``pcm16`` / ``audio/pcm`` (24 kHz, little-endian, base64) and ``g711_ulaw`` / ``audio/pcmu``
(8 kHz), separately for input and output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping

import numpy as np

from ..config import SAMPLE_RATE
from ..engine.engine import CONTEXT_POLICIES
from ..errors import PersonaplexError
from ..serving.hub import Conversation, HubBusy, HubClosed, NotSupported, PersonaError, PersonaRequest
from ..serving.input_budget import InputBudget, InputRateExceeded
from .chat_protocol import ProtocolError, request_from_query
from .codecs import (
    MULAW_RATE,
    AudioFormatError,
    StreamResampler,
    decode_base64,
    encode_base64,
    float_to_pcm16,
    float_to_pcm16_bytes,
    mulaw_to_pcm16,
    pcm16_bytes_to_float,
    pcm16_to_float,
    pcm16_to_mulaw,
)
from .session_loop import receive_until_over

log = logging.getLogger("personaplex.integrations.realtime")  # the log name operators filter on, kept

FRONT_END = "realtime"
MAX_EVENT_BYTES = 1 << 20  # one client event; base64 PCM16 at 24 kHz: about 16 s of audio
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
SEND_TIMEOUT = 2.0

PCM16, ULAW = "pcm16", "g711_ulaw"
_GA_FORMATS = {"audio/pcm": PCM16, "audio/pcmu": ULAW}
_BETA_FORMATS = {PCM16: PCM16, ULAW: ULAW}
_SAMPLING_KEYS = ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed")
# Client events that exist in the Realtime API but mean nothing for a full-duplex model.
_UNSUPPORTED = {
    "response.cancel": "the agent is never 'responding' on request: it listens and speaks at once and yields "
                       "by itself when the user talks over it",
    "output_audio_buffer.clear": "agent audio is streamed in real time; there is no server-side output buffer",
    "conversation.item.truncate": "the conversation has no editable item history",
    "conversation.item.delete": "the conversation has no editable item history",
    "conversation.item.retrieve": "the conversation has no item history",
    "transcription_session.update": "this server has no transcription sessions",
}


class RealtimeError(PersonaplexError):
    """A client event that cannot be honoured; becomes an ``error`` event (the session carries on)."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.param, self.kind = code, param, kind


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeSession:
    """One ``/v1/realtime`` connection over a ``MessageTransport`` (text messages carry JSON events)."""

    def __init__(self, hub, transport, *, beta: bool = False, model: str | None = None,
                 idle_timeout: float | None = None):
        self.hub = hub
        self.transport = transport
        self.idle_timeout = idle_timeout  # seconds without an event before the conversation starts
        self.budget = InputBudget(hub.options.input_burst_seconds, hub.options.max_messages_per_second)
        self.beta = beta
        self.id = _new_id("sess")
        self.model = model or hub.describe()["model"]
        defaults = PersonaRequest()
        self.instructions = ""
        self.voice: str | None = None
        self.sampling = defaults.sampling
        self.context_policy: str | None = None  # None: the server's default
        self.input_format = PCM16
        self.output_format = PCM16
        self.conversation: Conversation | None = None
        self.response_id = _new_id("resp")
        self.item_id = _new_id("item")
        self.transcript: list[str] = []
        self.dropped_before_start = 0.0  # seconds of user audio received before the persona was applied
        self.persona_changes = 0  # session.updates that changed instructions or voice (each may build a persona)
        self._conversation_task: asyncio.Task | None = None
        self._session_over = asyncio.Event()
        self._close_code = CLOSE_NORMAL
        self._close_reason = ""
        self._closed = False
        self._input_resampler: StreamResampler | None = None
        self._output_resampler: StreamResampler | None = None
        self._current_event_id: str | None = None  # of the client event being handled, echoed in errors

    # --- the connection ---------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._send("session.created", session=self.session_view())
        try:
            if await receive_until_over(self._receive_loop, self._session_over, log, "realtime") is not None:
                self.hub.metrics.record_error("internal")
                await self._error_event(RealtimeError("internal_error", "internal server error; please reconnect",
                                                      kind="server_error"))
                self._close_code = CLOSE_INTERNAL
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self.conversation is not None:
            await self.conversation.close(getattr(self.transport, "end_reason", None) or "client closed")
        if self._conversation_task is not None:
            self._conversation_task.cancel()
            await asyncio.gather(self._conversation_task, return_exceptions=True)
        await self._close(self._close_code, self._close_reason)

    async def _close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        # WebSocket close reasons are limited to 123 bytes; a client that is gone cannot be told anything.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(code, reason.encode("utf-8")[:120].decode("utf-8", "ignore")),
                                   SEND_TIMEOUT)

    def _end_session(self, code: int, reason: str) -> None:
        self._close_code, self._close_reason = code, reason
        self._session_over.set()

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await self._receive()
            except asyncio.TimeoutError:
                return await self._refuse("idle_timeout", f"no event for {self.idle_timeout:g} s (--idle-timeout): "
                                          "start the conversation by streaming audio")
            if message is None:
                return
            try:
                self.budget.take_message()
                await self._handle(message)
            except RealtimeError as error:
                self.hub.metrics.record_error("realtime_" + error.code)
                await self._error_event(error, self._current_event_id)
            except InputRateExceeded as error:
                return await self._refuse("input_rate_exceeded", str(error))

    async def _receive(self) -> bytes | str | None:
        if self.idle_timeout and self._conversation_task is None:  # afterwards the hub's input timeout applies
            return await asyncio.wait_for(self.transport.receive(), self.idle_timeout)
        return await self.transport.receive()

    async def _refuse(self, code: str, message: str) -> None:
        """Tell the client why, then end the session (the receive loop returns)."""
        self.hub.metrics.record_error("realtime_" + code)
        self.hub.metrics.input_refused.labels(reason=code).inc()
        await self._error_event(RealtimeError(code, message), self._current_event_id)
        self._end_session(CLOSE_POLICY, code)

    # --- client events ----------------------------------------------------------------------------------

    async def _handle(self, message: bytes | str) -> None:
        self._current_event_id = None
        if isinstance(message, bytes):
            raise RealtimeError("invalid_message", "binary messages are not part of this protocol: send JSON "
                                "events as text messages (audio goes base64-encoded in input_audio_buffer.append)")
        if len(message) > MAX_EVENT_BYTES:
            raise RealtimeError("event_too_large", f"an event of {len(message)} bytes; at most {MAX_EVENT_BYTES} "
                                "are accepted (send audio in chunks of a few hundred milliseconds)")
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            raise RealtimeError("invalid_json", "the message is not valid JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("invalid_event", "an event is a JSON object with a string 'type'", "type")
        event_id = event.get("event_id")
        self._current_event_id = event_id if isinstance(event_id, str) else None
        kind = event["type"]
        handler = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append_audio,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "response.create": self._response_create,
            "conversation.item.create": self._item_create,
        }.get(kind)
        if handler is not None:
            return await handler(event)
        if kind in _UNSUPPORTED:
            raise RealtimeError("unsupported_event", f"{kind} is not supported by this full-duplex server: "
                                f"{_UNSUPPORTED[kind]}", "type")
        raise RealtimeError("unknown_event", f"unknown event type {kind[:80]!r}", "type")

    async def _session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise RealtimeError("invalid_session", "session.update needs a 'session' object", "session")
        if session.get("type", "realtime") != "realtime":
            raise RealtimeError("unsupported_session_type", "only 'realtime' sessions are served (no transcription "
                                "sessions)", "session.type")
        errors: list[RealtimeError] = []
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
        audio_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        audio_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}

        for value, param, direction in ((session.get("input_audio_format"), "session.input_audio_format", "input"),
                                        (audio_in.get("format"), "session.audio.input.format", "input"),
                                        (session.get("output_audio_format"), "session.output_audio_format", "output"),
                                        (audio_out.get("format"), "session.audio.output.format", "output")):
            if value is None:
                continue
            try:
                chosen = _audio_format(value, param)
            except RealtimeError as error:
                errors.append(error)
                continue
            if direction == "input":
                if chosen != self.input_format:
                    self._input_resampler = None
                self.input_format = chosen
            else:
                if chosen != self.output_format:
                    self._output_resampler = None
                self.output_format = chosen

        modalities = session.get("output_modalities", session.get("modalities"))
        if modalities is not None and (not isinstance(modalities, list) or "audio" not in modalities):
            errors.append(RealtimeError("unsupported_modalities", "this model always answers with audio (and its "
                                        "transcript): output modalities must include 'audio'", "session.modalities"))
        tools = session.get("tools")
        if tools:
            errors.append(RealtimeError("tools_not_supported", "this model cannot call tools", "session.tools"))

        # The persona: text prompt, voice, sampling.
        instructions, voice, sampling = self.instructions, self.voice, self.sampling
        if "instructions" in session:
            if isinstance(session["instructions"], str):
                instructions = session["instructions"]
            else:
                errors.append(RealtimeError("invalid_value", "instructions must be a string", "session.instructions"))
        for raw, param in ((session.get("voice"), "session.voice"), (audio_out.get("voice"), "session.audio.output.voice")):
            if raw is None:
                continue
            name = raw.get("id") if isinstance(raw, dict) else raw
            if isinstance(name, str) and name:
                voice = name
            else:
                errors.append(RealtimeError("invalid_value", "voice must be a preset name (see GET /api/voices)",
                                            param))
        try:
            sampling = _sampling(session, sampling)
        except RealtimeError as error:
            errors.append(error)
        policy = self.context_policy
        if "context_policy" in session:
            if session["context_policy"] is None or session["context_policy"] in CONTEXT_POLICIES:
                policy = session["context_policy"]
            else:
                errors.append(RealtimeError(
                    "invalid_value", f"context_policy must be one of {', '.join(CONTEXT_POLICIES)} (or null: the "
                    f"server's default), got {str(session['context_policy'])[:40]!r}", "session.context_policy"))

        changed = (instructions, voice, sampling, policy) != (self.instructions, self.voice, self.sampling,
                                                              self.context_policy)
        if changed and self._conversation_task is not None:
            errors.append(RealtimeError(
                "session_already_started", "the persona (instructions, voice, sampling, context policy) is fixed "
                "once the conversation has started (at the first audio); open a new session for another persona",
                "session"))
        elif (instructions, voice) != (self.instructions, self.voice):
            limit = self.hub.options.max_persona_changes
            if self.persona_changes >= limit:  # each change may cost a persona build: bounded per connection
                errors.append(RealtimeError(
                    "too_many_persona_changes", f"this connection changed its persona {limit} times already; "
                    "open a new session for another persona", "session"))
            else:
                self.persona_changes += 1
                try:  # build it now: a bad voice or prompt is reported here, and the start is faster
                    await self.hub.build_persona(PersonaRequest(text_prompt=instructions, voice=voice))
                    self.instructions, self.voice = instructions, voice
                except PersonaError as error:
                    param = "session.voice" if voice != self.voice else "session.instructions"
                    hint = f" (voices: {', '.join(self.hub.voices()) or 'none'})" if voice != self.voice else ""
                    errors.append(RealtimeError("invalid_persona", f"{error}{hint}", param))
                except (HubBusy, HubClosed) as error:  # the persona is not changed; the session carries on
                    errors.append(RealtimeError("server_busy", str(error), "session", kind="server_error"))
            self.sampling, self.context_policy = sampling, policy
        elif changed:
            self.sampling, self.context_policy = sampling, policy
        for error in errors:
            self.hub.metrics.record_error("realtime_" + error.code)
            await self._error_event(error, self._current_event_id)
        await self._send("session.updated", session=self.session_view())

    async def _append_audio(self, event: dict) -> None:
        self.budget.check_audio()  # raises InputRateExceeded before any decoding
        try:
            data = decode_base64(event.get("audio"), "input_audio_buffer.append audio")
            seconds = len(data) / (2 * SAMPLE_RATE if self.input_format == PCM16 else MULAW_RATE)
            self.budget.spend_audio(seconds)
            pcm = self._decode_input(data)
        except AudioFormatError as error:
            raise RealtimeError("invalid_audio", str(error), "audio") from None
        self.hub.metrics.input_decoded.labels(front_end=FRONT_END).inc(seconds)
        if self.conversation is not None:
            self.conversation.send_audio(pcm)
            return
        self.dropped_before_start += len(pcm) / SAMPLE_RATE
        self._start_conversation()

    async def _commit(self, event: dict) -> None:
        await self._send("input_audio_buffer.committed", previous_item_id=None, item_id=_new_id("item"))

    async def _clear(self, event: dict) -> None:
        await self._send("input_audio_buffer.cleared")

    async def _response_create(self, event: dict) -> None:
        if self._conversation_task is not None:
            raise RealtimeError("conversation_already_has_active_response", "the agent's response is already "
                                "streaming: in full duplex there is one continuous response per session")
        self._start_conversation()

    async def _item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise RealtimeError("invalid_item", "conversation.item.create needs an 'item' object", "item")
        content = item.get("content") if isinstance(item.get("content"), list) else []
        texts = [part.get("text") for part in content if isinstance(part, dict)
                 and part.get("type") in ("input_text", "text") and isinstance(part.get("text"), str)]
        if item.get("type", "message") != "message" or item.get("role") != "user" or not texts \
                or len(texts) != len(content):
            raise RealtimeError("unsupported_item", "only user messages with input_text content can be added "
                                "(as text turns); this model takes no other items", "item")
        if self.conversation is None:
            raise RealtimeError("conversation_not_started", "a text turn needs a started conversation: send audio "
                                "(input_audio_buffer.append) first", "item")
        try:
            self.conversation.send_text("\n".join(texts))
        except NotSupported as error:
            raise RealtimeError("text_turns_not_supported", str(error), "item") from None
        item_id = item.get("id") if isinstance(item.get("id"), str) else _new_id("item")
        created = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                   "status": "completed", "content": [{"type": "input_text", "text": t} for t in texts]}
        await self._send("conversation.item.created" if self.beta else "conversation.item.added",
                         previous_item_id=None, item=created)

    # --- audio conversions ------------------------------------------------------------------------------

    def _decode_input(self, data: bytes) -> np.ndarray:
        if self.input_format == PCM16:
            return pcm16_bytes_to_float(data)
        if self._input_resampler is None:
            self._input_resampler = StreamResampler(MULAW_RATE, SAMPLE_RATE)
        return self._input_resampler(pcm16_to_float(mulaw_to_pcm16(data)))

    def _encode_output(self, pcm: np.ndarray) -> bytes:
        if self.output_format == PCM16:
            return float_to_pcm16_bytes(pcm)
        if self._output_resampler is None:
            self._output_resampler = StreamResampler(SAMPLE_RATE, MULAW_RATE)
        return pcm16_to_mulaw(float_to_pcm16(self._output_resampler(pcm)))

    # --- the conversation -------------------------------------------------------------------------------

    def _start_conversation(self) -> None:
        if self._conversation_task is None:
            self._conversation_task = asyncio.create_task(self._converse())

    async def _converse(self) -> None:
        request = PersonaRequest(text_prompt=self.instructions, voice=self.voice, sampling=self.sampling,
                                 context_policy=self.context_policy)
        try:
            self.conversation = await self.hub.open(request, front_end=FRONT_END)
        except (PersonaError, HubBusy, HubClosed) as error:
            code, close = {PersonaError: ("invalid_persona", CLOSE_POLICY), HubBusy: ("server_busy", CLOSE_TRY_AGAIN),
                           HubClosed: ("server_shutting_down", CLOSE_GOING_AWAY)}[type(error)]
            self.hub.metrics.record_error({"invalid_persona": "bad_persona", "server_busy": "busy",
                                           "server_shutting_down": "closed"}[code])
            await self._error_event(RealtimeError(code, str(error), kind="server_error" if code != "invalid_persona"
                                                  else "invalid_request_error"))
            return self._end_session(close, str(error))
        conversation = self.conversation
        try:
            await self._send_response_start()
            async for frame in conversation.frames():
                if conversation.output_overflow:
                    break
                await self._send(self._name("audio.delta"), **self._part_ids(),
                                 delta=encode_base64(self._encode_output(frame.pcm)))
                if frame.text:
                    self.transcript.append(frame.text)
                    await self._send(self._name("audio_transcript.delta"), **self._part_ids(), delta=frame.text)
        except Exception as error:  # noqa: BLE001 - the client vanished while we were sending: nothing to tell it
            await conversation.close("client closed")
            log.debug("realtime send failed: %r", error)
            return self._end_session(CLOSE_GOING_AWAY, "send failed")
        reason = conversation.end_reason or "the conversation ended"
        await self._send_response_end(reason)
        await self._error_event(RealtimeError("conversation_ended", reason, kind="server_error"))
        self._end_session(CLOSE_GOING_AWAY if "shutting down" in reason else CLOSE_NORMAL, reason)

    def _name(self, suffix: str) -> str:
        """Event names that differ between dialects: ``audio.delta`` -> ``response.output_audio.delta`` (GA)
        or ``response.audio.delta`` (beta)."""
        return "response." + (suffix if self.beta else "output_" + suffix)

    def _part_ids(self) -> dict:
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _response(self, status: str, details: dict | None = None) -> dict:
        response = {"id": self.response_id, "object": "realtime.response", "status": status,
                    "status_details": details, "output": [], "usage": None}
        if self.beta:
            response["modalities"] = ["audio", "text"]
        else:
            response["output_modalities"] = ["audio"]
        return response

    def _item(self, status: str) -> dict:
        part = {"type": "audio" if self.beta else "output_audio", "transcript": "".join(self.transcript)}
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": [part] if status == "completed" else []}

    async def _send_response_start(self) -> None:
        await self._send("response.created", response=self._response("in_progress"))
        await self._send("response.output_item.added", response_id=self.response_id, output_index=0,
                         item=self._item("in_progress"))
        await self._send("response.content_part.added", **self._part_ids(),
                         part={"type": "audio" if self.beta else "output_audio", "transcript": ""})

    async def _send_response_end(self, reason: str) -> None:
        transcript = "".join(self.transcript)
        await self._send(self._name("audio.done"), **self._part_ids())
        await self._send(self._name("audio_transcript.done"), **self._part_ids(), transcript=transcript)
        await self._send("response.content_part.done", **self._part_ids(),
                         part={"type": "audio" if self.beta else "output_audio", "transcript": transcript})
        item = self._item("completed")
        await self._send("response.output_item.done", response_id=self.response_id, output_index=0, item=item)
        response = self._response("incomplete", {"type": "incomplete", "reason": reason})
        response["output"] = [item]
        await self._send("response.done", response=response)

    # --- server events ----------------------------------------------------------------------------------

    def session_view(self) -> dict:
        """The effective session configuration in this connection's dialect."""
        sampling = {"text_temperature": self.sampling.text_temperature, "text_topk": self.sampling.text_top_k,
                    "audio_temperature": self.sampling.audio_temperature, "audio_topk": self.sampling.audio_top_k,
                    "seed": self.sampling.seed}
        voice = self.voice or self.hub.options.default_voice
        common = {"id": self.id, "object": "realtime.session", "model": self.model,
                  "instructions": self.instructions, "tools": [], "tool_choice": "auto", "sampling": sampling,
                  "context_policy": self.context_policy or self.hub.options.context_policy}
        if self.beta:
            return {**common, "modalities": ["audio", "text"], "voice": voice,
                    "input_audio_format": self.input_format, "output_audio_format": self.output_format,
                    "input_audio_transcription": None, "turn_detection": None,
                    "temperature": self.sampling.audio_temperature, "max_response_output_tokens": "inf"}
        formats = {PCM16: {"type": "audio/pcm", "rate": SAMPLE_RATE}, ULAW: {"type": "audio/pcmu"}}
        return {**common, "type": "realtime", "output_modalities": ["audio"], "max_output_tokens": "inf",
                "audio": {"input": {"format": formats[self.input_format], "transcription": None,
                                    "noise_reduction": None, "turn_detection": None},
                          "output": {"format": formats[self.output_format], "voice": voice, "speed": 1.0}}}

    async def _send(self, kind: str, **fields) -> None:
        await self.transport.send_text(json.dumps({"type": kind, "event_id": _new_id("event"), **fields}))

    async def _error_event(self, error: RealtimeError, client_event_id: str | None = None) -> None:
        body = {"type": error.kind, "code": error.code, "message": str(error), "param": error.param,
                "event_id": client_event_id}
        with contextlib.suppress(Exception):  # the client is gone or not reading
            await asyncio.wait_for(self._send("error", error=body), SEND_TIMEOUT)


def _audio_format(value: object, param: str) -> str:
    """A wire format (beta string or GA object) -> PCM16 or ULAW; raises ``RealtimeError``."""
    if isinstance(value, str) and value in _BETA_FORMATS:
        return _BETA_FORMATS[value]
    if isinstance(value, dict) and value.get("type") in _GA_FORMATS:
        rate = value.get("rate")
        if value["type"] == "audio/pcm" and rate not in (None, SAMPLE_RATE):
            raise RealtimeError("unsupported_audio_format", f"audio/pcm is served at {SAMPLE_RATE} Hz only", param)
        return _GA_FORMATS[value["type"]]
    raise RealtimeError("unsupported_audio_format", f"unsupported audio format {str(value)[:60]!r}: use pcm16 "
                        "(audio/pcm, 24 kHz) or g711_ulaw (audio/pcmu)", param)


def _sampling(session: Mapping, current):
    """The sampling settings a session update asks for (validated like ``/api/chat`` query parameters)."""
    values = {"text_temperature": current.text_temperature, "text_topk": current.text_top_k,
              "audio_temperature": current.audio_temperature, "audio_topk": current.audio_top_k,
              "seed": -1 if current.seed is None else current.seed}
    temperature = session.get("temperature")
    if temperature is not None:
        values["text_temperature"] = values["audio_temperature"] = temperature
    extra = session.get("sampling")
    if extra is not None:
        if not isinstance(extra, dict) or set(extra) - set(_SAMPLING_KEYS):
            raise RealtimeError("invalid_value", f"sampling is an object with any of {', '.join(_SAMPLING_KEYS)}",
                                "session.sampling")
        values.update({k: v for k, v in extra.items() if v is not None})
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values.values()):
        raise RealtimeError("invalid_value", "temperature and sampling values must be numbers", "session.sampling")
    try:
        return request_from_query({k: repr(v) if isinstance(v, float) else str(v) for k, v in values.items()}).sampling
    except ProtocolError as error:
        raise RealtimeError("invalid_value", str(error), "session.sampling") from None


def event_too_large_notice(limit: int) -> str:
    """The ``error`` event sent before closing for an event over the WebSocket's size limit (bytes)."""
    return json.dumps({"type": "error", "event_id": _new_id("event"), "error": {
        "type": "invalid_request_error", "code": "event_too_large", "param": None, "event_id": None,
        "message": f"an event of more than {limit} bytes; at most {MAX_EVENT_BYTES} are accepted (send audio in "
                   "chunks of a few hundred milliseconds)"}})


async def run_realtime(hub, transport, *, beta: bool = False, model: str | None = None,
                       idle_timeout: float | None = None) -> None:
    """Serve one ``/v1/realtime`` connection from upgrade to close. Never raises for client behaviour.
    ``idle_timeout``: seconds without an event before the conversation starts that end the session."""
    session = RealtimeSession(hub, transport, beta=beta, model=model, idle_timeout=idle_timeout)
    started = time.monotonic()
    try:
        await session.run()
    except asyncio.CancelledError:
        if session.conversation is not None:
            await session.conversation.close("the server is shutting down")
        await session._close(CLOSE_GOING_AWAY, "the server is shutting down")
        raise
    except Exception:  # a bug must end this session only, and say so
        log.exception("realtime session failed")
        hub.metrics.record_error("internal")
        if session.conversation is not None:
            await session.conversation.close("internal error")
        await session._close(CLOSE_INTERNAL, "internal server error; please reconnect")
    log.debug("realtime session %s lasted %.1f s", session.id, time.monotonic() - started)
