"""``personaplex loadtest`` driving the Realtime-style endpoint of a real running server (demo model)."""

from __future__ import annotations

import json

from test_realtime import ServerThread, metric_value


def test_loadtest_drives_the_realtime_endpoint(tmp_path, capsys):
    from personaplex.demo import demo_assets
    from personaplex.loading import load_model
    from personaplex.loadtest import main

    server = ServerThread(load_model(demo_assets(), "cpu"), {"auth_token": "s3cret"}, max_conversations=2,
                          input_timeout_seconds=None)
    try:
        results = tmp_path / "results.json"
        code = main(["--url", f"{server.ws}/v1/realtime", "-n", "2", "--duration", "1.6", "--token", "s3cret",
                     "--voice-prompt", "NATM0", "--json", str(results),
                     "--max-missing", "100", "--max-late", "100"])  # frame counts are checked below
        metrics = server.metrics()
    finally:
        server.stop()
    assert code == 0
    table = capsys.readouterr().out
    assert "all: 2/2 clients without error" in table
    for client in json.loads(results.read_text()):
        assert client["error"] is None
        assert client["sent_frames"] == 20
        assert client["frames"] >= 15  # answered frame for frame (a slow machine may skip a few ticks)
        assert client["text_pieces"] > 0 and client["latency_p50"] is not None
    assert metric_value(metrics, "personaplex_sessions_total", front_end="realtime") == 2
