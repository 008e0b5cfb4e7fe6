"""What the shared-memory channels of ``--front-end-processes`` cost the engine process per 80 ms tick (CPU).

    python bench/front_end_channels.py [--callers 32,64,160] [--ticks 500]

Per tick and for every caller: the engine thread takes the caller's new audio from its input ring
(``InputRing.take``, one 80 ms frame written by the front end) and the engine process's event loop puts the
agent's frame in the output ring (``OutputRing.put``); the front end reads it back (``OutputRing.get``).
Prints the time per tick of each side (median and p99 over ``--ticks`` ticks) next to the 80 ms budget. The
engine thread's part holds the GIL on the tick's critical path; the rest runs on the event loops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import FRAME_SIZE  # noqa: E402
from personaplex.serving.frame_channels import ChannelBlock  # noqa: E402


def measure(callers: int, ticks: int) -> dict:
    engine = ChannelBlock.create(callers)
    front = ChannelBlock.attach(engine.name, callers)
    rng = np.random.default_rng(0)
    user = (0.1 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)
    agent = (0.1 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)
    take, put, get = [], [], []
    try:
        for tick in range(ticks):
            for channel in front.channels:  # the front ends write a frame of the caller's audio
                channel.input.put(user)
            started = time.perf_counter()
            for channel in engine.channels:  # engine thread, start of the tick
                channel.input.take()
            take.append(time.perf_counter() - started)
            started = time.perf_counter()
            for channel in engine.channels:  # engine process's event loop, after the step
                channel.output.put(agent, "hi" if tick % 3 == 0 else None)
            put.append(time.perf_counter() - started)
            started = time.perf_counter()
            for channel in front.channels:  # front ends, on the tick notice
                channel.output.get(channel.output.written - 1)
            get.append(time.perf_counter() - started)
    finally:
        front.close()
        engine.close()
    row = {"callers": callers}
    for name, values in (("take", take), ("put", put), ("get", get)):
        ms = np.array(values) * 1000
        row[f"{name}_p50_ms"] = float(np.percentile(ms, 50))
        row[f"{name}_p99_ms"] = float(np.percentile(ms, 99))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", default="32,64,160", help="caller counts, by commas")
    parser.add_argument("--ticks", type=int, default=500)
    args = parser.parse_args()
    print("| callers | engine thread: take audio p50 / p99 ms | engine loop: put frames p50 / p99 ms "
          "| front ends: get frames p50 / p99 ms |")
    print("|---|---|---|---|")
    for callers in (int(c) for c in args.callers.split(",")):
        r = measure(callers, args.ticks)
        print(f"| {callers} | {r['take_p50_ms']:.2f} / {r['take_p99_ms']:.2f} | {r['put_p50_ms']:.2f} / "
              f"{r['put_p99_ms']:.2f} | {r['get_p50_ms']:.2f} / {r['get_p99_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
