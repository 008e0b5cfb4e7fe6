"""The Twilio Media Streams bridge against a real running server (demo model): a client replays the
documented message sequence (``connected``, ``start`` with ``customParameters``, 20 ms ``media`` of real
G.711 mu-law audio at real-time pace, ``mark`` echoes, ``stop``) and checks the agent's ``media``, ``mark``
and ``clear`` messages, persona mapping per number and per call, the token, malformed messages and the
end of a conversation."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import aiohttp
import numpy as np
import pytest
from test_realtime import (
    DEADLINE,
    LONG_CALL_DEADLINE,
    LONG_CALL_PROMPTS,
    LongCalls,
    ServerThread,
    frames_stepped,
    metric_value,
    wait_until,
)
from test_twilio_codecs import speech_like

from personaplex.frontends.codecs import float_to_pcm16, mulaw_to_pcm16, pcm16_to_mulaw
from personaplex.frontends.twilio import PhonePersonaError, PhonePersonas

PERSONAS = {
    "personas": {
        "support": {"text_prompt": "You work for Acme's help desk.", "voice": "NATF2"},
        "sales": {"text_prompt": "You sell Acme's phone plans.", "voice": "NATM1", "seed": 7},
    },
    "numbers": {"+1 (555) 123-0002": "sales"},
    "default": "support",
}
STREAM_SID = "MZ0123456789abcdef0123456789abcdef"
CALL_SID = "CA0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("phone") / "personas.json"
    path.write_text(json.dumps(PERSONAS))
    running = ServerThread(demo_model, {"phone_personas": path}, max_conversations=3, max_queue=0,
                           input_timeout_seconds=None)
    yield running
    running.stop()


# --- a client that behaves like Twilio ---------------------------------------------------------------------


def caller_audio(seconds: float, seed: int = 0) -> bytes:
    """What a caller's phone sends: speech-like audio, G.711 mu-law at 8 kHz."""
    return pcm16_to_mulaw(float_to_pcm16(speech_like(seconds, 8000, seed)))


class Call:
    """Replays Twilio's side of a bidirectional Media Stream and records what the server sends."""

    def __init__(self, url: str, parameters: dict[str, str] | None = None, *, echo_marks: bool = True,
                 encoding: str = "audio/x-mulaw"):
        self.url = url
        self.encoding = encoding
        self.parameters = parameters or {}
        self.echo_marks = echo_marks
        self.received: list[tuple[float, dict]] = []
        self.close_code: int | None = None
        self.sequence = 0

    def of(self, event: str) -> list[dict]:
        return [m for _, m in self.received if m.get("event") == event]

    def message(self, event: str, **fields) -> str:
        self.sequence += 1
        return json.dumps({"event": event, "sequenceNumber": str(self.sequence), **fields})

    async def run(self, audio: bytes, *, extra: list[str] = (), hang_up: bool = True, linger: float = 0.4,
                  until=None, streamed=None, stepped=None, deadline: float = DEADLINE) -> None:
        """Stream ``audio`` in real time, then again and again while ``until()`` is false (a loaded machine
        steps fewer frames per second, so a test streams until it saw what it checks); call ``streamed()``
        after the last media message, wait ``linger`` seconds and, with ``stepped`` (a function giving the
        frames the server has stepped for this call), until all of them arrived; then hang up (``stop``)
        unless ``hang_up`` is false, and wait for the server's close. Streaming fails past ``deadline`` seconds."""
        async with aiohttp.ClientSession() as http, http.ws_connect(self.url) as ws:
            reader = asyncio.create_task(self._read(ws))
            await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send_str(self.message("start", streamSid=STREAM_SID, start={
                "accountSid": "AC0123456789abcdef0123456789abcdef", "streamSid": STREAM_SID, "callSid": CALL_SID,
                "tracks": ["inbound"], "customParameters": self.parameters,
                "mediaFormat": {"encoding": self.encoding, "sampleRate": 8000, "channels": 1}}))
            for text in extra:
                await ws.send_str(text)
            start = self.started = time.monotonic()
            chunks = [audio[offset:offset + 160] for offset in range(0, len(audio), 160)]  # 20 ms each
            chunk = 0
            while chunk < len(chunks) or (until is not None and not until()):
                if ws.closed:
                    break
                assert time.monotonic() - start < deadline, f"still waiting after {deadline:g} s of streaming"
                await ws.send_str(self.message("media", streamSid=STREAM_SID, media={
                    "track": "inbound", "chunk": str(chunk + 1), "timestamp": str(chunk * 20),
                    "payload": base64.b64encode(chunks[chunk % len(chunks)]).decode()}))
                chunk += 1
                delay = start + chunk * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if streamed is not None:
                streamed()
            await asyncio.sleep(linger)
            if stepped is not None:
                frames = stepped()
                await wait_until(lambda: len(self.of("media")) >= frames, f"the {frames} frames the server stepped")
            self.hung_up = time.monotonic()
            if hang_up and not ws.closed:
                await ws.send_str(self.message("stop", streamSid=STREAM_SID,
                                               stop={"accountSid": "AC0", "callSid": CALL_SID}))
            await asyncio.wait_for(reader, DEADLINE)

    async def _read(self, ws) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            self.received.append((time.monotonic(), data))
            if data.get("event") == "mark" and self.echo_marks:
                # Twilio plays what it was sent in real time; the mark comes back once the audio before it
                # has played. Playback here keeps up, so it comes back at once.
                await ws.send_str(self.message("mark", streamSid=STREAM_SID, mark=data["mark"]))
        self.close_code = ws.close_code

    def agent_audio(self) -> np.ndarray:
        return mulaw_to_pcm16(b"".join(base64.b64decode(m["media"]["payload"]) for m in self.of("media")))


def url_of(server: ServerThread) -> str:
    return f"{server.ws}/twilio/media-stream"


# --- the call ----------------------------------------------------------------------------------------------


def test_a_call_replayed_with_real_mulaw_audio(server, caplog):
    caplog.set_level(logging.INFO, logger="personaplex.integrations.twilio")
    call = Call(url_of(server), {"to": "+15551230002", "FirstName": "Jane"})
    before = server.metrics()
    stepped_before = frames_stepped(server, "twilio")
    seen = {}
    stepped = lambda: frames_stepped(server, "twilio") - stepped_before  # noqa: E731
    # 2 s of speech, repeated if a loaded machine has not yet answered 16 frames of it.
    asyncio.run(call.run(caller_audio(2.0), linger=0.1, until=lambda: len(call.of("media")) >= 16,
                         streamed=lambda: seen.update(stepped=stepped(), metrics=server.metrics()), stepped=stepped))
    after = server.metrics()

    media = call.of("media")
    assert all(m["streamSid"] == STREAM_SID for _, m in call.received)
    # Full duplex: the agent's audio flows while the caller talks, one 80 ms message per frame the server
    # stepped (every one until the hang-up, none twice), never faster than real time.
    assert 16 <= seen["stepped"] <= len(media) <= stepped(), (seen["stepped"], len(media), stepped())
    last_media = max(at for at, m in call.received if m.get("event") == "media")
    assert len(media) <= (last_media - call.started) / 0.08 + 2, (len(media), last_media - call.started)
    assert all(len(base64.b64decode(m["media"]["payload"])) == 640 for m in media)  # 80 ms at 8 kHz
    assert np.abs(call.agent_audio()).max() > 0
    marks = [m["mark"]["name"] for m in call.of("mark")]
    assert marks and all(name.startswith("frame-") for name in marks)
    assert not call.of("clear")  # playback kept up: no backlog to drop
    assert call.close_code == 1000
    # The called number picked the persona of the file.
    assert "voice NATM1, prompt \"You sell Acme's phone plans.\"" in caplog.text
    sessions = [metric_value(m, "personaplex_sessions_total", front_end="twilio") for m in (before, after)]
    assert sessions[1] == sessions[0] + 1
    # The model heard the caller: the frames it stepped were fed from the call's audio, not filled with
    # silence (underruns happen only before the first media; with no media at all there would be one
    # per frame). Counted until the last media was sent: after it, every frame is an underrun.
    underruns = [metric_value(m, "personaplex_input_underrun_frames_total") for m in (before, seen["metrics"])]
    assert underruns[1] - underruns[0] <= 8, underruns


