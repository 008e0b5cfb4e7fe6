"""The OpenAI-Realtime-style endpoint against a real running server (demo model), driven by the official
``openai`` Python SDK's realtime clients (GA ``client.realtime`` and beta ``client.beta.realtime``): session
configuration, audio in, audio and transcript deltas out, error events for what a full-duplex model cannot
do, and a neighbouring session unaffected by another's bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import aiohttp
import numpy as np
import pytest

FRAME = 1920  # 80 ms at 24 kHz
FRAME_BYTES = 2 * FRAME
AUDIO_DELTA = "response.output_audio.delta"
# Generous: a conversation on a saturated 2-core machine runs far slower than real time; a test waits for
# what it checks and fails only when it never comes.
DEADLINE = 90.0


# --- a real server in a background thread ------------------------------------------------------------------


class ServerThread:
    """A hub and the aiohttp server on their own event loop in a thread, as in production."""

    def __init__(self, model, server_options: dict | None = None, **hub_options):
        from personaplex.serving import ConversationHub, HubOptions

        self.hub = ConversationHub(model, HubOptions(**hub_options))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._start(server_options or {}))
        self.http = f"http://127.0.0.1:{self.server.port}"
        self.ws = f"ws://127.0.0.1:{self.server.port}"

    async def _start(self, options):
        from personaplex.server.serve import start_server

        return await start_server(self.hub, host="127.0.0.1", port=0, static_dir=None, **options)

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def metrics(self) -> str:
        return self.hub.metrics.render()

    def stop(self) -> None:
        from personaplex.server.serve import stop_server

        self.call(stop_server(self.server, self.hub))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def metric_value(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(demo_model):
    running = ServerThread(demo_model, max_conversations=3, max_queue=0, input_timeout_seconds=None)
    yield running
    running.stop()


# --- client helpers ----------------------------------------------------------------------------------------


def client_for(server: ServerThread, api_key: str = "unused", *, websocket_base_url: bool = False):
    """An SDK client for the server: the GA client derives ws:// from an http:// ``base_url``; the beta
    client always assumes wss:// unless ``websocket_base_url`` is given."""
    import openai  # the dev extra's openai[realtime]

    return openai.AsyncOpenAI(api_key=api_key, base_url=f"{server.http}/v1", max_retries=0,
                              websocket_base_url=f"{server.ws}/v1" if websocket_base_url else None)


def voice_like_pcm16(seconds: float, seed: int = 0) -> bytes:
    """24 kHz PCM16 of a harmonic, pitch-gliding signal with a syllable envelope (a stand-in for speech)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    phase = 2 * np.pi * np.cumsum(160 + 40 * np.sin(2 * np.pi * 0.8 * t)) / 24000
    voice = sum(np.sin(k * phase) / k for k in range(1, 10)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    samples = 0.15 * voice + 0.005 * rng.standard_normal(len(t))
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def stream_audio(connection, pcm: bytes, chunk_frames: int = 1, frame_bytes: int = FRAME_BYTES, *,
                       until=None, deadline: float = DEADLINE) -> None:
    """Append audio at real-time pace, ``chunk_frames`` x 80 ms (``frame_bytes``) per event: all of ``pcm``
    once, then, with ``until`` (a function), ``pcm`` again and again until ``until()`` holds.

    A loaded machine steps fewer frames per second than real time (it skips ticks), so a test streams
    until it saw what it checks rather than for a fixed time; past ``deadline`` seconds it fails."""
    start = time.monotonic()
    step = chunk_frames * frame_bytes
    chunks = [pcm[offset:offset + step] for offset in range(0, len(pcm), step)]
    index = 0
    while index < len(chunks) or (until is not None and not until()):
        assert time.monotonic() - start < deadline, f"still waiting after {deadline:g} s of streaming"
        await connection.input_audio_buffer.append(audio=base64.b64encode(chunks[index % len(chunks)]).decode())
        index += 1
        delay = start + index * chunk_frames * 0.08 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def wait_until(condition, what: str, deadline: float = DEADLINE) -> None:
    """Poll ``condition()`` until it holds; fail naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out after {deadline:g} s waiting for {what}"
        await asyncio.sleep(0.02)


