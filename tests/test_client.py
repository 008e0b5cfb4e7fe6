"""``personaplex client`` against a real running server (demo model): a recording streamed in real time as
Ogg/Opus gives a reply wav on the input's timeline and a transcript; the server's refusals, a wrong token
and an unreachable server are one ``error:`` line with exit status 2."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
import sphn
from test_realtime import metric_value
from test_server_protocol import ServerThread

from personaplex.client import main
from personaplex.loadtest import synthetic_voice

TOKEN = "s3cret"


class TlsServerThread(ServerThread):
    """The same server behind TLS, with a self-signed certificate."""

    def __init__(self, model, ssl_context, **options):
        self.ssl_context = ssl_context
        super().__init__(model, **options)
        self.url = self.url.replace("ws://127.0.0.1", "wss://localhost")

    async def _start(self, kwargs):
        from personaplex.server.serve import start_server

        return await start_server(self.hub, host="127.0.0.1", port=0, ssl_context=self.ssl_context, **kwargs)


@pytest.fixture(scope="module")
def server(demo_model):
    running = ServerThread(demo_model, max_conversations=2, input_timeout_seconds=None, auth_token=TOKEN)
    yield running
    running.stop()


def voice_wav(path, seconds: float, rate: int = 24000, channels: int = 1):
    voice = synthetic_voice(seconds, seed=2)
    from personaplex.audio import resample

    samples = resample(voice, 24000, rate)[: round(seconds * rate)]
    sphn.write_wav(str(path), np.stack([samples] * channels) if channels > 1 else samples, rate)
    return path


def test_reply_wav_and_transcript_on_the_input_timeline(server, tmp_path, capsys, monkeypatch):
    # The client waits this long after its last frame for the answers still due; a loaded machine steps
    # slower than real time, so the test gives it ample time (the server answers every frame, late or not).
    monkeypatch.setattr("personaplex.client.TAIL_SECONDS", 90.0)
    source = voice_wav(tmp_path / "question.wav", 2.0)
    reply = tmp_path / "reply.wav"
    code = main([str(source), "--url", server.url, "--token", TOKEN, "-o", str(reply), "--voice-prompt", "NATM0",
                 "--seed", "7", "--temp-text", "0.9", "--topk-audio", "100", "--max-late", "100"])  # late: CPU load
    out = capsys.readouterr().out
    assert code == 0, out
    audio, rate = sphn.read(str(reply))
    assert rate == 24000 and audio.shape[-1] == 48000  # exactly the input's length
    assert np.abs(audio).max() > 0.01 and np.abs(audio[..., : 24000]).max() > 0.01  # the agent spoke from the start
    text = json.loads(reply.with_suffix(".json").read_text())
    assert text["pieces"] and text["text"] and text["duration_seconds"] == 2.0
    times = [piece["time"] for piece in text["pieces"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 2.0
    assert text["server"]["audio_topk"] == 100 and text["server"]["text_temperature"] == 0.9  # the query arrived
    # Every frame answered (one more may arrive while the client hangs up).
    assert re.search(r"sent 25 frames, received 2[56] \(0 missing", out) and "wrote " in out, out


def test_44k_stereo_input_without_a_clock(server, tmp_path, capsys):
    source = voice_wav(tmp_path / "stereo.wav", 1.3, rate=44100, channels=2)
    dropped = metric_value(server.hub.metrics.render(), "personaplex_input_dropped_seconds_total")
    code = main([str(source), "--url", server.url, "--token", TOKEN, "--no-realtime", "--max-late", "100"])
    assert code == 0, capsys.readouterr()
    # Without a clock the client still sends no faster than the server takes audio: none of it is dropped.
    assert metric_value(server.hub.metrics.render(), "personaplex_input_dropped_seconds_total") == dropped
    audio, rate = sphn.read(str(tmp_path / "stereo.reply.wav"))  # the default name, beside the input
    assert rate == 44100 and audio.shape == (1, round(1.3 * 44100))
    assert np.abs(audio).max() > 0.01
    assert json.loads((tmp_path / "stereo.reply.json").read_text())["pieces"]


def test_bad_voice_is_the_servers_error_in_one_line(server, tmp_path, capsys):
    source = voice_wav(tmp_path / "q.wav", 0.5)
    assert main([str(source), "--url", server.url, "--token", TOKEN, "--voice-prompt", "NoSuchVoice"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the server ended the conversation:") and "NoSuchVoice" in err
    assert not (tmp_path / "q.reply.wav").exists()  # nothing started, nothing written


def test_wrong_or_missing_token_names_the_auth_problem(server, tmp_path, capsys):
    source = voice_wav(tmp_path / "q.wav", 0.5)
    assert main([str(source), "--url", server.url, "--token", "wrong"]) == 2
    assert main([str(source), "--url", server.url]) == 2
    wrong, missing = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert wrong.startswith("error: the server refused the token (HTTP 401") and "--token" in wrong
    assert missing.startswith("error: the server refused the connection (HTTP 401") and TOKEN not in missing


def test_refusals_before_connecting(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = voice_wav(tmp_path / "q.wav", 0.5)
    assert main([str(tmp_path / "absent.wav")]) == 2
    assert main([str(source), "--url", "http://localhost:8998/api/chat"]) == 2
    assert main([str(source), "--url", f"ws://127.0.0.1:{port}/api/chat"]) == 2
    assert main([str(source), "-o", str(tmp_path / "no" / "such" / "dir.wav")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 4
    assert "audio file not found" in errors[0]
    assert "--url must start with ws://" in errors[1]
    assert errors[2].startswith(f"error: cannot connect to ws://127.0.0.1:{port}/api/chat") and "serve" in errors[2]
    assert "does not exist" in errors[3]


def test_wss_with_a_self_signed_certificate_needs_insecure(demo_model, tmp_path, capsys):
    from personaplex.server.tls import tls_context

    context, generated = tls_context(tmp_path / "tls")
    assert generated
    running = TlsServerThread(demo_model, context, max_conversations=1, input_timeout_seconds=None)
    try:
        source = voice_wav(tmp_path / "q.wav", 0.8)
        assert main([str(source), "--url", running.url]) == 2
        err = capsys.readouterr().err
        assert "is not trusted" in err and "--insecure" in err
        assert main([str(source), "--url", running.url, "--insecure", "--max-late", "100"]) == 0
    finally:
        running.stop()
    audio, rate = sphn.read(str(tmp_path / "q.reply.wav"))
    assert audio.shape[-1] == round(0.8 * rate) and np.abs(audio).max() > 0.01
