"""The web page in a real headless Chromium (Debian's ``chromium``) against real servers.

The microphone is Chromium's fake capture device fed from a wav file this module writes; the page encodes it
with WebCodecs Opus into our own Ogg pages. Servers: ``personaplex serve --model demo`` as a subprocess, and a
minimal aiohttp server defined here that speaks only message kinds 0-2 (as the reference server does) and
records the Ogg stream the page sends, so its structure and content can be checked byte by byte.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from loopback import LoopbackServer

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "personaplex" / "server" / "static"
LAN_HOST = "lan.test"  # resolved to 127.0.0.1 by the browsers: not "localhost", so plain http is not secure
TONE_HZ = 440.0
TOKEN = "browser-test-token"
PROXY_PREFIX = "/voice/agent"
# Every wait for the page is at least this long: a browser and the server on a saturated 2-core machine
# run far slower than real time; a wait fails only when what it waits for never comes.
MIN_WAIT_SECONDS = 90.0
# Notices that report a problem. The demo model's notice is always there, and the behind-real-time one
# depends on how busy the machine is (tests/server/test_web_ui_notices.py checks both).
PROBLEM_NOTICES = "personaplex.notices.filter(n => !['demo-model', 'behind'].includes(n.id))"

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    path = os.environ.get("PERSONAPLEX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: its absence there is a broken setup, not a skip
        pytest.skip(message)
    return path


sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


# --- fixtures: microphone input, browser --------------------------------------------------------------------


def write_microphone_wav(path: Path, seconds: float = 4.0, sample_rate: int = 48_000) -> Path:
    """A 440 Hz tone, amplitude-modulated at 3 Hz so that it is not a steady tone the browser's noise
    suppression would learn away; 16-bit mono."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal_ = 0.5 * np.sin(2 * np.pi * TONE_HZ * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes((signal_ * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_path()
    microphone = write_microphone_wav(tmp_path_factory.mktemp("microphone") / "speech.wav")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone}",
                f"--host-resolver-rules=MAP {LAN_HOST} 127.0.0.1",
            ],
        )
        yield browser
        browser.close()


@dataclass
class Page:
    """A browser page with the console errors it logged."""

    page: object
    context: object
    errors: list[str] = field(default_factory=list)

    def js(self, expression: str):
        return self.page.evaluate(expression)

    def click(self, selector: str) -> None:
        self.page.click(selector)

    def wait(self, expression: str, timeout: float = 20.0, what: str | None = None):
        """Wait until ``expression`` is true in the page: ``timeout`` seconds, at least ``MIN_WAIT_SECONDS``."""
        try:
            self.page.wait_for_function(expression, timeout=max(timeout, MIN_WAIT_SECONDS) * 1000)
        except sync_api.TimeoutError:
            state = self.js("JSON.stringify({state: personaplex.state, notices: personaplex.notices, "
                            "stats: personaplex.stats, counters: personaplex.counters})")
            raise AssertionError(f"timed out waiting for {what or expression}; page: {state}") from None


def open_page(browser, url: str, *, microphone: bool = True) -> Page:
    context = browser.new_context(permissions=["microphone"] if microphone else [])
    page = context.new_page()
    result = Page(page, context)
    page.on("console", lambda message: result.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: result.errors.append(f"uncaught: {error}"))
    page.goto(url)
    page.wait_for_selector("body[data-ready]", timeout=MIN_WAIT_SECONDS * 1000)
    return result


# The page helpers below take any page with ``click``, ``js``, ``wait`` and ``errors`` (Chromium's ``Page`` here,
# Firefox's ``Tab`` in test_web_ui_firefox.py), so that both browsers run the same scenarios.


def start_conversation(page) -> None:
    page.click("#start")
    page.wait("personaplex.state === 'connected'", timeout=60, what="the handshake")


def stop_conversation(page) -> None:
    page.click("#stop")
    page.wait("personaplex.state === 'closed'", timeout=10, what="the close")


def second_caller_waits_for_the_slot(first, second) -> None:
    """With one slot, a second caller is told its queue position and gets the slot when the first leaves."""
    start_conversation(first)
    second.click("#start")
    second.wait("document.querySelector('#status-text').textContent === 'Waiting, position 1'", timeout=20,
                what="the queue position")
    assert second.js("personaplex.state") == "preparing"
    stop_conversation(first)
    second.wait("personaplex.state === 'connected'", timeout=60, what="the queued caller to get the slot")
    stop_conversation(second)
    assert first.errors == [] and second.errors == []


