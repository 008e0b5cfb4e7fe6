"""``personaplex loadtest`` driving the Realtime-style endpoint of a real running server (demo model)."""

from __future__ import annotations

import json

from test_realtime import ServerThread, frames_stepped, metric_value


# Frames the server may step for a caller between its hang-up and the server reading it (never received):
# about 0.4 s of a loaded server's event loop.
HANG_UP_FRAMES = 5


def test_loadtest_drives_the_realtime_endpoint(tmp_path, capsys):
    from personaplex.demo import demo_assets
    from personaplex.loading import load_model
    from personaplex.loadtest import main

    server = ServerThread(load_model(demo_assets(), "cpu"), {"auth_token": "s3cret"}, max_conversations=2,
                          input_timeout_seconds=None)
    try:
        before = frames_stepped(server)
        results = tmp_path / "results.json"
        code = main(["--url", f"{server.ws}/v1/realtime", "-n", "2", "--duration", "1.6", "--token", "s3cret",
                     "--voice-prompt", "NATM0", "--json", str(results),
                     "--max-missing", "100", "--max-late", "100"])  # frame counts are checked below
        metrics = server.metrics()
        stepped = frames_stepped(server) - before
    finally:
        server.stop()
    assert code == 0
    table = capsys.readouterr().out
    assert "all: 2/2 clients without error" in table
    clients = json.loads(results.read_text())
    for client in clients:
        assert client["error"] is None
        assert client["sent_frames"] == 20
        assert client["frames"] > 0 and client["latency_p50"] is not None
        # The transcript deltas were counted: at most one per frame, and words within a second of audio (the
        # demo model's text; a saturated machine may step fewer frames than that while the caller listens).
        assert client["text_pieces"] <= client["frames"]
        assert client["text_pieces"] > 0 or client["frames"] < 12, client
    # Answered frame for frame: the callers counted the frames the server stepped for them (a slow machine
    # steps fewer than the 20 sent, skipping ticks), but those stepped while a hang-up was on its way.
    received = sum(client["frames"] for client in clients)
    assert stepped - 2 * HANG_UP_FRAMES <= received <= stepped, (received, stepped)
    assert metric_value(metrics, "personaplex_sessions_total", front_end="realtime") == 2