def test_per_call_parameters_override_the_file(server, caplog):
    caplog.set_level(logging.INFO, logger="personaplex.integrations.twilio")
    # Each call streams until the agent answers: its persona is logged once its conversation started.
    call = Call(url_of(server), {"persona": "sales", "voice": "VARF1"})
    asyncio.run(call.run(caller_audio(0.3), linger=0.2, until=lambda: call.of("media")))
    assert "voice VARF1, prompt \"You sell Acme's phone plans.\"" in caplog.text
    caplog.clear()
    call = Call(url_of(server), {"to": "+15550000000"})
    asyncio.run(call.run(caller_audio(0.3), linger=0.2, until=lambda: call.of("media")))
    assert "voice NATF2, prompt \"You work for Acme's help desk.\"" in caplog.text  # the file's default


def test_a_playback_backlog_is_cleared(server):
    # A "Twilio" that never reports playback: the audio it holds grows by 80 ms per frame.
    call = Call(url_of(server), echo_marks=False)
    asyncio.run(call.run(caller_audio(2.4), until=lambda: call.of("clear")))
    clears = call.of("clear")
    assert clears and clears[0]["streamSid"] == STREAM_SID
    kinds = [m["event"] for _, m in call.received]
    first_clear = kinds.index("clear")
    assert 15 <= kinds[:first_clear].count("media") <= 22  # after about 1.4 s of unplayed audio


def test_malformed_messages_are_ignored_and_do_not_disturb_other_calls(server):
    junk = ["{not json", json.dumps([1, 2]), json.dumps({"event": "media", "media": {"payload": "%%%"}}),
            json.dumps({"event": "media"}), json.dumps({"event": "surprise"}),
            json.dumps({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}}),
            json.dumps({"event": "start", "start": {"streamSid": "MZother"}})]
    bad, good = Call(url_of(server)), Call(url_of(server))
    errors_before = server.metrics()

    async def both():
        await asyncio.gather(
            bad.run(caller_audio(1.6, seed=1), extra=junk * 3, until=lambda: len(bad.of("media")) >= 15),
            good.run(caller_audio(1.6, seed=2), until=lambda: len(good.of("media")) >= 15))

    asyncio.run(both())
    for call in (bad, good):
        assert len(call.of("media")) >= 15 and call.close_code == 1000
    after = server.metrics()
    for kind in ("twilio_invalid_message", "twilio_invalid_media", "twilio_unknown_event", "twilio_invalid_start"):
        assert metric_value(after, "personaplex_errors_total", kind=kind) > metric_value(
            errors_before, "personaplex_errors_total", kind=kind), kind


def test_a_refused_call_gets_no_audio(server, demo_model):
    unknown = Call(url_of(server), {"persona": "nobody"})
    asyncio.run(unknown.run(caller_audio(0.4), hang_up=False))
    assert not unknown.of("media") and unknown.close_code == 1000
    bad_policy = Call(url_of(server), {"context_policy": "forever"})
    asyncio.run(bad_policy.run(caller_audio(0.4), hang_up=False))
    assert not bad_policy.of("media") and bad_policy.close_code == 1000
    alaw = Call(url_of(server), encoding="audio/x-alaw")
    asyncio.run(alaw.run(caller_audio(0.4), hang_up=False))
    assert not alaw.of("media") and alaw.close_code == 1000

    guarded = ServerThread(demo_model, {"auth_token": "s3cret"}, max_conversations=1, input_timeout_seconds=None)
    try:
        refused, accepted = Call(url_of(guarded)), Call(url_of(guarded), {"token": "s3cret"})
        asyncio.run(refused.run(caller_audio(0.4), hang_up=False))
        asyncio.run(accepted.run(caller_audio(0.6), until=lambda: accepted.of("media")))
    finally:
        guarded.stop()
    assert not refused.of("media")
    assert accepted.of("media")