# --- the real server ---------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: list[str]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            return response.read().decode()

    @property
    def page_url(self) -> str:
        return f"{self.url}/?token={TOKEN}"

    def get_json(self, path: str):
        import json

        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start_server(*options: str) -> Server:
    """``personaplex serve --model demo`` on a free port of 127.0.0.1, with these extra options."""
    command = [sys.executable, "-m", "personaplex", "serve", "--model", "demo", "--host", "127.0.0.1", "--port", "0",
               *options]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def drain():
        for line in process.stdout:
            output.append(line)
            match = re.search(r"Access the Web UI directly at (\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(180)
    if not found:
        process.kill()
        pytest.fail("personaplex serve did not start:\n" + "".join(output[-40:]))
    return Server(found[0], process, output)


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def demo_server():
    """One slot (so that a second caller queues), uploads on and an access token (which the pages get through
    their own URL, ``?token=``)."""
    server = start_server("--max-conversations", "1", "--allow-voice-upload", "--auth-token", TOKEN)
    yield server
    stop_server(server)


def test_page_loads_lists_voices_and_fills_examples(browser, demo_server):
    page = open_page(browser, demo_server.page_url)
    listed = demo_server.get_json("/api/voices")
    assert page.js("personaplex.voices") == listed["voices"]
    options = page.js("[...document.querySelectorAll('#voice option')].map(o => o.value)")
    assert options == listed["voices"]
    assert page.js("document.querySelector('#voice').value") == listed["default"]
    labels = page.js("[...document.querySelectorAll('#examples button')].map(b => b.textContent)")
    assert labels == ["Assistant (default)", "Medical office (service)", "Bank (service)", "Astronaut (fun)"]
    page.page.click("text=Astronaut (fun)")
    prompt = page.js("document.querySelector('#prompt').value")
    assert "reactor" in prompt
    assert page.js("document.querySelector('#prompt-count').textContent") == f"{len(prompt)}/1000"
    assert page.js("document.querySelector('#upload-group').hidden") is False  # the server allows uploads
    assert page.js(PROBLEM_NOTICES) == []
    assert page.errors == []
    page.context.close()


def test_conversation_with_the_demo_model(browser, demo_server):
    before = demo_server.metrics()
    page = open_page(browser, demo_server.page_url)
    page.page.click("#sampling summary")
    page.page.fill("#seed", "1234")
    page.page.fill("#text-temperature", "0.5")
    start_conversation(page)
    page.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 2", timeout=30,
              what="2 s of agent audio played")
    page.wait("personaplex.counters.textPieces > 0 && personaplex.transcript().length > 0", timeout=30,
              what="agent text in the transcript")

    welcome = page.js("personaplex.metadata[0]")
    assert welcome["model"] == "demo"
    assert welcome["persona"]["seed"] == 1234  # sampling settings travel as query parameters
    assert welcome["text_temperature"] == 0.5
    assert page.js("document.querySelector('#status-text').textContent").startswith("Connected")
    assert "demo" in page.js("document.querySelector('#server-info').textContent")
    playback = page.js("personaplex.stats.playback")
    assert playback["peak"] > 1e-4, "the agent's audio played as silence"
    assert re.fullmatch(r"\d+ ms", page.js("document.querySelector('[data-stat=latency]').textContent"))
    sent_pages = page.js("personaplex.counters.pagesOut")
    received_seconds = playback["receivedSeconds"]
    stop_conversation(page)

    assert page.js(PROBLEM_NOTICES) == []
    assert page.errors == []
    after = demo_server.metrics()
    assert metric(after, "personaplex_sessions_total", 'front_end="chat"') == \
        metric(before, "personaplex_sessions_total", 'front_end="chat"') + 1
    assert metric(after, "personaplex_conversations_ended_total", 'reason="client_closed"') == \
        metric(before, "personaplex_conversations_ended_total", 'reason="client_closed"') + 1
    # The server decoded the page's Ogg/Opus: frames it had to fill with silence for lack of input are few.
    frames = received_seconds / 0.08
    underruns = metric(after, "personaplex_input_underrun_frames_total") - \
        metric(before, "personaplex_input_underrun_frames_total")
    assert sent_pages > 50 and frames > 20
    assert underruns < 0.25 * frames, (underruns, frames)
    assert metric(after, "personaplex_errors_total", 'kind="protocol"') == 0
    page.context.close()


def test_unknown_voice_shows_the_servers_error(browser, demo_server):
    page = open_page(browser, demo_server.page_url)
    page.js("(() => { const s = document.querySelector('#voice'); s.add(new Option('bogus', 'no-such-voice')); "
            "s.value = 'no-such-voice'; })()")
    page.page.click("#start")
    page.wait("personaplex.state === 'closed'", timeout=30, what="the server to refuse the voice")
    errors = page.js("personaplex.serverErrors")
    assert len(errors) == 1 and "no-such-voice" in errors[0]
    notice = page.js("document.querySelector('[data-notice=server-error]').textContent")
    assert notice.startswith("The server refused the conversation:") and "no-such-voice" in notice
    assert page.js("document.querySelector('#status-text').textContent") == "Ended by the server"
    assert page.js("document.querySelector('#start').disabled") is False
    page.context.close()


