"""Phone calls: a bridge for Twilio Media Streams (bidirectional, ``<Connect><Stream>``).

Twilio opens a WebSocket to the server and sends JSON text messages: ``connected``, ``start`` (stream
and call ids, media format, the ``<Parameter>`` values as ``customParameters``), ``media`` (base64
G.711 mu-law at 8 kHz, 20 ms per message), ``dtmf``, ``mark`` (echo of ours once played) and ``stop``.
The bridge answers with ``media`` (the agent's audio, 80 ms per message), ``mark`` and ``clear``.

- Audio: mu-law 8 kHz <-> float32 24 kHz through streaming resamplers (``codecs.py``).
- Barge-in needs nothing special: the model is full duplex, it hears the caller while it speaks and
  yields by itself; its audio is sent in real time, so what it stops saying stops being heard within a
  frame or two.
- ``clear`` keeps that true when the network stalls: the bridge sends a ``mark`` every few frames and
  Twilio echoes each once played, so the bridge knows how much audio waits in Twilio's playback buffer.
  A burst after a stall would leave that backlog (and the delay before the caller hears the agent react)
  for the rest of the call; past ``MAX_PLAYBACK_BACKLOG_SECONDS`` the bridge sends ``clear`` to drop it.
- Persona per call: ``customParameters`` ``text_prompt`` / ``voice`` / ``seed`` / ``context_policy``
  (``sliding`` or ``pin-persona``: what a call longer than the model's context keeps) directly, or ``persona``
  (a name in the phone persona file), or ``to`` (the called number, looked up in that file's
  ``numbers``), else the file's ``default``, else the server's default persona. See ``PhonePersonas``.
- With an auth token on the server the stream must carry ``<Parameter name="token" value="..."/>``.
  Until its authenticated ``start`` a stream gets no work: at most ``MAX_MESSAGES_BEFORE_START``
  messages, nothing decoded, and it is closed if ``start`` has not come within the idle timeout.
- Every message counts against the stream's ``InputBudget`` (messages per second; audio at real time
  plus a burst), checked before it is parsed or decoded: a stream over it is closed.
- The conversation starts at ``start``; media before its persona is applied is dropped undecoded. When the
  conversation ends (length limit, shutdown) the bridge lets the last audio play, then closes the
  WebSocket, and Twilio goes on with the TwiML after ``</Connect>``. Malformed messages are logged,
  counted (``personaplex_errors{kind="twilio_..."}``) and ignored: they never end the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FRAME_RATE, SAMPLE_RATE
from ..errors import PersonaplexError
from ..serving.hub import Conversation, HubBusy, HubClosed, PersonaError, PersonaRequest
from ..serving.input_budget import InputBudget, InputRateExceeded
from .chat_protocol import ProtocolError, request_from_query
from .codecs import (
    MULAW_RATE,
    AudioFormatError,
    StreamResampler,
    decode_base64,
    encode_base64,
    float_to_pcm16,
    mulaw_to_pcm16,
    pcm16_to_float,
    pcm16_to_mulaw,
)
from .logs import RateLimitedLog
from .security import token_matches
from .session_loop import receive_until_over

log = logging.getLogger("personaplex.integrations.twilio")  # the log name operators filter on, kept
# Streams refused before they authenticate: anyone can open them, so they are logged at most every 10 s.
refusal_log = RateLimitedLog(log)

FRONT_END = "twilio"
MARK_EVERY_FRAMES = 5  # a playback mark every 400 ms
MAX_PLAYBACK_BACKLOG_SECONDS = 1.0
END_MARK = "personaplex-end"
MAX_MESSAGE_BYTES = 64 << 10  # a 20 ms media message is about 300 bytes
SEND_TIMEOUT = 2.0
MAX_MESSAGES_BEFORE_START = 8  # Twilio sends 'connected' then 'start'
MAX_LOGGED_MALFORMED = 5  # per call; more are only counted
MAX_MARK_DIGITS = 12


class PhonePersonaError(PersonaplexError):
    """The phone persona file is missing or malformed."""


@dataclass
class PhonePersonas:
    """Which persona answers a call. The file (``personaplex serve --phone-personas FILE``) is JSON::

        {
          "personas": {
            "support": {"text_prompt": "You work for Acme's help desk...", "voice": "NATF2"},
            "sales":   {"text_prompt": "You sell Acme's plans...", "voice": "NATM1", "seed": 7}
          },
          "numbers": {"+15551230001": "support", "+15551230002": "sales"},
          "default": "support"
        }

    A persona holds ``text_prompt``, ``voice`` (a preset name) and optionally the sampling settings
    ``text_temperature``, ``text_topk``, ``audio_temperature``, ``audio_topk``, ``seed`` and the
    ``context_policy`` (``sliding`` or ``pin-persona``; default: the server's ``--context-policy``).
    """

    personas: dict[str, dict] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def given(cls, value: str | Path | PhonePersonas | None) -> PhonePersonas:
        """The personas a server was given: ready ones, a file to load, or None (no persona file)."""
        if isinstance(value, PhonePersonas):
            return value
        return cls.load(value) if value is not None else cls()

    @classmethod
    def load(cls, path: str | Path) -> PhonePersonas:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PhonePersonaError(f"phone persona file not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PhonePersonaError(f"cannot read the phone persona file {path}: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "phone personas") -> PhonePersonas:
        if not isinstance(data, dict) or set(data) - {"personas", "numbers", "default"}:
            raise PhonePersonaError(f"{source}: expected an object with 'personas', 'numbers' and 'default'")
        personas, numbers, default = data.get("personas", {}), data.get("numbers", {}), data.get("default")
        if not isinstance(personas, dict) or not isinstance(numbers, dict):
            raise PhonePersonaError(f"{source}: 'personas' and 'numbers' must be objects")
        for name, persona in personas.items():
            if not isinstance(persona, dict):
                raise PhonePersonaError(f"{source}: persona {name!r} must be an object")
            try:
                _request(persona)
            except PhonePersonaError as exc:
                raise PhonePersonaError(f"{source}: persona {name!r}: {exc}") from None
        for number, name in list(numbers.items()) + [("default", default)]:
            if name is not None and name not in personas:
                raise PhonePersonaError(f"{source}: {number} refers to persona {name!r}, which is not in 'personas'")
        return cls(personas, {_normalize_number(k): v for k, v in numbers.items()}, default)

    def check_voices(self, available: list[str]) -> None:
        """Raise ``PhonePersonaError`` when a persona names a voice preset the server does not have."""
        for name, persona in self.personas.items():
            voice = persona.get("voice")
            if voice and voice not in available and str(voice).rsplit(".", 1)[0] not in available:
                raise PhonePersonaError(f"persona {name!r} uses voice {voice!r}, which this server does not have "
                                        f"(voices: {', '.join(available) or 'none'})")

    def resolve(self, parameters: Mapping[str, str]) -> PersonaRequest:
        """The persona for a call's ``customParameters``; raises ``PhonePersonaError``."""
        base: dict = {}
        name = parameters.get("persona")
        if name:
            if name not in self.personas:
                raise PhonePersonaError(f"unknown persona {name[:60]!r}: add it to the phone persona file")
            base = self.personas[name]
        elif parameters.get("to") and _normalize_number(parameters["to"]) in self.numbers:
            base = self.personas[self.numbers[_normalize_number(parameters["to"])]]
        elif self.default is not None:
            base = self.personas[self.default]
        overrides = {k: v for k, v in parameters.items() if k in _PERSONA_KEYS}
        return _request({**base, **overrides})


_PERSONA_KEYS = ("text_prompt", "voice", "text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed",
                 "context_policy")


def _normalize_number(number: str) -> str:
    return "".join(c for c in str(number) if c.isdigit() or c == "+")


def _request(persona: Mapping) -> PersonaRequest:
    """A ``PersonaRequest`` from persona fields (strings or numbers), validated like ``/api/chat``."""
    unknown = set(persona) - set(_PERSONA_KEYS)
    if unknown:
        raise PhonePersonaError(f"unknown fields {sorted(unknown)}; a persona has {', '.join(_PERSONA_KEYS)}")
    query = {"voice_prompt" if k == "voice" else k: str(v) for k, v in persona.items() if v is not None}
    try:
        return request_from_query(query)
    except ProtocolError as exc:
        raise PhonePersonaError(str(exc)) from None


class TwilioSession:
    """One Media Streams WebSocket over a ``MessageTransport``."""

    def __init__(self, hub, transport, *, personas: PhonePersonas | None = None, auth_token: str | None = None,
                 idle_timeout: float | None = None, on_authenticated=None):
        self.hub = hub
        self.idle_timeout = idle_timeout  # seconds from the upgrade to an authenticated start
        self._on_authenticated = on_authenticated
        self.authenticated = False
        self.budget = InputBudget(hub.options.input_burst_seconds, hub.options.max_messages_per_second)
        self._malformed = 0
        self.transport = transport
        self.personas = personas or PhonePersonas()
        self.auth_token = auth_token
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.conversation: Conversation | None = None
        self.frames_sent = 0
        self.frames_played = 0  # by the last mark Twilio echoed
        self.clears = 0
        self.dropped_media = 0  # inbound media messages before the persona was applied
        self._inbound = StreamResampler(MULAW_RATE, SAMPLE_RATE)
        self._outbound = StreamResampler(SAMPLE_RATE, MULAW_RATE)
        self._conversation_task: asyncio.Task | None = None
        self._end_mark_played = asyncio.Event()
        self._over = asyncio.Event()

    async def run(self) -> None:
        expiry = asyncio.create_task(self._expire_unauthenticated()) if self.idle_timeout else None
        try:
            if await receive_until_over(self._receive_loop, self._over, log, "twilio") is not None:
                self.hub.metrics.record_error("internal")
        finally:
            if expiry is not None:
                expiry.cancel()
            if self.conversation is not None:
                await self.conversation.close(getattr(self.transport, "end_reason", None) or "client closed")
            if self._conversation_task is not None:
                self._conversation_task.cancel()
                await asyncio.gather(self._conversation_task, return_exceptions=True)
            with contextlib.suppress(Exception):  # Twilio may be gone already
                await asyncio.wait_for(self.transport.close(1000, ""), SEND_TIMEOUT)

    # --- from Twilio ------------------------------------------------------------------------------------

    async def _expire_unauthenticated(self) -> None:
        await asyncio.sleep(self.idle_timeout)
        if not self.authenticated:
            refusal_log(logging.INFO, "closing a media stream that sent no authenticated start in %g s",
                        self.idle_timeout)
            self.hub.metrics.record_error("twilio_no_start")
            self._over.set()

    async def _receive_loop(self) -> None:
        while True:
            message = await self.transport.receive()
            if message is None:
                return
            try:
                self.budget.take_message()
            except InputRateExceeded as error:
                return self._refuse("input_rate", str(error))
            if not self.authenticated and self.budget.messages > MAX_MESSAGES_BEFORE_START:
                return self._refuse("twilio_no_start", f"{MAX_MESSAGES_BEFORE_START} messages without an "
                                    "authenticated start")
            event = self._parse(message)
            if event is None:
                continue
            kind = event.get("event")
            if kind == "media":
                try:
                    self._media(event)
                except InputRateExceeded as error:
                    return self._refuse("input_rate", str(error))
            elif kind == "start":
                self._start(event)
            elif kind == "mark":
                self._mark(event)
            elif kind == "stop":
                log.info("call %s: stream stopped", self.call_sid)
                return
            elif kind in ("connected", "dtmf"):
                log.debug("twilio %s: %s", kind, event)
            else:
                self._bad("unknown_event", f"unknown event {str(kind)[:40]!r}")

    def _parse(self, message: bytes | str) -> dict | None:
        if isinstance(message, bytes):
            return self._bad("invalid_message", "binary message")
        if len(message) > MAX_MESSAGE_BYTES:
            return self._bad("invalid_message", f"message of {len(message)} bytes")
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            return self._bad("invalid_message", "not JSON")
        if not isinstance(event, dict):
            return self._bad("invalid_message", "not a JSON object")
        return event

    def _bad(self, kind: str, what: str) -> None:
        self._malformed += 1
        self.hub.metrics.record_error("twilio_" + kind)
        if not self.authenticated:  # anyone can send these: logged with everyone else's refusals
            return refusal_log(logging.WARNING, "ignoring a malformed Media Streams message before start (%s)", what)
        if self._malformed <= MAX_LOGGED_MALFORMED:
            more = " (further ones are only counted)" if self._malformed == MAX_LOGGED_MALFORMED else ""
            log.warning("call %s: ignoring a malformed Media Streams message (%s)%s", self.call_sid, what, more)
        return None

    def _refuse(self, kind: str, what: str) -> None:
        """End the stream before doing any work for this message (the receive loop returns)."""
        refusal_log(logging.WARNING, "call %s: closing the media stream: %s", self.call_sid or "(no start)", what)
        self.hub.metrics.record_error(kind)
        self.hub.metrics.input_refused.labels(reason=kind).inc()

    def _start(self, event: dict) -> None:
        start = event.get("start")
        if self._conversation_task is not None or not isinstance(start, dict):
            return self._bad("invalid_start", "a second start message" if self._conversation_task else "no start")
        self.stream_sid = str(start.get("streamSid") or event.get("streamSid") or "")[:64]
        self.call_sid = str(start.get("callSid") or "")[:64]
        media_format = start.get("mediaFormat") or {}
        parameters = start.get("customParameters") or {}
        if not isinstance(parameters, dict):
            parameters = {}
        parameters = {str(k)[:64]: str(v) for k, v in list(parameters.items())[:64]}
        if not self.authenticated:
            if self.auth_token and not token_matches(parameters.get("token"), self.auth_token):
                refusal_log(logging.WARNING, "call %s: refused: missing or wrong token parameter", self.call_sid)
                self.hub.metrics.record_error("twilio_unauthorized")
                self._over.set()
                return None
            self._authenticate()
        self._conversation_task = asyncio.create_task(self._converse(media_format, parameters))

    def _authenticate(self) -> None:
        self.authenticated = True
        if self._on_authenticated is not None:
            self._on_authenticated()

    def _media(self, event: dict) -> None:
        media = event.get("media")
        if not isinstance(media, dict):
            return self._bad("invalid_media", "no media object")
        if media.get("track", "inbound") != "inbound":  # only the caller's audio is for the model
            return None
        if self.conversation is None:  # not started (or not authenticated): dropped without decoding
            self.dropped_media += 1
            self.hub.metrics.input_refused.labels(reason="before_start").inc()
            return None
        payload = media.get("payload")
        self.budget.check_audio()  # raises InputRateExceeded
        try:
            data = decode_base64(payload, "media payload")
        except AudioFormatError as error:
            return self._bad("invalid_media", str(error))
        seconds = len(data) / MULAW_RATE
        self.budget.spend_audio(seconds)
        self.hub.metrics.input_decoded.labels(front_end=FRONT_END).inc(seconds)
        self.conversation.send_audio(self._inbound(pcm16_to_float(mulaw_to_pcm16(data))))

    def _mark(self, event: dict) -> None:
        name = (event.get("mark") or {}).get("name") if isinstance(event.get("mark"), dict) else None
        if name == END_MARK:
            self._end_mark_played.set()
            return None
        number = name[6:] if isinstance(name, str) and name.startswith("frame-") else ""
        # Only ASCII digits, and few: str.isdigit also accepts '²', and int() of thousands of digits raises.
        if number.isascii() and number.isdigit() and len(number) <= MAX_MARK_DIGITS:
            self.frames_played = max(self.frames_played, int(number))
        else:
            self._bad("invalid_mark", f"mark name {str(name)[:40]!r}")

    # --- the conversation -------------------------------------------------------------------------------

    async def _converse(self, media_format: object, parameters: dict[str, str]) -> None:
        try:
            await self._converse_until_the_end(media_format, parameters)
        except Exception:  # a bug must end this call only
            log.exception("call %s: bridge failure", self.call_sid)
            self.hub.metrics.record_error("internal")
        finally:
            self._over.set()

    async def _converse_until_the_end(self, media_format: object, parameters: dict[str, str]) -> None:
        if not isinstance(media_format, dict) or media_format.get("encoding", "audio/x-mulaw") != "audio/x-mulaw" \
                or str(media_format.get("sampleRate", MULAW_RATE)) != str(MULAW_RATE):
            log.error("call %s: unsupported media format %s (expected audio/x-mulaw at 8000 Hz)",
                      self.call_sid, str(media_format)[:100])
            self.hub.metrics.record_error("twilio_media_format")
            return
        try:
            request = self.personas.resolve(parameters)
            self.conversation = await self.hub.open(request, front_end=FRONT_END)
        except (PhonePersonaError, PersonaError, HubBusy, HubClosed) as error:
            log.error("call %s: cannot start the conversation: %s", self.call_sid, error)
            self.hub.metrics.record_error({PhonePersonaError: "bad_persona", PersonaError: "bad_persona",
                                           HubBusy: "busy", HubClosed: "closed"}[type(error)])
            return
        log.info("call %s: conversation %s started (slot %d, voice %s, prompt %r, context policy %s)", self.call_sid,
                 self.conversation.id, self.conversation.slot, request.voice or self.hub.options.default_voice,
                 request.text_prompt[:60], self.conversation.context_policy)
        conversation = self.conversation
        try:
            async for frame in conversation.frames():
                if conversation.output_overflow:
                    break
                await self._send_audio(frame.pcm)
            log.info("call %s: conversation ended: %s", self.call_sid, conversation.end_reason)
            await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": END_MARK}})
            backlog = (self.frames_sent - self.frames_played) / FRAME_RATE
            await asyncio.wait_for(self._end_mark_played.wait(), backlog + SEND_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - the call is gone or not reading: nothing left to play
            log.debug("call %s: %r", self.call_sid, error)

    async def _send_audio(self, pcm) -> None:
        payload = pcm16_to_mulaw(float_to_pcm16(self._outbound(pcm)))
        await self._send({"event": "media", "streamSid": self.stream_sid, "media": {"payload": encode_base64(payload)}})
        self.frames_sent += 1
        if self.frames_sent % MARK_EVERY_FRAMES == 0:
            await self._send({"event": "mark", "streamSid": self.stream_sid,
                              "mark": {"name": f"frame-{self.frames_sent}"}})
        backlog_seconds = (self.frames_sent - self.frames_played) / FRAME_RATE
        if backlog_seconds > MAX_PLAYBACK_BACKLOG_SECONDS + MARK_EVERY_FRAMES / FRAME_RATE:
            # Twilio echoes the pending marks when it clears; count them as played now.
            await self._send({"event": "clear", "streamSid": self.stream_sid})
            self.clears += 1
            self.frames_played = self.frames_sent
            log.info("call %s: cleared %.1f s of playback backlog", self.call_sid, backlog_seconds)

    async def _send(self, message: dict) -> None:
        await self.transport.send_text(json.dumps(message))


async def run_twilio(hub, transport, *, personas: PhonePersonas | None = None, auth_token: str | None = None,
                     idle_timeout: float | None = None, on_authenticated=None) -> None:
    """Serve one Media Streams WebSocket from upgrade to close. Never raises for client behaviour.
    ``auth_token``: the token the ``start`` message must carry (None: already authenticated, or no token).
    ``idle_timeout``: seconds it may take to send an authenticated ``start``. ``on_authenticated``: called
    once it did."""
    session = TwilioSession(hub, transport, personas=personas, auth_token=auth_token, idle_timeout=idle_timeout,
                            on_authenticated=on_authenticated)
    try:
        await session.run()
    except asyncio.CancelledError:
        if session.conversation is not None:
            await session.conversation.close("the server is shutting down")
        raise
    except Exception:  # a bug must end this call only
        log.exception("twilio session failed")
        hub.metrics.record_error("internal")
        if session.conversation is not None:
            await session.conversation.close("internal error")
