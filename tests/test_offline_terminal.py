"""What the offline tool prints while it works, as a person at a terminal sees it: the lines it writes go
above the progress bar, never into it; the up-front CPU estimate is followed by the rate really measured;
commands without inputs (serve, voice build) do not print the offline tool's time estimate."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import sphn

from personaplex.config import get_preset
from personaplex.deploy.estimates import CpuEstimate

REPO = Path(__file__).resolve().parents[1]


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_lines_go_above_the_progress_bar_on_a_terminal(tmp_path):
    sources = []
    for name, seconds in (("a", 0.3), ("b", 0.6)):
        t = np.arange(int(seconds * 24_000)) / 24_000
        sphn.write_wav(str(tmp_path / f"{name}.wav"), (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000)
        sources.append(str(tmp_path / f"{name}.wav"))
    command = [sys.executable, "-m", "personaplex", "offline", "--model", "demo", "--device", "cpu",
               "--input-wav", *sources, "--output-wav", str(tmp_path / "a.out.wav"), str(tmp_path / "b.out.wav"),
               "--output-text", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--seed", "1",
               "--text-prompt", ""]
    controller, terminal = pty.openpty()  # stderr is a terminal: the progress bar is drawn
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns (a new pty has 0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=terminal, env=env)
    os.close(terminal)
    screen = read_all(controller).decode("utf-8", "replace")
    os.close(controller)
    assert process.wait(timeout=600) == 0, screen
    assert "conversations:" in screen and "frame" in screen  # the progress bar was drawn
    wrote = [m.start() for m in re.finditer("wrote ", screen)]
    assert len(wrote) == 2, screen
    for start in wrote:
        # What shares the screen line with "wrote": everything since the last carriage return or newline.
        line_start = max(screen.rfind("\r", 0, start), screen.rfind("\n", 0, start)) + 1
        assert screen[line_start:start].strip() == "", repr(screen[line_start:start + 40])


def test_the_rate_measured_on_the_run_follows_the_estimate(tmp_path, monkeypatch, capsys):
    from personaplex import offline
    from personaplex.app import recordings

    monkeypatch.setattr(recordings, "RATE_REPORT_AFTER_SECONDS", 0.0)  # report after the first step
    t = np.arange(24_000) / 24_000
    sphn.write_wav(str(tmp_path / "in.wav"), (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000)
    code = offline.main(["--model", "demo", "--device", "cpu", "--input-wav", str(tmp_path / "in.wav"),
                         "--output-wav", str(tmp_path / "o.wav"), "--output-text", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    measured = re.search(r"measured: ([0-9.]+) frames/s \(([0-9.]+)x real time\) over the first \d+ s; "
                         r"about [0-9.]+ (s|min|h) left at this rate", err)
    assert measured, err
    # Both printed to two or three significant digits: equal up to that rounding (5%).
    assert float(measured[1]) > 0 and float(measured[2]) == pytest.approx(float(measured[1]) * 0.08, rel=0.05)
    assert err.index("measured:") < err.index("processed ")


def test_rate_line_counts_what_is_left():
    from personaplex.app.recordings import measured_rate

    assert measured_rate(25, 125, 10.0) == ("measured: 2.5 frames/s (0.2x real time) over the first 10 s; "
                                            "about 40 s left at this rate")


def test_estimate_without_inputs_gives_the_speed_only():
    estimate = CpuEstimate("personaplex-7b", seconds_per_frame=2.0, prefill_seconds=30.0, slots=1)
    alone = estimate.describe([])
    assert alone.startswith("running personaplex-7b on the CPU: about 2.00 s per 80 ms frame step (25x slower")
    assert "input(s)" not in alone and "will take" not in alone
    assert estimate.describe() == alone
    with_inputs = estimate.describe([100])
    assert "1 input(s), 8.0 s of audio" in with_inputs and "first estimate" in with_inputs


def test_serve_and_voice_build_plans_print_no_offline_estimate():
    from personaplex.deploy.plan import plan_load

    plan = plan_load(get_preset("personaplex-7b"), "cpu", slots=1)  # what serve and voice build ask
    assert plan.messages and not any("input(s)" in m or "will take" in m for m in plan.messages)