def test_second_caller_waits_with_its_queue_position(browser, demo_server):
    first = open_page(browser, demo_server.page_url)
    second = open_page(browser, demo_server.page_url)
    second_caller_waits_for_the_slot(first, second)
    first.context.close()
    second.context.close()


def test_uploaded_voice_sample(browser, demo_server, tmp_path):
    sample = write_microphone_wav(tmp_path / "my-voice.wav", seconds=2.0, sample_rate=24_000)
    page = open_page(browser, demo_server.page_url)
    page.page.set_input_files("#voice-file", str(sample))
    start_conversation(page)
    voice = page.js("personaplex.metadata[0].persona.voice")
    assert voice.startswith("upload-")
    stop_conversation(page)
    assert page.js(PROBLEM_NOTICES) == []
    page.context.close()


def test_missing_access_token_is_explained(browser, demo_server):
    page = open_page(browser, demo_server.url + "/")
    assert "access token" in page.js("document.querySelector('[data-notice=auth]').textContent")
    assert page.js("document.querySelector('#access').open") is True
    page.page.fill("#token", TOKEN)
    page.page.dispatch_event("#token", "change")
    page.wait("personaplex.voices.length === 18 && !document.querySelector('[data-notice=auth]')", timeout=10,
              what="the voices to load with the token")
    start_conversation(page)  # the token also goes with the WebSocket, as ?token=
    stop_conversation(page)
    assert [e for e in page.errors if "401" not in e] == []  # the first /api/voices was refused
    page.context.close()


def test_token_in_the_page_url_becomes_a_cookie_the_websocket_carries(browser, demo_server):
    """``/?token=T`` sets the page's HttpOnly cookie and redirects to ``/``: the token leaves the address bar,
    and the page's API calls and WebSocket, which carry no token of their own, work with the cookie (the
    reference web client never adds ``?token=``)."""
    sockets: list[str] = []
    context = browser.new_context(permissions=["microphone"])
    page = context.new_page()
    page.on("websocket", lambda ws: sockets.append(ws.url))
    response = page.goto(demo_server.page_url)
    page.wait_for_selector("body[data-ready]", timeout=MIN_WAIT_SECONDS * 1000)
    wrapped = Page(page, context)
    assert page.url == demo_server.url + "/" and response.request.redirected_from is not None
    assert response.request.redirected_from.url == demo_server.page_url
    cookies = {c["name"]: c for c in context.cookies()}
    cookie = cookies["personaplex_token"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page can read it
    assert page.evaluate("document.querySelector('#token').value") == ""  # the page itself holds no token
    wrapped.wait("personaplex.voices.length === 18", timeout=10, what="/api/voices with the cookie")
    start_conversation(wrapped)
    wrapped.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 0.5", timeout=30,
                 what="agent audio over the cookie-authenticated socket")
    stop_conversation(wrapped)
    assert sockets and all("/api/chat" in url and "token=" not in url for url in sockets), sockets
    assert [n["id"] for n in page.evaluate("personaplex.notices")] == ["demo-model"]  # nothing about access
    context.close()


def test_blocked_microphone_is_explained(browser, demo_server):
    sessions = metric(demo_server.metrics(), "personaplex_sessions_total", 'front_end="chat"')
    page = open_page(browser, demo_server.page_url, microphone=False)
    page.page.click("#start")
    page.wait("document.body.dataset.mic === 'blocked'", timeout=10, what="the blocked-microphone notice")
    notice = page.js("document.querySelector('[data-notice=mic-blocked]').textContent")
    assert "microphone is blocked" in notice
    page.wait("!document.querySelector('#start').disabled", timeout=5, what="Start to be offered again")
    assert page.js("personaplex.state") != "connected"
    assert metric(demo_server.metrics(), "personaplex_sessions_total", 'front_end="chat"') == sessions
    page.context.close()


def test_insecure_origin_is_explained(browser, demo_server):
    port = demo_server.url.rsplit(":", 1)[1]
    page = open_page(browser, f"http://{LAN_HOST}:{port}/?token={TOKEN}")
    assert page.js("window.isSecureContext") is False
    assert "insecure" in page.js("document.body.dataset.unsupported")
    assert "not in a secure context" in page.js("document.querySelector('[data-notice=insecure]').textContent")
    assert page.js("document.querySelector('#start').disabled") is True
    page.context.close()