def test_the_end_of_a_conversation_lets_the_last_audio_play_then_closes(demo_model):
    short = ServerThread(demo_model, max_conversations=1, max_conversation_seconds=0.8, input_timeout_seconds=None)
    try:
        call = Call(url_of(short))
        asyncio.run(call.run(caller_audio(1.6), hang_up=False))
    finally:
        short.stop()
    assert len(call.of("media")) == 10  # 0.8 s of agent audio
    last = call.received[-1][1]
    assert last["event"] == "mark" and last["mark"]["name"] == "personaplex-end"
    assert call.close_code == 1000


@pytest.mark.slow
def test_calls_go_on_past_the_context_under_either_context_policy(short_context_demo):
    """Two calls at once, one per context policy (``<Parameter name="context_policy">``), each longer than
    the model's context: both go on until the caller hangs up, each under its own policy in the engine."""
    server = ServerThread(short_context_demo, max_conversations=2, max_queue=0, input_timeout_seconds=None)
    try:
        long_calls = LongCalls(server)
        before = server.metrics()
        calls = {policy: Call(url_of(server), {"text_prompt": text, "context_policy": policy})
                 for policy, text in LONG_CALL_PROMPTS.items()}

        async def both():
            await asyncio.gather(*(call.run(caller_audio(2.0, seed=len(policy)), until=long_calls.past_the_context,
                                            deadline=LONG_CALL_DEADLINE,
                                            stepped=lambda p=policy: long_calls.frames_past_the_prompt(p))
                                   for policy, call in calls.items()))

        asyncio.run(both())
        long_calls.check_the_engine()
        long_calls.wait_for_the_ends(before)
    finally:
        server.stop()
    for policy, call in calls.items():
        # Every frame the call had when both were past the context was played; the caller hung up.
        assert len(call.of("media")) >= long_calls.frames_past_the_prompt(policy), policy
        assert all(m["mark"]["name"] != "personaplex-end" for m in call.of("mark"))
        assert call.close_code == 1000


# --- the persona file --------------------------------------------------------------------------------------


def test_phone_persona_file_resolution_and_errors(tmp_path):
    personas = PhonePersonas.from_dict(PERSONAS)
    assert personas.resolve({"to": "+15551230002"}).voice == "NATM1"
    assert personas.resolve({"to": "+15551230002"}).sampling.seed == 7
    assert personas.resolve({}).text_prompt == "You work for Acme's help desk."
    assert personas.resolve({"text_prompt": "Hi", "seed": "3"}).sampling.seed == 3
    assert PhonePersonas().resolve({}).voice is None  # no file: the server's default persona
    with pytest.raises(PhonePersonaError, match="unknown persona 'x'"):
        personas.resolve({"persona": "x"})
    with pytest.raises(PhonePersonaError, match="text_topk"):
        personas.resolve({"text_topk": "0"})
    assert personas.resolve({}).context_policy is None  # the server's --context-policy
    assert personas.resolve({"context_policy": "pin-persona"}).context_policy == "pin-persona"
    assert PhonePersonas.from_dict({"personas": {"a": {"context_policy": "pin-persona"}}, "default": "a"}).resolve(
        {}).context_policy == "pin-persona"
    with pytest.raises(PhonePersonaError, match="context_policy='forever'.*sliding, pin-persona"):
        personas.resolve({"context_policy": "forever"})
    with pytest.raises(PhonePersonaError, match="not in 'personas'"):
        PhonePersonas.from_dict({"personas": {}, "numbers": {"+1": "ghost"}})
    with pytest.raises(PhonePersonaError, match="unknown fields"):
        PhonePersonas.from_dict({"personas": {"a": {"prompt": "typo"}}})
    with pytest.raises(PhonePersonaError, match="not found"):
        PhonePersonas.load(tmp_path / "missing.json")
    personas.check_voices(["NATF2", "NATM1"])
    with pytest.raises(PhonePersonaError, match="voice 'NATM1'.*voices: NATF2"):
        personas.check_voices(["NATF2"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(PhonePersonaError, match="broken.json"):
        PhonePersonas.load(tmp_path / "broken.json")