def frames_stepped(server: ServerThread, front_end: str = "realtime") -> int:
    """Agent frames the server stepped so far for conversations of ``front_end`` (its /metrics counter)."""
    return int(metric_value(server.metrics(), "personaplex_agent_frames_total", front_end=front_end))


async def receive_every_stepped_frame(server: ServerThread, before: int, received, front_end: str = "realtime") -> int:
    """Wait until the client got (``received()``) every frame the server has stepped for ``front_end``
    since the count ``before``; returns that number of frames."""
    stepped = frames_stepped(server, front_end) - before
    await wait_until(lambda: received() >= stepped, f"the {stepped} frames the server stepped")
    return stepped


async def collect(connection, events: list, stop: asyncio.Event) -> None:
    """Receive parsed SDK events until ``stop`` is set or the connection closes."""
    while not stop.is_set():
        try:
            event = await asyncio.wait_for(connection.recv(), 0.2)
        except asyncio.TimeoutError:
            continue
        except Exception:  # noqa: BLE001 - the connection closed
            return
        events.append(event)


def of_type(events: list, kind: str) -> list:
    return [e for e in events if e.type == kind]


# --- long calls: past the model's context (shared with the Twilio and /api/chat tests) ----------------------

# A call of 1.3 x the short-context demo's 200 frames, two at once, on a loaded 2-core machine: the engine may
# step several times slower than real time. The tests wait for what they check; this only bounds a hang.
LONG_CALL_DEADLINE = 900.0
# One call per context policy, each with its own text prompt: the server-side conversation of each policy is
# told apart by the length of its system prompt.
LONG_CALL_PROMPTS = {"sliding": "You enjoy having a good conversation.", "pin-persona": "x"}


class LongCalls:
    """Watches, from the server's side, one live conversation per context policy (prompts of
    ``LONG_CALL_PROMPTS``): how far each has gone (system prompt frames plus frames stepped: positions of
    its KV rings) and how many positions the engine pins in its rings."""

    def __init__(self, server: ServerThread):
        from personaplex.serving import PersonaRequest

        self.server = server
        hub = server.hub
        self.prompt_frames = {policy: server.call(hub.build_persona(PersonaRequest(text))).num_steps
                              for policy, text in LONG_CALL_PROMPTS.items()}
        assert len(set(self.prompt_frames.values())) == 2, self.prompt_frames
        self.context = hub.model.lm.config.context
        self.wanted = int(1.3 * self.context)  # positions each call reaches: both rings have wrapped
        self.positions: dict[str, int] = {}
        self.pinned: dict[str, set[int]] = {policy: set() for policy in LONG_CALL_PROMPTS}

    def observe(self) -> None:
        hub = self.server.hub
        for conversation in list(hub._admitted):
            slot = conversation.slot
            if slot < 0 or conversation.end_reason is not None or not hub.engine.active[slot]:
                continue
            for policy, frames in self.prompt_frames.items():
                if conversation.prompt_frames == frames:
                    self.positions[policy] = frames + conversation._engine_frames
                    self.pinned[policy].add(int(hub.engine.lm_state.pinned[slot]))

    def past_the_context(self) -> bool:
        """Whether both calls, still live, have reached ``wanted`` positions (1.3 x the context)."""
        self.observe()
        return len(self.positions) == 2 and min(self.positions.values()) >= self.wanted

    def frames_past_the_prompt(self, policy: str) -> int:
        """Agent frames the call of ``policy`` had at least when both were past the context."""
        return self.wanted - self.prompt_frames[policy]

    def check_the_engine(self) -> None:
        """Each call ran under its own policy in the engine: pin-persona pins exactly its system prompt."""
        assert self.pinned == {"sliding": {0}, "pin-persona": {self.prompt_frames["pin-persona"]}}, self.pinned

    def wait_for_the_ends(self, before: str) -> str:
        """Wait until the server recorded both conversations' ends (after the metrics ``before``); returns the
        metrics then. Neither ended for its length: there is no limit by default."""
        count = "personaplex_conversation_seconds_count"
        end = time.monotonic() + DEADLINE
        while metric_value(self.server.hub.metrics.render(), count) < metric_value(before, count) + 2:
            assert time.monotonic() < end, "the server did not record the end of both calls"
            time.sleep(0.05)
        after = self.server.hub.metrics.render()
        ended = "personaplex_conversations_ended_total"
        assert metric_value(after, ended, reason="max_length") == metric_value(before, ended, reason="max_length")
        for policy in LONG_CALL_PROMPTS:
            joins = [metric_value(m, "personaplex_conversation_joins_total", context_policy=policy)
                     for m in (before, after)]
            assert joins[1] == joins[0] + 1, (policy, joins)
        return after


