"""The ``/api/chat`` protocol, independent of the web framework that carries it.

Compatible with the reference server and its web client: every message is binary, byte 0 is the kind.

| kind | direction | payload |
| --- | --- | --- |
| ``0x00`` handshake | server -> client | none; sent once the persona's system prompt is applied (the reference web client: paced, below) |
| ``0x01`` audio | both ways | exactly one Ogg page of an Ogg/Opus stream, 24 kHz mono |
| ``0x02`` text | server -> client | UTF-8 piece of the agent's words (padding is not sent) |
| ``0x04`` metadata | server -> client | UTF-8 JSON: model, persona, limits; queue position while waiting |
| ``0x05`` error | server -> client | UTF-8 text saying what went wrong; the server closes right after |
| ``0x06`` text turn | client -> server | UTF-8 user text: refused with ``0x05`` (these models hear the user only as audio) |

Query parameters: ``text_prompt``, ``voice_prompt`` (a preset name, e.g. ``NATF2`` or ``NATF2.pt``),
``seed`` (-1: random), ``text_temperature``, ``text_topk``, ``audio_temperature``, ``audio_topk``,
``context_policy`` (``sliding`` or ``pin-persona``: what the conversation keeps once it is longer than the
model's context; default: the server's ``--context-policy``), all honoured per conversation and validated
(a bad value gets ``0x05``). The reference client's other
parameters (``pad_mult``, ``text_seed``, ``repetition_penalty`` ...) are accepted and ignored.

Order of the server's messages: metadata (model, limits; then ``queue_position`` updates while all
slots are busy), handshake, then per 80 ms frame its audio page(s) followed by its text piece (text
never runs ahead of its audio). The agent's stream starts with the ``OpusHead`` and ``OpusTags`` pages,
counts granule positions in 48 kHz units and ends with an end-of-stream page.

The reference web client, unchanged, gets the reference server's pace. It attaches its player only a
second after its Connect click (its decoder's fixed warm-up) and drops every audio message before that,
while it starts its microphone at the handshake; the reference server's handshake takes seconds, ours
tens of milliseconds. A client that sends that client's parameters (``pad_mult`` and
``repetition_penalty_context``, which no other client needs) therefore gets its handshake no sooner than
``REFERENCE_CLIENT_HANDSHAKE_SECONDS`` after its socket opened, and its conversation's clock starts with
its first audio page (``ConversationHub.open(start_on_audio=True)``: nothing is generated before it, as
in the reference server), so the agent's stream, header pages included, reaches a player that listens.
Every other client (this server's page, ``personaplex client``) gets its handshake as soon as the persona
is applied and its frames from the next tick on, whether it sends audio yet or not. A conversation that
the server ends (length limit, no audio from the client for the input timeout, client not reading,
shutdown) gets a ``0x05`` with the reason before the close.

Bad input ends the conversation with ``0x05`` and a close code: a text (non-binary) message, an empty
message, an unknown kind (1003); a message over the size limit (1009); an audio payload that is not a
valid Ogg/Opus stream (1007); a bad persona or query parameter (1008). Nothing of it reaches the engine
or any other conversation. A message over the WebSocket's own limit (4 x the protocol's) gets its ``0x05``
just before the close (1009). Every message counts against the connection's ``InputBudget`` before it
is decoded: more than ``--max-messages-per-second`` messages, or audio more than ``--input-burst``
seconds ahead of real time, end the conversation with ``0x05`` (1008). An Ogg page with a bad checksum, or with the serial number of another stream,
is not an error of the protocol but a damaged or foreign page: it is dropped before the decoder (its
audio is lost, as a lost packet's would be), counted in ``personaplex_errors_total{kind="ogg_page_dropped"}``,
and the conversation goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from ..engine import SamplingConfig
from ..engine.engine import CONTEXT_POLICIES, MAX_AUDIO_TOP_K, MAX_TEXT_TOP_K
from ..errors import PersonaplexError
from ..serving.hub import (
    MAX_VOICE_NAME_BYTES,
    Conversation,
    HubBusy,
    HubClosed,
    NotSupported,
    PersonaError,
    PersonaRequest,
)
from ..serving.input_budget import InputBudget, InputRateExceeded
from ..ogg import LivePageCheck, OpusPageWriter
from .opus_pool import OpusEncoderPool, OpusWorkerError

log = logging.getLogger("personaplex.server")

KIND_HANDSHAKE = 0x00
KIND_AUDIO = 0x01
KIND_TEXT = 0x02
KIND_METADATA = 0x04
KIND_ERROR = 0x05
KIND_USER_TEXT = 0x06

MAX_MESSAGE_BYTES = 128 << 10  # an Ogg page is at most ~64 KiB
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
SEND_TIMEOUT = 2.0  # seconds a closing message may take to go out before the connection is dropped
# The reference web client's player is ready 1 s after its Connect click, which comes before its socket
# opens; measured with its build on a loaded 2-core machine: 0.9 s after the socket opened. Half a second
# more for a slower machine; the reference server's own handshake takes seconds.
REFERENCE_CLIENT_HANDSHAKE_SECONDS = 1.5
REFERENCE_CLIENT_PARAMETERS = ("pad_mult", "repetition_penalty_context")  # sent by that client only


class MessageTransport(Protocol):
    async def receive(self) -> bytes | str | None:  # None: the client closed
        ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class ProtocolError(PersonaplexError):
    """The client broke the protocol; ``code`` is the WebSocket close code to use."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --- query parameters -------------------------------------------------------------------------------------


