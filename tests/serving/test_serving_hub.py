"""The conversation hub without any network: jitter-buffer policy, tick schedule, admission queue, limits,
shutdown, voices, and that a hub conversation produces exactly what the engine produces directly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from personaplex.engine import Engine, SamplingConfig
from personaplex.serving import (
    ConversationHub,
    HubBusy,
    HubClosed,
    HubOptions,
    NotSupported,
    PersonaError,
    PersonaRequest,
)
from personaplex.serving.jitter import InputJitterBuffer
from personaplex.text import SpokenText

FRAME = 1920


def run_hub(model, scenario, **options):
    """Start a hub with ``options``, run ``scenario(hub)``, close the hub; returns the scenario's result."""

    async def main():
        hub = ConversationHub(model, HubOptions(**options))
        await hub.start()
        try:
            return await asyncio.wait_for(scenario(hub), 60)
        finally:
            await hub.close()

    return asyncio.run(main())


async def take(conversation, count: int) -> list:
    frames = []
    async for frame in conversation.frames():
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


# --- jitter buffer ---------------------------------------------------------------------------------------


def test_jitter_buffer_keeps_order_and_partial_samples():
    buffer = InputJitterBuffer(FRAME, capacity_frames=4)
    samples = np.arange(3 * FRAME, dtype=np.float32)
    buffer.push(samples[:1000])
    assert not buffer.pop_frame().any() and buffer.underruns == 1  # too little: silence, samples kept
    buffer.push(samples[1000:])
    for k in range(3):
        assert np.array_equal(buffer.pop_frame(), samples[k * FRAME:(k + 1) * FRAME])
    assert buffer.underruns == 1 and buffer.dropped_samples == 0


def test_jitter_buffer_drops_oldest_past_capacity():
    buffer = InputJitterBuffer(FRAME, capacity_frames=2)
    samples = np.arange(5 * FRAME, dtype=np.float32)
    for chunk in np.split(samples, 10):
        buffer.push(chunk)
    assert buffer.buffered_samples == 2 * FRAME and buffer.dropped_samples == 3 * FRAME
    assert np.array_equal(buffer.pop_frame(), samples[3 * FRAME:4 * FRAME])  # the newest audio survives
    buffer.push(np.ones(10 * FRAME, dtype=np.float32))  # one huge burst
    assert buffer.buffered_samples == 2 * FRAME


# --- the hub -----------------------------------------------------------------------------------------------


def test_hub_conversation_equals_the_engine_alone(demo_model):
    """A hub conversation (silence in, fixed seed) gives the tokens and audio of the engine driven directly."""
    request = PersonaRequest("You like trains.", "NATM1", sampling=SamplingConfig(seed=1234))

    async def scenario(hub):
        conversation = await hub.open(request, front_end="test")
        frames = await take(conversation, 20)
        prompt = await hub.build_persona(request)
        await conversation.close()
        return frames, prompt

    frames, prompt = run_hub(demo_model, scenario, max_conversations=2, tick_seconds=0, input_timeout_seconds=None)
    engine = Engine(demo_model.lm, demo_model.mimi, max_slots=1)
    engine.join(0, 1, prompt, request.sampling)
    silence = torch.zeros(1, FRAME)
    spoken = SpokenText(demo_model.tokenizer)  # the text channel as shown: byte pieces joined into characters
    for frame in frames:
        out = engine.step(silence)
        assert np.array_equal(frame.pcm, out.pcm[0].numpy())
        assert frame.text == (spoken.push(int(out.tokens[0, 0])) or None)


def test_fast_and_late_tick_schedules(demo_model):
    async def scenario(hub):
        conversation = await hub.open(PersonaRequest("x"), front_end="test")
        frames = await take(conversation, 15)
        await conversation.close()
        return len(frames), hub.late_ticks, hub.metrics.render()

    count, late, _ = run_hub(demo_model, scenario, tick_seconds=0, input_timeout_seconds=None)
    assert count == 15 and late == 0
    # A 1 ms tick cannot be kept: every tick is late, missed tick times are skipped (counted), never
    # caught up: the conversation still gets exactly one frame per tick that ran.
    count, late, metrics = run_hub(demo_model, scenario, tick_seconds=0.001, input_timeout_seconds=None)
    assert count == 15 and late >= 10
    skipped = float(next(line.split()[1] for line in metrics.splitlines()
                         if line.startswith("personaplex_skipped_ticks_total")))
    assert skipped > 0
    # /metrics counts the frames stepped per front end: the 15 taken (and any stepped before the close).
    stepped = float(next(line.split()[1] for line in metrics.splitlines()
                         if line.startswith('personaplex_agent_frames_total{front_end="test"}')))
    assert stepped >= 15