# --- GA client ---------------------------------------------------------------------------------------------


def test_ga_client_session_update_audio_in_audio_and_transcript_out(server):
    async def scenario():
        client = client_for(server)
        async with client.realtime.connect(model="personaplex") as connection:
            created = await asyncio.wait_for(connection.recv(), 10)
            assert created.type == "session.created"
            assert created.session.audio.output.format.type == "audio/pcm"
            assert created.session.audio.input.turn_detection is None  # full duplex: no server VAD turns

            await connection.session.update(session={
                "type": "realtime", "instructions": "You answer calls for a bakery. You are cheerful.",
                "audio": {"output": {"voice": "NATM1"},
                          "input": {"turn_detection": {"type": "server_vad"}}},
            })
            updated = await asyncio.wait_for(connection.recv(), 30)
            assert updated.type == "session.updated", updated
            assert updated.session.instructions == "You answer calls for a bakery. You are cheerful."
            assert updated.session.audio.output.voice == "NATM1"
            assert updated.session.audio.input.turn_detection is None  # accepted, reported as what it is

            events: list = []
            stop = asyncio.Event()
            receiver = asyncio.create_task(collect(connection, events, stop))
            before = frames_stepped(server)
            started = time.monotonic()
            # 2.4 s of speech (30 frames), repeated if a loaded machine has not yet answered 22 of them.
            await stream_audio(connection, voice_like_pcm16(2.4), until=lambda: len(of_type(events, AUDIO_DELTA)) >= 22)
            stepped = await receive_every_stepped_frame(server, before, lambda: len(of_type(events, AUDIO_DELTA)))
            stop.set()
            await receiver
            return events, time.monotonic() - started, stepped, frames_stepped(server) - before

    events, seconds, stepped, stepped_at_end = asyncio.run(scenario())
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.output_item.added", "response.content_part.added"]
    audio = of_type(events, AUDIO_DELTA)
    # The first audio starts the conversation; from then on the agent's audio flows while the user speaks,
    # one 80 ms frame per frame the server stepped (every one of them, none twice), never faster than
    # real time.
    assert 22 <= stepped <= len(audio) <= stepped_at_end, (stepped, len(audio), stepped_at_end)
    assert len(audio) <= seconds / 0.08 + 2, (len(audio), seconds)
    for event in audio:
        assert len(base64.b64decode(event.delta)) == FRAME_BYTES  # 80 ms of PCM16 at 24 kHz
        assert event.response_id == events[0].response.id
    samples = np.frombuffer(b"".join(base64.b64decode(e.delta) for e in audio), dtype="<i2")
    assert np.abs(samples).max() > 0  # real audio, not padding
    transcript = of_type(events, "response.output_audio_transcript.delta")
    assert transcript and all(isinstance(e.delta, str) and e.delta for e in transcript)
    assert not of_type(events, "error")