def test_https_with_a_generated_certificate_on_a_lan_name(browser, tmp_path):
    """The way to reach a server from another machine: --ssl makes a certificate, and the page on a name
    other than localhost is a secure context, talking over wss://."""
    server = start_server("--ssl", str(tmp_path / "tls"))
    try:
        assert server.url.startswith("https://")
        port = server.url.rsplit(":", 1)[1]
        context = browser.new_context(permissions=["microphone"], ignore_https_errors=True)  # self-signed
        page = context.new_page()
        page.goto(f"https://{LAN_HOST}:{port}/")
        page.wait_for_selector("body[data-ready]", timeout=MIN_WAIT_SECONDS * 1000)
        assert page.evaluate("window.isSecureContext") is True
        assert page.evaluate(PROBLEM_NOTICES) == []
        page.click("#start")
        page.wait_for_function("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 0.5",
                               timeout=MIN_WAIT_SECONDS * 1000)
        page.click("#stop")
        page.wait_for_function("personaplex.state === 'closed'", timeout=MIN_WAIT_SECONDS * 1000)
        assert page.evaluate(PROBLEM_NOTICES) == []
        context.close()
    finally:
        stop_server(server)


# --- the reference web client's timing ------------------------------------------------------------------------

# A client that times its player as the reference web client does (its Queue page, UserAudio component and
# useServerAudio hook): its Opus decoder is given a fixed second from the Connect click to load; the socket opens
# at once (the reference opens it after its worklet and microphone are ready, later); the handshake marks it
# "connected" and starts its microphone; its audio listener is attached only once it is both connected and its
# decoder ready: every audio message before that is lost. It sends the reference client's query parameters. The
# microphone is encoded by this project's capture module (the reference uses opus-recorder: pages of 40 ms
# instead of 20 ms). It records what it lost and each Ogg page it heard, and decodes the audio with WebCodecs.
REFERENCE_LIKE_PAGE = """<!doctype html>
<meta charset="utf-8"><title>reference-like client</title>
<button id="connect">Connect</button>
<script type="module">
import { OpusCapture, chooseEncoderConfig } from "/js/capture.js";
import { isOpusHead, opusPacketSamples } from "/js/opus.js";

const DECODER_WARM_UP_MS = 1000;
const client = (window.client = { state: "idle", lost: [], heard: [], decodedFrames: 0, errors: [], texts: 0 });
const params = new URLSearchParams({
  text_temperature: "0.7", text_topk: "25", audio_temperature: "0.8", audio_topk: "250", pad_mult: "0",
  text_seed: "1234", audio_seed: "5678", repetition_penalty_context: "64", repetition_penalty: "1",
  text_prompt: "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.",
  voice_prompt: "NATF0.pt",
});

const isOpusTags = (packet) => String.fromCharCode(...packet.subarray(0, 8)) === "OpusTags";

function parsePage(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const segments = bytes[26];
  const packets = [];
  let offset = 27 + segments, size = 0;
  for (let i = 0; i < segments; i++) {
    size += bytes[27 + i];
    if (bytes[27 + i] < 255) { packets.push(bytes.subarray(offset, offset + size)); offset += size; size = 0; }
  }
  return { flags: bytes[5], sequence: view.getUint32(18, true), granule: Number(view.getBigInt64(6, true)), packets };
}

document.querySelector("#connect").onclick = () => {
  const clickedAt = performance.now();
  let connected = false, decoderReady = false, listening = false;
  let capture = null, decoder = null, timestamp = 0;
  const socket = new WebSocket(`ws://${location.host}/api/chat?${params}`);
  socket.binaryType = "arraybuffer";
  client.state = "connecting";
  const elapsed = () => performance.now() - clickedAt;
  const audio = (async () => {
    const context = new AudioContext();
    await context.audioWorklet.addModule("/js/worklets/capture-worklet.js");
    const config = await chooseEncoderConfig();
    const microphone = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    return { context, config, microphone };
  })();
  setTimeout(() => { decoderReady = true; client.readyAt = elapsed(); maybeListen(); }, DECODER_WARM_UP_MS);

  function decode(packet) {
    if (!decoder) {
      decoder = new AudioDecoder({ output: (data) => { client.decodedFrames += data.numberOfFrames; data.close(); },
                                   error: (error) => client.errors.push(String(error)) });
      decoder.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: 1 });
    }
    const duration = Math.round((opusPacketSamples(packet) * 1e6) / 48000);
    decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, duration, data: packet }));
    timestamp += duration;
  }

  function onAudio(event) {
    const bytes = new Uint8Array(event.data);
    if (bytes[0] !== 1) return;
    const page = parsePage(bytes.subarray(1));
    client.heard.push({ at: elapsed(), flags: page.flags, sequence: page.sequence, granule: page.granule,
                        head: page.packets.length > 0 && isOpusHead(page.packets[0]),
                        samples: page.packets.reduce((sum, p) =>
                          sum + (p.length && !isOpusHead(p) && !isOpusTags(p) ? opusPacketSamples(p) : 0), 0) });
    for (const packet of page.packets) {
      if (packet.length === 0 || isOpusHead(packet) || isOpusTags(packet)) continue;
      decode(packet);
    }
  }

  function maybeListen() {
    if (!connected || !decoderReady || listening) return;
    listening = true;
    client.listeningAt = elapsed();
    socket.addEventListener("message", onAudio);
  }

  async function startMicrophone() {
    const { context, config, microphone } = await audio;
    capture = new OpusCapture(context, microphone, config, {
      onPage: (page) => {
        if (socket.readyState !== WebSocket.OPEN) return;
        if (client.firstSentAt === undefined) client.firstSentAt = elapsed();
        const message = new Uint8Array(page.length + 1);
        message[0] = 1;
        message.set(page, 1);
        socket.send(message);
      },
      onLevel: () => {},
      onError: (error) => client.errors.push(String(error)),
    });
    capture.start();
  }

  socket.addEventListener("message", (event) => {
    const bytes = new Uint8Array(event.data);
    if (bytes[0] === 0 && !connected) {
      connected = true;
      client.state = "connected";
      client.connectedAt = elapsed();
      maybeListen();
      startMicrophone();
    } else if (bytes[0] === 1 && !listening) {
      client.lost.push({ at: elapsed(), bytes: bytes.length });
    } else if (bytes[0] === 2) {
      client.texts++;
    } else if (bytes[0] === 5) {
      client.serverError = new TextDecoder().decode(bytes.subarray(1));
    }
  });
  socket.onclose = async (event) => {
    capture?.abort();
    if (decoder && decoder.state === "configured") await decoder.flush().catch(() => {});
    client.closeCode = event.code;
    client.state = "closed";
  };
};
</script>
"""


