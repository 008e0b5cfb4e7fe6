"""The web page in headless Firefox (Debian's ``firefox-esr``), driven over WebDriver BiDi.

Firefox has no fake capture file like Chromium's: its fake microphone (``media.navigator.streams.fake``) is a
steady tone. Headless Firefox only runs an AudioContext when it has an audio output, so each run starts its own
PulseAudio daemon with a null sink (no sound card is touched). The browser's profile sends every non-loopback
request to a closed local port, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time

import pytest
from test_web_ui import (  # noqa: F401  (fixtures used by name)
    LAN_HOST,
    MIN_WAIT_SECONDS,
    PROBLEM_NOTICES,
    TOKEN,
    check_sent_stream,
    demo_server,
    metric,
    minimal_server,
    second_caller_waits_for_the_slot,
    start_conversation,
    start_server,
    stop_conversation,
    stop_server,
    write_microphone_wav,
)

pytestmark = pytest.mark.slow

FIREFOX_FAKE_TONE_HZ = 1000.0

PROFILE_PREFS = {
    # fake microphone, no permission prompt, audio allowed to start
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.autoplay.block-webaudio": False,
    "remote.prefs.recommended": True,
    # every request that is not for this machine goes to a closed local port
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1",
    "network.proxy.http_port": 9,
    "network.proxy.ssl": "127.0.0.1",
    "network.proxy.ssl_port": 9,
    "network.proxy.share_proxy_settings": True,
    "network.proxy.no_proxies_on": f"localhost, 127.0.0.1, {LAN_HOST}",
    "network.dns.localDomains": LAN_HOST,  # resolves to this machine: a plain-http origin that is not secure
    "network.proxy.allow_hijacking_localhost": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "extensions.update.enabled": False,
    "app.update.disabledForTesting": True,
}


def required_program(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{names[0]} is not installed (apt-get install {names[0]})"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs it: its absence there is a broken setup, not a skip
    pytest.skip(message)


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def pulse_socket(tmp_path_factory):
    """A private PulseAudio daemon with a null sink; yields the path of its socket."""
    pulseaudio = required_program("pulseaudio")
    runtime = tmp_path_factory.mktemp("pulse")
    socket = runtime / "native"
    process = subprocess.Popen(
        [pulseaudio, "--daemonize=no", "-n", "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=no",
         "--log-target=stderr", "--load=module-null-sink sink_name=silence",
         f"--load=module-native-protocol-unix socket={socket}", "--load=module-always-sink"],
        env={**os.environ, "PULSE_RUNTIME_PATH": str(runtime), "HOME": str(runtime)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    for _ in range(100):
        if socket.exists() or process.poll() is not None:
            break
        time.sleep(0.1)
    if not socket.exists():
        stop_process(process)
        pytest.fail(f"pulseaudio did not start: {process.stderr.read()[-2000:]}")
    yield socket
    stop_process(process)


@pytest.fixture(scope="module")
def firefox(tmp_path_factory, pulse_socket):
    """Headless Firefox with a fresh profile; yields its WebDriver BiDi address."""
    with running_firefox(tmp_path_factory.mktemp("firefox-profile"), pulse_socket, PROFILE_PREFS) as address:
        yield address


@contextlib.contextmanager
def running_firefox(profile, pulse_socket, prefs: dict):
    """Headless Firefox on profile folder ``profile`` with ``prefs``; yields its WebDriver BiDi address."""
    executable = required_program("firefox-esr", "firefox")
    (profile / "user.js").write_text(
        "".join(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items())
    )
    process = subprocess.Popen(
        [executable, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", "0",
         "about:blank"],
        env={**os.environ, "PULSE_SERVER": f"unix:{pulse_socket}", "MOZ_HEADLESS": "1", "HOME": str(profile)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    address: list[str] = []
    ready = threading.Event()

    def drain():
        for line in process.stdout:
            match = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            if match:
                address.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(60)
    if not address:
        stop_process(process)
        pytest.fail("firefox did not open its WebDriver BiDi port")
    try:
        yield address[0]
    finally:
        stop_process(process)


class Bidi:
    """A small synchronous WebDriver BiDi client: one session, commands, console errors per tab."""

    def __init__(self, address: str, capabilities: dict | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.console_errors: dict[str, list[str]] = {}
        self._call(self._connect(address))
        self.command("session.new", {"capabilities": capabilities or {}})
        self.command("session.subscribe", {"events": ["log.entryAdded"]})

    def _call(self, coroutine, timeout: float = 90):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _connect(self, address: str) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"{address}/session", max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if data.get("id") in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "log.entryAdded" and data["params"].get("level") == "error":
                context = data["params"].get("source", {}).get("context", "")
                self.console_errors.setdefault(context, []).append(data["params"].get("text", ""))

    async def _command(self, method: str, params: dict) -> dict:
        ident = next(self.ids)
        future = self.loop.create_future()
        self.pending[ident] = future
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        return await asyncio.wait_for(future, 60)

    def command(self, method: str, params: dict) -> dict:
        answer = self._call(self._command(method, params))
        if answer.get("type") == "error":
            raise RuntimeError(f"{method} failed: {answer.get('error')}: {answer.get('message')}")
        return answer["result"]

    def close(self) -> None:
        try:
            self.command("session.end", {})
        finally:
            async def shutdown():
                await self.ws.close()
                await self.http.close()

            self._call(shutdown())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class Tab:
    def __init__(self, bidi: Bidi, url: str):
        self.bidi = bidi
        self.context = bidi.command("browsingContext.create", {"type": "tab"})["context"]
        bidi.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})
        self.wait("document.body.dataset.ready === 'true'", timeout=10, what="the page")

    @property
    def errors(self) -> list[str]:
        return self.bidi.console_errors.get(self.context, [])

    def js(self, expression: str):
        """Evaluate in the page (promises awaited); the value comes back through JSON."""
        wrapped = f"(async () => JSON.stringify(await ({expression})))()"
        result = self.bidi.command("script.evaluate", {
            "expression": wrapped, "target": {"context": self.context}, "awaitPromise": True,
            "resultOwnership": "none", "userActivation": True,
        })
        if result.get("type") == "exception":
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value.get("type") == "string" else None

    def wait(self, expression: str, timeout: float = 20.0, what: str | None = None) -> None:
        """Wait until ``expression`` is true in the page: ``timeout`` seconds, at least ``MIN_WAIT_SECONDS``."""
        deadline = time.monotonic() + max(timeout, MIN_WAIT_SECONDS)
        while not self.js(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                state = self.js("({state: personaplex.state, notices: personaplex.notices, stats: personaplex.stats})")
                raise AssertionError(f"timed out waiting for {what or expression}; page: {state}")
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def set_files(self, selector: str, paths: list[str]) -> None:
        """Choose files in a file input, as a user's file picker would (BiDi ``input.setFiles``)."""
        element = self.bidi.command("script.evaluate", {
            "expression": f"document.querySelector({json.dumps(selector)})", "target": {"context": self.context},
            "awaitPromise": False, "resultOwnership": "root",
        })["result"]
        self.bidi.command("input.setFiles", {
            "context": self.context, "element": {"sharedId": element["sharedId"]}, "files": paths,
        })

    def close(self) -> None:
        self.bidi.command("browsingContext.close", {"context": self.context})