def test_unknown_and_unsupported_events_get_error_events_and_the_session_goes_on(server):
    async def scenario():
        client = client_for(server)
        async with client.realtime.connect(model="personaplex") as connection:
            await asyncio.wait_for(connection.recv(), 10)  # session.created
            events: list = []
            stop = asyncio.Event()
            receiver = asyncio.create_task(collect(connection, events, stop))
            streamer = asyncio.create_task(stream_audio(connection, voice_like_pcm16(2.0, seed=3)))
            await asyncio.sleep(0.5)
            await connection.send_raw(json.dumps({"type": "no.such.event", "event_id": "evt_client_1"}))
            await connection.send_raw("{not json")
            await connection.response.cancel()
            await connection.send_raw(json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}))
            await connection.conversation.item.create(item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]})
            await connection.session.update(session={"type": "realtime", "instructions": "Someone else."})
            await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await connection.send_raw(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
            before = len(of_type(events, AUDIO_DELTA))
            await streamer
            # Audio goes on until every error is answered and 10 more frames came after the bad events.
            await stream_audio(connection, voice_like_pcm16(0.8, seed=3), until=lambda: len(
                of_type(events, "error")) >= 8 and len(of_type(events, AUDIO_DELTA)) >= before + 10)
            await asyncio.sleep(0.3)
            stop.set()
            await receiver
            return events, before

    events, audio_before_errors = asyncio.run(scenario())
    errors = [e.error for e in of_type(events, "error")]
    codes = [e.code for e in errors]
    assert codes == ["unknown_event", "invalid_json", "unsupported_event", "invalid_audio",
                     "text_turns_not_supported", "session_already_started", "unsupported_modalities",
                     "unsupported_session_type"], codes
    assert errors[0].event_id == "evt_client_1" and errors[0].type == "invalid_request_error"
    assert "response.cancel" in errors[2].message
    assert "audio" in errors[4].message  # says why: the model hears the user only as audio
    assert len(of_type(events, "session.updated")) == 2  # the rest of each update still answered
    # Audio kept flowing after the errors.
    assert len(of_type(events, AUDIO_DELTA)) >= audio_before_errors + 10


def test_a_bad_persona_is_reported_at_session_update(server):
    async def scenario():
        client = client_for(server)
        async with client.realtime.connect(model="personaplex") as connection:
            await asyncio.wait_for(connection.recv(), 10)
            await connection.session.update(session={"type": "realtime", "instructions": "Be brief.",
                                                     "audio": {"output": {"voice": "alloy"}}})
            error = await asyncio.wait_for(connection.recv(), 30)
            updated = await asyncio.wait_for(connection.recv(), 10)
            await connection.session.update(session={"type": "realtime", "sampling": {"text_topk": 0}})
            sampling_error = await asyncio.wait_for(connection.recv(), 10)
            await asyncio.wait_for(connection.recv(), 10)
            return error, updated, sampling_error

    error, updated, sampling_error = asyncio.run(scenario())
    assert error.type == "error" and error.error.code == "invalid_persona"
    assert "alloy" in error.error.message and "NATF2" in error.error.message  # lists the presets
    assert error.error.param == "session.voice"
    assert updated.type == "session.updated"
    assert updated.session.audio.output.voice == "NATF2"  # the default voice stays
    assert sampling_error.error.code == "invalid_value" and "text_topk" in sampling_error.error.message


# --- beta client -------------------------------------------------------------------------------------------


def test_beta_client_gets_beta_event_names_and_mulaw_audio(server):
    async def scenario():
        client = client_for(server, websocket_base_url=True)
        async with client.beta.realtime.connect(model="personaplex") as connection:
            created = await asyncio.wait_for(connection.recv(), 10)
            await connection.session.update(session={
                "instructions": "You enjoy having a good conversation.", "voice": "NATF2", "temperature": 0.9,
                "input_audio_format": "pcm16", "output_audio_format": "g711_ulaw", "turn_detection": None})
            updated = await asyncio.wait_for(connection.recv(), 30)
            events: list = []
            stop = asyncio.Event()
            receiver = asyncio.create_task(collect(connection, events, stop))
            await stream_audio(connection, voice_like_pcm16(1.6, seed=5), chunk_frames=2,
                               until=lambda: len(of_type(events, "response.audio.delta")) >= 10)
            await asyncio.sleep(0.3)
            stop.set()
            await receiver
            return created, updated, events

    created, updated, events = asyncio.run(scenario())
    assert created.type == "session.created" and created.session.input_audio_format == "pcm16"
    assert updated.type == "session.updated"
    assert updated.session.output_audio_format == "g711_ulaw"
    assert updated.session.temperature == pytest.approx(0.9)
    assert updated.session.voice == "NATF2"
    audio = of_type(events, "response.audio.delta")
    assert len(audio) >= 10
    assert all(len(base64.b64decode(e.delta)) == 640 for e in audio)  # 80 ms of mu-law at 8 kHz
    assert of_type(events, "response.audio_transcript.delta")
    assert not of_type(events, "response.output_audio.delta")


def test_mulaw_both_ways(server):
    from personaplex.frontends.codecs import float_to_pcm16, pcm16_to_mulaw

    rng = np.random.default_rng(4)
    t = np.arange(8000 * 2) / 8000
    caller = pcm16_to_mulaw(float_to_pcm16(0.2 * np.sin(2 * np.pi * 300 * t) + 0.01 * rng.standard_normal(len(t))))

    async def scenario():
        async with client_for(server).realtime.connect(model="personaplex") as connection:
            await asyncio.wait_for(connection.recv(), 10)
            await connection.session.update(session={"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}})
            updated = await asyncio.wait_for(connection.recv(), 30)
            events: list = []
            stop = asyncio.Event()
            receiver = asyncio.create_task(collect(connection, events, stop))
            before = server.metrics()
            await stream_audio(connection, caller, frame_bytes=640,  # 80 ms of mu-law at 8 kHz
                               until=lambda: len(of_type(events, AUDIO_DELTA)) >= 15)
            after = server.metrics()  # while it streamed
            stop.set()
            await receiver
            return updated, events, before, after

    updated, events, before, after = asyncio.run(scenario())
    assert updated.session.audio.input.format.type == "audio/pcmu"
    assert updated.session.audio.output.format.type == "audio/pcmu"
    audio = of_type(events, AUDIO_DELTA)
    assert len(audio) >= 15 and all(len(base64.b64decode(e.delta)) == 640 for e in audio)
    assert not of_type(events, "error")
    # The 8 kHz audio reached the model as 24 kHz frames: no silence filled in while it streamed.
    underruns = [metric_value(m, "personaplex_input_underrun_frames_total") for m in (before, after)]
    assert underruns[1] - underruns[0] <= 4, underruns


# --- long calls ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sessions_go_on_past_the_context_under_either_context_policy(short_context_demo):
    """Two sessions at once, one per context policy (``session.context_policy``), each longer than the model's
    context: both go on without an error, and each runs under its own policy in the engine. An unknown policy
    is refused with an error event; once the conversation runs, the policy is fixed."""
    server = ServerThread(short_context_demo, max_conversations=2, max_queue=0, input_timeout_seconds=None)
    try:
        calls = LongCalls(server)
        before = server.metrics()

        async def session(policy: str, other: str):
            async with client_for(server).realtime.connect(model="personaplex") as connection:
                created = await asyncio.wait_for(connection.recv(), 10)
                await connection.session.update(session={"type": "realtime", "instructions": LONG_CALL_PROMPTS[policy],
                                                         "context_policy": "forever"})
                refused = await asyncio.wait_for(connection.recv(), 30)
                kept = await asyncio.wait_for(connection.recv(), 10)
                await connection.session.update(session={"type": "realtime", "context_policy": policy})
                updated = await asyncio.wait_for(connection.recv(), 10)
                events: list = []
                stop = asyncio.Event()
                receiver = asyncio.create_task(collect(connection, events, stop))
                await stream_audio(connection, voice_like_pcm16(2.0, seed=len(policy)), until=calls.past_the_context,
                                   deadline=LONG_CALL_DEADLINE)
                # Every frame the call had when both were past the context reaches the client.
                await wait_until(lambda: len(of_type(events, AUDIO_DELTA)) >= calls.frames_past_the_prompt(policy),
                                 "the agent's audio past the context")
                await connection.session.update(session={"type": "realtime", "context_policy": other})
                await stream_audio(connection, voice_like_pcm16(0.4), until=lambda: of_type(events, "error"))
                stop.set()
                await receiver
                return created, refused, kept, updated, events

        async def both():
            return await asyncio.wait_for(asyncio.gather(session("sliding", "pin-persona"),
                                                         session("pin-persona", "sliding")), LONG_CALL_DEADLINE + 60)

        results = asyncio.run(both())
        calls.check_the_engine()
        calls.wait_for_the_ends(before)
    finally:
        server.stop()
    for policy, (created, refused, kept, updated, events) in zip(("sliding", "pin-persona"), results):
        assert created.session.context_policy == "sliding"  # the server's default
        assert refused.type == "error" and refused.error.code == "invalid_value"
        assert refused.error.param == "session.context_policy" and "pin-persona" in refused.error.message
        assert kept.type == "session.updated" and kept.session.context_policy == "sliding"
        assert kept.session.instructions == LONG_CALL_PROMPTS[policy]  # the rest of that update applied
        assert updated.type == "session.updated" and updated.session.context_policy == policy
        assert len(of_type(events, AUDIO_DELTA)) >= calls.frames_past_the_prompt(policy)
        assert [e.error.code for e in of_type(events, "error")] == ["session_already_started"], policy
        assert not of_type(events, "response.done")  # the response (the call) was still going


# --- isolation, limits, auth, metrics ----------------------------------------------------------------------


def test_a_session_is_unaffected_by_another_sessions_bad_input(server):
    good_done = asyncio.Event()

    async def bad_client():
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws}/v1/realtime") as ws:
            await ws.receive()
            errors = []

            async def read():  # as any client must: the server ends one that stops reading (2 s behind)
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        break
                    event = json.loads(message.data)
                    if event["type"] == "error":
                        errors.append(event["error"]["code"])

            reader = asyncio.create_task(read())
            pcm = voice_like_pcm16(1.0, seed=9)
            rounds = 0
            # At least the 1 s of audio, and for as long as the good session runs.
            while rounds * FRAME_BYTES < len(pcm) or not good_done.is_set():
                offset = (rounds * FRAME_BYTES) % len(pcm)
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(pcm[offset:offset + FRAME_BYTES]).decode()}))
                await ws.send_bytes(b"\x00\xff" * 100)
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "AAA"}))  # odd PCM16
                await ws.send_str(json.dumps([1, 2, 3]))
                await ws.send_str("x" * ((1 << 20) + 1))  # over the event size limit
                rounds += 1
                await asyncio.sleep(0.08)
            deadline = time.monotonic() + DEADLINE
            while len(errors) < 4 * rounds and not reader.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            reader.cancel()
            return errors, rounds

    async def good_client():
        client = client_for(server)
        try:
            async with client.realtime.connect(model="personaplex") as connection:
                await asyncio.wait_for(connection.recv(), 10)
                events: list = []
                stop = asyncio.Event()
                receiver = asyncio.create_task(collect(connection, events, stop))
                await stream_audio(connection, voice_like_pcm16(2.0, seed=1),
                                   until=lambda: len(of_type(events, AUDIO_DELTA)) >= 18)
                await asyncio.sleep(0.3)
                stop.set()
                await receiver
                return events
        finally:
            good_done.set()

    async def both():
        return await asyncio.gather(bad_client(), good_client())

    (bad_errors, rounds), good_events = asyncio.run(both())
    assert len(bad_errors) == 4 * rounds  # every bad message answered
    assert set(bad_errors) == {"invalid_message", "invalid_audio", "invalid_event", "event_too_large"}
    assert not of_type(good_events, "error")
    assert len(of_type(good_events, AUDIO_DELTA)) >= 18