def test_a_client_timed_like_the_reference_hears_the_agent_from_the_first_frame(browser, tmp_path):
    """The reference web client listens only a second after Connect, once its decoder has loaded, but starts its
    microphone at the handshake, which the server gives it no sooner than 1.5 s after its socket opened; the
    conversation's clock starts with its first audio. It loses no agent audio: it hears the OpusHead first, every
    page in sequence, and as much audio as frames the server stepped for it (the call ends at its length limit,
    so that all of them are sent)."""
    static = tmp_path / "static"  # our page's modules, and the client page beside them (served by the server:
    shutil.copytree(STATIC, static)  # Chromium lets only a page from this address open sockets to 127.0.0.1)
    (static / "reference-like.html").write_text(REFERENCE_LIKE_PAGE)
    server = start_server("--static", str(static), "--max-conversations", "1", "--max-conversation-seconds", "3")
    try:
        before = metric(server.metrics(), "personaplex_agent_frames_total", 'front_end="chat"')
        context = browser.new_context(permissions=["microphone"])
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server.url}/reference-like.html")
        page.click("#connect")
        page.wait_for_function("window.client.state === 'closed'", timeout=4 * MIN_WAIT_SECONDS * 1000)
        client = page.evaluate("window.client")
        context.close()
        after = metric(server.metrics(), "personaplex_agent_frames_total", 'front_end="chat"')
    finally:
        stop_server(server)
    assert not errors and not client["errors"], (errors, client["errors"])
    assert "connectedAt" in client and "listeningAt" in client, str({k: v for k, v in client.items() if k != "heard"})
    assert "maximum length" in client.get("serverError", ""), client.get("serverError")
    assert client["lost"] == [], f"{len(client['lost'])} agent audio messages arrived before the player was ready"
    heard = client["heard"]
    assert heard[0]["head"] and heard[0]["flags"] & 0x02, "the OpusHead page did not reach the player"
    assert [h["sequence"] for h in heard] == list(range(len(heard))), "an agent page is missing"
    stepped = after - before
    assert stepped == 37  # 3 s at 12.5 frames per second
    assert sum(h["samples"] for h in heard) == stepped * 3840  # 80 ms at 48 kHz per frame, all heard
    assert client["decodedFrames"] >= 0.9 * stepped * 3840  # and decoded (less any pre-skip the decoder trims)
    assert heard[0]["at"] > client["firstSentAt"]  # the clock started with the client's audio
    print(f"decoder ready at {client['readyAt']:.0f} ms, handshake at {client['connectedAt']:.0f} ms, listening at "
          f"{client['listeningAt']:.0f} ms, first page sent at {client['firstSentAt']:.0f} ms, first agent page at "
          f"{heard[0]['at']:.0f} ms; {len(heard)} pages heard, {stepped:.0f} frames stepped, "
          f"{client['decodedFrames'] / 48000:.2f} s decoded")


# --- a server that speaks only kinds 0-2, as the reference does -------------------------------------------------


