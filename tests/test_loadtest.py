"""The load test's pieces without a server (the end-to-end run is in test_server_cli.py): URLs, the
synthetic caller's audio, the per-client figures and the table, and its refusals."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import numpy as np

from personaplex.loadtest import ClientReport, build_parser, client_url, format_table, main, synthetic_voice


def test_client_urls_carry_persona_seed_and_token():
    args = build_parser().parse_args(["--url", "wss://host:9/api/chat?voice_prompt=VARF1", "--token", "t"])
    query = parse_qs(urlsplit(client_url(args, 3)).query)
    assert query["voice_prompt"] == ["VARF1"]  # the URL's own parameters win
    assert query["seed"] == ["3"] and query["token"] == ["t"] and query["text_prompt"]


def test_synthetic_voice_is_speech_like():
    audio = synthetic_voice(2.0, seed=1)
    assert audio.dtype == np.float32 and audio.shape == (48000,)
    assert 0.05 < np.abs(audio).max() <= 1.0
    assert (np.abs(audio) < 0.02).mean() > 0.1  # pauses between bursts


def test_report_figures_and_table():
    steady = ClientReport(0, join_seconds=0.5, sent_frames=10, received_samples=9 * 1920 + 100, text_pieces=4,
                          late_frames=1, latencies=[0.05, 0.06, 0.07, 0.5])
    failed = ClientReport(1, error="all 4 conversation slots are busy")
    assert steady.frames == 9 and steady.missing == 1
    assert abs(steady.percentile(50) - 0.065) < 1e-9 and failed.percentile(50) is None
    table = format_table([steady, failed])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["client", "join", "s", "sent"]
    assert "slots are busy" in lines[2]
    assert lines[-1].startswith("all: 1/2 clients without error; frames 9, missing 1, late 1")


def test_refusals_are_one_error_line(capsys):
    assert main(["--url", "http://localhost:8998/api/chat"]) == 2
    assert main(["--url", "ws://localhost:8998/api/chat", "-n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --url must start with ws://") and err[1].startswith("error: -n must be")
