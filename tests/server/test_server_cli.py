"""The server as users start it: ``personaplex serve`` in its own process, the load test against it, a
graceful SIGTERM in the middle of a conversation, ``python -m personaplex.server``, TLS."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    """``personaplex serve --model demo --port 0 ...`` in a subprocess; returns it and its printed URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "personaplex", "serve", "--model", "demo", "--port", "0", "--host", "127.0.0.1",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"Access the Web UI directly at (\S+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


@pytest.mark.slow
def test_serve_loadtest_and_graceful_shutdown(tmp_path):
    process, url = start_server("--max-conversations", "2")
    try:
        assert url.startswith("http://127.0.0.1:")
        ws_url = url.replace("http://", "ws://") + "/api/chat"
        report = tmp_path / "load.json"
        load = subprocess.run(
            [sys.executable, "-m", "personaplex", "loadtest", "--url", ws_url, "-n", "2", "--duration", "2", "--processes", "2",
             "--json", str(report), "--max-missing", "100", "--max-late", "100"],  # counts checked below
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        )
        assert load.returncode == 0, load.stderr
        table = load.stdout
        assert "client" in table and "p50 ms" in table and "2/2 clients without error" in table
        import json

        results = json.loads(report.read_text())
        assert len(results) == 2
        for result in results:
            assert result["error"] is None
            assert result["sent_frames"] == 25  # 2 s of 80 ms frames, sent at real-time pace
            assert result["frames"] > 0 and result["latency_p50"] is not None

        async def conversation_during_shutdown():
            url = ws_url + "?voice_prompt=NATF1&text_prompt=hi"
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                kinds, error = [], None
                async for message in ws:
                    kinds.append(message.data[0])
                    if message.data[0] == 0x00:
                        process.send_signal(signal.SIGTERM)
                    if message.data[0] == 0x05:
                        error = message.data[1:].decode()
                return kinds, error, ws.close_code

        kinds, error, code = asyncio.run(asyncio.wait_for(conversation_during_shutdown(), 60))
        assert 0x00 in kinds and "shutting down" in error and code == 1001
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_python_m_server_with_tls_and_token(tmp_path):
    certs = tmp_path / "certs"
    process, url = start_server("--ssl", str(certs), "--auth-token", "t0k")
    try:
        assert url.startswith("https://127.0.0.1:")
        assert (certs / "cert.pem").is_file() and (certs / "key.pem").is_file()
        assert (certs / "key.pem").stat().st_mode & 0o077 == 0
        context = ssl.create_default_context(cafile=str(certs / "cert.pem"))  # the self-signed cert verifies

        async def probe():
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/api/health", ssl=context) as r:
                    health = r.status
                async with session.get(url + "/api/voices", ssl=context) as r:
                    refused = r.status
                async with session.get(url + "/api/voices", ssl=context, headers={"Authorization": "Bearer t0k"}) as r:
                    allowed = r.status
            return health, refused, allowed

        assert asyncio.run(probe()) == (200, 401, 200)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 0
    # An existing certificate is reused, never regenerated.
    before = (certs / "cert.pem").read_bytes()
    process = subprocess.Popen([sys.executable, "-m", "personaplex.server", "--help"], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT)
    help_text, _ = process.communicate(timeout=60)
    for flag in ("--host", "--port", "--static", "--ssl", "--hf-repo", "--moshi-weight", "--mimi-weight",
                 "--tokenizer", "--voice-prompt-dir", "--device", "--cpu-offload", "--model", "--max-conversations",
                 "--max-queue", "--max-conversation-seconds", "--context-policy", "--auth-token",
                 "--allow-voice-upload"):
        assert flag in help_text, flag
    from personaplex.server.tls import tls_context

    _, generated = tls_context(certs)
    assert not generated and (certs / "cert.pem").read_bytes() == before


@pytest.mark.slow
def test_cpu_offload_and_bad_static_are_refused_clearly():
    # On a CPU --cpu-offload means nothing: refused as the offline tool refuses it (same loading code).
    for extra, words in ((["--cpu-offload", "--device", "cpu"], "--cpu-offload"),
                         (["--static", "/no/such/folder"], "--static folder not found"),
                         (["--opus-workers", "-1"], "--opus-workers must be 0 or more")):
        result = subprocess.run([sys.executable, "-m", "personaplex", "serve", "--model", "demo", *extra],
                                capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
        assert result.returncode == 2
        # Start-up progress lines may come first; then one error line, no traceback.
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr
