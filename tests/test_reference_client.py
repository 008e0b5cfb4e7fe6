"""The reference's own web client, unchanged, against our server (``personaplex serve --static DIST``).

The reference client is a separate React application (its repository's ``client/`` folder, built with
``npm ci && npm run build``); it is not part of this project. Give its build with
``PERSONAPLEX_REFERENCE_CLIENT=/path/to/client/dist``; without it these tests skip. In headless Chromium
with a fake microphone the page is loaded from our server, "Connect" is clicked, and the WebSocket
traffic is read off the browser: the client's opus-recorder Ogg pages go up, our Ogg/Opus pages and
text pieces come down, its player reports audio played, and the transcript fills in.
"""

from __future__ import annotations

import os
import re
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

            def on_socket(socket):
                if "/api/chat" not in socket.url:
                    return
                socket.on("framesent", lambda payload: up.append(payload) if isinstance(payload, bytes) else None)
                socket.on("framereceived", lambda payload: (down if isinstance(payload, bytes) else texts).append(payload))

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
    print(f"reference client: {len(sent_pages)} Ogg pages sent, {kinds_down.count(0x01)} received, "
          f"{kinds_down.count(0x02)} text pieces; transcript shown: {shown.strip()[:80]!r}")
    log = "".join(server.output)
    assert not re.search(r"protocol error|invalid audio|Traceback", log), log[-3000:]