def _number(query: Mapping[str, str], name: str, kind: type, default, low, high):
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ProtocolError(f"invalid {name}={text[:40]!r}: expected {'an integer' if kind is int else 'a number'}",
                            CLOSE_POLICY) from None
    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
        raise ProtocolError(f"invalid {name}={text[:40]!r}: must be between {low} and {high}", CLOSE_POLICY)
    return value


def request_from_query(query: Mapping[str, str]) -> PersonaRequest:
    """The persona and sampling settings a ``/api/chat`` query asks for; raises ``ProtocolError``."""
    defaults = SamplingConfig()
    seed = _number(query, "seed", int, -1, -1, 2**63 - 1)
    sampling = SamplingConfig(
        text_temperature=_number(query, "text_temperature", float, defaults.text_temperature, 0.0, 10.0),
        text_top_k=_number(query, "text_topk", int, defaults.text_top_k, 1, MAX_TEXT_TOP_K),
        audio_temperature=_number(query, "audio_temperature", float, defaults.audio_temperature, 0.0, 10.0),
        audio_top_k=_number(query, "audio_topk", int, defaults.audio_top_k, 1, MAX_AUDIO_TOP_K),
        seed=None if seed < 0 else seed,
    )
    voice = query.get("voice_prompt") or None
    if voice is not None and len(voice.encode("utf-8", "surrogateescape")) > MAX_VOICE_NAME_BYTES:
        raise ProtocolError(f"invalid voice_prompt ({len(voice.encode('utf-8', 'surrogateescape'))} bytes): preset "
                            f"names are at most {MAX_VOICE_NAME_BYTES} bytes (see GET /api/voices)", CLOSE_POLICY)
    policy = query.get("context_policy") or None
    if policy is not None and policy not in CONTEXT_POLICIES:
        raise ProtocolError(f"invalid context_policy={policy[:40]!r}: must be one of {', '.join(CONTEXT_POLICIES)}",
                            CLOSE_POLICY)
    return PersonaRequest(text_prompt=query.get("text_prompt", ""), voice=voice, sampling=sampling,
                          context_policy=policy)


def is_reference_web_client(query: Mapping[str, str]) -> bool:
    """Whether the query is the reference web client's (see the module's notes on its pace)."""
    return all(name in query for name in REFERENCE_CLIENT_PARAMETERS)


# --- the session ------------------------------------------------------------------------------------------


async def run_chat(hub, query: Mapping[str, str], transport: MessageTransport, *, front_end: str = "chat",
                   voice_audio: bytes | None = None, encoders: OpusEncoderPool | None = None) -> None:
    """Serve one ``/api/chat`` connection from upgrade to close. Never raises for client behaviour.
    ``encoders``: worker processes that encode the agent's audio (None: this process does)."""
    session = ChatSession(hub, transport, front_end, encoders)
    try:
        await session.run(query, voice_audio)
    except asyncio.CancelledError:
        await session.abandon("the server is shutting down")
        raise
    except Exception:  # a bug must end this session only, and say so
        log.exception("chat session failed")
        hub.metrics.record_error("internal")
        await session.fail("internal server error; please reconnect", 1011)


