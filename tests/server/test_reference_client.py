"""The reference's own web client, unchanged, against our server (``personaplex serve --static DIST``).

The reference client is a separate React application (its repository's ``client/`` folder, built with
``npm ci && npm run build``); it is not part of this project. Give its build with
``PERSONAPLEX_REFERENCE_CLIENT=/path/to/client/dist``; without it these tests skip. In headless Chromium
with a fake microphone the page is loaded from our server, "Connect" is clicked, and the WebSocket
traffic is read off the browser: the client's opus-recorder Ogg pages go up, our Ogg/Opus pages and
text pieces come down, its player reports audio played, and the transcript fills in. With the demo
model's context shortened to 200 frames, a call runs past the context in seconds: the client stays
connected (no ``0x05``, no close) under either server ``--context-policy``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from test_web_ui import chromium_path, start_server, stop_server, sync_api, write_microphone_wav

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_dist() -> Path:
    value = os.environ.get("PERSONAPLEX_REFERENCE_CLIENT")
    if not value:
        pytest.skip("set PERSONAPLEX_REFERENCE_CLIENT to a build of the reference web client (client/dist)")
    dist = Path(value)
    if not (dist / "index.html").is_file():
        pytest.fail(f"{dist} holds no index.html: build the reference client first (npm ci && npm run build)")
    return dist


def test_reference_client_holds_a_conversation(reference_dist, tmp_path):
    executable = chromium_path()
    microphone = write_microphone_wav(tmp_path / "speech.wav", seconds=8.0)
    server = start_server("--static", str(reference_dist), "--max-conversations", "2")
    up, down, texts = [], [], []
    timeline: list[str] = []  # "audio" per agent audio message, "listening" when the client's player attached
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=[
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={microphone}",
                "--autoplay-policy=no-user-gesture-required",
            ])
            context = browser.new_context(permissions=["microphone"])
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # The client logs this when it attaches its audio listener (connected and decoder ready):
            # audio messages before it are dropped unheard.
            page.on("console", lambda message: timeline.append("listening")
                    if "Should start in a bit" in message.text else None)

            def received(payload):
                (down if isinstance(payload, bytes) else texts).append(payload)
                if isinstance(payload, bytes) and payload[:1] == b"\x01":
                    timeline.append("audio")

            def on_socket(socket):
                if "/api/chat" not in socket.url:
                    return
                socket.on("framesent", lambda payload: up.append(payload) if isinstance(payload, bytes) else None)
                socket.on("framereceived", received)

            page.on("websocket", on_socket)
            page.goto(server.url)
            page.get_by_role("button", name="Connect").click()
            # Its player's own statistics: "Audio played: m:ss.cc" grows past two seconds.
            page.wait_for_function(
                "() => { const m = document.body.innerText.match(/Audio played:\\s*(\\d+):(\\d+)\\.(\\d+)/);"
                " return m && (60 * +m[1] + +m[2]) >= 2; }", timeout=90_000)
            shown = page.inner_text(".player-text")
            page.get_by_role("button", name="Disconnect").click()
            page.wait_for_timeout(1000)
            browser.close()
    finally:
        stop_server(server)
    kinds_down = [message[0] for message in down]
    assert 0x00 in kinds_down and set(kinds_down[:kinds_down.index(0x00)]) <= {0x04}  # metadata, then the handshake
    assert kinds_down.count(0x01) >= 25  # two seconds and more of agent audio
    assert 0x02 in kinds_down and shown.strip(), "text pieces arrive and the client shows them"
    sent_pages = [message for message in up if message[:1] == b"\x01"]
    assert len(sent_pages) >= 25 and all(message[1:5] == b"OggS" for message in sent_pages)
    assert not errors, errors
    # None of the agent's audio came before the client listened (its first words, and the OpusHead page).
    assert "listening" in timeline, "the client never attached its player"
    lost = timeline[:timeline.index("listening")].count("audio")
    assert lost == 0, f"{lost} agent audio messages came before the client listened"
    first_audio = next(message for message in down if message[:1] == b"\x01")
    assert first_audio[1:5] == b"OggS" and first_audio[29:37] == b"OpusHead"
    print(f"reference client: {len(sent_pages)} Ogg pages sent, {kinds_down.count(0x01)} received, "
          f"{kinds_down.count(0x02)} text pieces; transcript shown: {shown.strip()[:80]!r}")
    log = "".join(server.output)
    assert not re.search(r"protocol error|invalid audio|Traceback", log), log[-3000:]


# Audio played, as the client's "Server Audio Stats" shows it ("Audio played: m:ss.cc"), in seconds.
AUDIO_PLAYED = ("() => { const m = document.body.innerText.match(/Audio played:\\s*(\\d+):(\\d+)\\.(\\d+)/);"
                " return m ? 60 * +m[1] + +m[2] + +m[3] / 100 : -1; }")
LONG_CALL_DEADLINE = 900.0  # seconds: a call of 1.3 x a 200-frame context on a loaded machine; bounds a hang only


@pytest.mark.parametrize("policy", ["sliding", "pin-persona"])
def test_reference_client_stays_connected_past_the_context(reference_dist, short_context_demo, tmp_path, policy):
    """The reference client has no way to choose a context policy: it gets the server's (``--context-policy``).
    Its call goes on past the model's context (1.3 x the 200 frames of the short-context demo) without a
    forced end, under that policy in the engine, and its player keeps playing until it disconnects."""
    from test_realtime import metric_value
    from test_server_protocol import ServerThread

    executable = chromium_path()
    microphone = write_microphone_wav(tmp_path / "speech.wav", seconds=8.0)  # Chromium loops the file
    server = ServerThread(short_context_demo, static_dir=reference_dist, max_conversations=1, max_queue=0,
                          input_timeout_seconds=None, context_policy=policy)
    hub = server.hub
    context = short_context_demo.lm.config.context
    wanted = int(1.3 * context)  # positions of the rings (system prompt and conversation frames)
    down, closed, errors = [], [], []
    reached: dict = {}
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=[
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={microphone}",
                "--autoplay-policy=no-user-gesture-required",
            ])
            page = browser.new_context(permissions=["microphone"]).new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))

            def on_socket(socket):
                if "/api/chat" not in socket.url:
                    return
                socket.on("framereceived", lambda payload: down.append(payload) if isinstance(payload, bytes) else None)
                socket.on("close", lambda _: closed.append(time.monotonic()))

            page.on("websocket", on_socket)
            page.goto(server.http)
            # Its default prompt (the assistant) does not leave 10 s of a 200-frame context to talk.
            page.locator("textarea").first.fill("Be brief.")
            page.get_by_role("button", name="Connect").click()
            deadline = time.monotonic() + LONG_CALL_DEADLINE
            while True:  # until the server has stepped the call past the context
                for conversation in list(hub._admitted):
                    slot = conversation.slot
                    if slot >= 0 and conversation.end_reason is None and hub.engine.active[slot]:
                        reached = {"positions": conversation.prompt_frames + conversation._engine_frames,
                                   "prompt": conversation.prompt_frames,
                                   "pinned": int(hub.engine.lm_state.pinned[slot])}
                if reached.get("positions", 0) >= wanted:
                    break
                assert not closed and not errors, (closed, errors)
                assert time.monotonic() < deadline, f"the call did not get past the context: {reached}"
                page.wait_for_timeout(250)
            # Past the context the client still hears the agent: its player's count grows.
            played = page.evaluate(AUDIO_PLAYED)
            end = time.monotonic() + 120
            while page.evaluate(AUDIO_PLAYED) < played + 1.0:
                assert time.monotonic() < end, "the client's player stopped past the context"
                page.wait_for_timeout(250)
            assert not closed, "the server closed the call"
            page.get_by_role("button", name="Disconnect").click()
            page.wait_for_timeout(1000)
            browser.close()
        metrics = hub.metrics.render()
    finally:
        server.stop()
    kinds_down = [message[0] for message in down]
    assert 0x00 in kinds_down and 0x05 not in kinds_down, "no error message: the server never ended the call"
    assert reached["pinned"] == (reached["prompt"] if policy == "pin-persona" else 0), reached
    import sphn

    decoder = sphn.OpusStreamReader(24000)
    heard = sum(len(pcm) for pcm in (decoder.append_bytes(m[1:]) for m in down if m[:1] == b"\x01") if pcm is not None)
    assert heard >= (wanted - reached["prompt"] - 1) * 1920  # the agent's audio of the whole call came down
    assert not errors, errors
    for kind in ("protocol", "bad_request", "internal"):
        assert metric_value(metrics, "personaplex_errors_total", kind=kind) == 0, kind
    assert metric_value(metrics, "personaplex_conversations_ended_total", reason="max_length") == 0