def test_full_server_says_busy(demo_model):
    small = ServerThread(demo_model, max_conversations=1, max_queue=0, input_timeout_seconds=None)

    async def scenario():
        client = client_for(small)
        async with client.realtime.connect(model="personaplex") as first:
            await first.recv()
            await first.input_audio_buffer.append(audio=base64.b64encode(b"\x00" * FRAME_BYTES).decode())
            while (await asyncio.wait_for(first.recv(), 30)).type != "response.created":
                pass
            async with aiohttp.ClientSession() as http, http.ws_connect(f"{small.ws}/v1/realtime") as ws:
                await ws.receive_json()
                await ws.send_json({"type": "response.create"})
                busy = await ws.receive_json(timeout=10)
                closing = await ws.receive(timeout=10)
                return busy, closing, ws.close_code

    try:
        busy, closing, code = asyncio.run(scenario())
    finally:
        small.stop()
    assert busy["type"] == "error" and busy["error"]["code"] == "server_busy"
    assert "busy" in busy["error"]["message"]
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and code == 1013


def test_auth_token_is_the_api_key(demo_model):
    guarded = ServerThread(demo_model, {"auth_token": "s3cret"}, max_conversations=1, input_timeout_seconds=None)

    async def connect(api_key):
        async with client_for(guarded, api_key).realtime.connect(model="personaplex") as connection:
            return (await asyncio.wait_for(connection.recv(), 10)).type

    try:
        assert asyncio.run(connect("s3cret")) == "session.created"
        with pytest.raises(Exception, match="401"):
            asyncio.run(connect("wrong"))
    finally:
        guarded.stop()