class ChatSession:
    def __init__(self, hub, transport: MessageTransport, front_end: str, encoders: OpusEncoderPool | None = None):
        self.hub = hub
        self.transport = transport
        self.front_end = front_end
        self.conversation: Conversation | None = None
        self.opened_at = time.monotonic()  # about when the socket opened (the session starts at the upgrade)
        self.writer = encoders.open() if encoders is not None else OpusPageWriter()
        self._reader = None
        self._closed = False
        self._pending_sends: set[asyncio.Task] = set()
        self._metadata: dict = {}
        self.budget = InputBudget(hub.options.input_burst_seconds, hub.options.max_messages_per_second)

    async def run(self, query: Mapping[str, str], voice_audio: bytes | None) -> None:
        try:
            request = request_from_query(query)
        except ProtocolError as error:
            self.hub.metrics.record_error("bad_request")
            return await self.fail(str(error), error.code)
        if voice_audio is not None:
            request = dataclasses.replace(request, voice=None, voice_audio=voice_audio)
        # Every metadata message repeats the welcome fields: the reference client validates each one whole.
        self._metadata = self._welcome(request)
        if not await self._try_send(self._metadata_message()):
            return await self._close(CLOSE_NORMAL, "")

        reference_pace = is_reference_web_client(query)
        receiver = asyncio.create_task(self._receive())
        opener = asyncio.create_task(self.hub.open(request, front_end=self.front_end, start_on_audio=reference_pace,
                                                   on_queue_position=self._queue_position))
        await asyncio.wait({receiver, opener}, return_when=asyncio.FIRST_COMPLETED)
        if not opener.done():  # the client left (or broke the protocol) before its conversation started
            opener.cancel()
            await asyncio.gather(opener, return_exceptions=True)
            return await self._finish_receiver(receiver)
        try:
            self.conversation = opener.result()
        except (PersonaError, HubBusy, HubClosed) as error:
            receiver.cancel()
            kind = {PersonaError: "bad_persona", HubBusy: "busy", HubClosed: "closed"}[type(error)]
            self.hub.metrics.record_error(kind)
            code = CLOSE_POLICY if isinstance(error, PersonaError) else \
                CLOSE_TRY_AGAIN if isinstance(error, HubBusy) else CLOSE_GOING_AWAY
            return await self.fail(str(error), code)
        conversation = self.conversation
        if reference_pace:  # its player is not listening yet: the handshake waits (the slot holds, not stepping)
            wait = self.opened_at + REFERENCE_CLIENT_HANDSHAKE_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.wait({receiver}, timeout=wait)
            if receiver.done():  # the client left (or broke the protocol) meanwhile
                return await self._finish_receiver(receiver)
        limit = conversation.max_frames
        started = {
            "conversation_id": conversation.id, "slot": conversation.slot,
            "max_conversation_seconds": None if limit is None else round(limit * 0.08, 2),  # None: no limit
            "cached_persona": conversation.cached_persona, "queue_position": None,
            "context_policy": conversation.context_policy,
        }
        if not (await self._try_send(bytes([KIND_HANDSHAKE]))
                and await self._try_send(self._metadata_message(started))):
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            await conversation.close("the client left")
            return await self._close(CLOSE_NORMAL, "")

        sender = asyncio.create_task(self._send_frames(conversation))
        ended = asyncio.create_task(conversation.ended())
        await asyncio.wait({receiver, sender, ended}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():
            ended.cancel()
            await self._finish_receiver(receiver, sender)
            return
        if sender.done() and conversation.end_reason is None:  # sending failed: our encoder, or the connection
            error = sender.exception()
            encoder_stopped = isinstance(error, OpusWorkerError)
            if encoder_stopped:
                log.error("conversation ended: %s", error)
                self.hub.metrics.record_error("internal")
            else:
                log.debug("sending to the client failed: %r", error)
            reason = "the audio encoder stopped" if encoder_stopped else "the connection to the client was lost"
            await conversation.close(reason)
            receiver.cancel()
            ended.cancel()
            await asyncio.gather(receiver, ended, return_exceptions=True)
            if encoder_stopped:
                return await self.fail("internal server error (the audio encoder stopped); please reconnect", 1011)
            return await self._close(CLOSE_NORMAL, "")
        # The hub ended the conversation (or sending failed): let the last frames out, then say why.
        if not sender.done():
            await asyncio.wait({sender}, timeout=SEND_TIMEOUT)
        sender.cancel()
        receiver.cancel()
        ended.cancel()
        await asyncio.gather(sender, receiver, ended, return_exceptions=True)
        reason = conversation.end_reason or "the conversation ended"
        code = CLOSE_GOING_AWAY if "shutting down" in reason else CLOSE_NORMAL
        await self.fail(reason, code)

    async def _finish_receiver(self, receiver: asyncio.Task, sender: asyncio.Task | None = None) -> None:
        """The receive side ended: the client closed, or broke the protocol."""
        error = receiver.exception() if not receiver.cancelled() else None
        if self.conversation is not None:
            dropped = getattr(self.transport, "end_reason", None)  # the server dropped the connection: why
            await self.conversation.close(f"protocol error: {error}" if error is not None else dropped or "client closed")
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if error is None:
            return await self._close(CLOSE_NORMAL, "")
        if isinstance(error, ProtocolError):
            self.hub.metrics.record_error("protocol")
            return await self.fail(str(error), error.code)
        if isinstance(error, NotSupported):
            self.hub.metrics.record_error("not_supported")
            return await self.fail(str(error), CLOSE_UNSUPPORTED)
        log.error("receiving failed: %r", error)
        self.hub.metrics.record_error("internal")
        await self.fail("internal server error; please reconnect", 1011)

    # --- receiving -------------------------------------------------------------------------------------

    async def _receive(self) -> None:
        """Read client messages until it closes (returns) or breaks the protocol (raises)."""
        import sphn

        self._reader = sphn.OpusStreamReader(24_000)
        self._pages = LivePageCheck()
        while True:
            message = await self.transport.receive()
            if message is None:
                return
            try:
                self.budget.take_message()
            except InputRateExceeded as error:
                self.hub.metrics.input_refused.labels(reason="input_rate").inc()
                raise ProtocolError(str(error), CLOSE_POLICY) from None
            if isinstance(message, str):
                raise ProtocolError("text messages are not part of this protocol: send binary messages "
                                    "(first byte: the kind, 0x01 for an Ogg page)", CLOSE_UNSUPPORTED)
            if not message:
                raise ProtocolError("empty message: every message starts with its kind byte", CLOSE_UNSUPPORTED)
            if len(message) > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"message of {len(message)} bytes; at most {MAX_MESSAGE_BYTES} are accepted "
                                    "(one Ogg page per message)", CLOSE_TOO_BIG)
            kind, payload = message[0], message[1:]
            if kind == KIND_AUDIO:
                self._take_audio(payload)
            elif kind == KIND_USER_TEXT:
                if self.conversation is None:
                    raise ProtocolError("a text turn before the handshake", CLOSE_UNSUPPORTED)
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError("a text turn must be UTF-8", CLOSE_INVALID_DATA) from None
                self.conversation.send_text(text)
            else:
                raise ProtocolError(f"unsupported message kind 0x{kind:02x}: clients send 0x01 (one Ogg/Opus page)",
                                    CLOSE_UNSUPPORTED)

    def _take_audio(self, page: bytes) -> None:
        try:
            self.budget.check_audio()
        except InputRateExceeded as error:
            self.hub.metrics.input_refused.labels(reason="input_rate").inc()
            raise ProtocolError(str(error), CLOSE_POLICY) from None
        try:
            if not self._pages.accept(page):  # a damaged or foreign page: dropped and counted, the call goes on
                self.hub.metrics.record_error("ogg_page_dropped")
                return
            pcm = self._reader.append_bytes(page)
        except Exception as exc:  # noqa: BLE001 - sphn reports malformed Ogg or Opus as plain exceptions
            raise ProtocolError(f"invalid audio: expected one page of an Ogg/Opus stream per 0x01 message ({exc})",
                                CLOSE_INVALID_DATA) from None
        seconds = 0.0 if pcm is None else len(pcm) / 24000
        self.budget.spend_audio(seconds)
        self.hub.metrics.input_decoded.labels(front_end=self.front_end).inc(seconds)
        if self.conversation is not None and pcm is not None and len(pcm):
            self.conversation.send_audio(np.asarray(pcm, dtype=np.float32).reshape(-1))
        # Audio that arrives before the handshake is decoded (validated) and dropped: the conversation
        # starts at the handshake (or, paced like the reference, with the first audio after it).

    # --- sending ---------------------------------------------------------------------------------------

    async def _send_frames(self, conversation: Conversation) -> None:
        async for frame in conversation.frames():
            if conversation.output_overflow:  # the client is not reading: do not queue more
                return
            for page in await self.writer.encode(frame.pcm):
                await self.transport.send_bytes(bytes([KIND_AUDIO]) + page)
            if frame.text:
                await self.transport.send_bytes(bytes([KIND_TEXT]) + frame.text.encode("utf-8"))

    def _welcome(self, request: PersonaRequest) -> dict:
        info = self.hub.describe()
        sampling = request.sampling
        return {
            # Fields the reference web client's "server info" panel reads.
            "text_temperature": sampling.text_temperature, "text_topk": sampling.text_top_k,
            "audio_temperature": sampling.audio_temperature, "audio_topk": sampling.audio_top_k,
            "pad_mult": 0, "repetition_penalty_context": 0, "repetition_penalty": 1.0,
            "lm_model_file": info["model"], "instance_name": "personaplex",
            "build_info": dict.fromkeys(("build_timestamp", "build_date", "git_branch", "git_timestamp", "git_date",
                                         "git_hash", "git_describe", "rustc_host_triple", "rustc_version",
                                         "cargo_target_triple"), ""),
            # This server's own.
            "model": info["model"], "untrained": info["untrained"],
            "persona": {"text_prompt": request.text_prompt, "voice": request.voice or self.hub.options.default_voice,
                        "seed": sampling.seed,
                        "context_policy": request.context_policy or self.hub.options.context_policy},
            "limits": {k: info[k] for k in ("slots", "max_queue", "max_conversation_seconds", "input_timeout_seconds")},
            "text_turns": False,
            **self.hub.load(),
        }

    def _metadata_message(self, update: dict | None = None) -> bytes:
        """A ``0x04`` message: everything known so far, with ``update`` merged in."""
        self._metadata.update(update or {})
        return bytes([KIND_METADATA]) + json.dumps(self._metadata).encode("utf-8")

    def _queue_position(self, position: int) -> None:
        message = {"queue_position": position, "queued": self.hub.load()["queued"]}
        task = asyncio.ensure_future(self._try_send(self._metadata_message(message)))
        self._pending_sends.add(task)
        task.add_done_callback(self._pending_sends.discard)

    async def _try_send(self, data: bytes) -> bool:
        """Send; False when the client is gone (the receive side will notice and end the session)."""
        try:
            await self.transport.send_bytes(data)
        except Exception:
            log.debug("sending to the client failed", exc_info=True)
            return False
        return True

    # --- ending ----------------------------------------------------------------------------------------

    async def fail(self, message: str, code: int) -> None:
        """End of stream page (if audio was sent), ``0x05`` with ``message``, close with ``code``."""
        if self._closed:
            return
        eos = self.writer.finish()
        try:
            if eos is not None:
                await asyncio.wait_for(self.transport.send_bytes(bytes([KIND_AUDIO]) + eos), SEND_TIMEOUT)
            await asyncio.wait_for(self.transport.send_bytes(bytes([KIND_ERROR]) + message.encode("utf-8")),
                                   SEND_TIMEOUT)
        except Exception:
            log.debug("could not send the error message", exc_info=True)
        await self._close(code, message)

    async def abandon(self, reason: str) -> None:
        if self.conversation is not None:
            await self.conversation.close(reason)
        await self.fail(reason, CLOSE_GOING_AWAY)

    async def _close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self.conversation is not None:
            await self.conversation.close("client closed")
        eos = self.writer.finish()
        self.writer.close()
        if eos is not None:
            try:
                await asyncio.wait_for(self.transport.send_bytes(bytes([KIND_AUDIO]) + eos), SEND_TIMEOUT)
            except Exception:
                log.debug("could not send the end of stream", exc_info=True)
        try:
            # WebSocket close reasons are limited to 123 bytes.
            await asyncio.wait_for(self.transport.close(code, reason.encode("utf-8")[:120].decode("utf-8", "ignore")),
                                   SEND_TIMEOUT)
        except Exception:
            log.debug("could not close cleanly", exc_info=True)
