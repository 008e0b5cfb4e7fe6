"""What the server's front end (WebSockets, Ogg/Opus, the hub's tick) costs per caller, without a GPU.

    python bench/server_front_end.py --clients 4 8 16 --duration 10 [--step-ms 20]

The real server (aiohttp, ``/api/chat``, the real ``ConversationHub`` and its engine thread) runs in this
process with a stand-in engine: every tick it waits ``--step-ms`` for its "GPU" (the GIL released, as a
device synchronisation does) and answers noise at a voice's level, so everything the server does besides the model is
real. The real ``personaplex loadtest`` (a separate process) calls it with N real-time Ogg/Opus callers.
Per count it reports the server process's CPU time per caller per second of audio (its Opus worker
processes, with ``--opus-workers``, not included), the event loop's
lateness (a 10 ms probe: how late it wakes up, p50/p99), the hub's tick time and the callers' view
(late and missing agent frames). On the GPU host the 7B server sustained fewer callers than its engine
steps (bench/NOTES.md): this separates the front end's share.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.engine.engine import FrameOutput  # noqa: E402
from personaplex.serving import ConversationHub, HubOptions  # noqa: E402


class StandInEngine:
    """The engine interface the hub drives, with a fixed wait instead of device work."""

    device = torch.device("cpu")
    join_chunk_frames = 64

    def __init__(self, max_slots: int, step_seconds: float, channels: int = 17):
        self.max_slots, self.step_seconds, self.channels = max_slots, step_seconds, channels
        self.active = [False] * max_slots
        # Speech-like level noise, not silence: Opus encodes silence far more cheaply than a model's voice.
        self._noise = 0.1 * torch.randn(max_slots + 7, 1920, generator=torch.Generator().manual_seed(0))
        self._steps = 0

    def capture_graphs(self) -> int:
        return 0

    def warm_up_join(self, prompt, chunk_frames=-1) -> None:
        pass

    def free_slots(self) -> list[int]:
        return [slot for slot, busy in enumerate(self.active) if not busy]

    def begin_join(self, first, stop, prompt, sampling, **_) -> bool:
        for slot in range(first, stop):
            self.active[slot] = True
        return True  # as a prefix-cache hit: live at once

    def advance_joins(self, frame_budget) -> list[int]:
        return []

    def leave(self, slot: int) -> None:
        self.active[slot] = False

    def step(self, pcm: torch.Tensor) -> FrameOutput:
        batch = max((slot + 1 for slot, busy in enumerate(self.active) if busy), default=1)
        time.sleep(self.step_seconds)
        self._steps += 1
        start = self._steps % 7
        return FrameOutput(torch.zeros(batch, self.channels, dtype=torch.long), self._noise[start : start + batch])


async def loop_lateness(stop: asyncio.Event, samples: list[float], period: float = 0.010) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(period)
        samples.append(1000 * (time.perf_counter() - began - period))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def measure(hub, url: str, clients: int, duration: float, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "clients.json"
        stop, lateness = asyncio.Event(), []
        probe = asyncio.create_task(loop_lateness(stop, lateness))
        ticks_before = hub.ticks
        tick_sum_before = hub.metrics.tick_seconds._sum.get()
        cpu_before, wall_before = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "personaplex", "loadtest", "--url", url, "-n", str(clients), "--duration", str(duration),
            "--processes", str(processes), "--json", str(report), "--max-missing", "100", "--max-late", "100",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _, stderr = await process.communicate()
        cpu_after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall_before
        stop.set()
        await probe
        if not report.exists():
            raise RuntimeError(f"loadtest failed: {stderr.decode()[-500:]}")
        rows = json.loads(report.read_text())
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    ticks = hub.ticks - ticks_before
    sent = sum(r["sent_frames"] for r in rows)
    return {
        "clients": clients,
        "ok": sum(r["error"] is None for r in rows),
        "cpu_ms_per_caller_second": 1000 * cpu / (clients * duration),
        "cpu_share": cpu / wall,
        "loop_late_p50": percentile(lateness, 50), "loop_late_p99": percentile(lateness, 99),
        "tick_mean_ms": 1000 * (hub.metrics.tick_seconds._sum.get() - tick_sum_before) / max(1, ticks),
        "late": 100 * sum(r["late"] for r in rows) / max(1, sent),
        "missing": 100 * sum(r["missing"] for r in rows) / max(1, sent),
    }


async def run(args) -> None:
    from personaplex.demo import demo_assets
    from personaplex.loading import load_model
    from personaplex.server.serve import start_server, stop_server

    model = load_model(demo_assets(), "cpu")  # the tokenizer and voices; its LM is never stepped
    most = max(args.clients)
    hub = ConversationHub(model, HubOptions(max_conversations=most, max_queue=0, input_timeout_seconds=None),
                          engine=StandInEngine(most, args.step_ms / 1000))
    server = await start_server(hub, host="127.0.0.1", port=0, static_dir=None, opus_workers=args.opus_workers)
    url = f"ws://127.0.0.1:{server.port}/api/chat"
    print(f"{os.cpu_count()} CPUs; stand-in engine step {args.step_ms:g} ms; {args.duration:g} s calls; "
          f"loadtest in {args.processes} process(es); Opus encoding in "
          f"{f'{args.opus_workers} worker process(es)' if args.opus_workers else 'the server process'}", flush=True)
    print("| callers | ok | server CPU ms per caller-second | server CPU share of one core | event loop late p50 / p99 ms "
          "| tick mean ms | late frames | missing frames |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for clients in args.clients:
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            row = await measure(hub, url, clients, args.duration, args.processes)
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
            print(f"| {clients} | {row['ok']} | {row['cpu_ms_per_caller_second']:.1f} | {100 * row['cpu_share']:.0f}% | "
                  f"{row['loop_late_p50']:.1f} / {row['loop_late_p99']:.1f} | {row['tick_mean_ms']:.1f} | "
                  f"{row['late']:.2f}% | {row['missing']:.2f}% |", flush=True)
    finally:
        await stop_server(server, hub)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--step-ms", type=float, default=20.0, help="the stand-in engine's wait per tick")
    parser.add_argument("--processes", type=int, default=1, help="load test processes")
    parser.add_argument("--opus-workers", type=int, default=0,
                        help="processes that encode the agent's audio (the server's --opus-workers; 0: in-process)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the event loop's thread (cProfile) and print where its time goes")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