def test_input_timeout_and_maximum_length(demo_model):
    async def silent(hub):
        conversation = await hub.open(PersonaRequest("x"), front_end="test")
        frames = [f async for f in conversation.frames()]
        return conversation.end_reason, len(frames)

    reason, _ = run_hub(demo_model, silent, tick_seconds=0.02, input_timeout_seconds=0.3)
    assert "no audio from the client for 0.3 s" in reason

    async def talking(hub):
        conversation = await hub.open(PersonaRequest("x"), front_end="test")
        frames = []
        async for frame in conversation.frames():
            conversation.send_audio(np.zeros(FRAME, dtype=np.float32))
            frames.append(frame)
        return conversation.end_reason, len(frames), hub.load()

    reason, count, load = run_hub(demo_model, talking, tick_seconds=0, max_conversation_seconds=0.8)
    assert "maximum length" in reason and count == 10 and load["slots_busy"] == 0


def test_a_conversation_started_on_audio_waits_for_its_callers_first_audio(demo_model):
    """``start_on_audio``: nothing is stepped after the prompt until the caller's first audio arrives; its
    first step is the next tick's. Audio that came at once is answered frame for frame from the first one
    (the engine driven directly with the same audio gives the same frames); a first packet shorter than a
    frame starts the clock too, its first frame being silence (an underrun, counted)."""
    request = PersonaRequest("You like trains.", "NATM1", sampling=SamplingConfig(seed=77))
    audio = (0.1 * np.random.default_rng(5).standard_normal(10 * FRAME)).astype(np.float32)

    async def idle_ticks(hub, count):
        ticks = hub.ticks
        while hub.ticks < ticks + count:  # the engine ticks (other work could run) but steps nothing for it
            await asyncio.sleep(0.01)

    async def scenario(hub):
        conversation = await hub.open(request, front_end="test", start_on_audio=True)
        await idle_ticks(hub, 20)
        waited = conversation._engine_frames, conversation.frames_sent
        conversation.send_audio(audio)
        frames = await take(conversation, 10)
        await conversation.close()
        short = await hub.open(PersonaRequest("x"), front_end="test", start_on_audio=True)
        await idle_ticks(hub, 10)
        short_waited = short._engine_frames
        underruns = hub.metrics.registry.get_sample_value("personaplex_input_underrun_frames_total")
        short.send_audio(audio[:FRAME // 4])  # a 20 ms packet
        started = await take(short, 3)
        await short.close()
        return waited, frames, await hub.build_persona(request), short_waited, started, \
            hub.metrics.registry.get_sample_value("personaplex_input_underrun_frames_total") - underruns

    waited, frames, prompt, short_waited, started, underruns = run_hub(
        demo_model, scenario, tick_seconds=0.01, input_timeout_seconds=None)
    assert waited == (0, 0) and short_waited == 0
    engine = Engine(demo_model.lm, demo_model.mimi, max_slots=1)
    engine.join(0, 1, prompt, request.sampling)
    for k, frame in enumerate(frames):
        out = engine.step(torch.from_numpy(audio[k * FRAME:(k + 1) * FRAME])[None])
        assert np.array_equal(frame.pcm, out.pcm[0].numpy()), k
    assert len(started) == 3 and underruns >= 3


def test_a_conversation_waiting_for_audio_ends_at_the_input_timeout(demo_model):
    async def never_speaks(hub):
        conversation = await hub.open(PersonaRequest("x"), front_end="test", start_on_audio=True)
        frames = [f async for f in conversation.frames()]
        await asyncio.sleep(0.1)
        return conversation.end_reason, len(frames), conversation._engine_frames, hub.load()

    reason, frames, stepped, load = run_hub(demo_model, never_speaks, tick_seconds=0.02, input_timeout_seconds=0.3)
    assert "no audio from the client for 0.3 s" in reason
    assert frames == 0 and stepped == 0 and load["slots_busy"] == 0


def test_queue_positions_refusal_cancellation_and_shutdown(demo_model):
    async def scenario(hub):
        first = await hub.open(PersonaRequest("a"), front_end="test")
        positions = []
        waiting = asyncio.create_task(hub.open(PersonaRequest("b"), front_end="test",
                                               on_queue_position=positions.append))
        while hub.load()["queued"] != 1:
            await asyncio.sleep(0.001)
        with pytest.raises(HubBusy, match="try again"):
            await hub.open(PersonaRequest("c"), front_end="test")
        waiting.cancel()  # the caller vanished while queued
        await asyncio.gather(waiting, return_exceptions=True)
        assert hub.load()["queued"] == 0
        third = asyncio.create_task(hub.open(PersonaRequest("d"), front_end="other"))
        while hub.load()["queued"] != 1:
            await asyncio.sleep(0.001)
        await first.close()  # the slot passes to the next in line
        second = await third
        assert second.slot == 0 and hub.load()["slots_busy"] == 1
        with pytest.raises(NotSupported):
            second.send_text("hello")
        await hub.close()
        with pytest.raises(HubClosed):
            await hub.open(PersonaRequest("e"), front_end="test")
        return positions, second.end_reason, hub.metrics.render()

    positions, reason, metrics = run_hub(demo_model, scenario, max_conversations=1, max_queue=1, tick_seconds=0.02,
                                         input_timeout_seconds=None)
    assert positions == [1]
    assert "shutting down" in reason
    assert 'personaplex_sessions_total{front_end="test"} 1.0' in metrics
    assert 'personaplex_sessions_total{front_end="other"} 1.0' in metrics
    assert "personaplex_conversations_refused_total 1.0" in metrics


def test_voices_reference_names_and_uploads(demo_model, tmp_path):
    from personaplex.demo import synthesize_voice, wav_bytes

    async def scenario(hub):
        assert "NATF0" in hub.voices()
        # The reference client asks for "NATF0.pt"; the demo presets are audio files.
        await hub.build_persona(PersonaRequest("x", "NATF0.pt"))
        for bad in ("../NATF0", "/etc/passwd", "NATF0/../../x", ".hidden", "NOBODY"):
            with pytest.raises(PersonaError):
                await hub.build_persona(PersonaRequest("x", bad))
        name = await hub.add_voice_upload(wav_bytes(synthesize_voice("custom", seconds=2.0)))
        conversation = await hub.open(PersonaRequest("x", name), front_end="test")
        frames = await take(conversation, 3)
        await conversation.close()
        with pytest.raises(PersonaError, match="cannot use this voice|cannot decode"):
            await hub.add_voice_upload(b"RIFF not really a wav file at all")
        with pytest.raises(PersonaError, match="limited to 30 s"):
            await hub.add_voice_upload(wav_bytes(np.zeros(24000 * 31, dtype=np.float32)))
        with pytest.raises(PersonaError, match="unknown uploaded voice"):
            await hub.build_persona(PersonaRequest("x", "upload-0123456789abcdef"))
        return len(frames)

    assert run_hub(demo_model, scenario, tick_seconds=0, allow_voice_upload=True, input_timeout_seconds=None) == 3

    async def refused(hub):
        with pytest.raises(PersonaError, match="--allow-voice-upload"):
            await hub.add_voice_upload(b"RIFF....")

    run_hub(demo_model, refused, tick_seconds=0)


def test_an_engine_failure_ends_its_conversations_and_the_hub_goes_on(demo_model):
    async def scenario(hub):
        first = await hub.open(PersonaRequest("x"), front_end="test")
        await take(first, 2)
        real_step = hub.engine.step

        def failing_step(pcm):
            hub.engine.step = real_step  # fail once
            raise RuntimeError("injected device failure")

        hub.engine.step = failing_step
        async for _ in first.frames():
            pass
        second = await hub.open(PersonaRequest("x"), front_end="test")
        frames = await take(second, 3)
        return first.end_reason, len(frames), hub.metrics.render()

    reason, count, metrics = run_hub(demo_model, scenario, tick_seconds=0.01, input_timeout_seconds=None)
    assert "internal engine error" in reason and count == 3
    assert 'personaplex_errors_total{kind="engine"} 1.0' in metrics


def test_a_join_spread_over_ticks_while_another_conversation_talks(demo_model):
    async def scenario(hub):
        talking = await hub.open(PersonaRequest("first"), front_end="test")
        received = 0

        async def listen():
            nonlocal received
            async for _ in talking.frames():
                received += 1

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.2)
        before = received
        joining = await hub.open(PersonaRequest("a second persona, prefilled four frames per block"), front_end="test")
        during = received - before
        frames = await take(joining, 3)
        await talking.close()
        await listener
        return during, len(frames), joining.cached_persona

    # Stepping as fast as possible runs exactly one prefill block per tick (with a fixed tick, as many blocks
    # as the time left allows): the prompt of ~75 frames takes ~19 ticks.
    during, count, cached = run_hub(demo_model, scenario, max_conversations=2, tick_seconds=0, join_block_frames=4,
                                    input_timeout_seconds=None, max_output_frames=10_000)
    assert not cached and count == 3
    assert during >= 10  # the prompt took many ticks, and the live conversation got a frame in each


def test_fp8_kv_option_reaches_the_engine(demo_model):
    async def scenario(hub):
        conversation = await hub.open(PersonaRequest("x"), front_end="test")
        frames = await take(conversation, 3)
        await conversation.close()
        return hub.engine.lm_state.tensors()[0].dtype, len(frames)

    dtype, count = run_hub(demo_model, scenario, tick_seconds=0, kv_dtype="fp8", input_timeout_seconds=None)
    assert dtype == torch.float8_e4m3fn and count == 3


def test_jitter_buffer_trims_a_standing_backlog_to_its_target():
    buffer = InputJitterBuffer(FRAME, capacity_frames=12, target_frames=2, trim_window=5)
    buffer.push(np.zeros(8 * FRAME, dtype=np.float32))  # a burst: 8 frames ahead
    for k in range(5):  # then exactly real time: one frame in, one frame out
        buffer.push(np.full(FRAME, k + 1, dtype=np.float32))
        buffer.pop_frame()
    assert buffer.buffered_samples == 2 * FRAME  # latency back to the target, the oldest audio dropped
    assert buffer.dropped_samples == 6 * FRAME
    assert np.array_equal(buffer.pop_frame(), np.full(FRAME, 4, dtype=np.float32))
    # A buffer that does drain below the target is left alone.
    steady = InputJitterBuffer(FRAME, capacity_frames=12, target_frames=2, trim_window=5)
    for _ in range(20):
        steady.push(np.ones(FRAME, dtype=np.float32))
        steady.pop_frame()
    assert steady.dropped_samples == 0


def test_the_default_persona_is_warmed_up_at_start(demo_model):
    """Start-up runs one join of the default persona the live way: the first caller with it starts from
    the prefix cache, and a different persona still prefills."""

    async def scenario(hub):
        default = await hub.open(PersonaRequest(), front_end="test")
        other = await hub.open(PersonaRequest("someone else"), front_end="test")
        cached = default.cached_persona, other.cached_persona
        await default.close()
        await other.close()
        return cached

    cached = run_hub(demo_model, scenario, max_conversations=2, tick_seconds=0, input_timeout_seconds=None)
    assert cached == (True, False)


@pytest.mark.parametrize("default", ["sliding", "pin-persona"])
def test_a_conversation_runs_under_the_context_policy_it_asks_for(demo_model, default):
    """Each conversation's context policy reaches its engine slot: its own, else the hub's default; an unknown
    one is refused before any persona work, and the hub's own default is checked at construction."""

    async def scenario(hub):
        asked = {policy: await hub.open(PersonaRequest("x", context_policy=policy), front_end="test")
                 for policy in ("sliding", "pin-persona")}
        pinned = {policy: int(hub.engine.lm_state.pinned[c.slot]) for policy, c in asked.items()}
        policies = {policy: c.context_policy for policy, c in asked.items()}
        frames = asked["pin-persona"].prompt_frames
        for conversation in asked.values():
            await conversation.close()
        plain = await hub.open(PersonaRequest("x"), front_end="test")
        pinned["default"], policies["default"] = int(hub.engine.lm_state.pinned[plain.slot]), plain.context_policy
        await plain.close()
        with pytest.raises(PersonaError, match="unknown context policy 'forever'"):
            await hub.open(PersonaRequest("x", context_policy="forever"), front_end="test")
        return pinned, policies, frames, hub.describe(), hub.metrics.render()

    pinned, policies, frames, info, metrics = run_hub(demo_model, scenario, max_conversations=2, tick_seconds=0,
                                                      input_timeout_seconds=None, context_policy=default)
    assert frames > 0
    assert pinned == {"sliding": 0, "pin-persona": frames, "default": frames if default == "pin-persona" else 0}
    assert policies == {"sliding": "sliding", "pin-persona": "pin-persona", "default": default}
    assert info["context_policy"] == default
    other = ({"sliding", "pin-persona"} - {default}).pop()
    joins = 'personaplex_conversation_joins_total{context_policy="%s"} '
    assert joins % default + "2.0" in metrics and joins % other + "1.0" in metrics
    with pytest.raises(ValueError, match="context_policy must be one of sliding, pin-persona"):
        ConversationHub(demo_model, HubOptions(context_policy="forever"))


def test_serve_context_policy_flag_sets_the_hub_default(demo_model, monkeypatch):
    import personaplex.app.model as model_flags
    from personaplex.server.serve import build_parser

    monkeypatch.setattr(model_flags, "load_model_for_args", lambda *args, **kwargs: demo_model)
    parser = build_parser()
    for flags, policy in (([], "sliding"), (["--context-policy", "pin-persona"], "pin-persona")):
        hub = ConversationHub.from_args(parser.parse_args(["--model", "demo", "--max-conversations", "1", *flags]))
        assert hub.options.context_policy == policy and hub.describe()["context_policy"] == policy


def test_a_conversation_goes_on_past_the_context(short_context_demo):
    """No length limit by default: past the model's context the rings slide and the call continues; the
    metrics record the conversation's length. An operator's limit still ends it."""
    context = short_context_demo.lm.config.context
    wanted = int(1.5 * context)

    async def long_call(hub):
        conversation = await hub.open(PersonaRequest("x"), front_end="test")
        frames = []
        async for frame in conversation.frames():
            conversation.send_audio(np.zeros(FRAME, dtype=np.float32))
            frames.append(frame)
            if len(frames) == wanted:
                break
        still_open = conversation.end_reason is None
        await conversation.close()
        return still_open, len(frames), hub.describe(), hub.metrics.render()

    still_open, count, info, metrics = run_hub(short_context_demo, long_call, tick_seconds=0,
                                               input_timeout_seconds=None)
    assert still_open and count == wanted
    assert info["max_conversation_seconds"] is None and info["context_seconds"] == (context - 1) / 12.5
    assert "personaplex_conversation_seconds_count 1.0" in metrics
    # The engine may have stepped a few frames the test did not read before the close reached it.
    length = float(metrics.split("personaplex_conversation_seconds_sum ")[1].split()[0])
    assert wanted / 12.5 <= length <= (wanted + 30) / 12.5


def test_a_burst_of_joins_waits_for_room_in_the_tick_instead_of_making_it_late(demo_model):
    """Joins applied before a tick's step delay it: while others talk, a join runs only if it and the step
    (their measured averages) still fit before the tick's end; the others wait, in order, for the next tick."""
    import threading
    import time

    from personaplex.serving.hub import JOIN_PATIENCE_TICKS, _Join

    class Gone:  # a caller that hung up before its join was applied: the hub skips it
        closed = threading.Event()
        closed.set()

    hub = ConversationHub(demo_model, HubOptions(max_conversations=2))
    joins = [_Join(Gone(), None, SamplingConfig(), "sliding") for _ in range(3)]
    hub._live[0] = object()  # someone is talking
    hub._cached_join_seconds, hub._step_seconds = 0.002, 0.060

    for command in joins:
        hub._commands.put(command)
    hub._apply_commands(until=time.perf_counter() + 0.050)  # the step alone does not fit any more
    assert [hub._next_command() for _ in joins] == joins  # none applied, the order kept
    assert hub._next_command() is None

    for command in joins:
        hub._commands.put(command)
    hub._apply_commands(until=time.perf_counter() + 10.0)  # room for all
    assert hub._next_command() is None and not hub._deferred

    # A machine whose step alone overruns every tick: a join waits JOIN_PATIENCE_TICKS ticks, then runs
    # anyway (one at a time), rather than never.
    for command in joins:
        hub._commands.put(command)
    for _ in range(JOIN_PATIENCE_TICKS):
        hub._apply_commands(until=time.perf_counter() - 1.0)
        assert len(hub._deferred) + hub._commands.qsize() == len(joins)
    hub._apply_commands(until=time.perf_counter() - 1.0)
    assert [hub._next_command() for _ in joins[1:]] == joins[1:]  # the first ran, the next ones wait again
    assert hub._next_command() is None

    hub._live.clear()  # nobody to make late: every join runs at once
    for command in joins:
        hub._commands.put(command)
    hub._apply_commands(until=time.perf_counter() - 1.0)
    assert hub._next_command() is None