class MinimalServer(LoopbackServer):
    """Handshake, then one 80 ms frame of a 330 Hz tone per 80 ms of decoded input, and a text piece every
    fifth frame; no metadata, no errors, no /api/voices. Keeps the raw Ogg bytes each client sent."""

    def __init__(self):
        self.streams: list[bytearray] = []
        self.queries: list[dict] = []
        self.paths: list[str] = []
        super().__init__()

    async def chat(self, request):
        import sphn
        from aiohttp import WSMsgType, web

        self.queries.append(dict(request.query))
        self.paths.append(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x00")
        reader, writer = sphn.OpusStreamReader(24_000), sphn.OpusStreamWriter(24_000)
        stream = bytearray()
        self.streams.append(stream)
        pending = np.zeros(0, np.float32)
        frames = 0
        t = np.arange(1920) / 24_000
        async for message in ws:
            if message.type != WSMsgType.BINARY or not message.data or message.data[0] != 1:
                continue
            stream += message.data[1:]
            pending = np.concatenate([pending, reader.append_bytes(message.data[1:])])
            while len(pending) >= 1920:
                pending = pending[1920:]
                tone = (0.3 * np.sin(2 * np.pi * 330 * (t + frames * 0.08))).astype(np.float32)
                pages = writer.append_pcm(tone)
                if pages:
                    await ws.send_bytes(b"\x01" + pages)
                if frames % 5 == 0:
                    await ws.send_bytes(b"\x02" + f" word{frames}".encode())
                frames += 1
        return ws

    def start(self) -> None:
        from aiohttp import web

        async def index(request):
            return web.FileResponse(STATIC / "index.html")

        app = web.Application()
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/", index)
        # The same page behind a path prefix, as a reverse proxy would mount it.
        app.router.add_get(f"{PROXY_PREFIX}/api/chat", self.chat)
        app.router.add_get(f"{PROXY_PREFIX}/", index)
        app.router.add_static(f"{PROXY_PREFIX}/", STATIC)
        app.router.add_static("/", STATIC)
        self.serve(app)


@pytest.fixture(scope="module")
def minimal_server():
    server = MinimalServer()
    server.start()
    yield server
    server.stop()


def ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def parse_ogg(data: bytes) -> list[dict]:
    """Pages of an Ogg stream, each checked for its capture pattern and CRC."""
    pages, offset = [], 0
    while offset < len(data):
        assert data[offset:offset + 4] == b"OggS", f"no capture pattern at byte {offset}"
        flags = data[offset + 5]
        granule, serial, sequence, crc = struct.unpack_from("<qIII", data, offset + 6)
        segments = data[offset + 26]
        lacing = data[offset + 27:offset + 27 + segments]
        end = offset + 27 + segments + sum(lacing)
        page = bytearray(data[offset:end])
        page[22:26] = b"\0\0\0\0"
        assert ogg_crc(bytes(page)) == crc, f"bad CRC on page {sequence}"
        body = data[offset + 27 + segments:end]
        packets, start, size = [], 0, 0
        for value in lacing:
            size += value
            if value < 255:
                packets.append(body[start:start + size])
                start, size = start + size, 0
        pages.append({"flags": flags, "granule": granule, "serial": serial, "sequence": sequence, "packets": packets,
                      "offset": offset, "length": end - offset})
        offset = end
    return pages


def opus_packet_samples(packet: bytes) -> int:
    """48 kHz samples in an Opus packet (RFC 6716 section 3.1)."""
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:
        size = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:
        size = (480, 960)[config & 1]
    else:
        size = (120, 240, 480, 960)[config & 3]
    count = 1 if code == 0 else 2 if code in (1, 2) else packet[1] & 0x3F
    return size * count


def check_sent_stream(stream: bytes, sent_seconds: float, tone_hz: float) -> None:
    """The Ogg/Opus stream a page sent, checked as RFC 7845 asks, and its content: the microphone's tone."""
    import sphn

    pages = parse_ogg(stream)
    assert pages[0]["flags"] == 0x02 and pages[0]["packets"][0][:8] == b"OpusHead"
    head = pages[0]["packets"][0]
    assert head[8] == 1 and head[9] == 1  # version 1, mono
    pre_skip = struct.unpack_from("<H", head, 10)[0]
    assert pre_skip == 312  # libopus's 6.5 ms look-ahead, in 48 kHz units
    assert pages[1]["packets"][0][:8] == b"OpusTags" and pages[1]["granule"] == 0
    assert all(page_["flags"] == 0 for page_ in pages[2:-1])
    assert pages[-1]["flags"] == 0x04, "no end-of-stream page"
    assert len({page_["serial"] for page_ in pages}) == 1
    assert [page_["sequence"] for page_ in pages] == list(range(len(pages)))
    audio_pages = pages[2:]
    total = pre_skip
    for page_ in audio_pages[:-1]:
        total += sum(opus_packet_samples(packet) for packet in page_["packets"])
        assert page_["granule"] == total  # 48 kHz units, pre-skip included
    last_end = total + sum(opus_packet_samples(packet) for packet in audio_pages[-1]["packets"])
    assert total <= audio_pages[-1]["granule"] <= last_end  # the end trims the last packet's padding only
    duration = (audio_pages[-1]["granule"] - pre_skip) / 48_000
    assert abs(duration - sent_seconds) < 0.001  # the end granule marks exactly the last sample captured

    pcm, rate = sphn.read_opus_bytes(stream)
    pcm = np.asarray(pcm)[0]
    assert abs(len(pcm) / rate - duration) < 0.1
    spectrum = np.abs(np.fft.rfft(pcm[rate // 2:]))
    peak_hz = np.fft.rfftfreq(len(pcm[rate // 2:]), 1 / rate)[spectrum.argmax()]
    assert abs(peak_hz - tone_hz) < 5, peak_hz


def test_server_that_speaks_only_kinds_0_to_2(browser, minimal_server):
    page = open_page(browser, f"http://127.0.0.1:{minimal_server.port}/")
    # No /api/voices there: the page offers the reference's presets and says why.
    options = page.js("[...document.querySelectorAll('#voice option')].map(o => o.value)")
    assert len(options) == 18 and options[0] == "NATF0.pt" and page.js("document.querySelector('#voice').value") == "NATF0.pt"
    assert not page.js("document.querySelector('#voice-note').hidden")
    assert page.js("document.querySelector('#upload-group').hidden") is True
    start_conversation(page)
    page.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 2", timeout=30,
              what="2 s of audio played")
    page.wait("personaplex.transcript().includes('word5')", timeout=10, what="text pieces in the transcript")
    playback = page.js("personaplex.stats.playback")
    assert 0.2 < playback["peak"] < 0.4  # the 330 Hz tone at 0.3
    stop_conversation(page)
    time.sleep(0.5)  # the server reads the last page after the close is initiated

    assert page.js("document.querySelector('#server-panel').hidden") is True  # no metadata ever came
    assert page.js("personaplex.metadata") == []
    assert page.js(PROBLEM_NOTICES) == []
    assert [e for e in page.errors if "404" not in e] == []  # the only error: the missing /api/voices
    query = minimal_server.queries[-1]
    assert query["voice_prompt"] == "NATF0.pt" and "wise and friendly teacher" in query["text_prompt"]
    assert query["text_topk"] == "25" and query["audio_topk"] == "250" and "seed" not in query

    check_sent_stream(bytes(minimal_server.streams[-1]), page.js("personaplex.sentSeconds"), TONE_HZ)
    page.context.close()


def test_page_behind_a_path_prefix(browser, minimal_server):
    page = open_page(browser, f"http://127.0.0.1:{minimal_server.port}{PROXY_PREFIX}/")
    conversations = len(minimal_server.paths)
    start_conversation(page)
    stop_conversation(page)
    assert minimal_server.paths[conversations:] == [f"{PROXY_PREFIX}/api/chat"]  # relative to the page
    assert page.js(PROBLEM_NOTICES) == []
    page.context.close()


def test_unreachable_server_is_explained(browser, minimal_server):
    import socket

    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    page = open_page(browser, f"http://127.0.0.1:{minimal_server.port}/?worker_addr=127.0.0.1:{port}")
    page.page.click("#start")
    page.wait("personaplex.state === 'closed'", timeout=20, what="the failed connection")
    notice = page.js("document.querySelector('[data-notice=connection]').textContent")
    assert notice.startswith("Could not connect to the server")
    assert page.js("document.querySelector('#status').dataset.state") == "failed"
    page.wait("!document.querySelector('#start').disabled", timeout=5, what="Start to be offered again")
    page.context.close()


def test_ogg_reader_takes_any_chunking_and_drops_corrupt_pages(browser, minimal_server):
    import sphn

    writer = sphn.OpusStreamWriter(24_000)
    t = np.arange(12 * 1920) / 24_000
    frames = (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32).reshape(12, 1920)
    stream = b"".join(writer.append_pcm(frame) for frame in frames)
    pages = parse_ogg(stream)
    expected = [len(packet) for page_ in pages for packet in page_["packets"]]
    assert len(pages) >= 5 and all(len(page_["packets"]) == 1 for page_ in pages)
    corrupt = bytearray(stream)
    corrupt[pages[3]["offset"] + pages[3]["length"] - 5] ^= 0xFF  # a byte inside the fourth page's body
    page = open_page(browser, f"http://127.0.0.1:{minimal_server.port}/")
    result = page.page.evaluate(
        """async ([whole, corrupt]) => {
          const { OggReader } = await import('./js/ogg.js');
          const read = (bytes, chunk) => {
            const reader = new OggReader();
            const sizes = [];
            for (let i = 0; i < bytes.length; i += chunk) {
              for (const p of reader.push(new Uint8Array(bytes.slice(i, i + chunk)))) sizes.push(p.packet.length);
            }
            return { sizes, stats: reader.stats };
          };
          return { byByte: read(whole, 1), byOdd: read(whole, 77), corrupt: read(corrupt, 4096) };
        }""",
        [list(stream), list(corrupt)],
    )
    assert result["byByte"]["sizes"] == expected
    assert result["byOdd"]["sizes"] == expected
    assert result["corrupt"]["stats"]["badPages"] == 1
    assert result["corrupt"]["sizes"] == expected[:3] + expected[4:]
    page.context.close()


def test_resampler_keeps_the_band_and_rejects_aliases(browser, minimal_server):
    page = open_page(browser, f"http://127.0.0.1:{minimal_server.port}/")
    result = page.page.evaluate(
        """async () => {
          const { StreamResampler } = await import('./js/worklets/resampler.js');
          const run = (inputRate, outputRate, hz) => {
            const resampler = new StreamResampler(inputRate, outputRate);
            const input = new Float32Array(inputRate).map((_, i) => 0.5 * Math.sin(2 * Math.PI * hz * i / inputRate));
            const parts = [];
            for (let i = 0; i < input.length; i += 128) parts.push(resampler.process(input.subarray(i, i + 128)));
            const output = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
            let offset = 0;
            for (const part of parts) { output.set(part, offset); offset += part.length; }
            const steady = output.subarray(200, output.length - 200);
            return { length: output.length, rms: Math.sqrt(steady.reduce((s, v) => s + v * v, 0) / steady.length),
                     samples: Array.from(output.subarray(1000, 1400)) };
          };
          return { speech: run(48000, 24000, 1000), alias: run(48000, 24000, 20000),
                   up: run(24000, 44100, 440), odd: run(44100, 24000, 3000) };
        }"""
    )
    full = 0.5 / np.sqrt(2)
    assert abs(result["speech"]["rms"] / full - 1) < 0.01
    assert abs(result["up"]["rms"] / full - 1) < 0.01 and abs(result["odd"]["rms"] / full - 1) < 0.01
    assert 20 * np.log10(result["alias"]["rms"] / full) < -50  # 20 kHz would fold to 4 kHz
    assert abs(result["speech"]["length"] - 24_000) <= 16 and abs(result["up"]["length"] - 44_100) <= 32
    # The output is the same sine, in phase with the input (no delay): compare with the ideal samples.
    ideal = 0.5 * np.sin(2 * np.pi * 440 * (np.arange(1000, 1400) / 44_100))
    assert np.max(np.abs(np.array(result["up"]["samples"]) - ideal)) < 0.01
    page.context.close()


def test_playback_buffer_drops_bursts_and_grows_after_underruns(browser, minimal_server):
    page = open_page(browser, f"http://127.0.0.1:{minimal_server.port}/")
    result = page.page.evaluate(
        """async () => {
          const context = new AudioContext();
          await context.resume();
          await context.audioWorklet.addModule('./js/worklets/playback-worklet.js');
          const node = new AudioWorkletNode(context, 'personaplex-playback', { numberOfInputs: 0,
            outputChannelCount: [1], processorOptions: { targetMs: 100, targetStepMs: 20, maxTargetMs: 400, slackMs: 160 } });
          node.connect(context.destination);
          let latest = null;
          node.port.onmessage = (event) => { latest = event.data; };
          const until = (test) => new Promise((resolve, reject) => {
            const started = performance.now();
            const poll = () => latest && test(latest) ? resolve({ ...latest })
              : performance.now() - started > 60000 ? reject(new Error('timeout: ' + JSON.stringify(latest)))
              : setTimeout(poll, 10);
            poll();
          });
          const send = (ms) => node.port.postMessage({ type: 'audio', sampleRate: 24000,
            samples: new Float32Array(24 * ms).map((_, i) => 0.25 * Math.sin(i / 5)) });
          send(60);
          const waiting = await until((s) => s.receivedSeconds > 0.05);   // below the target: not playing yet
          send(640);                                                      // a burst: 700 ms buffered at once
          const burst = await until((s) => s.droppedSeconds > 0);
          const underrun = await until((s) => s.underruns > 0);           // nothing more arrives
          send(110);
          const stillWaiting = await until((s) => s.receivedSeconds > 0.8);
          send(20);
          const resumed = await until((s) => s.playing);
          await context.close();
          return { waiting, burst, underrun, stillWaiting, resumed };
        }"""
    )
    assert result["waiting"]["playing"] is False and result["waiting"]["playedSeconds"] == 0
    # 700 ms is past target + slack (260 ms): the oldest audio goes, 100 ms stay.
    assert 0.55 < result["burst"]["droppedSeconds"] < 0.62 and result["burst"]["overflows"] == 1
    assert result["underrun"]["targetMs"] == pytest.approx(120, abs=1)
    assert result["underrun"]["playedSeconds"] > 0.09  # the 100 ms kept after the burst played
    assert result["stillWaiting"]["playing"] is False  # 110 ms < the new 120 ms target
    assert result["resumed"]["playing"] is True
    page.context.close()