@pytest.fixture(scope="module")
def bidi(firefox):
    client = Bidi(firefox)
    yield client
    client.close()


def test_firefox_conversation_with_the_demo_model(bidi, demo_server):  # noqa: F811
    before = demo_server.metrics()
    tab = Tab(bidi, demo_server.page_url)
    assert tab.js("navigator.userAgent").count("Firefox/") == 1
    assert len(tab.js("personaplex.voices")) == 18
    assert tab.js(PROBLEM_NOTICES) == []
    tab.click("#start")
    tab.wait("personaplex.state === 'connected'", timeout=60, what="the handshake")
    tab.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 2", timeout=30,
             what="2 s of agent audio played")
    tab.wait("personaplex.counters.textPieces > 0", timeout=20, what="agent text")
    assert tab.js("personaplex.metadata[0].model") == "demo"
    assert tab.js("personaplex.stats.playback.peak") > 1e-4
    received_seconds = tab.js("personaplex.stats.playback.receivedSeconds")
    tab.click("#stop")
    tab.wait("personaplex.state === 'closed'", timeout=10, what="the close")
    assert tab.js(PROBLEM_NOTICES) == []
    assert tab.errors == []
    after = demo_server.metrics()
    underruns = metric(after, "personaplex_input_underrun_frames_total") - \
        metric(before, "personaplex_input_underrun_frames_total")
    assert underruns < 0.25 * received_seconds / 0.08, (underruns, received_seconds)
    assert metric(after, "personaplex_errors_total", 'kind="protocol"') == 0
    tab.close()


def test_firefox_sends_a_valid_ogg_opus_stream(bidi, minimal_server):  # noqa: F811
    tab = Tab(bidi, f"http://127.0.0.1:{minimal_server.port}/")
    tab.click("#start")
    tab.wait("personaplex.state === 'connected'", timeout=30, what="the handshake")
    tab.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 2", timeout=30,
             what="2 s of audio played")
    tab.wait("personaplex.transcript().includes('word5')", timeout=10, what="text pieces in the transcript")
    assert 0.2 < tab.js("personaplex.stats.playback.peak") < 0.4
    tab.click("#stop")
    tab.wait("personaplex.state === 'closed'", timeout=10, what="the close")
    time.sleep(0.5)
    assert tab.js(PROBLEM_NOTICES) == []
    assert tab.js("personaplex.metadata") == []
    assert [error for error in tab.errors if "404" not in error and "api/voices" not in error] == []
    check_sent_stream(bytes(minimal_server.streams[-1]), tab.js("personaplex.sentSeconds"), FIREFOX_FAKE_TONE_HZ)
    tab.close()


def test_firefox_explains_an_insecure_origin(bidi, demo_server):  # noqa: F811
    port = demo_server.url.rsplit(":", 1)[1]
    tab = Tab(bidi, f"http://{LAN_HOST}:{port}/?token={TOKEN}")
    assert tab.js("window.isSecureContext") is False
    assert "not in a secure context" in tab.js("document.querySelector('[data-notice=insecure]').textContent")
    assert tab.js("document.querySelector('#start').disabled") is True
    assert len(tab.js("personaplex.voices")) == 18  # the rest of the page still works
    tab.close()


def test_firefox_explains_a_blocked_microphone(tmp_path_factory, pulse_socket, demo_server):  # noqa: F811
    """A Firefox whose user blocks microphones (its own permission default, as "Block" sets per site): the
    page says so, offers Start again and opens no session."""
    prefs = {**PROFILE_PREFS, "media.navigator.permission.disabled": False, "permissions.default.microphone": 2}
    sessions = metric(demo_server.metrics(), "personaplex_sessions_total", 'front_end="chat"')
    with running_firefox(tmp_path_factory.mktemp("firefox-mic-blocked"), pulse_socket, prefs) as address:
        client = Bidi(address)
        try:
            tab = Tab(client, demo_server.page_url)
            tab.click("#start")
            tab.wait("document.body.dataset.mic === 'blocked'", timeout=15, what="the blocked-microphone notice")
            notice = tab.js("document.querySelector('[data-notice=mic-blocked]').textContent")
            assert "microphone is blocked" in notice
            tab.wait("!document.querySelector('#start').disabled", timeout=5, what="Start to be offered again")
            assert tab.js("personaplex.state") != "connected"
            tab.close()
        finally:
            client.close()
    assert metric(demo_server.metrics(), "personaplex_sessions_total", 'front_end="chat"') == sessions


def test_firefox_second_caller_waits_with_its_queue_position(bidi, demo_server):  # noqa: F811
    first = Tab(bidi, demo_server.page_url)
    second = Tab(bidi, demo_server.page_url)
    second_caller_waits_for_the_slot(first, second)
    first.close()
    second.close()


def test_firefox_uploaded_voice_sample(bidi, demo_server, tmp_path):  # noqa: F811
    sample = write_microphone_wav(tmp_path / "my-voice.wav", seconds=2.0, sample_rate=24_000)
    tab = Tab(bidi, demo_server.page_url)
    tab.set_files("#voice-file", [str(sample)])
    start_conversation(tab)
    assert tab.js("personaplex.metadata[0].persona.voice").startswith("upload-")
    stop_conversation(tab)
    assert tab.js(PROBLEM_NOTICES) == []
    tab.close()


def test_firefox_https_with_a_generated_certificate_on_a_lan_name(tmp_path_factory, pulse_socket, tmp_path):
    """--ssl's self-signed certificate, the page on a name other than localhost: a secure context talking
    over wss:// (the certificate accepted as a user would, for this browser session only)."""
    server = start_server("--ssl", str(tmp_path / "tls"))
    try:
        port = server.url.rsplit(":", 1)[1]
        profile = tmp_path_factory.mktemp("firefox-https")
        with running_firefox(profile, pulse_socket, PROFILE_PREFS) as address:
            client = Bidi(address, {"alwaysMatch": {"acceptInsecureCerts": True}})
            try:
                tab = Tab(client, f"https://{LAN_HOST}:{port}/")
                assert tab.js("window.isSecureContext") is True
                assert tab.js(PROBLEM_NOTICES) == []
                tab.click("#start")
                tab.wait("personaplex.stats.playback && personaplex.stats.playback.playedSeconds > 0.5", timeout=60,
                         what="agent audio over wss://")
                stop_conversation(tab)
                assert tab.js(PROBLEM_NOTICES) == []
                tab.close()
            finally:
                client.close()
    finally:
        stop_server(server)
