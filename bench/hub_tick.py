"""Host time of one serving tick (the engine thread's own work) beside a busy event loop.

The end-to-end server bench sustained 24 calls where the engine alone steps 40 in 20 ms: the tick, not the
GPU step, was the limit. The engine thread shares the GIL with the event loop (WebSockets, Ogg/Opus), and
every call that releases the GIL (each torch operation does) must win it back, which takes up to one
switch interval (5 ms) while the loop is busy. This measures that cost without a GPU: the real
``ConversationHub._tick`` over N live conversations, with an engine that answers at once (no device),
alone and beside a thread that keeps the GIL busy as a saturated event loop does.

    python bench/hub_tick.py --conversations 8 16 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.engine.engine import FrameOutput  # noqa: E402
from personaplex.serving.hub import FRAME_SIZE, Conversation, ConversationHub, HubOptions  # noqa: E402


class InstantEngine:
    """The engine's step interface with the host-side calls of the real one and no device work."""

    device = torch.device("cpu")

    def __init__(self, max_slots: int, step_seconds: float, channels: int = 17):
        self.max_slots = max_slots
        self.channels = channels
        self.step_seconds = step_seconds
        self.active = [True] * max_slots

    def step(self, pcm: torch.Tensor) -> FrameOutput:
        batch = len(self.active)
        pcm = pcm[:batch].to(torch.float32)
        active = torch.tensor(self.active[:batch])
        time.sleep(self.step_seconds)  # the wait for the GPU's step, which releases the GIL as a sync does
        tokens = torch.zeros(batch, self.channels, dtype=torch.long) + active[:, None]
        return FrameOutput(tokens.cpu(), (pcm * 0.5).cpu())


def busy(stop: threading.Event) -> None:
    """A saturated event loop, as far as the GIL is concerned: pure Python, never waiting."""
    total = 0
    while not stop.is_set():
        for value in range(1000):
            total += value


def tick_times(conversations: int, ticks: int, contended: bool, step_seconds: float) -> list[float]:
    loop = asyncio.new_event_loop()
    model = SimpleNamespace(tokenizer=SimpleNamespace(spoken_text=lambda token: None))
    hub = ConversationHub(model, HubOptions(max_conversations=conversations), engine=InstantEngine(conversations, step_seconds))
    hub._loop = loop
    for slot in range(conversations):
        conversation = Conversation(hub, "chat", None)
        conversation.slot, conversation.max_frames = slot, 10**9
        hub._live[slot] = conversation
    pcm = torch.zeros(conversations, FRAME_SIZE)
    stop = threading.Event()
    thread = threading.Thread(target=busy, args=(stop,), daemon=True)
    if contended:
        thread.start()
    times = []
    try:
        for _ in range(ticks):
            for conversation in hub._live.values():
                conversation._input.push(np.zeros(FRAME_SIZE, dtype=np.float32))
            started = time.perf_counter()
            hub._tick(pcm)
            times.append(1000 * (time.perf_counter() - started))
            loop.run_until_complete(asyncio.sleep(0))  # let the loop take the delivered frames
    finally:
        stop.set()
        loop.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--ticks", type=int, default=60)
    parser.add_argument("--step-ms", type=float, default=20.0, help="the GPU step the engine waits for (GIL released)")
    parser.add_argument("--switch-intervals-ms", type=float, nargs="+", default=[5.0, 1.0],
                        help="GIL switch intervals to compare (5 ms: Python's default; the server sets 1 ms)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; engine step {args.step_ms:g} ms (a wait); "
          "host cost = tick - step")
    print("| switch interval ms | conversations | host cost alone p50 / p90 ms | beside a busy event loop p50 / p90 ms |")
    print("|---|---|---|---|")
    for interval in args.switch_intervals_ms:
        sys.setswitchinterval(interval / 1000)
        for count in args.conversations:
            rows = []
            for contended in (False, True):
                extra = sorted(t - args.step_ms for t in tick_times(count, args.ticks, contended, args.step_ms / 1000))
                rows.append(f"{statistics.median(extra):.2f} / {extra[int(0.9 * (len(extra) - 1))]:.2f}")
            print(f"| {interval:g} | {count} | {rows[0]} | {rows[1]} |", flush=True)


if __name__ == "__main__":
    main()