def test_metrics_count_realtime_sessions(server):
    before = metric_value(server.metrics(), "personaplex_sessions_total", front_end="realtime")

    async def one_session():
        async with client_for(server).realtime.connect(model="personaplex") as connection:
            await connection.recv()
            await connection.input_audio_buffer.append(audio=base64.b64encode(b"\x00" * FRAME_BYTES).decode())
            while (await asyncio.wait_for(connection.recv(), 30)).type != "response.output_audio.delta":
                pass

    asyncio.run(one_session())
    text = server.metrics()
    assert metric_value(text, "personaplex_sessions_total", front_end="realtime") == before + 1
    assert 'personaplex_sessions_total{front_end="realtime"}' in text


def test_shutdown_ends_the_session_with_a_reason(demo_model):
    stopping = ServerThread(demo_model, max_conversations=1, input_timeout_seconds=None)

    async def scenario():
        async with client_for(stopping).realtime.connect(model="personaplex") as connection:
            await connection.recv()
            await connection.input_audio_buffer.append(audio=base64.b64encode(b"\x00" * FRAME_BYTES).decode())
            while (await asyncio.wait_for(connection.recv(), 30)).type != "response.output_audio.delta":
                pass
            stopper = asyncio.get_running_loop().run_in_executor(None, stopping.stop)
            events = []
            events_task = asyncio.create_task(collect(connection, events, asyncio.Event()))
            await asyncio.wait_for(events_task, 10)
            await stopper
            return events

    events = asyncio.run(scenario())
    done = of_type(events, "response.done")
    assert done and done[0].response.status == "incomplete"
    assert "shutting down" in done[0].response.status_details.reason
    assert [e.error.code for e in of_type(events, "error")] == ["conversation_ended"]
